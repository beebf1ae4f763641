"""Ollama native API family adapter.

Contract:
- `/api/chat` and `/api/generate` stream NDJSON when `stream` is absent, as Ollama does.
- Usage: the final `"done": true` object's `prompt_eval_count` (in) and `eval_count` (out); a count
  that is absent means 0 (Ollama omits zeros); its `model` and `done_reason` are the answering model
  and the finish reason.
- The upstream gets `Authorization: Bearer` only when the deployment has an api_key.
- Errors are `{"error": "..."}`; after the first byte a final `{"error": ...}` line.
- `/api/tags` names every model the way Ollama does: a configured name without a tag is listed
  with `:latest` (routing treats `llama3.2` and `llama3.2:latest` as one model: `Deployment.serves`).
"""
from __future__ import annotations

import time

import orjson

from config.models import Deployment
from proxy.context import RequestContext
from proxy.errors import GatewayError
from providers.base import Adapter, UpstreamRequest, UsageTap, forward_request_headers, valid_model

_MODEL_PATHS = {"/api/chat": "chat", "/api/generate": "text_completion", "/api/embed": "embeddings",
                "/api/embeddings": "embeddings", "/api/show": "other"}
_STREAMING_BY_DEFAULT = {"/api/chat", "/api/generate"}


def _with_tag(name: str) -> str:
    """Ollama's full name: no tag means ":latest" (a ":" before the last "/" is a registry port)."""
    return name if ":" in name.rpartition("/")[2] else name + ":latest"


def _count(value: object) -> int:
    """Ollama omits zero counts: absent (or not a non-negative integer) means 0."""
    return value if type(value) is int and value >= 0 else 0


class _Tap:
    __slots__ = ("ctx", "buf", "ndjson")

    def __init__(self, ctx: RequestContext, ndjson: bool) -> None:
        self.ctx, self.ndjson, self.buf = ctx, ndjson, bytearray()

    def feed(self, chunk: bytes) -> None:
        if not self.ndjson:
            if len(self.buf) < 8 * 1024 * 1024:
                self.buf += chunk
            return
        self.buf += chunk
        if b"\n" not in chunk:
            return
        *lines, rest = bytes(self.buf).split(b"\n")
        self.buf = bytearray(rest)
        for line in lines:
            if b'"done":true' in line or b'"done": true' in line:
                self._read(line)

    def _read(self, line: bytes) -> None:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict) and (obj.get("done") is True or "prompt_eval_count" in obj or "embeddings" in obj):
            u = self.ctx.usage
            u.input_tokens = _count(obj.get("prompt_eval_count"))
            u.output_tokens = _count(obj.get("eval_count"))
            if obj.get("model").__class__ is str:
                u.response_model = obj["model"]
            u.finished(obj.get("done_reason"))

    def finish(self) -> None:
        if self.buf:
            self._read(bytes(self.buf))
            self.buf.clear()


class OllamaAdapter(Adapter):
    family = "ollama"

    def inspect(self, ctx: RequestContext) -> None:
        path = ctx.path
        if path == "/api/tags" and ctx.method in ("GET", "HEAD"):
            ctx.model_list = True
            return
        body = ctx.json
        if path in _MODEL_PATHS:
            if not isinstance(body, dict):
                raise GatewayError("caller_invalid_request", "the request body must be a JSON object")
            ctx.model = valid_model(body.get("model") or body.get("name"))
            ctx.operation = _MODEL_PATHS[path]
            flag = body.get("stream")
            ctx.stream = path in _STREAMING_BY_DEFAULT and flag is not False if flag is None else flag is True
        elif isinstance(body, dict) and isinstance(body.get("model"), str):
            ctx.model = valid_model(body["model"])

    def upstream(self, ctx: RequestContext, dep: Deployment) -> UpstreamRequest:
        headers = forward_request_headers(ctx.headers)
        if dep.api_key:
            headers.append(("authorization", f"Bearer {dep.api_key}"))
        url = dep.base_url + ctx.path + (f"?{ctx.query}" if ctx.query else "")
        return UpstreamRequest(ctx.method, url, headers, ctx.body)

    def tap(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]]) -> UsageTap | None:
        ctype = next((v for k, v in headers if k == b"content-type"), b"")
        if b"ndjson" in ctype:
            return _Tap(ctx, True)
        return _Tap(ctx, False) if b"json" in ctype else None

    def stream_verdict(self, held: bytes) -> str:
        line, sep, _ = held.partition(b"\n")
        if not sep:
            return "wait"
        return "error" if line.lstrip().startswith(b'{"error"') else "ok"

    def render_error(self, err: GatewayError, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return err.status, [(b"content-type", b"application/json")], orjson.dumps({"error": err.message})

    def error_frame(self, err: GatewayError) -> bytes:
        return orjson.dumps({"error": err.message}) + b"\n"

    def model_list_response(self, models: list[str]) -> bytes:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        names = list(dict.fromkeys(_with_tag(m) for m in models))  # as Ollama lists them; one entry per name
        return orjson.dumps({"models": [
            {"name": m, "model": m, "modified_at": stamp, "size": 0, "digest": "", "details": {}} for m in names]})

    def models_from_response(self, body: bytes) -> list[str]:
        data = orjson.loads(body).get("models") or []
        return [m.get("model") or m["name"] for m in data if isinstance(m, dict) and (m.get("model") or m.get("name"))]
