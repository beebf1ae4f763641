"""Anthropic Messages clients served by a Bedrock deployment (InvokeModel for Claude).

Contract:
- Request: the Messages body minus `model` and `stream`, plus `anthropic_version:
  bedrock-2023-05-31` (unless given) and `anthropic_beta` from the `anthropic-beta` header; sent to
  `/model/{mapped id}/invoke` or `/invoke-with-response-stream`, where the id comes from the
  deployment's `deployments:` map; signed with SigV4 for the deployment.
- Response: a JSON message passes through (it already is an Anthropic message); an event stream
  is converted frame by frame into Anthropic SSE with `event:` lines (the SDK dispatches on them);
  an exception frame becomes `event: error`. Bedrock error bodies become Anthropic error bodies.
So an Anthropic client that fails over to Bedrock does not notice.
"""
from __future__ import annotations

import base64

import orjson

from config.models import Deployment
from proxy.context import RequestContext
from providers import sigv4
from providers.base import UpstreamRequest
from providers.eventstream import FrameError, FrameReader

BEDROCK_VERSION = "bedrock-2023-05-31"
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                424: "api_error", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
                504: "timeout_error", 529: "overloaded_error"}
_EXCEPTION_TYPES = {"throttlingException": "rate_limit_error", "serviceUnavailableException": "overloaded_error",
                    "modelTimeoutException": "timeout_error", "validationException": "invalid_request_error"}


def build_request(ctx: RequestContext, dep: Deployment, credentials: sigv4.SigningCredentials) -> UpstreamRequest:
    body = dict(ctx.json) if isinstance(ctx.json, dict) else {}
    body.pop("model", None)
    body.pop("stream", None)
    body.setdefault("anthropic_version", BEDROCK_VERSION)
    beta = ctx.header(b"anthropic-beta")
    if beta:
        body["anthropic_beta"] = [b.strip() for b in beta.split(",") if b.strip()]
    raw = orjson.dumps(body)
    model_id = dep.deployment_map[ctx.model or ""]
    segment = model_id.replace("%", "%25").replace(":", "%3A").replace("/", "%2F")
    op = "invoke-with-response-stream" if ctx.stream else "invoke"
    url = f"{dep.base_url}/model/{segment}/{op}"
    headers = {"content-type": "application/json",
               ("x-amzn-bedrock-accept" if ctx.stream else "accept"): "application/json"}
    signed = sigv4.sign(method="POST", url=url, body=raw, headers=headers, credentials=credentials,
                        region=dep.region or "us-east-1")
    out = list(headers.items()) + list(signed.items())
    trace = ctx.header(b"traceparent")
    if trace:
        out.append(("traceparent", trace))
    return UpstreamRequest("POST", url, out, raw)


class EventStreamToSSE:
    """Stateful filter: Bedrock event-stream bytes in, Anthropic SSE bytes out."""

    __slots__ = ("reader",)

    def __init__(self) -> None:
        self.reader = FrameReader()

    def __call__(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        try:
            for headers, payload in self.reader.feed(chunk):
                out.append(self._event(headers, payload))
        except (FrameError, ValueError, TypeError, KeyError):
            out.append(_error_event("api_error", "the upstream stream could not be decoded"))
        return b"".join(out)

    @staticmethod
    def _event(headers: dict[str, object], payload: bytes) -> bytes:
        kind = headers.get(":message-type")
        if kind == "event" and headers.get(":event-type") == "chunk":
            inner = base64.b64decode(orjson.loads(payload)["bytes"])
            name = orjson.loads(inner).get("type", "message")
            return b"event: " + str(name).encode() + b"\ndata: " + inner + b"\n\n"
        if kind in ("exception", "error"):
            exc = str(headers.get(":exception-type") or headers.get(":error-code") or "")
            try:
                message = orjson.loads(payload).get("message") or exc
            except (orjson.JSONDecodeError, AttributeError):
                message = exc or "upstream stream error"
            return _error_event(_EXCEPTION_TYPES.get(exc, "api_error"), str(message))
        return b""


def _error_event(kind: str, message: str) -> bytes:
    return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": {"type": kind, "message": message}}) + b"\n\n"


def error_body(status: int, headers: list[tuple[bytes, bytes]], body: bytes, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A Bedrock error response rewritten as the Anthropic error the client expects."""
    try:
        message = orjson.loads(body).get("message") or "upstream error"
    except (orjson.JSONDecodeError, AttributeError):
        message = "upstream error"
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    out = orjson.dumps({"type": "error", "error": {"type": kind, "message": str(message)}, "request_id": request_id})
    keep = [(k, v) for k, v in headers if k in (b"retry-after", b"retry-after-ms")]
    return status, keep + [(b"content-type", b"application/json")], out


def response_headers(headers: list[tuple[bytes, bytes]], streaming: bool) -> list[tuple[bytes, bytes]]:
    drop = {b"content-type", b"x-amzn-bedrock-content-type"} | ({b"content-length"} if streaming else set())
    out = [(k, v) for k, v in headers if k not in drop]
    return out + [(b"content-type", b"text/event-stream" if streaming else b"application/json")]
