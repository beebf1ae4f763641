"""The telemetry seam: every decision the gateway makes is reported to one `Observer`.

Contract: kernel modules and middlewares call these hooks at the moment a decision is made; the
base class does nothing, so traffic never depends on telemetry. An implementation (OpenTelemetry
traces and metrics, Prometheus) overrides what it needs. Hooks must be cheap, must not raise and
must not block; `attempt_start` may add headers (e.g. `traceparent`) to the upstream request.
"""
from __future__ import annotations

from typing import Any

from config.models import Deployment
from proxy.context import RequestContext


class Observer:
    def request_start(self, ctx: RequestContext, scope: dict[str, Any]) -> Any:
        """The server span for one client request; returns a handle for `request_end`."""
        return None

    def request_end(self, ctx: RequestContext, handle: Any, status: int, outcome: str) -> None:
        pass

    def attempt_start(self, ctx: RequestContext, dep: Deployment, url: str,
                      headers: list[tuple[str, str]]) -> Any:
        """One upstream attempt (a CLIENT span); may append propagation headers."""
        return None

    def attempt_end(self, ctx: RequestContext, dep: Deployment, handle: Any, status: int | None,
                    error_type: str | None) -> None:
        pass

    def first_chunk(self, ctx: RequestContext, seconds: float) -> None:
        """Time from the attempt start to the first response chunk relayed to the client."""

    def failover(self, ctx: RequestContext, failed: Deployment, nxt: Deployment, reason: str) -> None:
        pass

    def retry_budget_exhausted(self, ctx: RequestContext) -> None:
        pass

    def rate_limited(self, ctx: RequestContext, scope: str, source: str) -> None:
        """source: "gateway" (our limiter) or "upstream" (a provider's 429)."""

    def limiter_mode(self, degraded: bool, mode: str) -> None:
        pass

    def redis_call(self, seconds: float, ok: bool) -> None:
        pass

    def circuit_changed(self, deployment: str, is_open: bool) -> None:
        pass

    def client_disconnected(self, ctx: RequestContext) -> None:
        pass

    def pool_saturated(self, ctx: RequestContext) -> None:
        pass

    def cache_result(self, ctx: RequestContext, result: str, saved_tokens: int, saved_cost_usd: float) -> None:
        """The response cache's decision (hit, miss, bypass, coalesced) and what a served answer saved."""

    def cache_bytes(self, size: int) -> None:
        """The embedded response cache now holds `size` bytes."""
