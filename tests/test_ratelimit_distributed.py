"""Distributed rate limiting: three gateway processes on one test-owned Redis, live limit changes,
and Redis faults (kill, SIGSTOP, SCRIPT FLUSH, cancelled calls).

Every process here is real: the simulated provider and each gateway replica run as subprocesses
(`tests/procs.py`), Redis is the `redis_server` fixture's own redis-server, and the clients are the
official SDKs (or httpx where only statuses and timings matter).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any, Iterator

import anthropic
import httpx
import openai
import pytest
import redis

from config import parse_config
from proxy.state import Store, StoreUnavailable, counter_keys, limits_key
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.procs import Proc, Procs, procs, restart_redis  # noqa: F401 - `procs` is a fixture

GLOBAL_LIMITS = limits_key("global")
GLOBAL_LOG = counter_keys("global")[0]
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
FIGURES: dict[str, Any] = {}  # measured figures, printed at the end of each test (pytest -s / -rA)


def config_text(redis_url: str, mock: str, *, rpm: int | None = None, tpm: int | None = None,
                state: str = "") -> str:
    limits = {k: v for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm)) if v is not None}
    return f"""
gateway: {{timeout: 30s, rate_limit: {json.dumps(limits)}}}
state: {{redis_url: "{redis_url}"{', ' + state if state else ''}}}
auth:
  keys:
    - {{id: team-test, sha256: {GATEWAY_KEY_SHA}}}
providers:
  openai: {{type: openai, base_url: "{mock}/v1", api_key: sk-upstream}}
  anthropic: {{type: anthropic, base_url: "{mock}", api_key: sk-ant-upstream}}
"""


@pytest.fixture(scope="module")
def mock_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    group = Procs(tmp_path_factory.mktemp("mock"))
    try:
        yield group.mock()
    finally:
        group.close()


def report(name: str, **values: Any) -> None:
    FIGURES[name] = values
    print(f"FIGURES {name}: {json.dumps(values)}")


# --- exact across replicas ----------------------------------------------------------------------
def test_exact_limit_across_three_replicas(redis_server: dict[str, Any], mock_proc: Proc, procs: Procs) -> None:
    gateways = procs.gateways(config_text(redis_server["url"], mock_proc.url, rpm=50), 3)

    async def burst() -> list[Any]:
        clients = []
        for gw in gateways:
            clients.append(openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=60))
            clients.append(anthropic.AsyncAnthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0, timeout=60))

        async def one(i: int) -> Any:
            client = clients[i % len(clients)]
            try:
                if isinstance(client, openai.AsyncOpenAI):
                    return await client.chat.completions.create(**CHAT)
                return await client.messages.create(model="claude-x", max_tokens=16,
                                                    messages=[{"role": "user", "content": "hello"}])
            except Exception as exc:  # noqa: BLE001 - classified by the test
                return exc

        try:
            return await asyncio.gather(*(one(i) for i in range(300)))
        finally:
            for client in clients:
                await client.close()

    started = time.monotonic()
    results = asyncio.run(burst())
    elapsed = time.monotonic() - started
    admitted = [r for r in results if not isinstance(r, Exception)]
    limited = [r for r in results if isinstance(r, (openai.RateLimitError, anthropic.RateLimitError))]
    other = [repr(r) for r in results if isinstance(r, Exception) and r not in limited]
    report("exact", admitted=len(admitted), limited=len(limited), other=len(other), seconds=round(elapsed, 2))
    assert not other, other[:5]
    assert len(admitted) == 50
    assert len(limited) == 250
    for exc in limited:
        headers = exc.response.headers
        assert 1 <= int(headers["retry-after"]) <= 60
        assert 0 < int(headers["retry-after-ms"]) <= 60000
        assert headers["x-should-retry"] == "true"
        assert headers["x-gateway-error"] == "policy_rate_limited"
    assert redis.Redis(port=redis_server["port"]).zcard(GLOBAL_LOG) == 50
