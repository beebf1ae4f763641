"""Distributed rate limiting: one atomic Redis script per request, reconciled off the critical path.

Contract:
- Scopes: `global`, `key:<id>`, `model:<name>` must all admit the request; among the router's
  candidate deployments (`provider:<name>`), the first that admits it is reserved and becomes
  `ctx.deployment`. One script call does all of it (all or nothing); Redis TIME is the clock.
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
"""
from __future__ import annotations

import asyncio
import functools
import math
import uuid
from typing import Any

import structlog

from config.models import Config, Deployment
from proxy.context import RequestContext, get_context
from proxy.errors import GatewayError
from proxy.local_limits import LocalLimiter
from proxy.runtime import Runtime
from proxy.health import PROBE_LOCK_MS, health_key, probe_key
from proxy.state import StoreUnavailable, concurrency_key, counter_keys, done_key, limits_key

log = structlog.get_logger("llm_gateway.ratelimit")
SETTLE_EVERY = 0.005
_STAT = 7


def _limit(value: int | None) -> int:
    return -1 if value is None else value


@functools.lru_cache(maxsize=65536)
def _scope_keys(scope: str, deployment: bool) -> tuple[bytes, ...]:
    """The Redis keys of one scope, encoded once (scopes repeat on every request)."""
    names = [*counter_keys(scope), limits_key(scope)]
    if deployment:
        dep = scope.split(":", 1)[1]
        names += [health_key(dep), probe_key(dep)]
    return tuple(n.encode() for n in names)


@functools.lru_cache(maxsize=4096)
def _limit_arg(value: int | None) -> bytes:
    return str(-1 if value is None else value).encode()


class RateLimitMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.runtime = deps
        self.mode = config.state.on_redis_error
        self.timeout = config.gateway.timeout
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
        # Settlements are batched (process-wide, like a pool): one pipelined round trip per
        # SETTLE_EVERY seconds instead of one per request.
        self.settlements: list[tuple[list[Any], list[Any]]] = []
        self.flusher: asyncio.Task[None] | None = None

    def scopes(self, ctx: RequestContext) -> tuple[list[tuple[str, int | None, int | None]], list[tuple[str, int | None, int | None]]]:
        p = ctx.principal
        common = [("global", *self.global_limits)]
        if p is not None:
            common.append((f"key:{p.key_id}", p.rpm, p.tpm))
        if ctx.model:
            common.append((f"model:{ctx.model}", None, None))
        candidates = [(f"provider:{d.name}", *self.providers.get(d.name, (None, None))) for d in ctx.candidates]
        return common, candidates

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
        if ctx.model_list or self._unlimited(ctx):
            await self.app(scope, receive, send)
            return
        common, candidates = self.scopes(ctx)
        member = f"{ctx.request_id}:{uuid.uuid4().hex[:12]}"
        conc = ctx.principal.max_concurrent if ctx.principal else None
        conc_key = concurrency_key(ctx.principal.key_id) if conc and ctx.principal else None
        headers = await self._reserve(ctx, common, candidates, member, conc, conc_key)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and headers:
                message = {**message, "headers": list(message.get("headers", [])) + headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            try:
                self._settle(ctx, common, candidates, member, conc_key)  # queues; the I/O is batched
            except Exception:  # noqa: BLE001 - settling must never hurt a finished request
                log.exception("settle_failed", request_id=ctx.request_id)

    def _keys_args(self, ctx: RequestContext, common: list[Any], candidates: list[Any], member: str,
                   conc: int | None, conc_key: str | None) -> tuple[list[bytes], list[Any]]:
        keys: list[bytes] = []
        args: list[Any] = [member, ctx.estimated_tokens, len(common), conc or 0,
                           int(self.timeout * 1000) + 60000, PROBE_LOCK_MS]
        for name, rpm, tpm in common:
            keys.extend(_scope_keys(name, False))
            args.extend((_limit_arg(rpm), _limit_arg(tpm)))
        for name, rpm, tpm in candidates:
            keys.extend(_scope_keys(name, True))
            args.extend((_limit_arg(rpm), _limit_arg(tpm)))
        if conc_key:
            keys.append(conc_key.encode())
        return keys, args

    async def _reserve(self, ctx: RequestContext, common: list[Any], candidates: list[Any], member: str,
                       conc: int | None, conc_key: str | None) -> list[tuple[bytes, bytes]]:
        keys, args = self._keys_args(ctx, common, candidates, member, conc, conc_key)
        try:
            reply = await self.runtime.store.script("reserve", keys, args)
        except StoreUnavailable:
            return self._fallback(ctx, common, candidates, member, conc, conc_key)
        admitted, chosen, retry_ms, marker = int(reply[0]), int(reply[1]), int(reply[2]), int(reply[4])
        stats = [int(v) for v in reply[6:]]
        rows = [stats[i:i + _STAT] for i in range(0, len(stats) - _STAT + 1, _STAT)]
        everything = common + candidates
        headers = self._headers(ctx, rows, everything)
        if not admitted and marker == -4:
            raise GatewayError("upstream_unavailable", "no deployment for this model can serve right now",
                               retry_after=retry_ms / 1000.0, headers={"retry-after": str(max(1, math.ceil(retry_ms / 1000)))})
        if not admitted:
            reason = {-2: "concurrent request limit", -3: "every deployment for this model is at its limit"}.get(marker, "rate limit")
            self.runtime.observer.rate_limited(ctx, reason, "gateway")
            raise self._reject(ctx, retry_ms / 1000.0, reason, headers, concurrency=marker == -2)
        if candidates and chosen > 0:
            ctx.deployment = ctx.candidates[chosen - 1]
        ctx.reservation = {"member": member, "tokens": ctx.estimated_tokens, "store": "redis",
                           "deployments": [ctx.deployment.name] if ctx.deployment and candidates else []}
        ctx.admit_deployment = self._admitter(ctx)
        return headers

    def _admitter(self, ctx: RequestContext) -> Any:
        """For further attempts: reserve the first of these deployments that is healthy and within limits."""

        async def admit(deps: list[Deployment]) -> Deployment | None:
            candidates = [(f"provider:{d.name}", *self.providers.get(d.name, (None, None))) for d in deps]
            member = f"{ctx.request_id}:{uuid.uuid4().hex[:12]}"
            if ctx.reservation and ctx.reservation.get("store") == "redis":
                keys, args = self._keys_args(ctx, [], candidates, member, None, None)
                try:
                    reply = await self.runtime.store.script("reserve", keys, args)
                except StoreUnavailable:
                    reply = None
                if reply is not None:
                    if not int(reply[0]) or int(reply[1]) < 1:
                        return None
                    chosen = deps[int(reply[1]) - 1]
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
            raise self._reject(ctx, retry, "rate limit (local fallback)", [], concurrency=False)
        if usable and chosen >= 0:
            name = usable[chosen][0].split(":", 1)[1]
            ctx.deployment = next(d for d in ctx.candidates if d.name == name)
        ctx.reservation = {"member": member, "tokens": ctx.estimated_tokens, "store": "local",
                           "deployments": [ctx.deployment.name] if ctx.deployment and candidates else []}
        ctx.admit_deployment = self._admitter(ctx)
        return []

    def _reject(self, ctx: RequestContext, retry: float, reason: str, headers: list[tuple[bytes, bytes]],
                concurrency: bool) -> GatewayError:
        retry = max(retry, 0.001)
        seconds = min(60, max(1, math.ceil(retry)))
        extra = {k.decode(): v.decode() for k, v in headers}
        extra.update({"retry-after": str(seconds), "retry-after-ms": str(int(retry * 1000)),
                      "x-should-retry": "true" if retry <= 60 else "false"})
        return GatewayError("policy_concurrency_limited" if concurrency else "policy_rate_limited",
                            f"Rate limit exceeded: {reason}. Retry after {seconds}s.",
                            headers=extra, retry_after=retry, detail="requests")

    def _headers(self, ctx: RequestContext, rows: list[list[int]], scopes: list[Any]) -> list[tuple[bytes, bytes]]:
        best_req = best_tok = None
        for row in rows:
            _, rpm, rem_r, reset_r, tpm, rem_t, reset_t = row
            name = scopes[row[0] - 1][0]
            seen = self.seen_limits.get(name)
            if seen != (rpm, tpm):
                self.seen_limits[name] = (rpm, tpm)
                if seen is not None:  # a live change (CLI, admin API or redis-cli) reached this replica
                    log.info("limit_applied", scope=name, requests_per_minute=rpm, tokens_per_minute=tpm,
                             previous_requests_per_minute=seen[0], previous_tokens_per_minute=seen[1])
            if rpm > 0 and (best_req is None or rem_r / rpm < best_req[1] / best_req[0]):
                best_req = (rpm, rem_r, reset_r, scopes[row[0] - 1][0])
            if tpm > 0 and (best_tok is None or rem_t / tpm < best_tok[1] / best_tok[0]):
                best_tok = (tpm, rem_t, reset_t, scopes[row[0] - 1][0])
        return ctx.adapter.rate_limit_headers(best_req, best_tok)

    def _settle(self, ctx: RequestContext, common: list[Any], candidates: list[Any], member: str,
                      conc_key: str | None) -> None:
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
        final_scope = [(f"provider:{final}", self.providers.get(final, (None, None))[1])] \
            if final in res["deployments"] else []
        groups = [(delta, [(name, tpm) for name, _, tpm in common] + final_scope)]
        failed = [d for d in res["deployments"] if d != final]
        if failed:  # attempts that failed over generated nothing: give their tokens back
            groups.append((-est, [(f"provider:{d}", self.providers.get(d, (None, None))[1]) for d in failed]))
        for i, (amount, token_scopes) in enumerate(groups):
            # Nothing to settle without a token limit in play (a live one could exist: only when
            # the deployment has Redis, where live hashes are read by the script, do we still call).
            if not (i == 0 and conc_key) and (not token_scopes or (
                    res["store"] == "local" and all(tpm is None for _, tpm in token_scopes))):
                continue
            if res["store"] == "local":
                self.local.settle(token_scopes, amount, member, conc_key if i == 0 else None, estimate=est)
                continue
            tag = member if i == 0 else f"{member}:failed"
            keys = [done_key(tag), (conc_key if i == 0 else None) or done_key(tag)]
            args: list[Any] = [member, amount]
            for name, tpm in token_scopes:
                keys.extend((counter_keys(name)[1], limits_key(name)))
                args.append(_limit(tpm))
            args.append(est)  # last: each scope is settled against the min(estimate, tpm) it was charged
            self.settlements.append((keys, args))
        if self.settlements and (self.flusher is None or self.flusher.done()):
            self.flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        """Settle every finished request of the last few milliseconds in one pipelined round trip."""
        await asyncio.sleep(SETTLE_EVERY)
        while self.settlements:
            batch, self.settlements = self.settlements[:500], self.settlements[500:]
            try:
                replies = await self.runtime.store.script_many("reconcile", batch)
                failed = [r for r in replies if isinstance(r, Exception)]
                if failed:
                    log.warning("reconcile_failed", count=len(failed), error=type(failed[0]).__name__)
            except StoreUnavailable:
                log.warning("reconcile_skipped", count=len(batch), reason="store unavailable")
            except Exception:  # noqa: BLE001 - reconciling must never hurt a finished request
                log.exception("reconcile_failed", count=len(batch))
