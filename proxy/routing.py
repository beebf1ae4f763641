"""Routing strategies: a small protocol with a name registry, pluggable by import path.

Contract: a strategy orders the deployments that can serve a request, best first; it never does
I/O (shared figures come from `SharedHealth.snapshot()`, refreshed off the request path).
Deployments already tried in this request, and deployments whose circuit is open, go last; the
reservation script then takes the first one that is healthy and within its own limits.
Built-ins: round_robin, weighted, cost_based, latency_based, least_busy, health_based. A custom one
is named `package.module:ClassName` (or `package.module.ClassName`) in `gateway.routing_strategy`
and is constructed with no arguments.
"""
from __future__ import annotations

import importlib
import itertools
import random
import time
from typing import Protocol

from config.models import Deployment
from proxy.context import RequestContext
from proxy.state.health import DeploymentStats


class Strategy(Protocol):
    def order(self, deps: list[Deployment], ctx: RequestContext,
              stats: dict[str, DeploymentStats]) -> list[Deployment]: ...


class HealthBased:
    """Healthy first, then by priority (higher first), then config order."""

    def order(self, deps: list[Deployment], ctx: RequestContext, stats: dict[str, DeploymentStats]) -> list[Deployment]:
        return sorted(deps, key=lambda d: -d.priority)


class RoundRobin:
    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def order(self, deps: list[Deployment], ctx: RequestContext, stats: dict[str, DeploymentStats]) -> list[Deployment]:
        if len(deps) < 2:
            return deps
        counter = self._counters.setdefault(f"{ctx.family}:{ctx.model}", itertools.count())
        start = next(counter) % len(deps)
        return deps[start:] + deps[:start]


class Weighted:
    """Random order where each pick is proportional to `weight` (weighted sampling without replacement)."""

    def order(self, deps: list[Deployment], ctx: RequestContext, stats: dict[str, DeploymentStats]) -> list[Deployment]:
        keyed = [(random.random() ** (1.0 / d.weight) if d.weight > 0 else 0.0, d) for d in deps]
        return [d for _, d in sorted(keyed, key=lambda kd: -kd[0])]


class CostBased:
    """Cheapest first for this request's estimated input and output tokens."""

    def order(self, deps: list[Deployment], ctx: RequestContext, stats: dict[str, DeploymentStats]) -> list[Deployment]:
        prompt = max(1, len(ctx.body) // 4)
        output = max(0, ctx.estimated_tokens - prompt)

        def cost(d: Deployment) -> float:
            return prompt / 1000 * d.cost.input_per_1k + output / 1000 * d.cost.output_per_1k

        return sorted(deps, key=cost)


class LatencyBased:
    """Lowest shared time-to-first-byte EWMA first; unmeasured deployments are tried first."""

    def order(self, deps: list[Deployment], ctx: RequestContext, stats: dict[str, DeploymentStats]) -> list[Deployment]:
        def ttfb(d: Deployment) -> float:
            s = stats.get(d.name)
            return -1.0 if s is None or s.ttfb_ewma is None else s.ttfb_ewma

        return sorted(deps, key=ttfb)


class LeastBusy:
    """Fewest in-flight attempts across all replicas first; ties broken at random."""

    def order(self, deps: list[Deployment], ctx: RequestContext, stats: dict[str, DeploymentStats]) -> list[Deployment]:
        return sorted(deps, key=lambda d: ((stats.get(d.name) or DeploymentStats()).inflight, random.random()))


REGISTRY: dict[str, type] = {
    "health_based": HealthBased, "round_robin": RoundRobin, "weighted": Weighted,
    "cost_based": CostBased, "latency_based": LatencyBased, "least_busy": LeastBusy,
}


def load_strategy(name: str) -> Strategy:
    if name in REGISTRY:
        return REGISTRY[name]()
    module, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not sep:
        raise ValueError(f"unknown routing strategy {name!r}")
    return getattr(importlib.import_module(module), attr)()


def arrange(strategy: Strategy, deps: list[Deployment], ctx: RequestContext,
            stats: dict[str, DeploymentStats]) -> list[Deployment]:
    """The strategy's order, then open circuits and already-tried deployments moved last."""
    ordered = strategy.order(list(deps), ctx, stats)
    now = time.time()
    return sorted(ordered, key=lambda d: (d.name in ctx.tried, (stats.get(d.name) or DeploymentStats()).open_until > now))
