"""OpenAI family adapter (also Azure OpenAI and any OpenAI-compatible upstream).

Contract:
- Paths are family-relative (`/v1/...`); the deployment `base_url` already ends in `/v1`.
- The one body rewrite the gateway makes: a streamed chat/completions call without
  `stream_options.include_usage` gets it injected so tokens can be metered, and the extra usage chunk
  (`choices: []`) is removed again before it reaches that client.
- Usage comes from the JSON body, the SSE usage chunk, or Responses' `response.completed`; so do
  the answering model (`model`) and the finish reasons (each choice's `finish_reason`, streamed in
  its last chunk; a Responses answer's `incomplete_details.reason`). Only SSE events that may hold
  them are parsed.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable
from urllib.parse import unquote

import orjson

from config.models import Deployment
from proxy.context import RequestContext
from proxy.errors import GatewayError
from providers.base import (
    Adapter, Decompressor, RateState, SSEReader, UpstreamRequest, UsageTap, forward_request_headers, valid_model,
)

_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion",
               "/v1/embeddings": "embeddings", "/v1/responses": "chat"}
_USAGE_INJECTED = {"/v1/chat/completions", "/v1/completions"}
# An Azure deployment name is templated into the upstream path: letters, digits, '-', '_' and '.', ASCII only.
_AZURE_DEPLOYMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TYPES = {
    "caller_invalid_request": ("invalid_request_error", None),
    "caller_missing_credentials": ("invalid_request_error", "invalid_api_key"),
    "caller_invalid_credentials": ("invalid_request_error", "invalid_api_key"),
    "caller_invalid_signature": ("invalid_request_error", "invalid_api_key"),
    "caller_forbidden": ("permission_error", "model_not_allowed"),
    "caller_not_found": ("invalid_request_error", "model_not_found"),
    "caller_method_not_allowed": ("invalid_request_error", "method_not_allowed"),
    "caller_payload_too_large": ("invalid_request_error", "request_too_large"),
    "policy_rate_limited": ("requests", "rate_limit_exceeded"),
    "policy_concurrency_limited": ("requests", "rate_limit_exceeded"),
    "upstream_rate_limited": ("requests", "rate_limit_exceeded"),
}


class _Tap:
    __slots__ = ("ctx", "sse", "buf", "inflate", "limit")

    def __init__(self, ctx: RequestContext, sse: bool, encoding: str) -> None:
        self.ctx, self.inflate, self.limit = ctx, Decompressor(encoding), 8 * 1024 * 1024
        self.sse = SSEReader(_worth_reading) if sse else None
        self.buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        chunk = self.inflate(chunk)
        if self.sse is None:
            if len(self.buf) < self.limit:
                self.buf += chunk
            return
        for _, data in self.sse.feed(chunk):
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                response = obj.get("response")
                self._read(response if isinstance(response, dict) else obj)

    def finish(self) -> None:
        if self.buf:
            try:
                obj = orjson.loads(bytes(self.buf))
            except orjson.JSONDecodeError:
                return
            if isinstance(obj, dict):
                self._read(obj)

    def _read(self, obj: dict[str, Any]) -> None:
        u = self.ctx.usage
        model = obj.get("model")
        if model.__class__ is str:
            u.response_model = model
        choices = obj.get("choices")
        if choices.__class__ is list:  # chat and completions: one reason per choice (in its last chunk)
            for choice in choices:
                if choice.__class__ is dict:
                    u.finished(choice.get("finish_reason"))
        elif obj.get("incomplete_details").__class__ is dict:  # a Responses API answer cut short says why
            u.finished(obj["incomplete_details"].get("reason"))
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return
        u.input_tokens = usage.get("prompt_tokens", usage.get("input_tokens"))
        u.output_tokens = usage.get("completion_tokens", usage.get("output_tokens", 0 if u.input_tokens is not None else None))
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            u.cached_tokens = details["cached_tokens"]


def _worth_reading(raw: bytes) -> bool:
    """An SSE event that may carry usage or a finish reason; the rest (most chunks) is not parsed."""
    return (b'"usage"' in raw and b'"usage":null' not in raw) or b'"finish_reason":"' in raw \
        or b'"finish_reason": "' in raw


_EVENT_END = re.compile(rb"(\r\n\r\n|\n\n)")


class _StripUsageChunk:
    """Drops the injected usage chunk (`"choices":[]` with usage) from an SSE stream."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def __call__(self, chunk: bytes) -> bytes:
        data = self.buf + chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")  # SSE events may end LF LF or CRLF CRLF
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not end:
            self.buf = data
            return b""
        self.buf = data[end:]
        events = data[:end]
        if b'"choices":[]' not in events and b'"choices": []' not in events:
            return events
        parts = _EVENT_END.split(events)  # [event, separator, event, separator, ..., b""]
        return b"".join(event + sep for event, sep in zip(parts[::2], parts[1::2]) if not _is_usage_chunk(event))

    def flush(self) -> bytes:
        """At the end of the stream: whatever is left (an unterminated last event) goes out as is."""
        rest, self.buf = self.buf, b""
        return b"" if _is_usage_chunk(rest) else rest


def _is_usage_chunk(event: bytes) -> bool:
    """The injected usage chunk: no choices and a usage object. Other choice-less chunks (Azure's
    `prompt_filter_results`, which carry `"usage": null` when usage was asked for) are kept."""
    if b'"usage"' not in event or (b'"choices":[]' not in event and b'"choices": []' not in event):
        return False
    for line in event.splitlines():
        if line.startswith(b"data:"):
            try:
                obj = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            return isinstance(obj, dict) and obj.get("choices") == [] and bool(obj.get("usage"))
    return False


