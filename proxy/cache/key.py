"""Which requests the response cache serves, the key of each, and the client's cache controls.

Contract (`CachePolicy(config).request(ctx)`, once per request, after inspection):
- None (the cache is bypassed) unless the call is a generation or embedding call (`POST`: OpenAI chat
  completions, completions, embeddings, responses; Anthropic messages; Bedrock invoke, converse and their
  stream variants; Ollama chat, generate, embed, embeddings) with a JSON body, for a model in
  `cache.models` (empty: any), from a key with the cache on (`auth.keys[].cache`, or a managed key's
  metadata `cache=false`), and not state-dependent (an OpenAI body with `previous_response_id`,
  `background: true`, `store: true` or `conversation`), and unless `Cache-Control: no-store`.
- The key is a 128-bit BLAKE2b of: the scope id (`key`: the key id; `team`: the key's `metadata.team`,
  else the key id; `global`: nothing), the namespace, the family, the family-relative raw path (the
  model is in it, or in the body) and query, the request headers that change the answer
  (`accept-encoding` always; Anthropic `anthropic-version`, `anthropic-beta`; Bedrock `accept`,
  `content-type` and the `x-amzn-bedrock-*` members that shape the answer), and the canonical body
  (parsed JSON re-serialized with sorted keys at every level: whitespace and key order do not matter;
  the stream flag is in it).
- Controls: `Cache-Control` directives (every field line, case-insensitive): `no-store` (bypass),
  `no-cache` (do not read, do write), `max-age=N` (only an entry at most N s old; a malformed value is
  ignored, a huge one capped); unknown directives are ignored. `x-gateway-cache-ttl: N` (whole
  seconds, 1..`MAX_TTL`) and `x-gateway-cache-namespace: NAME` (`NAMESPACE`: 1-64 of `A-Za-z0-9._-`)
  are a native 400 when malformed, whatever else the request says.
- Redis keys (all under the `{llmgw}` hash tag): `llmgw:{llmgw}:cache:e:<scope>:<ns>:<digest>` the entry
  (scope `k.<key id>`, `t.<team>`, `g`, or `k~`/`t~` + a hash for an id with other characters; ns `-`
  or `n.<namespace>`), `...:cache:l:<digest>` the single-flight lock, `...:cache:w:<digest>` "someone
  waits" (the leader publishes only then).
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

import orjson

from config.models import Config
from proxy.context import RequestContext
from proxy.errors import GatewayError
from proxy.state.store import TAG

PREFIX = f"llmgw:{TAG}:cache:"
MAX_TTL = 365 * 86400
MAX_AGE_CAP = 10 * 365 * 86400
NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DIGITS = re.compile(r"[0-9]+")
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PATHS = {
    "openai": frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}),
    "anthropic": frozenset({"/v1/messages"}),
    "ollama": frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"}),
}
_BEDROCK_OPS = frozenset({"invoke", "invoke-with-response-stream", "converse", "converse-stream"})
_VARY = {
    "openai": (b"accept-encoding",),
    "ollama": (b"accept-encoding",),
    "anthropic": (b"accept-encoding", b"anthropic-version", b"anthropic-beta"),
    "bedrock": (b"accept-encoding", b"accept", b"content-type", b"x-amzn-bedrock-accept", b"x-amzn-bedrock-trace",
                b"x-amzn-bedrock-guardrailidentifier", b"x-amzn-bedrock-guardrailversion",
                b"x-amzn-bedrock-performanceconfig-latency", b"x-amzn-bedrock-service-tier"),
}
_OFF = frozenset({"false", "off", "no", "0"})


@dataclass(slots=True)
class CacheRequest:
    """One request's cache key and controls."""

    digest: str
    entry_key: str  # the entry's Redis key (also the embedded store's key)
    scope: str  # `k.<id>`, `t.<team>`, `g` (a segment of entry_key)
    namespace: str  # `-` or `n.<name>`
    read: bool  # False: `no-cache`
    max_age_ms: int  # -1: any age
    ttl_ms: int

    @property
    def lock_key(self) -> str:
        return f"{PREFIX}l:{self.digest}"

    @property
    def waiters_key(self) -> str:
        return f"{PREFIX}w:{self.digest}"


@functools.lru_cache(maxsize=4096)  # a key's (or team's) tag, once per id
def _tag(kind: str, value: str) -> str:
    if _SAFE_ID.fullmatch(value):
        return f"{kind}.{value}"
    return f"{kind}~{hashlib.sha256(value.encode()).hexdigest()[:16]}"


def scope_tag(kind: str, value: str) -> str:
    """The entry key segment of a scope id (`key_id` for `k`, a team for `t`): what purges match."""
    return _tag(kind, value)


