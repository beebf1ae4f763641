"""Failover: the attempt loop around the forwarder, retrying only before the commit point.

Contract:
- An attempt that fails before any byte reached the client (connect error, timeout before the
  first byte, a plain answer whose head came but whose body did not start within `first_byte`, a
  retryable status: 429, 500/502/503/504/529, a status that cannot be relayed such as 999, or an
  in-band stream error held back before the first content) is retried on the next healthy
  candidate that is within its own limits (`ctx.admit_deployment`), else on the same deployment (after a 429 only once; a billing
  quota such as OpenAI `insufficient_quota` only moves to another deployment). After the first byte nothing is
  retried: the error layer ends the stream with the family's error frame.
- Backoff is exponential with full jitter; a `Retry-After` is honoured when it fits the deadline.
  The deadline is `gateway.timeout`, or the client's `x-stainless-timeout` /
  `x-stainless-read-timeout` when lower.
- Retry budget (Envoy's rule): retries in flight <= 20% of active requests + 3, and over time at
  most 0.2 retries per request + 3, so an outage cannot multiply load.
- A request the response cache answers (`ctx.replay`) makes no attempt: the replay sends the answer.
- Every attempt's outcome feeds the shared circuit breaker (a provider 429 with `Retry-After`
  ejects the deployment until then; a 429 relayed as is counts neither way). The final failure
  is native: the last upstream response verbatim, or the gateway's error, with `x-gateway-attempts`, and
  `x-should-retry: false` once the gateway has failed over.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import structlog

from config.models import Config
from proxy.context import RequestContext, get_context
from proxy.errors import GatewayError, UpstreamFailure
from proxy.headers import gateway_headers
from proxy.runtime import Runtime

log = structlog.get_logger("llm_gateway.failover")
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0


class RetryBudget:
    """Process-wide: not per request, so it may live on the middleware."""

    def __init__(self, ratio: float = 0.2, floor: int = 3) -> None:
        self.ratio, self.floor = ratio, floor
        self.active = 0
        self.in_flight = 0
        self.tokens = float(floor)

    def admit(self) -> None:
        if self.active == 0:  # idle between requests: a lone request may always use the floor
            self.tokens = max(self.tokens, float(self.floor))
        self.active += 1
        self.tokens = min(self.tokens + self.ratio, self.floor + 100.0)

    def try_retry(self, first: bool) -> bool:
        """Spend one retry token; the first retry of a request also takes an in-flight slot."""
        if first and self.in_flight >= self.ratio * self.active + self.floor:
            return False
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        self.in_flight += first
        return True


def client_deadline(ctx: RequestContext) -> float | None:
    if ctx.header_map is not None and b"x-stainless-timeout" not in ctx.header_map \
            and b"x-stainless-read-timeout" not in ctx.header_map:
        return None  # most clients send neither
    values = []
    for name in (b"x-stainless-timeout", b"x-stainless-read-timeout"):
        raw = ctx.header(name)
        try:
            if raw is not None and float(raw) > 0:
                values.append(float(raw))
        except ValueError:
            continue
    return min(values) if values else None


class FailoverMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.runtime = deps
        self.enabled = config.gateway.enable_failover
        self.max_retries = config.gateway.max_retries if self.enabled else 0
        self.timeout = config.gateway.timeout
        self.budget = RetryBudget()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        if ctx.replay is not None:  # answered from the response cache: no attempt, nothing to fail over
            await ctx.replay(ctx, send)
            return
        client = client_deadline(ctx)
        if client:  # answer before the client gives up: keep a margin for the reply to reach it
            client -= min(1.0, 0.1 * client)
        budget = min(x for x in (self.timeout, client) if x) if self.timeout or client else None
        deadline = ctx.started + budget if budget else None
        ctx.deadline = deadline  # the forwarder bounds each attempt's wait for the first byte by it
        ctx.deployment = ctx.admitted or ctx.candidates[0]  # the limiter's reservation, else the router's first
        health = self.runtime.health
        self.budget.admit()
        retrying = False
        try:
            while True:
                dep = ctx.deployment
                assert dep is not None, "the router sets a deployment"
                remaining = self.max_retries - (ctx.attempts + 1) + 1
                ctx.may_retry = remaining > 0 and self.max_retries > 0
                # Hold a stream's start only when another deployment could take over: with one
                # deployment the first chunk goes out at once (no added time to first chunk).
                ctx.hold_stream = ctx.may_retry and ctx.stream and len(ctx.candidates) > 1
                health.begin(dep.name)
                try:
                    await self.app(scope, receive, send)
                    attempt = ctx.attempt
                    outcome = attempt.outcome if attempt is not None else None
                    if outcome not in ("rate_limited", "quota"):  # a 429 relayed as is tells nothing of health
                        health.record(dep.name, "fail" if outcome == "transient" else "ok")
                    if attempt is not None and attempt.ttfb is not None:
                        health.observe_ttfb(dep.name, attempt.ttfb)
                    return
                except UpstreamFailure as failure:
                    if failure.kind == "rate_limited":
                        self.runtime.observer.rate_limited(ctx, f"provider:{dep.name}", "upstream")
                    throttled = failure.kind == "rate_limited" or failure.status == 529
                    cut_by_client = (failure.code == "upstream_timeout" and deadline is not None
                                     and time.perf_counter() >= deadline - 0.05)
                    if failure.kind != "quota" and not cut_by_client:  # neither is the deployment's health
                        health.record(dep.name, "throttle" if throttled and failure.retry_after else "fail",
                                      failure.retry_after)
                    if ctx.committed or ctx.client_disconnected:
                        raise
                    nxt = await self._next(ctx, failure, deadline, retrying)
                    if nxt is None:
                        await self._final(ctx, failure, send)
                        return
                    if not retrying:
                        retrying = True
                    self.runtime.observer.failover(ctx, dep, nxt, failure.code)
                    log.info("failover", request_id=ctx.request_id, failed=dep.name, next=nxt.name,
                             attempt=ctx.attempts + 1, reason=failure.code, status=failure.status)
                    ctx.failed_over = ctx.failed_over or nxt.name != dep.name
                    ctx.deployment = nxt
                finally:
                    health.end(dep.name)
        finally:
            self.budget.active -= 1
            if retrying:
                self.budget.in_flight -= 1

    async def _next(self, ctx: RequestContext, failure: UpstreamFailure, deadline: float | None, retrying: bool):  # -> Deployment | None
        if ctx.attempts > self.max_retries:
            return None
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            return None
        untried = [d for d in ctx.candidates if d.name not in ctx.tried]
        chosen = None
        if untried:
            chosen = await ctx.admit_deployment(untried) if ctx.admit_deployment else untried[0]
        delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (ctx.attempts - 1)))
        if chosen is None:
            # Nothing else can take it: the same deployment again, except for a billing quota
            # (never transient), and after a 429 only once (the client's SDK backs off too).
            if failure.kind == "quota" or (failure.kind == "rate_limited" and ctx.throttle_retried):
                return None
            if failure.kind == "rate_limited":
                ctx.throttle_retried = True
            chosen = ctx.deployment
            if failure.retry_after is not None:
                delay = max(delay, failure.retry_after)
        if deadline is not None and now + delay >= deadline:
            return None
        if not self.budget.try_retry(first=not retrying):
            log.warning("retry_budget_exhausted", request_id=ctx.request_id)
            self.runtime.observer.retry_budget_exhausted(ctx)
            return None
        await asyncio.sleep(delay)
        return chosen

    async def _final(self, ctx: RequestContext, failure: UpstreamFailure, send: Any) -> None:
        if failure.response is None:
            failure.headers["x-should-retry"] = "false" if ctx.attempts > 1 else failure.headers.get("x-should-retry", "true")
            raise GatewayError(failure.code, failure.message, headers=failure.headers, retry_after=failure.retry_after)
        status, headers, body = failure.response
        ctx.status = status
        headers = [(k, v) for k, v in headers if k not in (b"x-should-retry", b"content-length")]
        headers += [(b"content-length", str(len(body)).encode()), *gateway_headers(ctx)]
        if ctx.attempts > 1 or failure.kind == "quota":
            headers.append((b"x-should-retry", b"false"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
