"""Routing strategies: table-driven unit tests (no servers), plus two checks through a real gateway.

Unit: round robin alternates; weighted stays within tolerance over 1000 picks; cost_based picks the
cheapest for the request's estimate; latency_based prefers the fast deployment once measured and
explores unmeasured ones first; least_busy follows in-flight counts and so spreads load; health_based
orders by priority; a custom strategy (this module's `MyStrategy`) loads by import path, as
`gateway.routing_strategy` and per model through `gateway.routing_overrides`; `arrange()` moves tried
and open-circuit deployments last.

Integration: through a real gateway, latency_based prefers a fast simulated upstream over a slow one
after warm-up, and least_busy spreads concurrent requests across two deployments.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from typing import Any, Callable, Iterator

import httpx
import pytest

from config import ConfigError, parse_config
from config.models import Cost, Deployment
from middlewares.router import RouterMiddleware
from proxy.app import build_app
from proxy.context import RequestContext
from proxy.state.health import DeploymentStats
from proxy.mock import MockOptions, build_mock_app
from proxy.routing import (
    REGISTRY, CostBased, HealthBased, LatencyBased, LeastBusy, RoundRobin, Weighted, arrange, load_strategy,
)
from proxy.runtime import Runtime
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.servers import serve

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello routing"}]}


class MyStrategy:
    """A custom strategy loaded by import path: reverse alphabetical order, and it counts its calls."""

    calls = 0

    def order(self, deps: list[Deployment], ctx: RequestContext,
              stats: dict[str, DeploymentStats]) -> list[Deployment]:
        MyStrategy.calls += 1
        return sorted(deps, key=lambda d: d.name, reverse=True)


def dep(name: str, **fields: Any) -> Deployment:
    return Deployment(name=name, type="openai", family="openai", base_url=f"http://{name}.invalid/v1", **fields)


def ctx(model: str = "gpt-4o", *, body: bytes = b"", estimated: int = 0, tried: tuple[str, ...] = ()) -> RequestContext:
    c = RequestContext(request_id="req-1", family="openai", adapter=None, method="POST",  # type: ignore[arg-type]
                       path="/v1/chat/completions", query="", headers=[])
    c.model, c.body, c.estimated_tokens, c.tried, c.operation = model, body, estimated, list(tried), "chat"
    return c


def names(deps: list[Deployment]) -> list[str]:
    return [d.name for d in deps]


# ---------------------------------------------------------------- built-in strategies

def test_registry_names_match_the_config_contract() -> None:
    assert set(REGISTRY) == {"round_robin", "weighted", "cost_based", "latency_based", "least_busy", "health_based"}
    for name, cls in REGISTRY.items():
        assert isinstance(load_strategy(name), cls)


@pytest.mark.parametrize("count,expected_heads", [
    (2, ["a", "b", "a", "b", "a", "b"]),
    (3, ["a", "b", "c", "a", "b", "c"]),
    (1, ["a"] * 6),
])
def test_round_robin_alternates(count: int, expected_heads: list[str]) -> None:
    deps = [dep(n) for n in "abc"[:count]]
    rr = RoundRobin()
    orders = [names(rr.order(deps, ctx(), {})) for _ in range(6)]
    assert [o[0] for o in orders] == expected_heads
    assert all(sorted(o) == names(deps) for o in orders), "every candidate stays in the order, rotated"


def test_round_robin_keeps_one_rotation_per_model() -> None:
    deps = [dep("a"), dep("b")]
    rr = RoundRobin()
    heads = [(m, rr.order(deps, ctx(m), {})[0].name) for m in ("gpt-4o", "gpt-4o", "o3", "gpt-4o", "o3")]
    assert heads == [("gpt-4o", "a"), ("gpt-4o", "b"), ("o3", "a"), ("gpt-4o", "a"), ("o3", "b")]


@pytest.mark.parametrize("weights,expected_share", [((3, 1), 0.75), ((1, 1), 0.5), ((9, 1), 0.9), ((1, 4), 0.2)])
def test_weighted_first_pick_share_within_tolerance(weights: tuple[float, float], expected_share: float) -> None:
    random.seed(20240531)
    deps = [dep("a", weight=weights[0]), dep("b", weight=weights[1])]
    strategy = Weighted()
    firsts = collections.Counter(strategy.order(deps, ctx(), {})[0].name for _ in range(1000))
    assert abs(firsts["a"] / 1000 - expected_share) <= 0.05, firsts


def test_weighted_zero_weight_is_never_first_and_order_is_complete() -> None:
    random.seed(7)
    deps = [dep("a", weight=0), dep("b", weight=1), dep("c", weight=2)]
    orders = [names(Weighted().order(deps, ctx(), {})) for _ in range(300)]
    assert all(o[0] != "a" for o in orders)
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)


CHEAP_INPUT = dep("cheap-input", cost=Cost(input_per_1k=0.01, output_per_1k=0.10))
CHEAP_OUTPUT = dep("cheap-output", cost=Cost(input_per_1k=0.05, output_per_1k=0.02))
FREE = dep("free")


@pytest.mark.parametrize("body_chars,estimated,deps,expected", [
    (4000, 1010, [CHEAP_OUTPUT, CHEAP_INPUT], ["cheap-input", "cheap-output"]),   # long prompt, short answer
    (40, 4010, [CHEAP_INPUT, CHEAP_OUTPUT], ["cheap-output", "cheap-input"]),    # short prompt, long answer
    (400, 200, [CHEAP_INPUT, FREE, CHEAP_OUTPUT], ["free", "cheap-output", "cheap-input"]),
])
def test_cost_based_picks_the_cheapest_for_the_estimate(body_chars: int, estimated: int, deps: list[Deployment],
                                                       expected: list[str]) -> None:
    order = CostBased().order(deps, ctx(body=b"x" * body_chars, estimated=estimated), {})
    assert names(order) == expected


@pytest.mark.parametrize("ewma,expected", [
    ({"slow": 0.50, "fast": 0.05}, ["fast", "slow"]),
    ({"slow": 0.50, "fast": 0.05, "new": None}, ["new", "fast", "slow"]),   # unmeasured: explored first
    ({"slow": None, "fast": None}, ["slow", "fast"]),                        # nothing known: config order
    ({"slow": 0.20, "fast": 0.21}, ["slow", "fast"]),
])
def test_latency_based_prefers_fast_and_explores_unmeasured(ewma: dict[str, float | None], expected: list[str]) -> None:
    deps = [dep(n) for n in ewma]
    stats = {n: DeploymentStats(ttfb_ewma=v) for n, v in ewma.items()}
    assert names(LatencyBased().order(deps, ctx(), stats)) == expected


def test_latency_based_after_warm_up_follows_the_ewma() -> None:
    # The figures SharedHealth.observe_ttfb keeps: EWMA with alpha 0.3 over the observed TTFBs.
    def ewma(samples: list[float]) -> float:
        value = samples[0]
        for s in samples[1:]:
            value = 0.7 * value + 0.3 * s
        return value

    deps = [dep("a"), dep("b")]
    a_fast_then_slow = ewma([0.05, 0.05, 0.9, 0.9, 0.9])  # a degraded
    b_steady = ewma([0.2] * 5)
    stats = {"a": DeploymentStats(ttfb_ewma=a_fast_then_slow), "b": DeploymentStats(ttfb_ewma=b_steady)}
    assert names(LatencyBased().order(deps, ctx(), stats)) == ["b", "a"]


@pytest.mark.parametrize("inflight,expected_first", [
    ({"a": 5, "b": 1}, "b"), ({"a": 0, "b": 3}, "a"), ({"a": 2, "b": 2, "c": 1}, "c"),
])
def test_least_busy_prefers_fewest_in_flight(inflight: dict[str, int], expected_first: str) -> None:
    deps = [dep(n) for n in inflight]
    stats = {n: DeploymentStats(inflight=v) for n, v in inflight.items()}
    assert LeastBusy().order(deps, ctx(), stats)[0].name == expected_first


def test_least_busy_spreads_load() -> None:
    random.seed(3)
    deps = [dep("a"), dep("b"), dep("c")]
    stats = {d.name: DeploymentStats() for d in deps}
    strategy = LeastBusy()
    for _ in range(90):  # each pick stays in flight
        stats[strategy.order(deps, ctx(), stats)[0].name].inflight += 1
    assert sorted(s.inflight for s in stats.values()) == [30, 30, 30]
    ties = collections.Counter(LeastBusy().order(deps, ctx(), {})[0].name for _ in range(600))
    assert all(150 <= ties[n] <= 250 for n in "abc"), ties  # ties are broken at random, not by config order


@pytest.mark.parametrize("priorities,expected", [
    ({"a": 0, "b": 10, "c": 5}, ["b", "c", "a"]),
    ({"a": 1, "b": 1, "c": 1}, ["a", "b", "c"]),     # equal priority: config order
    ({"a": -1, "b": 0, "c": 0}, ["b", "c", "a"]),
])
def test_health_based_orders_by_priority(priorities: dict[str, int], expected: list[str]) -> None:
    deps = [dep(n, priority=p) for n, p in priorities.items()]
    assert names(HealthBased().order(deps, ctx(), {})) == expected


# ---------------------------------------------------------------- arrange(): tried and open circuits last

@pytest.mark.parametrize("tried,open_names,half_open,expected", [
    ((), (), (), ["a", "b", "c"]),
    (("a",), (), (), ["b", "c", "a"]),
    ((), ("b",), (), ["a", "c", "b"]),
    (("c",), ("a",), (), ["b", "a", "c"]),   # open last, tried after it
    (("a",), ("a",), (), ["b", "c", "a"]),
    ((), (), ("a",), ["a", "b", "c"]),       # ejection over (half-open): back in its place
    ((), ("a", "b", "c"), (), ["a", "b", "c"]),
])
def test_arrange_moves_tried_and_open_deployments_last(tried: tuple[str, ...], open_names: tuple[str, ...],
                                                        half_open: tuple[str, ...], expected: list[str]) -> None:
    deps = [dep("a", priority=3), dep("b", priority=2), dep("c", priority=1)]
    now = time.time()
    stats = {n: DeploymentStats(open_until=now + 30) for n in open_names}
    stats.update({n: DeploymentStats(open_until=now - 1, ejections=1) for n in half_open})
    assert names(arrange(HealthBased(), deps, ctx(tried=tried), stats)) == expected


# ---------------------------------------------------------------- custom strategies by import path

@pytest.mark.parametrize("path", ["tests.test_strategies:MyStrategy", "tests.test_strategies.MyStrategy"])
def test_custom_strategy_loads_by_import_path(path: str) -> None:
    strategy = load_strategy(path)
    assert isinstance(strategy, MyStrategy)
    assert names(strategy.order([dep("a"), dep("c"), dep("b")], ctx(), {})) == ["c", "b", "a"]


@pytest.mark.parametrize("bad", ["fastest", "tests.test_strategies:Missing", "no_such_module_xyz:Thing"])
def test_unknown_strategy_fails_loudly(bad: str) -> None:
    with pytest.raises((ValueError, AttributeError, ImportError)):
        load_strategy(bad)


def router_for(gateway_yaml: str) -> RouterMiddleware:
    cfg = parse_config(f"""
