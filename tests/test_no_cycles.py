"""The whole request path frees everything by reference counting: no reference cycles per request.

`llm-gateway serve` raises the young-generation GC threshold (proxy/cli/serve.py) on the strength of
this: cyclic garbage per request would then pile up between collections. The app is driven
in process (raw ASGI calls, so neither uvicorn's objects nor a test client's are counted) against
the simulated provider over real TCP: streamed and plain, all four families' paths, a native error,
with metrics, tracing and the access log on.
"""
from __future__ import annotations

import asyncio
import gc
from typing import Any

import orjson
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from config import parse_config
from proxy.app import build_app
from proxy.telemetry.observability import GatewayObserver
from tests.conftest import GATEWAY_KEY, standard_config

MONITORING = """
monitoring:
  access_log: true
  metrics: {enabled: true}
  tracing: {enabled: true, sample_rate: 1.0}
"""
CALLS: list[tuple[str, dict[str, Any], list[tuple[bytes, bytes]]]] = [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, []),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                              "stream": True}, []),
    ("/anthropic/v1/messages", {"model": "claude-3-5-sonnet-latest", "max_tokens": 8, "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]},
     [(b"anthropic-version", b"2023-06-01")]),
    ("/ollama/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}, []),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, [(b"api-base", b"http://evil")]),  # 400
]


async def _call(app: Any, path: str, payload: dict[str, Any], extra: list[tuple[bytes, bytes]]) -> int:
    body = orjson.dumps(payload)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"host", b"gw"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {GATEWAY_KEY}".encode()), *extra]}
    inbox = [{"type": "http.request", "body": body, "more_body": False}]
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop()
        await asyncio.sleep(3600)  # the client never leaves
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


def test_requests_leave_no_cyclic_garbage(mock_upstream: str) -> None:
    config = parse_config(standard_config(mock_upstream, MONITORING), "test.yaml", {})
    spans = InMemorySpanExporter()
    app = build_app(config, observer=GatewayObserver(config, span_exporter=spans,
                                                     metric_reader=InMemoryMetricReader()))

    async def scenario() -> tuple[list[int], list[str]]:
        for call in CALLS:  # warm-up: lazy pools, caches, metric series, the first span batch
            await _call(app, *call)
        await asyncio.sleep(0.1)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            statuses = [await _call(app, *call) for _ in range(10) for call in CALLS]
            gc.collect()
            kinds = sorted({type(o).__name__ for o in gc.garbage})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        await app.aclose()
        return statuses, kinds

    statuses, kinds = asyncio.run(scenario())
    # tracing really was on: a server span per call, plus an attempt span for all but the refused one
    assert len(spans.get_finished_spans()) >= (2 * len(CALLS) - 1) * 10
    assert statuses == [200, 200, 200, 200, 400] * 10
    assert kinds == [], f"objects left in reference cycles: {kinds}"
