"""Anthropic Messages family adapter.

Contract:
- The client key arrives as `x-api-key` (SDK <= 1.x) or `Authorization: Bearer` (SDK 2.x); the
  upstream always gets the deployment key as `x-api-key`. `anthropic-version` and `anthropic-beta`
  pass through exactly as received.
- Usage: input = input_tokens + cache_creation + cache_read (Anthropic's input excludes cache);
  streamed usage comes from `message_start` and the last (cumulative) `message_delta`. The
  answering model and `stop_reason` come from the message (streamed: `message_start`, and the
  last `message_delta`'s `delta.stop_reason`).
- Errors use `{"type":"error","error":{"type","message"},"request_id"}`; after the first byte an
  `event: error` frame.
"""
from __future__ import annotations

import time
from urllib.parse import unquote

import orjson

from typing import Any, Callable

from config.models import Deployment
from proxy.context import RequestContext
from proxy.errors import GatewayError
from providers import anthropic_bedrock as translate
from providers.bedrock import BedrockAdapter
from providers.base import (
    Adapter, Decompressor, RateState, SSEReader, UpstreamRequest, UsageTap, bearer, forward_request_headers,
    valid_model,
)

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                 403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                 502: "api_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def read_usage(usage: object, into: RequestContext) -> None:
    if not isinstance(usage, dict):
        return
    u = into.usage
    cache = (usage.get("cache_creation_input_tokens") or 0) + (usage.get("cache_read_input_tokens") or 0)
    if usage.get("input_tokens") is not None:
        u.input_tokens = usage["input_tokens"] + cache
        u.cached_tokens = cache
    if usage.get("output_tokens") is not None:
        u.output_tokens = usage["output_tokens"]


def read_message(message: dict[str, Any], into: RequestContext) -> None:
    """A Messages API message (or a stream's `message_start` one): usage, model and stop reason."""
    read_usage(message.get("usage"), into)
    if message.get("model").__class__ is str:
        into.usage.response_model = message["model"]
    into.usage.finished(message.get("stop_reason"))


class _Tap:
    __slots__ = ("ctx", "sse", "buf", "inflate")

    def __init__(self, ctx: RequestContext, sse: bool, encoding: str) -> None:
        self.ctx, self.inflate = ctx, Decompressor(encoding)
        self.sse = SSEReader(lambda raw: b"usage" in raw) if sse else None
        self.buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        chunk = self.inflate(chunk)
        if self.sse is None:
            if len(self.buf) < 8 * 1024 * 1024:
                self.buf += chunk
            return
        for _, data in self.sse.feed(chunk):
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if obj.get("type") == "message_start" and isinstance(obj.get("message"), dict):
                read_message(obj["message"], self.ctx)
            elif obj.get("type") == "message_delta":
                read_usage(obj.get("usage"), self.ctx)
                if isinstance(obj.get("delta"), dict) and obj["delta"].get("stop_reason").__class__ is str:
                    self.ctx.usage.finish_reasons = (obj["delta"]["stop_reason"],)  # the last one is the message's

    def finish(self) -> None:
        if not self.buf:
            return
        try:
            obj = orjson.loads(bytes(self.buf))
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict):
            if "input_tokens" in obj and obj.get("type") != "message":  # count_tokens answer
                return
            read_message(obj, self.ctx)


_REQUESTS_HEADERS = (b"anthropic-ratelimit-requests-limit", b"anthropic-ratelimit-requests-remaining",
                     b"anthropic-ratelimit-requests-reset")
_TOKENS_HEADERS = (b"anthropic-ratelimit-tokens-limit", b"anthropic-ratelimit-tokens-remaining",
                   b"anthropic-ratelimit-tokens-reset")


