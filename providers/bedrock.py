"""AWS Bedrock runtime family adapter.

Contract:
- Routes on the raw, percent-encoded path: `/model/{modelId}/{operation}`. The model id is decoded
  once for routing and validated; it is forwarded still encoded, so ARNs keep their `%2F`.
- Every attempt is re-signed with SigV4 (botocore) using the deployment's keys, or the standard AWS
  credential chain when the config gives none.
- Event streams pass through byte for byte; the tap decodes a copy for usage (ConverseStream
  `metadata`, invoke-stream `amazon-bedrock-invocationMetrics`, InvokeModel token-count headers)
  and the stop reason (Converse `stopReason`, ConverseStream `messageStop`; a model-native body's
  or stream event's `stop_reason`, with the model a native `message_start` names).
- Errors: `{"message"}` + `x-amzn-ErrorType`; after the first byte an exception frame with valid CRCs.
"""
from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import unquote

import orjson
from botocore.session import Session

from config.models import Deployment
from proxy.context import RequestContext
from proxy.errors import GatewayError
from providers import sigv4
from providers.sigv4 import SigningCredentials
from providers.base import Adapter, UpstreamRequest, UsageTap, forward_request_headers
from providers.eventstream import FrameError, FrameReader, exception_frame

# A model id (`anthropic.claude-v2:1`, `us.anthropic...`) has no '/'; an ARN (inference profile, provisioned
# or imported model) may: `arn:<partition>:bedrock|sagemaker:<region>:<account>:<resource>`.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,255}|arn:aws[a-z-]{0,12}:(bedrock|sagemaker):[a-z0-9-]{0,20}:"
                       r"\d{0,12}:[A-Za-z0-9][A-Za-z0-9._:/+-]{0,1900}")
_STREAM_OPS = {"invoke-with-response-stream", "converse-stream"}
_OPERATIONS = {"invoke": "chat", "invoke-with-response-stream": "chat", "converse": "chat",
               "converse-stream": "chat", "count-tokens": "count_tokens"}
_SIGNED = ("content-type", "accept", "x-amzn-bedrock-accept")
# code -> (AWS error type, status, exception-frame type)
_AWS = {
    "caller_invalid_request": ("ValidationException", 400),
    "caller_missing_credentials": ("MissingAuthenticationTokenException", 403),
    "caller_invalid_credentials": ("UnrecognizedClientException", 403),
    "caller_invalid_signature": ("InvalidSignatureException", 403),
    "caller_forbidden": ("AccessDeniedException", 403),
    "caller_not_found": ("ResourceNotFoundException", 404),
    "caller_method_not_allowed": ("ValidationException", 405),
    "caller_payload_too_large": ("ValidationException", 413),
    "policy_rate_limited": ("ThrottlingException", 429),
    "policy_concurrency_limited": ("ThrottlingException", 429),
    "upstream_rate_limited": ("ThrottlingException", 429),
    "upstream_timeout": ("ModelTimeoutException", 408),
    "upstream_unavailable": ("ServiceUnavailableException", 503),
    "upstream_unreachable": ("ServiceUnavailableException", 503),
    "upstream_error": ("ServiceUnavailableException", 503),
    "gateway_unavailable": ("ServiceUnavailableException", 503),
}


def _header_int(headers: list[tuple[bytes, bytes]], name: bytes) -> int | None:
    for k, v in headers:
        if k == name:
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _count(value: object) -> int | None:
    """A reported token count, or None when it is absent or not a non-negative integer."""
    return value if type(value) is int and value >= 0 else None


