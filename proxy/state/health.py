"""Shared deployment health: a passive circuit breaker per deployment, plus the live figures that
the latency- and load-aware strategies read (time-to-first-byte EWMA, in-flight attempts).

Contract:
- `record(dep, outcome, retry_after)` feeds one attempt's outcome to the shared breaker in Redis
  (`health.lua`): it opens after `FAILURES_TO_OPEN` consecutive transient failures, or at once on a
  provider 429/529 carrying `Retry-After` (until then); repeat ejections last 30 s x n
  (`gateway.circuit_base_ejection`), capped at 300 s, with jitter. The reservation script
  (`reserve.lua`) reads the same hash, so every replica skips an open deployment from its next
  request on; exactly one replica wins the half-open probe. A success closes an open circuit only
  once its ejection is over (the probe's): one that was in flight when a 429 opened it does not.
- This replica's own ejections count in `snapshot()` at once (a throttle before its Redis write
  lands, a failure as soon as the script answers), and a refresh read from Redis never overwrites
  a fresher one of them with an older view.
- While Redis is unavailable each replica keeps the same breaker locally (`locally_open`), and
  Redis being down causes no errors.
- `observe_ttfb`, `begin`/`end` keep shared EWMA and in-flight figures, pushed in one pipeline per
  refresh (not per request); a success reaches Redis only when it changes the breaker; `snapshot()` is the local
  copy (refreshed every `REFRESH` s off the request path, this replica's own attempts counted at
  once) that strategies read without I/O.
- Recording happens off the critical path (tasks kept referenced until done). `aclose()` stops the
  refresher and waits a bounded time for those writes; the store must still be open then.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import structlog

from config.models import Config
from proxy.telemetry.observer import Observer
from proxy.state.store import TAG, Store, StoreUnavailable

log = structlog.get_logger("llm_gateway.health")
FAILURES_TO_OPEN = 5
BASE_EJECTION_MS = 30_000
MAX_EJECTION_MS = 300_000
PROBE_LOCK_MS = 10_000
REFRESH = 0.5


def health_key(dep: str) -> str:
    return f"llmgw:{TAG}:health:{dep}"


def probe_key(dep: str) -> str:
    return f"llmgw:{TAG}:probe:{dep}"


def stats_key(dep: str) -> str:
    return f"llmgw:{TAG}:stats:{dep}"


@dataclass(slots=True)
class DeploymentStats:
    open_until: float = 0.0  # epoch seconds; 0 = closed
    ejections: int = 0
    fails: int = 0
    ttfb_ewma: float | None = None
    inflight: int = 0


class SharedHealth:
    def __init__(self, config: Config, store: Store, failures_to_open: int = FAILURES_TO_OPEN,
                 observer: Observer | None = None) -> None:
        self.store = store
        self.observer = observer or Observer()
        self.names = [d.name for d in config.providers]
        self.threshold = failures_to_open
        self.base_ejection_ms = int(config.gateway.circuit_base_ejection * 1000) or BASE_EJECTION_MS
        self.local: dict[str, DeploymentStats] = {n: DeploymentStats() for n in self.names}
        self.shared: dict[str, DeploymentStats] = {n: DeploymentStats() for n in self.names}
        self.ejected: dict[str, float] = {}  # this replica's latest known ejection end per deployment (epoch s)
        self.tasks: set[asyncio.Task[Any]] = set()
        self._pending_inflight: dict[str, int] = {}
        self._pending_ttfb: dict[str, float] = {}
        self._refresher: asyncio.Task[None] | None = None
        self.state_changes = 0
        self.closed = False

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- breaker ------------------------------------------------------------------------------
    def record(self, dep: str, outcome: str, retry_after: float | None = None) -> None:
        """outcome: "ok", "fail" (transient) or "throttle" (429/529 with Retry-After).

        A success is written to Redis only when it changes something (a failure count or an open
        circuit, here or in the shared view): the common case costs no Redis call."""
        local = self.local.get(dep)
        shared = self.shared.get(dep)
        self._record_local(dep, outcome, retry_after)
        if outcome == "ok" and not ((local and (local.fails or local.open_until))
                                    or (shared and (shared.fails or shared.open_until))):
            return
        self._spawn(self._record_shared(dep, outcome, retry_after))

    def _record_local(self, dep: str, outcome: str, retry_after: float | None) -> None:
        s = self.local.setdefault(dep, DeploymentStats())
        now = time.time()
        if outcome == "ok":  # closes the circuit only once the ejection is over (see health.lua)
            s.fails = 0
            if s.open_until <= now:
                s.open_until = 0.0
            return
        eject = 0.0
        if outcome == "throttle" and retry_after:
            eject = retry_after
        else:
            s.fails += 1
            if s.fails >= self.threshold or (s.open_until and now >= s.open_until):
                eject = min(self.base_ejection_ms * (s.ejections + 1), MAX_EJECTION_MS) / 1000 \
                    * random.uniform(0.9, 1.1)
        if eject:
            if not s.open_until or now >= s.open_until:
                log.warning("circuit_opened", deployment=dep, scope="local", seconds=round(eject, 1))
                self.observer.circuit_changed(dep, True)
            s.open_until, s.fails, s.ejections = max(s.open_until, now + eject), 0, s.ejections + 1
            if outcome == "throttle":  # the provider said when: every request from now on, not from the next refresh
                self._eject(dep, now + eject)

    def _eject(self, dep: str, until: float) -> None:
        """Count an ejection in the shared view now, and keep it over older refreshed views."""
        if until > self.ejected.get(dep, 0.0):
            self.ejected[dep] = until
        shared = self.shared.get(dep)
        if shared is not None and until > shared.open_until:
            shared.open_until = until

    async def _record_shared(self, dep: str, outcome: str, retry_after: float | None) -> None:
        keys = [health_key(dep), probe_key(dep)]
        args = [outcome, int((retry_after or 0) * 1000), self.threshold, self.base_ejection_ms, MAX_EJECTION_MS,
                random.random()]
        try:
            state, open_until, ejections, _ = await self.store.script("health", keys, args)
        except StoreUnavailable:
            return
        except Exception:  # noqa: BLE001 - health bookkeeping must never hurt traffic
            log.exception("health_record_failed", deployment=dep)
            return
        if state % 2:  # open, as of this write: the snapshot need not wait for the next refresh
            self._eject(dep, open_until / 1000)
        if state >= 2:
            self.state_changes += 1
            self.observer.circuit_changed(dep, bool(state % 2))
            log.warning("circuit_opened" if state % 2 else "circuit_closed", deployment=dep,
                        open_until_ms=open_until, ejections=ejections)

    def locally_open(self, dep: str) -> bool:
        s = self.local.get(dep)
        return bool(s and s.open_until > time.time())

    # --- live figures for strategies ------------------------------------------------------------
    def begin(self, dep: str) -> None:
        self.local.setdefault(dep, DeploymentStats()).inflight += 1
        self._shared_inflight(dep, 1)
        self._pending_inflight[dep] = self._pending_inflight.get(dep, 0) + 1

    def end(self, dep: str) -> None:
        self.local.setdefault(dep, DeploymentStats()).inflight -= 1
        self._shared_inflight(dep, -1)
        self._pending_inflight[dep] = self._pending_inflight.get(dep, 0) - 1

    def _shared_inflight(self, dep: str, by: int) -> None:
        """Our own attempts count in the shared figure at once, not only from the next refresh:
        otherwise every request between two refreshes sees the same stale counts, and least_busy herds."""
        s = self.shared.get(dep)
        if s is not None:
            s.inflight = max(0, s.inflight + by)

    def observe_ttfb(self, dep: str, seconds: float) -> None:
        s = self.local.setdefault(dep, DeploymentStats())
        s.ttfb_ewma = seconds if s.ttfb_ewma is None else 0.7 * s.ttfb_ewma + 0.3 * seconds
        self._pending_ttfb[dep] = s.ttfb_ewma

    async def _flush(self) -> None:
        """Push this replica's in-flight deltas and EWMAs in one pipeline (every REFRESH s, not per request)."""
        inflight, self._pending_inflight = {d: n for d, n in self._pending_inflight.items() if n}, {}
        ttfb, self._pending_ttfb = self._pending_ttfb, {}
        if not inflight and not ttfb:
            return

        async def op(c: Any) -> None:
            async with c.pipeline(transaction=False) as p:
                for dep, delta in inflight.items():
                    p.hincrby(stats_key(dep), "inflight", delta)
                    p.expire(stats_key(dep), 3600)
                for dep, value in ttfb.items():
                    p.hset(stats_key(dep), "ttfb_ewma", repr(value))
                    p.expire(stats_key(dep), 3600)
                await p.execute()

        try:
            await self.store.call(op, deadline=max(self.store.timeout, 1.0))
        except StoreUnavailable:  # keep the in-flight deltas so the shared count stays balanced
            for dep, delta in inflight.items():
                self._pending_inflight[dep] = self._pending_inflight.get(dep, 0) + delta

    def snapshot(self) -> dict[str, DeploymentStats]:
        """Shared figures where known (refreshed in the background), local ones otherwise."""
        if (self._refresher is None or self._refresher.done()) and not self.closed:
            try:
                self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
            except RuntimeError:
                pass
        return self.shared if not self.store.degraded else self.local

    async def _refresh_loop(self) -> None:
        while not self.closed:
            try:
                await self._flush()
                await self.refresh()
            except StoreUnavailable:
                pass
            except Exception:  # noqa: BLE001
                log.exception("health_refresh_failed")
            await asyncio.sleep(REFRESH)

    async def refresh(self) -> dict[str, DeploymentStats]:
        async def op(c: Any) -> list[Any]:
            async with c.pipeline(transaction=False) as p:
                for name in self.names:
                    p.hmget(health_key(name), "open_until", "ejections", "fails")
                    p.hmget(stats_key(name), "ttfb_ewma", "inflight")
                return await p.execute()

        rows = await self.store.call(op, deadline=max(self.store.timeout, 1.0))
        now = time.time()
        for dep in [d for d, until in self.ejected.items() if until <= now]:
            del self.ejected[dep]
        for i, name in enumerate(self.names):
            (open_until, ejections, fails), (ttfb, inflight) = rows[2 * i], rows[2 * i + 1]
            # The read may predate our own latest ejection (its write still on the way): keep the later end.
            self.shared[name] = DeploymentStats(
                open_until=max(int(open_until or 0) / 1000, self.ejected.get(name, 0.0)), ejections=int(ejections or 0),
                fails=int(fails or 0), ttfb_ewma=float(ttfb) if ttfb else None, inflight=max(0, int(inflight or 0)))
        return self.shared

    async def aclose(self) -> None:
        """Stop the refresher and give pending breaker writes a bounded moment, before the store closes."""
        self.closed = True
        pending = set(self.tasks)
        if self._refresher is not None:
            self._refresher.cancel()
            pending.add(self._refresher)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.store.timeout + 1)
            for task in late:
                task.cancel()
