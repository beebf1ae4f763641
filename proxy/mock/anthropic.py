"""Anthropic Messages wire format for the mock provider (deployment base_url `http://host:port`).

Contract: `handle(ex, path)` serves POST /v1/messages (JSON, or SSE with `event:` lines when
"stream" is true: message_start, content_block_start, ping, content_block_delta x N,
content_block_stop, message_delta with cumulative usage, message_stop), POST
/v1/messages/count_tokens -> {"input_tokens": N}, GET /v1/models and /v1/models/{id}; False
otherwise. Usage: input_tokens = len(body)//4 (min 1), output_tokens = words emitted, cache fields 0.
`message_json`, `stream_events` and `usage` are reused by the Bedrock invoke routes.
`error(status, message, kind)` renders `{"type":"error","error":{type, message}}`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson

if TYPE_CHECKING:
    from proxy.mock.app import Exchange

REQUEST_ID_HEADER = b"request-id"
# The provider account's own limits, on every response as api.anthropic.com sends them.
ACCOUNT_HEADERS = [(b"anthropic-ratelimit-requests-limit", b"4000"),
                   (b"anthropic-ratelimit-requests-remaining", b"3999"),
                   (b"anthropic-ratelimit-requests-reset", b"2026-01-01T00:00:00Z"),
                   (b"anthropic-ratelimit-tokens-limit", b"2000000"),
                   (b"anthropic-ratelimit-tokens-remaining", b"1999990"),
                   (b"anthropic-ratelimit-tokens-reset", b"2026-01-01T00:00:00Z"),
                   (b"anthropic-ratelimit-input-tokens-limit", b"1600000"),
                   (b"anthropic-ratelimit-input-tokens-remaining", b"1599990"),
                   (b"anthropic-ratelimit-input-tokens-reset", b"2026-01-01T00:00:00Z")]
SSE = b"text/event-stream; charset=utf-8"
DEFAULT_MODELS = ["claude-sonnet-4-5", "claude-3-5-haiku-20241022", "claude-3-sonnet-20240229"]
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
          403: "permission_error", 404: "not_found_error", 413: "request_too_large",
          429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}


def error(status: int, message: str, kind: str | None = None) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    err_type = kind or _TYPES.get(status, "overloaded_error" if status == 503 else "api_error")
    return orjson.dumps({"type": "error", "error": {"type": err_type, "message": message}}), []


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": output_tokens, "service_tier": "standard"}


def message_json(msg_id: str, model: str, text: str, n_in: int, n_out: int) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": usage(n_in, n_out)}


def stream_events(msg_id: str, model: str, pieces: list[str], n_in: int,
                  n_out: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The native stream as (head, deltas, tail) event dicts; content_block_start rides with delta 0."""
    start = message_json(msg_id, model, "", n_in, 1)
    start["content"], start["stop_reason"] = [], None
    head: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    deltas: list[dict[str, Any]] = [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}} for p in pieces]
    tail: list[dict[str, Any]] = [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {k: v for k, v in usage(n_in, n_out).items() if k != "service_tier"}},
        {"type": "message_stop"}]
    return head, deltas, tail


def _sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


_BLOCK_START = _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
_PING = _sse({"type": "ping"})


async def _messages(ex: "Exchange") -> None:
    req = ex.json_body()
    model = str(req.get("model") or DEFAULT_MODELS[0])
    pieces, n_out = ex.completion(model)
    n_in, msg_id = ex.input_tokens, "msg_" + ex.request_id[4:]
    if not req.get("stream"):
        await ex.json(message_json(msg_id, model, "".join(pieces), n_in, n_out))
        return
    head, deltas, tail = stream_events(msg_id, model, pieces, n_in, n_out)
    frames = [_sse(e) for e in deltas]
    frames[0] = _BLOCK_START + _PING + frames[0]
    err_type = ex.opts.stream_error_type or "overloaded_error"
    err = _sse({"type": "error", "error": {"type": err_type, "message": "simulated mid-stream error"}})
    await ex.stream(SSE, [_sse(e) for e in head], frames, lambda: [_sse(e) for e in tail], err,
                    [(b"cache-control", b"no-cache")])


def _model(model_id: str) -> dict[str, Any]:
    name = model_id.replace("-", " ").title()
    return {"type": "model", "id": model_id, "display_name": name, "created_at": "2025-02-19T00:00:00Z"}


async def handle(ex: "Exchange", path: str) -> bool:
    if ex.method == "POST":
        if path == "/v1/messages":
            await _messages(ex)
            return True
        if path == "/v1/messages/count_tokens":
            ex.json_body()
            await ex.json({"input_tokens": ex.input_tokens})
            return True
        return False
    if ex.method in ("GET", "HEAD"):
        if path == "/v1/models":
            ids = ex.models(DEFAULT_MODELS)
            await ex.json({"data": [_model(m) for m in ids], "has_more": False,
                           "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None})
            return True
        if path.startswith("/v1/models/") and len(path) > 11:
            await ex.json(_model(unquote(path[11:])))
            return True
    return False