class _StreamTap:
    __slots__ = ("ctx", "reader")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx, self.reader = ctx, FrameReader()

    def feed(self, chunk: bytes) -> None:
        try:
            for headers, payload in self.reader.feed(chunk):
                try:
                    self._event(headers.get(":event-type"), payload)
                except (ValueError, TypeError, KeyError, AttributeError):
                    pass  # one unreadable event must not hide the usage in later ones
        except (FrameError, ValueError, TypeError, KeyError, AttributeError):
            self.reader = FrameReader()  # unreadable usage must never break the relay

    def _event(self, kind: object, payload: bytes) -> None:
        if kind == "metadata":
            self._converse(orjson.loads(payload).get("usage"))
        elif kind == "messageStop":
            self.ctx.usage.finished(orjson.loads(payload).get("stopReason"))
        elif kind == "chunk" and len(payload) < 4 * 1024 * 1024:
            inner = base64.b64decode(orjson.loads(payload).get("bytes") or b"")
            if b'"stop_reason":"' in inner or b'"stop_reason": "' in inner or b'"message_start"' in inner:
                self._native(orjson.loads(inner))
            if b"amazon-bedrock-invocationMetrics" in inner:
                metrics = orjson.loads(inner)["amazon-bedrock-invocationMetrics"]
                u = self.ctx.usage
                cache = (_count(metrics.get("cacheReadInputTokenCount")) or 0) + \
                        (_count(metrics.get("cacheWriteInputTokenCount")) or 0)
                u.input_tokens = (_count(metrics.get("inputTokenCount")) or 0) + cache
                u.output_tokens = _count(metrics.get("outputTokenCount"))
                u.cached_tokens = cache or None

    def _native(self, obj: object) -> None:
        """A model-native body or stream event: the model a `message_start` names, a stop reason."""
        if not isinstance(obj, dict):
            return
        u = self.ctx.usage
        message = obj.get("message") if obj.get("type") == "message_start" else obj
        if isinstance(message, dict) and message.get("model").__class__ is str:
            u.response_model = message["model"]
        delta = obj.get("delta")
        reason = delta.get("stop_reason") if isinstance(delta, dict) else obj.get("stop_reason")
        if reason.__class__ is str:
            u.finish_reasons = (reason,)  # a stream's last one is the answer's

    def _converse(self, usage: object) -> None:
        if isinstance(usage, dict):
            u = self.ctx.usage
            cache = (_count(usage.get("cacheReadInputTokens")) or 0) + (_count(usage.get("cacheWriteInputTokens")) or 0)
            u.input_tokens = (_count(usage.get("inputTokens")) or 0) + cache
            u.output_tokens = _count(usage.get("outputTokens"))
            u.cached_tokens = cache or None

    def finish(self) -> None:
        pass


class _JsonTap(_StreamTap):
    __slots__ = ("buf",)

    def __init__(self, ctx: RequestContext) -> None:
        super().__init__(ctx)
        self.buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        if len(self.buf) < 8 * 1024 * 1024:
            self.buf += chunk

    def finish(self) -> None:
        try:
            obj = orjson.loads(bytes(self.buf))
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if isinstance(usage, dict) and ("inputTokens" in usage or "outputTokens" in usage):  # Converse's
            self._converse(usage)
        self.ctx.usage.finished(obj.get("stopReason"))
        self._native(obj)  # InvokeModel: the model's own body (its usage came in the token-count headers)


