"""The shared circuit breaker across gateway replicas: real gateway processes, one test-owned Redis.

Every gateway here is a real `llm-gateway serve` process (`tests/procs.py`) on the `redis_server`
fixture's own redis-server. The upstreams are the product's simulated provider served from this test
process, one mock per deployment: "a" (priority 10, the preferred one, faulty on demand) and "b"
(healthy), so the mocks' recordings show exactly which deployment each replica used. The shared
breaker state is read straight from Redis (`HGETALL llmgw:{llmgw}:health:<name>`).

`gateway.circuit_base_ejection` is shortened so that a half-open circuit comes within the test.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable, Iterator

import httpx
import pytest
import redis

from proxy.state.health import health_key, probe_key
from proxy.mock import MockApp, MockOptions, build_mock_app
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.procs import Proc, Procs, procs  # noqa: F401 - `procs` is a fixture
from tests.servers import serve

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello breaker"}], "max_tokens": 16}
HEALTHY = MockOptions(chunk_interval_ms=0)


def config_text(redis_url: str, a: str, b: str, ejection: str) -> str:
    return f"""
gateway: {{timeout: 30s, circuit_base_ejection: {ejection}}}
state: {{redis_url: "{redis_url}"}}
auth:
  keys:
    - {{id: team-test, sha256: {GATEWAY_KEY_SHA}}}
providers:
  a: {{type: openai, base_url: "{a}/v1", api_key: sk-upstream-a, priority: 10}}
  b: {{type: openai, base_url: "{b}/v1", api_key: sk-upstream-b}}
