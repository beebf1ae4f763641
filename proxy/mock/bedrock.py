"""Bedrock runtime wire format for the mock provider (deployment base_url `http://host:port`).

Contract: `handle(ex, path)` serves POST /model/{modelId}/{invoke, invoke-with-response-stream,
converse, converse-stream, count-tokens}; `path` is the RAW path, so the modelId is still
percent-encoded (`%3A`, `%2F` in inference-profile ARNs) and is unquoted only here. Invoke takes and
returns Anthropic-on-Bedrock JSON plus the x-amzn-bedrock-*-token-count headers; the streams are
`application/vnd.amazon.eventstream` frames built with `providers.eventstream` (invoke: `chunk`
events whose base64 `bytes` hold Anthropic stream events, the last one carrying
`amazon-bedrock-invocationMetrics`; converse: messageStart, contentBlockDelta x N, contentBlockStop,
messageStop, metadata). `authorize(ex)` verifies SigV4 (providers.sigv4) when AWS keys are set.
`error(status, message, kind)` renders `{"message"}` with `x-amzn-ErrorType`.
"""
from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson

from providers import sigv4
from providers.eventstream import event_frame, exception_frame
from proxy.mock import anthropic

if TYPE_CHECKING:
    from proxy.mock.app import Exchange

REQUEST_ID_HEADER = b"x-amzn-requestid"
EVENTSTREAM = b"application/vnd.amazon.eventstream"
_TYPES = {400: "ValidationException", 401: "UnrecognizedClientException", 403: "AccessDeniedException",
          404: "ResourceNotFoundException", 408: "ModelTimeoutException", 424: "ModelErrorException",
          429: "ThrottlingException", 500: "InternalServerException", 503: "ServiceUnavailableException",
          529: "ServiceUnavailableException"}


def error(status: int, message: str, kind: str | None = None) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    err_type = kind or _TYPES.get(status, "InternalServerException")
    return orjson.dumps({"message": message}), [(b"x-amzn-errortype", err_type.encode())]


def authorize(ex: "Exchange") -> tuple[int, str, str] | None:
    """SigV4 check when AWS keys are configured: None if allowed, else (status, message, error type)."""
    opts = ex.opts
    if not opts.aws_access_key_id and not opts.aws_secret_access_key:
        return None
    parsed = sigv4.parse_authorization(ex.headers.get("authorization", ""))
    if parsed is None:
        return 403, "Missing Authentication Token", "MissingAuthenticationTokenException"
    if opts.aws_access_key_id and parsed.access_key_id != opts.aws_access_key_id:
        return 403, "The security token included in the request is invalid.", "UnrecognizedClientException"
    if opts.aws_secret_access_key:
        try:
            sigv4.verify(method=ex.method, scheme="http", raw_path=ex.raw_path, query=ex.query,
                         headers=list(ex.headers.items()), body=ex.body, auth=parsed,
                         secret_key=opts.aws_secret_access_key)
        except ValueError as exc:
            return 403, f"The request signature we calculated does not match: {exc}", "InvalidSignatureException"
    return None


def _elapsed_ms(ex: "Exchange") -> int:
    return max(1, (time.perf_counter_ns() - ex.started_ns) // 1_000_000)


def _stream_error(ex: "Exchange") -> bytes:
    kind = ex.opts.stream_error_type or "modelStreamErrorException"
    payload: dict[str, Any] = {"message": "simulated mid-stream error"}
    if kind == "modelStreamErrorException":
        payload.update(originalStatusCode=500, originalMessage="simulated mid-stream error")
    return exception_frame(kind, orjson.dumps(payload))


def _chunk(event: dict[str, Any]) -> bytes:
    return event_frame("chunk", orjson.dumps({"bytes": base64.b64encode(orjson.dumps(event)).decode()}))


async def _invoke(ex: "Exchange", model: str, stream: bool) -> None:
    ex.json_body()
    pieces, n_out = ex.completion(model)
    n_in, msg_id = ex.input_tokens, "msg_bdrk_" + ex.request_id[4:]
    if not stream:
        headers = [(b"x-amzn-bedrock-input-token-count", str(n_in).encode()),
                   (b"x-amzn-bedrock-output-token-count", str(n_out).encode()),
                   (b"x-amzn-bedrock-invocation-latency", str(_elapsed_ms(ex)).encode())]
        await ex.json(anthropic.message_json(msg_id, model, "".join(pieces), n_in, n_out), headers=headers)
        return
    head, deltas, tail = anthropic.stream_events(msg_id, model, pieces, n_in, n_out)
    frames = [_chunk(e) for e in deltas]
    frames[0] = _chunk({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}) + frames[0]
    first_byte = _elapsed_ms(ex)

    def final() -> list[bytes]:
        tail[-1]["amazon-bedrock-invocationMetrics"] = {
            "inputTokenCount": n_in, "outputTokenCount": n_out,
            "invocationLatency": _elapsed_ms(ex), "firstByteLatency": first_byte}
        return [_chunk(e) for e in tail]

    await ex.stream(EVENTSTREAM, [_chunk(e) for e in head], frames, final, _stream_error(ex),
                    [(b"x-amzn-bedrock-content-type", b"application/json")])


async def _converse(ex: "Exchange", model: str, stream: bool) -> None:
    ex.json_body()
    pieces, n_out = ex.completion(model)
    n_in = ex.input_tokens
    usage = {"inputTokens": n_in, "outputTokens": n_out, "totalTokens": n_in + n_out}
    if not stream:
        await ex.json({"output": {"message": {"role": "assistant", "content": [{"text": "".join(pieces)}]}},
                       "stopReason": "end_turn", "usage": usage, "metrics": {"latencyMs": _elapsed_ms(ex)}})
        return
    head = [event_frame("messageStart", b'{"role":"assistant"}')]
    deltas = [event_frame("contentBlockDelta", orjson.dumps({"contentBlockIndex": 0, "delta": {"text": p}}))
              for p in pieces]

    def tail() -> list[bytes]:
        return [event_frame("contentBlockStop", b'{"contentBlockIndex":0}'),
                event_frame("messageStop", b'{"stopReason":"end_turn"}'),
                event_frame("metadata", orjson.dumps({"usage": usage,
                                                      "metrics": {"latencyMs": _elapsed_ms(ex)}}))]

    await ex.stream(EVENTSTREAM, head, deltas, tail, _stream_error(ex))


async def _count_tokens(ex: "Exchange") -> None:
    req = ex.json_body()
    inner = req.get("input") or {}
    n = ex.input_tokens
    if isinstance(inner.get("invokeModel"), dict) and inner["invokeModel"].get("body"):
        n = max(1, len(base64.b64decode(inner["invokeModel"]["body"])) // 4)
    elif isinstance(inner.get("converse"), dict):
        n = max(1, len(orjson.dumps(inner["converse"])) // 4)
    await ex.json({"inputTokens": n})


async def handle(ex: "Exchange", path: str) -> bool:
    if ex.method != "POST" or not path.startswith("/model/"):
        return False
    encoded, _, op = path[7:].rpartition("/")
    if not encoded:
        return False
    model = unquote(encoded)
    if op == "invoke":
        await _invoke(ex, model, False)
    elif op == "invoke-with-response-stream":
        await _invoke(ex, model, True)
    elif op == "converse":
        await _converse(ex, model, False)
    elif op == "converse-stream":
        await _converse(ex, model, True)
    elif op == "count-tokens":
        await _count_tokens(ex)
    else:
        return False
    return True
