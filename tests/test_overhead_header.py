"""`x-gateway-overhead-ms` is traffic, not telemetry: with the no-op observer (telemetry off) it
still subtracts the upstream's time, for plain answers and for a stream's head, which is stamped
while its attempt is still open.

Real sockets: a simulated upstream that waits 300 ms before answering, the gateway under uvicorn.
"""
from __future__ import annotations

import httpx
import pytest

from config import parse_config
from proxy.app import build_app
from proxy.mock import MockOptions, build_mock_app
from proxy.telemetry.observer import Observer
from tests.conftest import GATEWAY_KEY, standard_config
from tests.servers import serve

pytestmark = pytest.mark.e2e
DELAY_MS = 300.0


@pytest.mark.parametrize("stream", [False, True])
def test_overhead_excludes_upstream_time_without_telemetry(stream: bool) -> None:
    slow = build_mock_app(MockOptions(chunk_interval_ms=0, latency_ms=DELAY_MS))
    with serve(slow, lifespan="off") as upstream:
        cfg = parse_config(standard_config(upstream), "test.yaml", {})
        with serve(build_app(cfg, observer=Observer())) as base:
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers,
                              timeout=30) as response:
                assert response.status_code == 200
                overhead = float(response.headers["x-gateway-overhead-ms"])
                response.read()
    # the upstream's 300 ms are upstream time; what is left is the gateway's own (a few ms, and far
    # below the delay even on a loaded machine)
    assert 0.0 <= overhead < DELAY_MS / 3, overhead