class AnthropicAdapter(Adapter):
    family = "anthropic"

    def credential(self, ctx: RequestContext) -> str | None:
        key = ctx.header(b"x-api-key")
        return key.strip() if key else bearer(ctx)

    def inspect(self, ctx: RequestContext) -> None:
        path = ctx.path
        if path == "/v1/models" and ctx.method in ("GET", "HEAD"):
            ctx.model_list = True
            return
        if path.startswith("/v1/models/") and ctx.method == "GET":
            ctx.model = valid_model(unquote(path[len("/v1/models/"):]))
            return
        body = ctx.json
        known = path in ("/v1/messages", "/v1/messages/count_tokens")
        if not isinstance(body, dict):
            if known and ctx.method == "POST":
                raise GatewayError("caller_invalid_request", "the request body must be a JSON object")
            return
        if "model" in body or known:
            ctx.model = valid_model(body.get("model"))
        if path == "/v1/messages":
            ctx.operation = "chat"
            ctx.stream = body.get("stream") is True
        elif path == "/v1/messages/count_tokens":
            ctx.operation = "count_tokens"

    def __init__(self, bedrock: BedrockAdapter | None = None) -> None:
        self.bedrock = bedrock or BedrockAdapter()  # signs translated calls to Bedrock deployments

    def upstream(self, ctx: RequestContext, dep: Deployment) -> UpstreamRequest:
        if dep.type == "bedrock":
            return translate.build_request(ctx, dep, self.bedrock.credentials_for(dep))
        headers = forward_request_headers(ctx.headers)
        if dep.api_key:
            headers.append(("x-api-key", dep.api_key))
        url = dep.base_url + ctx.path + (f"?{ctx.query}" if ctx.query else "")
        return UpstreamRequest(ctx.method, url, headers, ctx.body)

    def stream_filter(self, ctx: RequestContext) -> Callable[[bytes], bytes] | None:
        if ctx.deployment is not None and ctx.deployment.type == "bedrock":
            return translate.EventStreamToSSE()
        return None

    def response_headers(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]], streaming: bool) -> list[tuple[bytes, bytes]]:
        if ctx.deployment is not None and ctx.deployment.type == "bedrock":
            return translate.response_headers(headers, streaming)
        return headers

    def error_response(self, ctx: RequestContext, status: int, headers: list[tuple[bytes, bytes]],
                       body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if ctx.deployment is not None and ctx.deployment.type == "bedrock":
            return translate.error_body(status, headers, body, ctx.request_id)
        return status, headers, body

    def tap(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]]) -> UsageTap | None:
        if ctx.deployment is not None and ctx.deployment.type == "bedrock":
            return self.bedrock.tap(ctx, headers)
        ctype = encoding = b""
        for k, v in headers:
            if k == b"content-type":
                ctype = v
            elif k == b"content-encoding":
                encoding = v
        if b"json" not in ctype and b"event-stream" not in ctype:
            return None
        return _Tap(ctx, b"event-stream" in ctype, encoding.decode("latin-1").strip().lower())

    def _error(self, err: GatewayError) -> dict[str, Any]:
        kind = _STATUS_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": err.message}}

    def render_error(self, err: GatewayError, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        body = {**self._error(err), "request_id": request_id}
        return err.status, [(b"content-type", b"application/json"), (b"request-id", request_id.encode())], orjson.dumps(body)

    def error_frame(self, err: GatewayError) -> bytes:
        return b"event: error\ndata: " + orjson.dumps(self._error(err)) + b"\n\n"

    def model_list_response(self, models: list[str]) -> bytes:
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2024-01-01T00:00:00Z"} for m in models]
        return orjson.dumps({"data": data, "has_more": False,
                             "first_id": models[0] if models else None, "last_id": models[-1] if models else None})

    def models_from_response(self, body: bytes) -> list[str]:
        data = orjson.loads(body).get("data") or []
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    # every anthropic-ratelimit-* header: the upstream's input/output-token ones would describe another account
    rate_limit_prefixes = (b"ratelimit", b"anthropic-ratelimit-")

    def rate_limit_headers(self, requests: RateState | None, tokens: RateState | None) -> list[tuple[bytes, bytes]]:
        out = super().rate_limit_headers(requests, tokens)
        now = time.time()
        for names, state in ((_REQUESTS_HEADERS, requests), (_TOKENS_HEADERS, tokens)):
            if state:
                # RFC 3339 in UTC, whole seconds (truncated, as the API writes them)
                reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + state[2] / 1000)).encode()
                out += [(names[0], b"%d" % state[0]), (names[1], b"%d" % state[1]), (names[2], reset)]
        return out
