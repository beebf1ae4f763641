"""What every provider adapter is: the seam between the gateway kernel and one API family.

Contract: an `Adapter` knows, for its inbound family,
- how the client presents its key (`credential`);
- where the model is and whether the call streams (`inspect`);
- how to rewrite the request for one deployment (`upstream`; called per attempt);
- how to read usage from a body or stream without touching the bytes (`tap`);
- how to classify an upstream failure (`classify`);
- how to render a gateway error natively, before (`render_error`) and after (`error_frame`) the
  first byte, and how to answer a model list.
Adapters never import middlewares; they import only the kernel's context and error types.
"""
from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol
from urllib.parse import unquote, unquote_plus

from config.models import Deployment
from proxy.context import RequestContext
from proxy.errors import GatewayError

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# Never forwarded upstream: client credentials and framing we recompute.
_REQUEST_DROP = HOP_BY_HOP | {
    b"host", b"content-length", b"authorization", b"x-api-key", b"api-key", b"x-amz-date",
    b"x-amz-security-token", b"x-amz-content-sha256", b"expect", b"accept-encoding", b"cookie",
    b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip",
}
_TAPPABLE_ENCODINGS = ("gzip", "deflate", "identity")
# Query parameters that carry a credential (compared lower-cased, after one percent-decoding): never forwarded,
# never read as the gateway key. "key" and "token" are in every one of them: a cheap first test.
CREDENTIAL_QUERY_PARAMS = frozenset({"api_key", "api-key", "key", "access_token", "token"})
UPSTREAM_PICKERS = frozenset({"api_base", "api-base", "base_url", "base-url", "azure_endpoint", "api_key"})
# Compared with case, '-' and '_' folded, so `API_BASE`, `baseUrl` or `azure-endpoint` are refused as well.
_PICKER_BODY = frozenset({"apibase", "baseurl", "azureendpoint", "apikey"})
_PICKER_HEADERS = frozenset({"apibase", "baseurl", "azureendpoint"})
# A header value may hold visible ASCII, space and tab only: CR, LF, NUL and other controls could split or
# smuggle a request upstream, and bytes past 0x7f cannot be relayed faithfully (RFC 9110 obs-text).
_BAD_VALUE = re.compile(rb"[^\t\x20-\x7e]")

# (limit, remaining, reset in ms, scope name) of the most constraining scope
RateState = tuple[int, int, int, str]
Classification = str  # "ok" | "transient" | "rate_limited" | "quota" | "credential" | "caller"


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


class UsageTap(Protocol):
    def feed(self, chunk: bytes) -> None: ...
    def finish(self) -> None: ...