class BedrockAdapter(Adapter):
    family = "bedrock"
    sigv4 = True

    def __init__(self) -> None:
        self._chains: dict[str, Any] = {}  # deployment name -> botocore credential provider (setup cache)

    def credential(self, ctx: RequestContext) -> str | None:
        value = ctx.header(b"authorization") or ""
        return value[7:].strip() if value[:7].lower() == "bearer " else None

    def inspect(self, ctx: RequestContext) -> None:
        parts = ctx.path.split("/")  # ["", "model", "<raw id>", "<op>", ...]
        if len(parts) < 4 or parts[1] != "model" or not parts[2]:
            raise GatewayError("caller_not_found", "unknown Bedrock runtime path")
        model = unquote(parts[2])
        if not _MODEL_ID.fullmatch(model) or any(p in ("", ".", "..") for p in model.split("/")):
            raise GatewayError("caller_invalid_request", "invalid model identifier")
        ctx.model = model
        op = "/".join(parts[3:])
        ctx.operation = _OPERATIONS.get(op, "other")
        ctx.stream = op in _STREAM_OPS
        if ctx.method == "POST" and ctx.body and ctx.json is None and op in _OPERATIONS:
            raise GatewayError("caller_invalid_request", "the request body must be JSON")

    def credentials_for(self, dep: Deployment) -> SigningCredentials:
        if dep.aws_access_key_id:
            return _Static(dep.aws_access_key_id, dep.aws_secret_access_key, dep.aws_session_token or None)
        if dep.name not in self._chains:  # resolved once (the chain refreshes itself), None included
            self._chains[dep.name] = Session().get_credentials()
        chain = self._chains[dep.name]
        if chain is None:
            raise GatewayError("upstream_unavailable", "no AWS credentials available for the deployment")
        return chain.get_frozen_credentials()

    def upstream(self, ctx: RequestContext, dep: Deployment) -> UpstreamRequest:
        model_seg = ctx.path.split("/")[2]
        mapped = dep.deployment_map.get(ctx.model or "")
        if mapped:
            model_seg = mapped.replace(":", "%3A").replace("/", "%2F")
        rest = "/".join(ctx.path.split("/")[3:])
        url = f"{dep.base_url}/model/{model_seg}/{rest}" + (f"?{ctx.query}" if ctx.query else "")
        headers = [(k, v) for k, v in forward_request_headers(ctx.headers) if not k.startswith("amz-sdk-")]
        signed = {k: v for k, v in headers if k in _SIGNED}
        creds = self.credentials_for(dep)
        headers.extend(sigv4.sign(method=ctx.method, url=url, body=ctx.body, headers=signed,
                                  credentials=creds, region=dep.region or "us-east-1").items())
        return UpstreamRequest(ctx.method, url, headers, ctx.body)

    def tap(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]]) -> UsageTap | None:
        ctype = next((v for k, v in headers if k == b"content-type"), b"")
        if b"eventstream" in ctype:
            return _StreamTap(ctx)
        inp = _header_int(headers, b"x-amzn-bedrock-input-token-count")
        if inp is not None:
            cache = (_header_int(headers, b"x-amzn-bedrock-cache-read-input-token-count") or 0) + \
                    (_header_int(headers, b"x-amzn-bedrock-cache-write-input-token-count") or 0)
            ctx.usage.input_tokens = inp + cache
            ctx.usage.output_tokens = _header_int(headers, b"x-amzn-bedrock-output-token-count")
            ctx.usage.cached_tokens = cache or None
        return _JsonTap(ctx) if b"json" in ctype else None

    def classify(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> str:
        if status == 400 and b"ServiceQuotaExceeded" in body + b"".join(v for k, v in headers if k == b"x-amzn-errortype"):
            return "quota"
        return super().classify(status, headers, body)

    def stream_verdict(self, held: bytes) -> str:
        frames = 0
        try:
            for headers, _ in FrameReader().feed(held):
                if headers.get(":message-type") in ("exception", "error"):
                    return "error"
                frames += 1
                if frames >= 2:
                    return "ok"
        except FrameError:
            return "ok"  # not ours to judge: relay it and let the client's parser decide
        return "wait"

    def render_error(self, err: GatewayError, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        kind, status = _AWS.get(err.code, ("InternalServerException", 500))
        if err.detail and err.detail.endswith("Exception"):
            kind = err.detail
        headers = [(b"content-type", b"application/json"), (b"x-amzn-errortype", kind.encode()),
                   (b"x-amzn-requestid", request_id.encode())]
        if err.retry_after is not None:
            headers.append((b"x-amz-retry-after", str(int(err.retry_after * 1000)).encode()))
        return status, headers, orjson.dumps({"message": err.message})

    def error_frame(self, err: GatewayError) -> bytes:
        kind = {429: "throttlingException", 504: "modelTimeoutException", 503: "serviceUnavailableException"}.get(
            err.status, "internalServerException" if err.code != "upstream_stream_error" else "modelStreamErrorException")
        return exception_frame(kind, orjson.dumps({"message": err.message}))


class _Static:
    __slots__ = ("access_key", "secret_key", "token")

    def __init__(self, access_key: str, secret_key: str, token: str | None) -> None:
        self.access_key, self.secret_key, self.token = access_key, secret_key, token