gateway: {gateway_yaml}
auth: {{mode: none}}
providers:
  alpha: {{type: openai, base_url: "http://alpha.invalid/v1", api_key: k1, priority: 10}}
  beta: {{type: openai, base_url: "http://beta.invalid/v1", api_key: k2, priority: 5}}
  gamma: {{type: openai, base_url: "http://gamma.invalid/v1", api_key: k3}}
""", "routing.yaml", {})
    return RouterMiddleware(None, cfg, deps=Runtime(cfg))


def test_custom_strategy_from_config() -> None:
    router = router_for('{routing_strategy: "tests.test_strategies:MyStrategy"}')
    before = MyStrategy.calls
    assert names(router.candidates(ctx("gpt-4o"))) == ["gamma", "beta", "alpha"]
    assert MyStrategy.calls == before + 1


def test_custom_strategy_as_a_per_model_override() -> None:
    router = router_for('{routing_strategy: health_based, routing_overrides: {o3: "tests.test_strategies:MyStrategy"}}')
    assert names(router.candidates(ctx("gpt-4o"))) == ["alpha", "beta", "gamma"]   # priority
    assert names(router.candidates(ctx("o3"))) == ["gamma", "beta", "alpha"]       # the override
    router = router_for("{routing_strategy: round_robin, routing_overrides: {o3: health_based}}")
    assert [router.candidates(ctx("gpt-4o"))[0].name for _ in range(3)] == ["alpha", "beta", "gamma"]
    assert [router.candidates(ctx("o3"))[0].name for _ in range(3)] == ["alpha"] * 3


def test_config_rejects_an_unknown_builtin_strategy() -> None:
    with pytest.raises(ConfigError, match="routing_strategy"):
        parse_config("gateway: {routing_strategy: fastest}\nproviders:\n  ollama: {}\n", "bad.yaml", {})


# ---------------------------------------------------------------- through a real gateway

@contextlib.contextmanager
def two_deployment_gateway(strategy: str, slow: MockOptions, fast: MockOptions) -> Iterator[tuple[str, Any]]:
    with contextlib.ExitStack() as stack:
        slow_url = stack.enter_context(serve(build_mock_app(slow), lifespan="off"))
        fast_url = stack.enter_context(serve(build_mock_app(fast), lifespan="off"))
        cfg = parse_config(f"""