"""


class Mocks:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.a: MockApp = build_mock_app(HEALTHY)
        self.b: MockApp = build_mock_app(HEALTHY)
        self.a_url = stack.enter_context(serve(self.a, lifespan="off"))
        self.b_url = stack.enter_context(serve(self.b, lifespan="off"))

    def set_a(self, **options: Any) -> None:
        self.a.options = MockOptions(chunk_interval_ms=0, **options)


@pytest.fixture
def mocks() -> Iterator[Mocks]:
    with contextlib.ExitStack() as stack:
        yield Mocks(stack)


@pytest.fixture
def cluster(redis_server: dict[str, Any], procs: Procs, mocks: Mocks) -> Callable[..., list[Proc]]:  # noqa: F811
    def start(n: int, ejection: str = "1s") -> list[Proc]:
        return procs.gateways(config_text(redis_server["url"], mocks.a_url, mocks.b_url, ejection), n)

    return start


@pytest.fixture
def rds(redis_server: dict[str, Any]) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server["port"], decode_responses=True, socket_timeout=2)
    try:
        yield client
    finally:
        client.close()


def chat(gw: Proc) -> tuple[int, str | None, int]:
    """One OpenAI chat call through a replica: (status, deployment that answered, attempts)."""
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
    return r.status_code, r.headers.get("x-gateway-provider"), int(r.headers.get("x-gateway-attempts", "0"))


def burst(gateways: list[Proc], per_replica: int) -> list[tuple[int, str | None, int]]:
    """Concurrent calls, `per_replica` through each replica at once."""

    async def run() -> list[tuple[int, str | None, int]]:
        async with httpx.AsyncClient(timeout=30) as c:
            async def one(gw: Proc) -> tuple[int, str | None, int]:
                r = await c.post(f"{gw.url}/v1/chat/completions", headers=AUTH, json=CHAT)
                return r.status_code, r.headers.get("x-gateway-provider"), int(r.headers.get("x-gateway-attempts", "0"))

            return await asyncio.gather(*(one(gw) for gw in gateways for _ in range(per_replica)))

    return asyncio.run(run())


def health(rds: redis.Redis, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in rds.hgetall(health_key(name)).items()}


def redis_ms(rds: redis.Redis) -> int:
    seconds, micros = rds.time()
    return int(seconds) * 1000 + int(micros) // 1000


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def wait_open(rds: redis.Redis, name: str, ejections: int) -> dict[str, int]:
    return wait_for(lambda: (h := health(rds, name)).get("ejections", 0) >= ejections
                    and h.get("open_until", 0) > redis_ms(rds) and h, 5, f"{name}'s circuit to open")


def wait_half_open(rds: redis.Redis, name: str) -> None:
    open_until = health(rds, name)["open_until"]
    wait_for(lambda: redis_ms(rds) > open_until + 20, 10, f"{name}'s ejection to end")


# ---------------------------------------------------------------- tests

def test_failures_seen_by_one_replica_eject_the_deployment_on_every_replica(
        cluster: Callable[..., list[Proc]], mocks: Mocks, rds: redis.Redis) -> None:
    g1, g2, g3 = cluster(3, ejection="20s")
    mocks.set_a(fault_status=503)
    for _ in range(5):  # five transient failures, all seen by replica 1; each request still succeeds
        assert chat(g1) == (200, "b", 2)
    state = wait_open(rds, "a", 1)
    assert state["fails"] == 0 and state["ejections"] == 1
    assert 0.9 * 20_000 <= state["open_until"] - state["updated"] <= 1.1 * 20_000
    assert len(mocks.a.records) == 5
    # Replicas 2 and 3 never saw a failure, yet their next requests go straight to the healthy deployment.
    assert chat(g2) == (200, "b", 1)
    assert chat(g3) == (200, "b", 1)
    assert chat(g1) == (200, "b", 1)
    assert len(mocks.a.records) == 5, "nobody used the open deployment"


def test_half_open_admits_one_probe_and_a_probe_decides(cluster: Callable[..., list[Proc]], mocks: Mocks,
                                                         rds: redis.Redis) -> None:
    gateways = cluster(3, ejection="1s")
    g1 = gateways[0]
    mocks.set_a(fault_status=503)
    for _ in range(5):
        assert chat(g1) == (200, "b", 2)
    first = wait_open(rds, "a", 1)
    assert 900 <= first["open_until"] - first["updated"] <= 1100

    # Half-open, still failing (slowly, so the probe is in flight while the others arrive): of twelve
    # concurrent requests on three replicas exactly one probes "a"; it fails over, and the circuit
    # reopens for longer (2 x base).
    mocks.set_a(fault_status=503, latency_ms=600)
    wait_half_open(rds, "a")
    mocks.a.records.clear()
    results = burst(gateways, 4)
    assert all(status == 200 and provider == "b" for status, provider, _ in results), results
    assert sorted(attempts for _, _, attempts in results) == [1] * 11 + [2], "exactly one request probed"
    assert len(mocks.a.records) == 1
    second = wait_open(rds, "a", 2)
    assert 1800 <= second["open_until"] - second["updated"] <= 2200

    # Half-open again, now healthy (still slow): one probe succeeds and closes the circuit for all.
    mocks.set_a(latency_ms=600)
    wait_half_open(rds, "a")
    mocks.a.records.clear()
    results = burst(gateways, 4)
    assert all(status == 200 for status, _, _ in results), results
    assert sorted(provider or "" for _, provider, _ in results) == ["a"] + ["b"] * 11, "one probe, on one replica"
    assert all(attempts == 1 for _, _, attempts in results)
    assert len(mocks.a.records) == 1
    wait_for(lambda: health(rds, "a").get("open_until") == 0, 5, "the circuit to close")
    assert rds.exists(probe_key("a")) == 0, "the probe lock is released"
    mocks.set_a()
    for gw in gateways:  # recovered: every replica prefers "a" again
        assert chat(gw) == (200, "a", 1)


def test_retry_after_opens_the_circuit_exactly_until_then(cluster: Callable[..., list[Proc]], mocks: Mocks,
                                                           rds: redis.Redis) -> None:
    g1, g2 = cluster(2, ejection="30s")
    mocks.set_a(fault_status=429, retry_after=1)
    assert chat(g1) == (200, "b", 2)  # one provider 429 with Retry-After: 1 s
    state = wait_open(rds, "a", 1)
    assert state["open_until"] - state["updated"] == 1000, "open exactly for the Retry-After, no jitter"
    assert chat(g2) == (200, "b", 1)
    assert len(mocks.a.records) == 1
    mocks.set_a()
    wait_half_open(rds, "a")
    assert chat(g2) == (200, "a", 1)  # the probe succeeds ...
    wait_for(lambda: health(rds, "a").get("open_until") == 0, 5, "the circuit to close")
    assert chat(g1) == (200, "a", 1)  # ... and the circuit is closed for everyone


def test_redis_down_each_replica_keeps_its_breaker_locally(cluster: Callable[..., list[Proc]], mocks: Mocks,
                                                           redis_server: dict[str, Any]) -> None:
    g1, g2 = cluster(2, ejection="30s")
    mocks.set_a(fault_status=503)
    redis_server["proc"].kill()
    redis_server["proc"].wait()
    seen = [chat(g1) for _ in range(7)]
    assert all(status == 200 and provider == "b" for status, provider, _ in seen), seen
    assert [attempts for _, _, attempts in seen] == [2] * 5 + [1] * 2, "replica 1's own breaker opened after 5"
    assert len(mocks.a.records) == 5
    # Replica 2's breaker is its own: it has not seen "a" fail, so it still tries it first, and still answers.
    assert chat(g2) == (200, "b", 2)
    assert len(mocks.a.records) == 6
    for _ in range(3):
        assert chat(g1) == (200, "b", 1)
