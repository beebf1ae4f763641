"""Request inspection: read the body once (bounded), parse it, find the model, enforce the allowlist.

Contract:
- The body is read once into `ctx.body`; past `gateway.max_body_bytes` it is a native 413.
- A JSON body that does not parse is a native 400; so is a path segment decoding to `.`/`..`, a
  top-level key spelled twice (`repeated_key`), and a top-level field or header that tries to choose
  the upstream (`api_base`, `base_url`, ...).
- Credential query parameters (`api_key`, `key`, `token`, ...: `providers.base.forward_query`) are
  removed from `ctx.query` here, after auth and before anything is forwarded; the rest stays as sent.
- The family adapter sets `ctx.model`, `ctx.stream` and `ctx.operation` (it may rewrite the body for
  the documented OpenAI `include_usage` case).
- A model outside the principal's allowlist is a native 403.
- `ctx.estimated_tokens` = prompt bytes / 4 + `max_tokens` (or the family's output field; else
  `gateway.model_output_tokens[model]`, else `gateway.default_output_tokens`), the figure rate
  limiting reserves before the real usage is known.
"""
from __future__ import annotations

import json
from typing import Any

import orjson

from config.models import Config
from proxy.context import RequestContext, get_context, read_body
from proxy.errors import GatewayError
from proxy.runtime import Runtime
from providers.base import check_path, forward_query, reject_upstream_pickers

_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")


def _pairs(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return pairs


def repeated_key(body: bytes, parsed: dict[str, Any]) -> str | None:
    """The first top-level key `body` spells more than once, or None. orjson keeps the last value of a
    repeated key while an upstream may keep the first: such a body could be routed on one model and served
    by another. This runs on every JSON body, so cheap proofs of "no repeat" come first:
    - the body is byte for byte what orjson writes for `parsed` (what the SDKs send): nothing was dropped;
    - no ':' spelled as an escape, and as many ':' bytes as that canonical form: every member has its own
      ':', and whitespace, escapes and number spellings add or remove none, so a dropped member would show;
    otherwise (a repeat somewhere, at any depth, an escaped ':' or a body too deep for orjson to write)
    the exact top-level check decides."""
    try:
        canonical = orjson.dumps(parsed)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper than it writes)
        canonical = b""
    if canonical == body:
        return None
    if canonical and body.count(b":") == canonical.count(b":") and (
            b"\\" not in body or b"\\u003" not in body or (b"\\u003a" not in body and b"\\u003A" not in body)):
        return None
    try:
        members = json.loads(body, object_pairs_hook=_pairs)
    except RecursionError:
        raise GatewayError("caller_invalid_request", "the request body nests too deeply") from None
    except ValueError:  # orjson accepted it, so this is not expected; refuse rather than guess
        raise GatewayError("caller_invalid_request", "the request body is not valid JSON") from None
    seen: set[str] = set()
    for key, _ in members:
        if key in seen:
            return key
        seen.add(key)
    return None


def estimate_tokens(ctx: RequestContext, default_output: int) -> int:
    body = ctx.json if isinstance(ctx.json, dict) else {}
    out = next((body[f] for f in _OUTPUT_FIELDS if isinstance(body.get(f), int)), None)
    if out is None:
        cfg = body.get("inferenceConfig") or body.get("options") or {}
        out = cfg.get("maxTokens") or cfg.get("num_predict") if isinstance(cfg, dict) else None
    if ctx.operation in ("embeddings", "count_tokens"):
        out = 0
    return max(1, len(ctx.body) // 4) + (out if isinstance(out, int) and out >= 0 else default_output)


class InspectMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.max_body = config.gateway.max_body_bytes
        self.default_output = config.gateway.default_output_tokens
        self.per_model = {m: int(v) for m, v in config.gateway.model_output_tokens.items()}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        check_path(ctx.path)
        ctx.query = forward_query(ctx.query)  # after auth (SigV4 signs the query as sent), before any upstream
        await read_body(ctx, receive, self.max_body)
        if ctx.body:
            ctype = (ctx.header(b"content-type") or "").lower()
            declared_json = "json" in ctype
            # Ollama's own docs post JSON with curl's default form content type: sniff the body too.
            if declared_json or ("multipart" not in ctype and ctx.body.lstrip()[:1] in (b"{", b"[")):
                try:
                    ctx.json = orjson.loads(ctx.body)
                except orjson.JSONDecodeError:
                    if declared_json or ctx.family != "openai":
                        raise GatewayError("caller_invalid_request", "the request body is not valid JSON") from None
                if ctx.json.__class__ is dict:
                    repeated = repeated_key(ctx.body, ctx.json)
                    if repeated is not None:
                        raise GatewayError("caller_invalid_request",
                                           f"the request body repeats the top-level key {repeated[:64]!r}")
        reject_upstream_pickers(ctx)
        ctx.adapter.inspect(ctx)
        principal = ctx.principal
        if principal is not None and not principal.allows(ctx.family, ctx.model):
            if principal.families and ctx.family not in principal.families:
                raise GatewayError("caller_forbidden", f"this key may not use the {ctx.family} API")
            raise GatewayError("caller_forbidden", f"this key may not use model {ctx.model!r}")
        ctx.estimated_tokens = estimate_tokens(ctx, self.per_model.get(ctx.model or "", self.default_output))
        await self.app(scope, receive, send)