gateway: {{timeout: 30s, routing_strategy: {strategy}}}
auth:
  keys:
    - {{id: team-test, sha256: {GATEWAY_KEY_SHA}}}
providers:
  slow: {{type: openai, base_url: "{slow_url}/v1", api_key: k1}}
  fast: {{type: openai, base_url: "{fast_url}/v1", api_key: k2}}
""", "routing.yaml", {})
        app = build_app(cfg)
        yield stack.enter_context(serve(app)), app


def provider_of(gw: str) -> str:
    r = httpx.post(f"{gw}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
    assert r.status_code == 200
    return r.headers["x-gateway-provider"]


def wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_latency_based_prefers_the_fast_upstream_after_warm_up() -> None:
    with two_deployment_gateway("latency_based", MockOptions(latency_ms=150, chunk_interval_ms=0),
                                MockOptions(chunk_interval_ms=0)) as (gw, app):
        warm_up: list[str] = []

        def measured() -> bool:
            warm_up.append(provider_of(gw))
            stats = app.runtime.health.snapshot()
            return all(stats[n].ttfb_ewma is not None for n in ("slow", "fast"))

        wait_for(measured, 10)  # unmeasured deployments are explored first, so both get measured
        assert set(warm_up) == {"slow", "fast"}, warm_up
        picks = collections.Counter(provider_of(gw) for _ in range(10))
        assert picks == {"fast": 10}, picks


def test_least_busy_spreads_concurrent_requests() -> None:
    slow = MockOptions(latency_ms=400, chunk_interval_ms=0)
    with two_deployment_gateway("least_busy", slow, slow) as (gw, _app):
        async def staggered() -> list[str]:
            async with httpx.AsyncClient(timeout=30) as c:
                async def one(i: int) -> str:
                    await asyncio.sleep(i * 0.05)
                    r = await c.post(f"{gw}/v1/chat/completions", headers=AUTH, json=CHAT)
                    assert r.status_code == 200
                    return r.headers["x-gateway-provider"]

                return await asyncio.gather(*(one(i) for i in range(24)))

        picks = collections.Counter(asyncio.run(staggered()))
        assert min(picks["slow"], picks["fast"]) >= 10, picks  # ~8 in flight at a time: alternates
