"""Distributed rate limiting: one atomic Redis script call per request, reconciled off the critical path.

Contract:
- Scopes: `global`, `key:<id>`, `model:<name>` must all admit the request; among the router's
  candidate deployments (`provider:<name>`), the first that admits it is reserved and becomes
  `ctx.admitted`. One script call does all of it (all or nothing); Redis TIME is the clock. The
  requests of one event-loop turn share that call (`proxy/state/reservations.py`), each still
  all or nothing and seeing the ones before it; settlements go as one call per 5 ms (`proxy/state/settlements.py`).
  Limits come from config, overridden live by the hashes in Redis (read inside the script, so a
  change applies on the next request, on every replica, without resetting counters).
- Requests: a 60 s sliding log (exact: never more than the limit in any 60 s window). Tokens: GCRA
  reserving `ctx.estimated_tokens`, reconciled with the real usage after the response (refund or
  charge), once per reservation. An aborted stream is charged what was counted, else the estimate.
- A rejection is a native 429 with `Retry-After` (whole seconds, <= 60), `retry-after-ms`,
  `x-should-retry`, Bedrock `x-amz-retry-after`, and the rate-limit headers. Admitted responses
  carry the family's rate-limit headers and IETF `RateLimit-Policy` / `RateLimit` for the most
  constraining scope.
- Redis down: `state.on_redis_error` = local (in-memory, limits / replicas), open, or closed (503).
- Per request only the member id, the estimate and the reply are new: the scopes, their encoded keys
  and default limits, and the settlement keys are built once per (key policy, model, candidate set)
  (`middlewares/ratelimit/plan.py`); at most `_MAX_PLANS` plans are kept, then the cache starts over.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Any

import structlog

from config.models import Config, Deployment
from proxy.state.reservations import CONCURRENCY, NONE_MAY_SERVE, Block, ReserveBatcher, Reservation
from middlewares.ratelimit.plan import Plan, encode, limit_arg, refusal, settle_keys
from proxy.state.settlements import SettleBlock, Settlements
from proxy.context import RequestContext, get_context
from proxy.errors import GatewayError
from proxy.state.local_limits import LocalLimiter
from proxy.runtime import Runtime
from proxy.state.health import PROBE_LOCK_MS
from proxy.state.store import StoreUnavailable

log = structlog.get_logger("llm_gateway.ratelimit")
_MAX_PLANS = 4096


class RateLimitMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.runtime = deps
        self.mode = config.state.on_redis_error
        self.timeout = config.gateway.timeout
        self.lease_ms = int(self.timeout * 1000) + 60000  # a concurrency slot outlives the longest request
        g = config.gateway.rate_limit
        self.global_limits = (g.requests_per_minute, g.tokens_per_minute)
        self.providers = {d.name: (d.rate_limit.requests_per_minute, d.rate_limit.tokens_per_minute)
                          for d in config.providers}
        self.local = LocalLimiter(config.state.replicas)
        # With the embedded store and no limit anywhere there is nothing to enforce: skip the script
        # until a live limit is set through this process's admin API.
        self.nothing_configured = g.is_empty() and all(d.rate_limit.is_empty() for d in config.providers) \
            and all(k.rate_limit.is_empty() and not k.max_concurrent for k in config.auth.keys)
        self.seen_limits: dict[str, tuple[int, int]] = {}  # scope -> effective limits last seen (for change logs)
        self.last_limits: dict[int, Any] = {}  # id(plan) -> its last reply's live limits (plans are kept)
        self.plans: dict[tuple[Any, ...], Plan] = {}
        # Member ids, unique per reservation across replicas without a random draw per request: a
        # random prefix per process, then a counter (after the request id, for operators).
        self.member_prefix = os.urandom(6).hex()
        self.member_seq = itertools.count()
        # Settlements are batched (process-wide, like a pool): one round trip per few milliseconds
        # instead of one per request.
        self.settlements = Settlements(deps, {name: SettleBlock(list(settle_keys(f"provider:{name}")), [limit_arg(tpm)])
                                              for name, (_, tpm) in self.providers.items()})
        deps.drains.append(self.settlements.drain)  # settle what is queued before the store closes
        self.batcher = ReserveBatcher(deps)  # process-wide too: reservations of one loop turn share a call

    def plan(self, ctx: RequestContext) -> Plan:
        p, names = ctx.principal, tuple([d.name for d in ctx.candidates])
        key = (p and (p.key_id, p.rpm, p.tpm, p.max_concurrent), ctx.model, names)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= _MAX_PLANS:  # many managed keys or models: start over, never grow unbounded
                self.plans.clear()
                self.last_limits.clear()  # keyed by the plans' ids
            plan = self.plans[key] = Plan(self.global_limits, self.providers, p, ctx.model, names, self.lease_ms)
        return plan

    def _member(self, ctx: RequestContext) -> str:
        return f"{ctx.request_id}:{self.member_prefix}{next(self.member_seq):x}"

    def _unlimited(self, ctx: RequestContext) -> bool:
        store = self.runtime.store
        p = ctx.principal
        return (self.nothing_configured and store.embedded and not store.live_limits
                and (p is None or (p.rpm is None and p.tpm is None and not p.max_concurrent)))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        if ctx.model_list or (self.nothing_configured and self._unlimited(ctx)):
            await self.app(scope, receive, send)
            return
        plan = self.plan(ctx)
        member = self._member(ctx)
        ctx.response_headers = await self._reserve(ctx, plan, member) or None  # the error layer adds them

        try:
            await self.app(scope, receive, send)
        finally:
            ctx.admit_deployment = None  # it holds ctx: without this, every context would wait for the GC
            try:
                self._settle(ctx, plan, member)  # queues; the I/O is batched
            except Exception:  # noqa: BLE001 - settling must never hurt a finished request
                log.exception("settle_failed", request_id=ctx.request_id)

    async def _reserve(self, ctx: RequestContext, plan: Plan, member: str) -> list[tuple[bytes, bytes]]:
        common, candidates = plan.common, plan.candidates
        try:
            reply = await self.batcher.reserve(plan.block, member, ctx.estimated_tokens)
        except StoreUnavailable:
            return self._fallback(ctx, common, candidates, member, plan.conc, plan.conc_key)
        chosen, retry_ms, marker = reply.chosen, reply.retry_ms, reply.marker
        headers = self._headers(ctx, reply, plan)
        if not reply.admitted and marker == NONE_MAY_SERVE:
            raise GatewayError("upstream_unavailable", "no deployment for this model can serve right now",
                               retry_after=retry_ms / 1000.0, headers={"retry-after": str(max(1, math.ceil(retry_ms / 1000)))})
        if not reply.admitted:
            reason, kind = refusal(ctx, reply, plan)
            self.runtime.observer.rate_limited(ctx, reason, "gateway")
            raise self._reject(ctx, retry_ms / 1000.0, reason, headers, concurrency=marker == CONCURRENCY, kind=kind)
        if candidates and chosen > 0:
            ctx.admitted = ctx.candidates[chosen - 1]
        ctx.reservation = {"member": member, "tokens": ctx.estimated_tokens, "store": "redis",
                           "deployments": [ctx.admitted.name] if ctx.admitted and candidates else []}
        ctx.admit_deployment = self._admitter(ctx)
        return headers

    def _admitter(self, ctx: RequestContext) -> Any:
        """For further attempts: reserve the first of these deployments that is healthy and within limits."""

        async def admit(deps: list[Deployment]) -> Deployment | None:
            candidates = [(f"provider:{d.name}", *self.providers.get(d.name, (None, None))) for d in deps]
            member = self._member(ctx)
            if ctx.reservation and ctx.reservation.get("store") == "redis":
                keys, limits = encode([], candidates, None)
                try:
                    block = Block(tuple(keys), [0, 0, self.lease_ms, PROBE_LOCK_MS, *limits])  # candidates only
                    reply = await self.batcher.reserve(block, member, ctx.estimated_tokens)
                except StoreUnavailable:
                    reply = None
                if reply is not None:
                    if not reply.admitted or reply.chosen < 1:
                        return None
                    chosen = deps[reply.chosen - 1]
                    ctx.reservation["deployments"].append(chosen.name)
                    return chosen
            usable = self._locally_healthy(candidates)
            ok, index, _ = self.local.reserve([], usable, ctx.estimated_tokens, member)
            if not ok or index < 0:
                return None
            name = usable[index][0].split(":", 1)[1]
            if ctx.reservation is not None:
                ctx.reservation["deployments"].append(name)
            return next(d for d in deps if d.name == name)

        return admit

    def _locally_healthy(self, candidates: list[Any]) -> list[Any]:
        """Redis down: each replica's own breaker state, with the same last-one and panic rules."""
        health = self.runtime.health
        healthy = [c for c in candidates if not health.locally_open(c[0].split(":", 1)[1])]
        return healthy if len(candidates) > 1 and len(healthy) * 2 >= len(candidates) else candidates

    def _fallback(self, ctx: RequestContext, common: list[Any], candidates: list[Any], member: str,
                  conc: int | None, conc_key: str | None) -> list[tuple[bytes, bytes]]:
        if self.mode == "open":
            return []
        if self.mode == "closed":
            raise GatewayError("gateway_unavailable", "rate limiter unavailable; try again shortly", retry_after=1.0)
        concurrency = (conc_key, conc, self.timeout + 60.0) if conc and conc_key else None
        usable = self._locally_healthy(candidates)
        ok, chosen, retry = self.local.reserve(common, usable, ctx.estimated_tokens, member, concurrency)
        if not ok:
            self.runtime.observer.rate_limited(ctx, "local fallback", "gateway")
            raise self._reject(ctx, retry, "the gateway's rate limit (local fallback while Redis is unavailable)", [],
                               concurrency=False)
        if usable and chosen >= 0:
            name = usable[chosen][0].split(":", 1)[1]
            ctx.admitted = next(d for d in ctx.candidates if d.name == name)
        ctx.reservation = {"member": member, "tokens": ctx.estimated_tokens, "store": "local",
                           "deployments": [ctx.admitted.name] if ctx.admitted and candidates else []}
        ctx.admit_deployment = self._admitter(ctx)
        return []

    def _reject(self, ctx: RequestContext, retry: float, reason: str, headers: list[tuple[bytes, bytes]],
                concurrency: bool, kind: str = "requests") -> GatewayError:
        retry = max(retry, 0.001)
        seconds = min(60, max(1, math.ceil(retry)))
        extra = {k.decode(): v.decode() for k, v in headers}
        extra.update({"retry-after": str(seconds), "retry-after-ms": str(int(retry * 1000)),
                      "x-should-retry": "true" if retry <= 60 else "false"})
        return GatewayError("policy_concurrency_limited" if concurrency else "policy_rate_limited",
                            f"Rate limit exceeded: {reason}. Retry after {seconds}s.",
                            headers=extra, retry_after=retry, detail=kind)

    def _headers(self, ctx: RequestContext, reply: Reservation, plan: Plan) -> list[tuple[bytes, bytes]]:
        """The rate-limit headers of the most constraining scope per dimension (reserve.lua picks it)."""
        # The effective limits only change when someone changes them live: the reply lists the live
        # ones of the checked scopes, compared here as a whole with this plan's last reply.
        seen = (reply.chosen, reply.live)
        if self.last_limits.get(id(plan)) != seen:
            self._note_limits(reply, plan)
            self.last_limits[id(plan)] = seen
        names = plan.names
        r, t = reply.requests, reply.tokens
        return ctx.adapter.rate_limit_headers((r.limit, r.remaining, r.reset_ms, names[r.scope - 1]) if r else None,
                                              (t.limit, t.remaining, t.reset_ms, names[t.scope - 1]) if t else None)

    def _note_limits(self, reply: Reservation, plan: Plan) -> None:
        """Log each checked scope whose effective limits differ from what this replica saw before."""
        rows = reply.live
        live = {rows[k]: (rows[k + 1], rows[k + 2]) for k in range(0, len(rows) - 2, 3)}
        checked = list(range(len(plan.common)))
        if reply.chosen > 0:
            checked.append(len(plan.common) + reply.chosen - 1)
        seen_limits = self.seen_limits
        for position in checked:
            name = plan.names[position]
            rpm, tpm = live.get(position + 1, plan.defaults[position])
            seen = seen_limits.get(name)
            if seen is None or seen[0] != rpm or seen[1] != tpm:
                seen_limits[name] = (rpm, tpm)
                if seen is not None:  # a live change (CLI, admin API or redis-cli) reached this replica
                    log.info("limit_applied", scope=name, requests_per_minute=rpm, tokens_per_minute=tpm,
                             previous_requests_per_minute=seen[0], previous_tokens_per_minute=seen[1])

    def _settle(self, ctx: RequestContext, plan: Plan, member: str) -> None:
        res = ctx.reservation
        if not res:
            return
        est = res["tokens"]
        if ctx.usage.known:
            delta = ctx.usage.total - est
        elif ctx.committed and (ctx.status or 500) < 400:
            delta = 0  # aborted or unreadable stream: the estimate stands
        else:
            delta = -est  # nothing was generated
        final = ctx.deployment.name if ctx.deployment else None
        final = final if final in res["deployments"] else None
        failed = [d for d in res["deployments"] if d != final]  # attempts that failed over generated nothing
        if res["store"] == "local":
            scopes = [(name, tpm) for name, _, tpm in plan.common] + [(f"provider:{d}", self._tpm(d)) for d in (final,) if d]
            self.local.settle(scopes, delta, member, plan.conc_key, estimate=est)
            if failed:
                self.local.settle([(f"provider:{d}", self._tpm(d)) for d in failed], -est, member, None, estimate=est)
            return
        self.settlements.add(member, member, plan.conc_key, delta, plan.settle, [final] if final else [], est)
        if failed:  # refunded under their own marker, so each part settles once
            self.settlements.add(f"{member}:failed", member, None, -est, None, failed, est)

    def _tpm(self, deployment: str) -> int | None:
        return self.providers.get(deployment, (None, None))[1]