class OpenAIAdapter(Adapter):
    family = "openai"

    def inspect(self, ctx: RequestContext) -> None:
        path = ctx.path
        ctx.operation = _OPERATIONS.get(path, "other")
        if path == "/v1/models" and ctx.method in ("GET", "HEAD"):
            ctx.model_list = True
            return
        if path.startswith("/v1/models/") and ctx.method == "GET":
            ctx.model = valid_model(unquote(path[len("/v1/models/"):]))
            return
        body = ctx.json
        if not isinstance(body, dict):
            if path in _OPERATIONS:
                raise GatewayError("caller_invalid_request", "the request body must be a JSON object")
            return
        if "model" in body or path in _OPERATIONS:
            ctx.model = valid_model(body.get("model"))
        ctx.stream = body.get("stream") is True
        if ctx.stream and path in _USAGE_INJECTED:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                ctx.strip_usage = True
                ctx.body = _inject_include_usage(ctx.body, body)

    def upstream(self, ctx: RequestContext, dep: Deployment) -> UpstreamRequest:
        headers = forward_request_headers(ctx.headers)
        rest = ctx.path[3:]  # drop "/v1": the base_url carries it
        query = ctx.query
        if dep.type == "azure_openai":
            name = dep.deployment_map.get(ctx.model or "", ctx.model or "")
            if not _AZURE_DEPLOYMENT.fullmatch(name):
                raise GatewayError("caller_not_found", "no Azure deployment for this model")
            base = dep.base_url.removesuffix("/openai")
            rest = f"/openai/deployments/{name}{rest}" if ctx.model else f"/openai{rest}"
            version = f"api-version={dep.api_version or '2024-10-21'}"
            query = f"{query}&{version}" if query else version
            headers.append(("api-key", dep.api_key))
            url = base + rest
        else:
            url = dep.base_url + rest
            if dep.api_key:
                headers.append(("authorization", f"Bearer {dep.api_key}"))
        return UpstreamRequest(ctx.method, url + (f"?{query}" if query else ""), headers, ctx.body)

    def tap(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]]) -> UsageTap | None:
        ctype = encoding = b""
        for k, v in headers:
            if k == b"content-type":
                ctype = v
            elif k == b"content-encoding":
                encoding = v
        if b"json" not in ctype and b"event-stream" not in ctype:
            return None
        return _Tap(ctx, b"event-stream" in ctype, encoding.decode("latin-1").strip().lower())

    def stream_filter(self, ctx: RequestContext) -> Callable[[bytes], bytes] | None:
        return _StripUsageChunk() if ctx.strip_usage else None

    def classify(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> str:
        if status == 429 and b"insufficient_quota" in body:
            return "quota"
        return super().classify(status, headers, body)

    def render_error(self, err: GatewayError, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return err.status, [(b"content-type", b"application/json")], orjson.dumps({"error": self._error(err)})

    def error_frame(self, err: GatewayError) -> bytes:
        return b"data: " + orjson.dumps({"error": self._error(err)}) + b"\n\n"

    def _error(self, err: GatewayError) -> dict[str, Any]:
        kind, code = _TYPES.get(err.code, ("server_error" if err.status >= 500 else "invalid_request_error", err.code))
        if err.detail in ("requests", "tokens"):
            kind = err.detail
        return {"message": err.message, "type": kind, "param": None, "code": code}

    def model_list_response(self, models: list[str]) -> bytes:
        now = int(time.time())
        return orjson.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "llm-gateway"} for m in models]})

    def models_from_response(self, body: bytes) -> list[str]:
        data = orjson.loads(body).get("data") or []
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    rate_limit_prefixes = (b"ratelimit", b"x-ratelimit-")

    def rate_limit_headers(self, requests: RateState | None, tokens: RateState | None) -> list[tuple[bytes, bytes]]:
        out = super().rate_limit_headers(requests, tokens)
        if requests:
            out += [(b"x-ratelimit-limit-requests", b"%d" % requests[0]),
                    (b"x-ratelimit-remaining-requests", b"%d" % requests[1]),
                    (b"x-ratelimit-reset-requests", go_duration(requests[2]))]
        if tokens:
            out += [(b"x-ratelimit-limit-tokens", b"%d" % tokens[0]),
                    (b"x-ratelimit-remaining-tokens", b"%d" % tokens[1]),
                    (b"x-ratelimit-reset-tokens", go_duration(tokens[2]))]
        return out


def go_duration(ms: int) -> bytes:
    """OpenAI's reset format: a Go duration such as `120ms`, `1.5s`, `6m0s` (integer arithmetic: exact)."""
    if ms < 1000:
        return b"%dms" % max(ms, 0)
    minutes, rest = divmod(ms, 60000)
    seconds, frac = divmod(rest, 1000)
    text = b"%d.%03d" % (seconds, frac) if frac else b"%d" % seconds
    if frac:
        text = text.rstrip(b"0")
    return b"%dm%bs" % (minutes, text) if minutes else text + b"s"


def _inject_include_usage(raw: bytes, body: dict[str, Any]) -> bytes:
    if "stream_options" not in body:
        start = raw.index(b"{") + 1  # a minimal splice keeps every other byte as sent
        return raw[:start] + b'"stream_options":{"include_usage":true},' + raw[start:]
    options = body["stream_options"] if isinstance(body["stream_options"], dict) else {}
    return orjson.dumps({**body, "stream_options": {**options, "include_usage": True}})
