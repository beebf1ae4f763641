"""OpenAI wire format for the mock provider (deployment base_url `http://host:port/v1`).

Contract: `handle(ex, path)` serves POST /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/responses and GET /v1/models, /v1/models/{id}; it returns False for any other route.
Chat and completions stream as `data: {...}` SSE ending `data: [DONE]`; with
`stream_options.include_usage` one extra `choices: []` chunk carries usage and every other chunk has
`"usage": null`. Responses streams typed `event:` SSE ending in `response.completed` with usage.
Usage: prompt tokens = len(body)//4 (min 1), completion tokens = words emitted.
`error(status, message, kind)` renders `{"error": {message, type, param, code}}`.
"""
from __future__ import annotations

import base64
import struct
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson

if TYPE_CHECKING:
    from proxy.mock.app import Exchange

REQUEST_ID_HEADER = b"x-request-id"
# The provider account's own limits, on every response as api.openai.com sends them (a gateway
# enforcing its own limits must replace these, never send both).
ACCOUNT_HEADERS = [(b"x-ratelimit-limit-requests", b"30000"), (b"x-ratelimit-limit-tokens", b"150000000"),
                   (b"x-ratelimit-remaining-requests", b"29999"), (b"x-ratelimit-remaining-tokens", b"149999970"),
                   (b"x-ratelimit-reset-requests", b"2ms"), (b"x-ratelimit-reset-tokens", b"0s")]
SSE = b"text/event-stream; charset=utf-8"
DEFAULT_MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "text-embedding-3-small"]
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 429: "requests"}
_CODES = {401: "invalid_api_key", 404: "unknown_url", 429: "rate_limit_exceeded", 503: "service_unavailable"}


def error(status: int, message: str, kind: str | None = None) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    err = {"message": message, "type": kind or _TYPES.get(status, "server_error"), "param": None,
           "code": _CODES.get(status)}
    return orjson.dumps({"error": err}), []


def _data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _stream_error(ex: "Exchange") -> bytes:
    kind = ex.opts.stream_error_type or "server_error"
    return _data({"error": {"message": "simulated mid-stream error", "type": kind, "param": None, "code": None}})


async def _chat_like(ex: "Exchange", chat: bool) -> None:
    req = ex.json_body()
    model = str(req.get("model") or "gpt-4o")
    pieces, n_out = ex.completion(model)
    n_in, created = ex.input_tokens, int(time.time())
    prefix, obj = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
    rid = prefix + ex.request_id[4:]
    if not req.get("stream"):
        text = "".join(pieces)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
             "logprobs": None, "finish_reason": "stop"} if chat else
            {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"})
        await ex.json({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                       "usage": _usage(n_in, n_out), "system_fingerprint": "fp_mock"})
        return
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    base: dict[str, Any] = {"id": rid, "object": chunk_obj, "created": created, "model": model,
                            "system_fingerprint": "fp_mock"}

    def frame(choice: dict[str, Any] | None) -> bytes:
        out = dict(base, choices=[choice] if choice is not None else [])
        if include_usage:
            out["usage"] = None
        return _data(out)

    if chat:
        head = [frame({"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                       "logprobs": None, "finish_reason": None})]
        deltas = [frame({"index": 0, "delta": {"content": p}, "logprobs": None, "finish_reason": None})
                  for p in pieces]
        final = frame({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})
    else:
        head = []
        deltas = [frame({"text": p, "index": 0, "logprobs": None, "finish_reason": None}) for p in pieces]
        final = frame({"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"})

    def tail() -> list[bytes]:
        frames = [final]
        if include_usage:
            frames.append(_data(dict(base, choices=[], usage=_usage(n_in, n_out))))
        frames.append(b"data: [DONE]\n\n")
        return frames

    await ex.stream(SSE, head, deltas, tail, _stream_error(ex))


async def _embeddings(ex: "Exchange") -> None:
    req = ex.json_body()
    model = str(req.get("model") or "text-embedding-3-small")
    raw = req.get("input", "")
    inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    dims = int(req.get("dimensions") or 16)
    data = []
    for i, item in enumerate(inputs):
        vec = ex.vector(item if isinstance(item, str) else orjson.dumps(item).decode(), dims)
        emb: Any = (base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
                    if req.get("encoding_format") == "base64" else vec)
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = ex.input_tokens
    await ex.json({"object": "list", "data": data, "model": model,
                   "usage": {"prompt_tokens": n, "total_tokens": n}})


def _response_obj(ex: "Exchange", rid: str, model: str, status: str, output: list[Any],
                  usage: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
            "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
            "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}


async def _responses(ex: "Exchange") -> None:
    req = ex.json_body()
    model = str(req.get("model") or "gpt-4o")
    pieces, n_out = ex.completion(model)
    n_in, rid, mid = ex.input_tokens, "resp_" + ex.request_id[4:], "msg_" + ex.request_id[4:]
    text = "".join(pieces)
    usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n_out,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n_in + n_out}
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"type": "message", "id": mid, "status": "completed", "role": "assistant", "content": [part]}
    if not req.get("stream"):
        await ex.json(_response_obj(ex, rid, model, "completed", [item], usage))
        return
    seq = iter(range(1 << 30))

    def ev(name: str, **fields: Any) -> bytes:
        return _event(name, {"type": name, "sequence_number": next(seq), **fields})

    pending = _response_obj(ex, rid, model, "in_progress", [], None)
    head = [ev("response.created", response=pending), ev("response.in_progress", response=pending),
            ev("response.output_item.added", output_index=0,
               item={**item, "status": "in_progress", "content": []}),
            ev("response.content_part.added", item_id=mid, output_index=0, content_index=0,
               part={**part, "text": ""})]
    deltas = [ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=p,
                 logprobs=[]) for p in pieces]

    def tail() -> list[bytes]:
        return [ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text,
                   logprobs=[]),
                ev("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part),
                ev("response.output_item.done", output_index=0, item=item),
                ev("response.completed", response=_response_obj(ex, rid, model, "completed", [item], usage))]

    err = {"type": ex.opts.stream_error_type or "server_error", "code": "server_error",
           "message": "simulated mid-stream error", "param": None}
    await ex.stream(SSE, head, deltas, tail, _event("error", {
        "type": "error", "sequence_number": len(deltas) + 4, "error": err}))


def _model(ex: "Exchange", model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1700000000,
            "owned_by": "system" if model_id in DEFAULT_MODELS else "mock"}


async def handle(ex: "Exchange", path: str) -> bool:
    method = ex.method
    if method == "POST":
        if path == "/v1/chat/completions":
            await _chat_like(ex, True)
        elif path == "/v1/completions":
            await _chat_like(ex, False)
        elif path == "/v1/embeddings":
            await _embeddings(ex)
        elif path == "/v1/responses":
            await _responses(ex)
        else:
            return False
        return True
    if method in ("GET", "HEAD"):
        if path == "/v1/models":
            await ex.json({"object": "list", "data": [_model(ex, m) for m in ex.models(DEFAULT_MODELS)]})
            return True
        if path.startswith("/v1/models/") and len(path) > 11:
            await ex.json(_model(ex, unquote(path[11:])))
            return True
    return False