def connection_listed(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    names: set[bytes] = set()
    for key, value in headers:
        if key == b"connection":
            names.update(p.strip().lower() for p in value.split(b",") if p.strip())
    return frozenset(names)


def forward_request_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Client headers minus hop-by-hop, credentials, framing and `x-gateway-*`."""
    listed = connection_listed(headers)
    out: list[tuple[str, str]] = []
    accept: str | None = None
    for key, value in headers:
        if key in _REQUEST_DROP or key in listed or key.startswith(b"x-gateway-"):
            if key == b"accept-encoding":
                accept = value.decode("latin-1")
            continue
        out.append((key.decode("latin-1"), value.decode("latin-1")))
    # Only ask for encodings the usage tap can read; the bytes still pass through compressed. Always say so
    # explicitly: otherwise the HTTP client's default (gzip, deflate) would reach a client that never asked.
    kept = [p.strip() for p in (accept or "").split(",") if p.split(";")[0].strip().lower() in _TAPPABLE_ENCODINGS]
    out.append(("accept-encoding", ", ".join(kept) if kept else "identity"))
    return out


def forward_query(query: str) -> str:
    """The raw query string minus credential parameters (`CREDENTIAL_QUERY_PARAMS`, also as `name[]`); everything
    else is kept byte for byte, in order (empty pieces and odd encodings included)."""
    if not query:
        return query
    folded = query.lower()
    if "key" not in folded and "token" not in folded and "%" not in folded:
        return query  # the common case: no parameter name can spell a credential
    kept = [piece for piece in query.split("&")
            if unquote_plus(piece.partition("=")[0]).partition("[")[0].strip().lower() not in CREDENTIAL_QUERY_PARAMS]
    return "&".join(kept)


# Response headers that never reach the client:
# - Date and Server: the gateway's own HTTP server writes them; relaying the upstream's would send them twice;
# - account- or session-identifying headers of the provider account behind the gateway: cookies (`set-cookie`,
#   e.g. Cloudflare's `__cf_bm` on api.openai.com), `openai-project`, and AWS `x-amz-*` headers (credential
#   scope, security tokens, edge ids), except the allowlisted ones below. `openai-organization`,
#   `anthropic-organization-id`, `x-amzn-requestid` and every `x-amzn-*` Bedrock header pass (request ids,
#   token counts and error types the SDKs read).
_RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server", b"set-cookie", b"set-cookie2", b"openai-project",
                               b"www-authenticate", b"proxy-authenticate"}
_RESPONSE_DROP_PREFIXES = (b"x-amz-",)
_RESPONSE_KEEP = frozenset({b"x-amz-retry-after", b"x-amz-request-id"})


def _dropped_response_header(name: bytes) -> bool:
    return name in _RESPONSE_DROP or (name.startswith(_RESPONSE_DROP_PREFIXES) and name not in _RESPONSE_KEEP)


def forward_response_headers(headers: list[tuple[bytes, bytes]], *, drop_length: bool,
                             replaced: tuple[bytes, ...] = ()) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers a client may see. `replaced`: name prefixes the gateway writes
    itself on this response (its rate-limit headers): the upstream's own are dropped, so a client
    never reads two `x-ratelimit-remaining-requests` (httpx would join them into "9, 41")."""
    listed = connection_listed(headers)
    return [
        (k, v) for k, v in headers
        if not _dropped_response_header(k) and k not in listed and not (drop_length and k == b"content-length")
        and not (replaced and k.startswith(replaced))
    ]


def bearer(ctx: RequestContext) -> str | None:
    value = ctx.header(b"authorization")
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def check_path(path: str) -> None:
    """No segment may decode (once or twice) to '.' or '..', nor smuggle a NUL, a control or a backslash;
    an encoded slash (`%2F`) may not hide a dot segment either."""
    if path.isascii() and path.isprintable() and "%" not in path and "\\" not in path and "/." not in path:
        return  # the common case: nothing encoded, no dot segment, no control character
    for segment in path.split("/"):
        once = unquote(segment)
        for decoded in (once, unquote(once)):
            if any(c < " " or c == "\x7f" for c in decoded) or "\\" in decoded \
                    or any(piece in (".", "..") for piece in decoded.split("/")):
                raise GatewayError("caller_invalid_request", "invalid path segment")


def _folded(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    """400 for a header value with CR, LF, NUL, another control or a non-ASCII byte (never forwarded)."""
    if _BAD_VALUE.search(b" ".join([b" ".join(pair) for pair in headers])):  # one scan for the common case
        raise GatewayError("caller_invalid_request", "header values must be printable ASCII")


def reject_upstream_pickers(ctx: RequestContext) -> None:
    """A client may never choose the upstream: no top-level body field or header naming one (the nested data
    of a request, such as tool schemas, is left alone). Header values are checked here as well."""
    check_headers(ctx.headers)
    if isinstance(ctx.json, dict):
        for key in ctx.json:
            # every refused name contains one of these: fold only the few keys that might be one
            if isinstance(key, str) and any(part in key.lower() for part in ("base", "endpoint", "key")) \
                    and _folded(key) in _PICKER_BODY:
                raise GatewayError("caller_invalid_request",
                                   f"field {key!r} is not allowed: upstreams come from the gateway config")
    for key, _ in ctx.headers:
        if (b"base" in key or b"endpoint" in key) and _folded(key.decode("latin-1")) in _PICKER_HEADERS:
            raise GatewayError("caller_invalid_request",
                               f"header {key.decode('latin-1')!r} is not allowed: upstreams come from the gateway config")


class Decompressor:
    """A side copy for the tap: inflates gzip/deflate so usage can be read; the client gets the raw bytes."""

    __slots__ = ("_obj",)

    def __init__(self, encoding: str) -> None:
        self._obj = zlib.decompressobj(47 if encoding == "gzip" else 15) if encoding in ("gzip", "deflate") else None

    def __call__(self, chunk: bytes) -> bytes:
        if self._obj is None:
            return chunk
        try:
            return self._obj.decompress(chunk)
        except zlib.error:
            self._obj = None
            return b""


class SSEReader:
    """Split an SSE byte stream into (event name, data) pairs, whatever the chunk boundaries."""

    __slots__ = ("_buf", "_wanted")

    def __init__(self, wanted: Callable[[bytes], bool]) -> None:
        self._buf = b""
        self._wanted = wanted

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        data = self._buf + chunk if self._buf else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        *events, self._buf = data.split(b"\n\n")
        out: list[tuple[bytes, bytes]] = []
        for raw in events:
            if not self._wanted(raw):
                continue
            name, payload = b"", []
            for line in raw.split(b"\n"):
                if line.startswith(b"event:"):
                    name = line[6:].strip()
                elif line.startswith(b"data:"):
                    payload.append(line[5:].lstrip(b" "))
            out.append((name, b"\n".join(payload)))
        return out


_MODEL_SAFE = re.compile(r"^[A-Za-z0-9._:/@+-]{1,256}$")


def valid_model(model: object) -> str:
    if not isinstance(model, str) or not _MODEL_SAFE.fullmatch(model):
        raise GatewayError("caller_invalid_request", "model must be a non-empty model name")
    return model


class Adapter:
    """Base adapter; one subclass per inbound family."""

    family: str = ""
    operations: dict[str, str] = {}
    # Name prefixes of the rate-limit headers `rate_limit_headers` writes (IETF `RateLimit*` here).
    rate_limit_prefixes: tuple[bytes, ...] = (b"ratelimit",)

    def credential(self, ctx: RequestContext) -> str | None:
        return bearer(ctx)

    def inspect(self, ctx: RequestContext) -> None:
        raise NotImplementedError

    def upstream(self, ctx: RequestContext, dep: Deployment) -> UpstreamRequest:
        raise NotImplementedError

    def tap(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]]) -> UsageTap | None:
        return None

    def stream_filter(self, ctx: RequestContext) -> Callable[[bytes], bytes] | None:
        return None

    def response_headers(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]],
                         streaming: bool) -> list[tuple[bytes, bytes]]:
        """Rewrite upstream response headers (only for cross-family deployments)."""
        return headers

    def error_response(self, ctx: RequestContext, status: int, headers: list[tuple[bytes, bytes]],
                       body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Rewrite an upstream error response (only for cross-family deployments)."""
        return status, headers, body

    def classify(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Classification:
        if status < 400:
            return "ok"
        if status == 429:
            return "rate_limited"
        if status in (408, 500, 502, 503, 504, 529):
            return "transient"
        if status in (401, 403):
            return "credential"
        return "caller"

    def stream_verdict(self, held: bytes) -> str:
        """Judge the first events of a stream before committing: "ok", "error" or "wait".

        SSE default: an `error` event (or a data object with a top-level `error`) is an error; two
        non-ping events mean the stream is producing, so it is healthy.
        """
        events = 0
        for raw in held.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
            if b"event: ping" in raw or b"event:ping" in raw or not raw.strip():
                continue
            if raw.startswith(b"event: error") or raw.startswith(b"event:error") or b'data: {"error"' in raw \
                    or b'data:{"error"' in raw or b'"type":"error"' in raw[:80] or b'"type": "error"' in raw[:80]:
                return "error"
            events += 1
            if events >= 2 or b"[DONE]" in raw:
                return "ok"
        return "wait"

    def render_error(self, err: GatewayError, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        raise NotImplementedError

    def error_frame(self, err: GatewayError) -> bytes:
        raise NotImplementedError

    def model_list_response(self, models: list[str]) -> bytes:
        raise NotImplementedError

    def models_from_response(self, body: bytes) -> list[str]:
        return []

    def rate_limit_headers(self, requests: RateState | None, tokens: RateState | None) -> list[tuple[bytes, bytes]]:
        """IETF RateLimit-Policy / RateLimit (draft-11) for the most constraining scope; families add theirs.
        Bytes formatting throughout: this runs on every limited response."""
        if requests and tokens:
            return [(b"ratelimit-policy", _both_policy(requests[0], tokens[0])),
                    (b"ratelimit", b'"requests";r=%d;t=%d, "tokens";r=%d;t=%d'
                     % (requests[1], -(-requests[2] // 1000), tokens[1], -(-tokens[2] // 1000)))]
        if requests:
            return [(b"ratelimit-policy", b'"requests";q=%d;w=60' % requests[0]),
                    (b"ratelimit", b'"requests";r=%d;t=%d' % (requests[1], -(-requests[2] // 1000)))]
        if tokens:
            return [(b"ratelimit-policy", b'"tokens";q=%d;w=60;llmgw-unit="tokens"' % tokens[0]),
                    (b"ratelimit", b'"tokens";r=%d;t=%d' % (tokens[1], -(-tokens[2] // 1000)))]
        return []


@functools.lru_cache(maxsize=1024)
def _both_policy(rpm: int, tpm: int) -> bytes:
    """RateLimit-Policy for requests and tokens: it changes only with the limits, so it is made once."""
    return b'"requests";q=%d;w=60, "tokens";q=%d;w=60;llmgw-unit="tokens"' % (rpm, tpm)