def _latest(model: str) -> str:
    return model if ":" in model.rpartition("/")[2] else model + ":latest"


def _bad(message: str) -> GatewayError:
    return GatewayError("caller_invalid_request", message)


class CachePolicy:
    def __init__(self, config: Config) -> None:
        c = config.cache
        self.scope = c.scope
        self.models = frozenset(c.models) | frozenset(_latest(m) for m in c.models)
        self.ttl_ms = max(1000, int(c.ttl * 1000))
        self.off_keys = frozenset(k.id for k in config.auth.keys if not k.cache)

    def request(self, ctx: RequestContext) -> CacheRequest | None:
        """The request's key and controls, or None when the cache does not apply (bypass)."""
        found = ctx.header_map
        if found is None:
            ctx.header(b"cache-control")  # builds the map
            found = ctx.header_map or {}
        ttl_ms, namespace = self.ttl_ms, "-"
        # The gateway's own headers are checked first: a malformed one is a 400 whatever else applies.
        if b"x-gateway-cache-ttl" in found:
            ttl = found[b"x-gateway-cache-ttl"].strip()
            if not (ttl.isdigit() and len(ttl) <= 9 and 1 <= int(ttl) <= MAX_TTL):
                raise _bad(f"x-gateway-cache-ttl must be a whole number of seconds from 1 to {MAX_TTL}")
            ttl_ms = int(ttl) * 1000
        if b"x-gateway-cache-namespace" in found:
            name = found[b"x-gateway-cache-namespace"].decode("latin-1")
            if not NAMESPACE.fullmatch(name):
                raise _bad("x-gateway-cache-namespace must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
            namespace = "n." + name
        read, max_age = True, -1
        if b"cache-control" in found:
            store, read, max_age = cache_control([v for k, v in ctx.headers if k == b"cache-control"])
            if not store:
                return None
        if not self._applies(ctx):
            return None
        p = ctx.principal
        key_id = p.key_id if p is not None else "anonymous"
        if self.scope == "global":
            scope = "g"
        elif self.scope == "team" and p is not None and p.metadata.get("team"):
            scope = _tag("t", p.metadata["team"])
        else:
            scope = _tag("k", key_id)
        try:
            canonical = orjson.dumps(ctx.json, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # nested deeper than orjson writes: not worth a key
            return None
        # NUL separates the parts: no path, query or header value may hold one, and the body comes last
        h = hashlib.blake2b(f"{scope}\0{namespace}\0{ctx.family}\0{ctx.path}\0{ctx.query}".encode("latin-1"),
                            digest_size=16)
        for header in _VARY[ctx.family]:
            h.update(b"\0" + found.get(header, b""))
        h.update(b"\0")
        h.update(canonical)
        digest = h.hexdigest()
        return CacheRequest(digest, f"{PREFIX}e:{scope}:{namespace}:{digest}", scope, namespace, read, max_age, ttl_ms)

    def _applies(self, ctx: RequestContext) -> bool:
        if ctx.method != "POST" or ctx.json is None or ctx.model_list:
            return False
        family = ctx.family
        if family == "bedrock":
            parts = ctx.path.split("/")
            if len(parts) != 4 or parts[3] not in _BEDROCK_OPS:
                return False
        elif ctx.path not in _PATHS[family]:
            return False
        if self.models and ctx.model not in self.models and _latest(ctx.model or "") not in self.models:
            return False
        p = ctx.principal
        if p is not None and (p.key_id in self.off_keys or str(p.metadata.get("cache", "")).lower() in _OFF):
            return False
        body = ctx.json
        if family == "openai" and body.__class__ is dict and (
                body.get("store") is True or body.get("background") is True
                or body.get("previous_response_id") is not None or body.get("conversation") is not None):
            return False  # the answer depends on state upstream, or creates it
        return True


def cache_control(values: list[bytes]) -> tuple[bool, bool, int]:
    """(store allowed, read allowed, max age in ms or -1) from `Cache-Control` request field lines."""
    store, read, max_age = True, True, -1
    for value in values:
        for directive in value.decode("latin-1").split(","):
            name, _, arg = directive.strip().partition("=")
            name = name.strip().lower()
            if name == "no-store":
                store = read = False
            elif name == "no-cache":
                read = False
            elif name == "max-age":
                arg = arg.strip().strip('"')
                if _DIGITS.fullmatch(arg):  # malformed (negative, empty, not a number): ignored, as RFC 9111 allows
                    seconds = min(int(arg[:12]), MAX_AGE_CAP)  # a huge value: capped, never parsed whole
                    max_age = seconds * 1000 if max_age < 0 else min(max_age, seconds * 1000)
    return store, read, max_age
