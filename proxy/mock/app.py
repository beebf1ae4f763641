"""The mock provider's ASGI core: options, per-request exchange, dispatch, recording, faults, auth.

Contract:
- `MockOptions` holds the global behaviour; any option in `HEADER_OPTIONS` can be overridden per
  request with a header `x-mock-<option>` (dashes or underscores), and the header wins.
- `MockApp(options)` is a pure ASGI callable. Requests are routed on `scope["raw_path"]` to one
  protocol module (`openai`, `anthropic`, `bedrock`, `ollama`); each exposes
  `REQUEST_ID_HEADER`, optionally `ACCOUNT_HEADERS` (the account's rate-limit headers, sent on
  every response of that family), `error(status, message, kind=None) -> (body, headers)` and
  `handle(ex, path) -> bool` (False = no such route, answered 404 in the family's shape).
- Order per request: read body, record, latency/stall, auth, fault injection, handler. A body that
  is not a JSON object (ValueError raised by `Exchange.json_body`) is answered 400 natively.
- Recording is a deque append of raw values; `GET /__mock/requests` renders them, `DELETE` clears.
- Text: `Exchange.completion(model)` gives the reply in `chunks` pieces and its word count (= the
  output tokens every family reports); input tokens are `len(body) // 4` (min 1).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import random
import time
from collections import deque
from types import ModuleType
from typing import Any, Awaitable, Callable

import orjson

from proxy.mock import anthropic, bedrock, ollama, openai

PROTOCOLS = ("openai", "anthropic", "bedrock", "ollama")
_INT = ("chunks", "fault_status", "cut_after", "stream_error_after")
_FLOAT = ("chunk_interval_ms", "latency_ms", "stall_ms", "fault_rate", "retry_after")
HEADER_OPTIONS = _INT + _FLOAT + ("stream_error_type",)
_NONE = ("", "none", "null", "off")
_FAMILIES: dict[str, ModuleType] = {"openai": openai, "anthropic": anthropic, "bedrock": bedrock, "ollama": ollama}
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


@dataclasses.dataclass(slots=True)
class MockOptions:
    protocols: set[str] = dataclasses.field(default_factory=lambda: set(PROTOCOLS))
    chunks: int = 8
    chunk_interval_ms: float = 20.0
    latency_ms: float = 0.0
    stall_ms: float = 0.0
    fault_status: int | None = None
    fault_rate: float | None = None  # None = 1.0 when fault_status is set
    retry_after: float | None = None
    cut_after: int | None = None
    stream_error_after: int | None = None
    stream_error_type: str | None = None  # family default when None
    api_key: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    models: list[str] | None = None
    record: bool = True
    record_limit: int = 1000


def _override(opts: MockOptions, raw: dict[str, str]) -> MockOptions:
    """A copy of `opts` with the `x-mock-*` header values applied (raises ValueError if invalid)."""
    changes: dict[str, Any] = {}
    for name, value in raw.items():
        value = value.strip()
        if name not in HEADER_OPTIONS:
            continue
        if value.lower() in _NONE or (name == "fault_status" and value == "0"):
            changes[name] = opts.chunks if name == "chunks" else None
        else:
            changes[name] = int(value) if name in _INT else float(value) if name in _FLOAT else value
    return dataclasses.replace(opts, **changes) if changes else opts


class MockStreamCut(Exception):
    """Raised mid-stream on purpose so the server drops the connection (option cut_after)."""


_FILLER = "The mock provider streams deterministic text for gateway tests and benchmarks.".split()
_rid_prefix, _rid_counter = os.urandom(4).hex(), itertools.count(1)


@functools.lru_cache(maxsize=1024)
def _pieces(model: str, chunks: int) -> tuple[list[str], int]:
    words = f"This is a simulated response from {model}.".split()
    words += list(itertools.islice(itertools.cycle(_FILLER), max(0, chunks - len(words))))
    n = len(words)
    groups = [words[i * n // chunks:(i + 1) * n // chunks] for i in range(chunks)]
    return [(" " if i else "") + " ".join(g) for i, g in enumerate(groups)], n


class Exchange:
    """One request: parsed bits plus helpers to answer it with raw ASGI messages."""

    __slots__ = ("send", "method", "raw_path", "query", "headers", "body", "opts", "rid_header",
                 "account_headers", "request_id", "started_ns")

    def __init__(self, send: Send, method: str, raw_path: str, query: str,
                 headers: dict[str, str], body: bytes, opts: MockOptions) -> None:
        self.send, self.method, self.raw_path, self.query = send, method, raw_path, query
        self.headers, self.body, self.opts = headers, body, opts
        self.rid_header: bytes | None = None
        self.account_headers: Headers = []
        self.request_id = f"req_{_rid_prefix}{next(_rid_counter):016x}"
        self.started_ns = time.perf_counter_ns()

    @property
    def input_tokens(self) -> int:
        return max(1, len(self.body) // 4)

    def json_body(self) -> dict[str, Any]:
        data = orjson.loads(self.body)  # JSONDecodeError is a ValueError
        if not isinstance(data, dict):
            raise ValueError("request body must be a JSON object")
        return data

    def models(self, default: list[str]) -> list[str]:
        return self.opts.models or default

    def completion(self, model: str) -> tuple[list[str], int]:
        """The reply split into `chunks` pieces (joined they give the full text) and its word count."""
        return _pieces(model, max(1, self.opts.chunks))

    @staticmethod
    def vector(text: str, dims: int) -> list[float]:
        """A deterministic unit-ish embedding of `text`."""
        seed = hashlib.sha256(text.encode()).digest()
        return [round((seed[i % 32] - 127.5) / 127.5, 6) for i in range(dims)]

    def _start(self, status: int, content_type: bytes, extra: Headers | None) -> dict[str, Any]:
        headers: Headers = [(b"content-type", content_type)]
        if self.rid_header:
            headers.append((self.rid_header, self.request_id.encode()))
        headers += self.account_headers
        if extra:
            headers.extend(extra)
        return {"type": "http.response.start", "status": status, "headers": headers}

    async def respond(self, status: int, body: bytes, content_type: bytes = b"application/json",
                      headers: Headers | None = None) -> None:
        start = self._start(status, content_type, headers)
        start["headers"].append((b"content-length", str(len(body)).encode()))
        await self.send(start)
        await self.send({"type": "http.response.body",
                         "body": b"" if self.method == "HEAD" else body})

    async def json(self, obj: Any, status: int = 200, headers: Headers | None = None) -> None:
        await self.respond(status, orjson.dumps(obj), b"application/json", headers)

    async def stream(self, content_type: bytes, head: list[bytes], deltas: list[bytes],
                     tail: Callable[[], list[bytes]], error: bytes, headers: Headers | None = None) -> None:
        """Send head, then the deltas (the counted chunks) one ASGI message each, `chunk_interval_ms`
        apart, then `tail()`; `stream_error_after` N sends `error` after head + N deltas and ends,
        `cut_after` N raises `MockStreamCut` there so the server drops the connection."""
        send, opts = self.send, self.opts
        await send(self._start(200, content_type, headers))
        for frame in head:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        interval = opts.chunk_interval_ms / 1000.0
        err, cut = opts.stream_error_after, opts.cut_after
        for i in range(len(deltas) + 1):
            stop = (err is not None and i >= err) or (cut is not None and i >= cut)
            if i and interval > 0 and (i < len(deltas) or stop):
                await asyncio.sleep(interval)
            if err is not None and i >= err and (cut is None or err <= cut):
                await send({"type": "http.response.body", "body": error, "more_body": False})
                return
            if cut is not None and i >= cut:
                raise MockStreamCut(f"cut_after={cut}: connection dropped on purpose")
            if i < len(deltas):
                await send({"type": "http.response.body", "body": deltas[i], "more_body": True})
        for frame in tail():
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def error(self, family: ModuleType, status: int, message: str, kind: str | None = None,
                    headers: Headers | None = None) -> None:
        body, extra = family.error(status, message, kind)
        await self.respond(status, body, b"application/json", extra + (headers or []))


def _family(path: str, headers: dict[str, str], enabled: set[str]) -> str:
    if path.startswith("/model/"):
        return "bedrock"
    if path.startswith("/api/") or path == "/":
        return "ollama"
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/models") and "anthropic" in enabled and (
            "anthropic-version" in headers or "openai" not in enabled):
        return "anthropic"
    only = [p for p in PROTOCOLS if p in enabled]
    return "openai" if path.startswith("/v1/") or len(only) != 1 else only[0]


class MockApp:
    """The ASGI application (`proxy.mock.build_mock_app` builds one)."""

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.records: deque[tuple[Any, ...]] = deque(maxlen=options.record_limit)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Send) -> None:
        while scope["type"] == "lifespan":  # startup, then shutdown
            kind = (await receive())["type"]
            await send({"type": kind + ".complete"})
            if kind == "lifespan.shutdown":
                return
        if scope["type"] != "http":
            return
        raw, method = scope.get("raw_path") or scope["path"].encode(), scope["method"]
        path = raw.decode("latin-1")
        message = await receive()
        parts = [message.get("body", b"")]
        while message.get("more_body"):
            parts.append((message := await receive()).get("body", b""))
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if path.startswith("/__mock/"):
            await self._control(send, method, path)
            return
        opts = self.options
        if opts.record:
            self.records.append((method, raw, scope.get("query_string", b""), scope["headers"],
                                 body, time.time()))
        headers: dict[str, str] = {}
        overrides: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers[name := k.decode("latin-1").lower()] = value = v.decode("latin-1")
            if name.startswith("x-mock-"):
                overrides[name[7:].replace("-", "_")] = value
        family = _FAMILIES[family_name := _family(path, headers, opts.protocols)]
        ex = Exchange(send, method, path, scope.get("query_string", b"").decode("latin-1"), headers, body, opts)
        ex.rid_header = family.REQUEST_ID_HEADER
        ex.account_headers = getattr(family, "ACCOUNT_HEADERS", [])
        try:
            ex.opts = opts = _override(opts, overrides)
        except ValueError as exc:
            await ex.error(family, 400, f"invalid x-mock-* header: {exc}")
            return
        delay = opts.latency_ms + opts.stall_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        if family_name not in opts.protocols:
            await ex.error(family, 404, f"{family_name} protocol is not enabled on this mock")
            return
        denied = self._auth(family_name, ex)
        if denied is not None:
            await ex.error(family, *denied)
            return
        if opts.fault_status and random.random() < (1.0 if opts.fault_rate is None else opts.fault_rate):
            extra: Headers = []
            if opts.retry_after is not None:
                ms = str(int(opts.retry_after * 1000)).encode()
                extra += [(b"retry-after", str(math.ceil(opts.retry_after)).encode()), (b"retry-after-ms", ms)]
                extra += [(b"x-amz-retry-after", ms)] if family_name == "bedrock" else []
            await ex.error(family, opts.fault_status, f"simulated {opts.fault_status} fault", None, extra)
            return
        try:
            handled = await family.handle(ex, path)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            # malformed JSON or a wrong body shape (e.g. "input": null), found before any byte was sent
            await ex.error(family, 400, f"malformed request body: {exc}")
            return
        if not handled:
            await ex.error(family, 404, f"unknown route: {method} {path}")

    @staticmethod
    def _auth(family: str, ex: Exchange) -> tuple[int, str, str | None] | None:
        if family == "bedrock":
            return bedrock.authorize(ex)
        key, headers = ex.opts.api_key, ex.headers
        if not key or headers.get("authorization") == f"Bearer {key}":
            return None
        if family == "anthropic" and headers.get("x-api-key") == key:
            return None
        return 401, "invalid api key", None

    async def _control(self, send: Send, method: str, path: str) -> None:
        status, payload = 200, b'{"ok":true}'
        if path == "/__mock/requests" and method == "GET":
            payload = orjson.dumps([self._render(r) for r in self.records])
        elif path == "/__mock/requests" and method == "DELETE":
            self.records.clear()
        elif path != "/__mock/health":
            status, payload = 404, b'{"error":"unknown control endpoint"}'
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    def _render(record: tuple[Any, ...]) -> dict[str, Any]:
        method, raw, query, headers, body, when = record
        return {"method": method, "raw_path": raw.decode("latin-1"), "query": query.decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers],
                "body_b64": base64.b64encode(body).decode(), "body_sha256": hashlib.sha256(body).hexdigest(),
                "time": when}
