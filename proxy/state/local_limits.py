"""In-process fallback limiter used while Redis is unavailable (`state.on_redis_error: local`).

Contract: the same algorithms as `proxy/state/lua/reserve.lua` (a 60 s sliding request log, GCRA for
tokens, all scopes together, first admissible deployment candidate), on the monotonic clock, with
each limit divided by `state.replicas` so N replicas together stay near the shared limit. Counters
start empty when the fallback engages; nothing is synchronised back to Redis.
"""
from __future__ import annotations

import time
from collections import deque

WINDOW = 60.0


class LocalLimiter:
    def __init__(self, replicas: int) -> None:
        self.replicas = max(1, replicas)
        self._logs: dict[str, deque[float]] = {}
        self._tat: dict[str, float] = {}
        self._inflight: dict[str, dict[str, float]] = {}

    def _share(self, limit: int | None) -> int | None:
        if limit is None or limit < 0:
            return None
        return max(1, limit // self.replicas) if limit > 0 else 0

    def _check(self, scope: str, rpm: int | None, tpm: int | None, tokens: int, now: float) -> float:
        retry = 0.0
        rpm, tpm = self._share(rpm), self._share(tpm)
        if rpm is not None:
            log = self._logs.setdefault(scope, deque())
            while log and log[0] <= now - WINDOW:
                log.popleft()
            if len(log) >= rpm:
                retry = WINDOW if rpm == 0 else log[len(log) - rpm] + WINDOW - now
        if tpm is not None:
            tat = max(self._tat.get(scope, now), now)
            new_tat = tat + min(tokens, tpm) * WINDOW / tpm if tpm else now + 2 * WINDOW
            if new_tat - now > WINDOW:
                retry = max(retry, new_tat - now - WINDOW)
        return retry

    def _apply(self, scope: str, rpm: int | None, tpm: int | None, tokens: int, now: float) -> None:
        if self._share(rpm) is not None:
            self._logs.setdefault(scope, deque()).append(now)
        share = self._share(tpm)
        if share:
            tat = max(self._tat.get(scope, now), now)
            self._tat[scope] = tat + min(tokens, share) * WINDOW / share

    def reserve(
        self,
        common: list[tuple[str, int | None, int | None]],
        candidates: list[tuple[str, int | None, int | None]],
        tokens: int,
        member: str,
        concurrency: tuple[str, int, float] | None = None,
    ) -> tuple[bool, int, float]:
        """(admitted, chosen candidate index or -1, retry_after seconds)."""
        now = time.monotonic()
        retry = max((self._check(s, r, t, tokens, now) for s, r, t in common), default=0.0)
        if concurrency is not None:
            key, limit, lease = concurrency
            held = {m: exp for m, exp in self._inflight.get(key, {}).items() if exp > now}
            self._inflight[key] = held
            if len(held) >= max(1, limit // self.replicas):
                retry = max(retry, 1.0)
        if retry > 0:
            return False, -1, retry
        chosen = -1
        if candidates:
            waits = []
            for i, (s, r, t) in enumerate(candidates):
                wait = self._check(s, r, t, tokens, now)
                if wait <= 0:
                    chosen = i
                    break
                waits.append(wait)
            if chosen < 0:
                return False, -1, min(waits)
        for s, r, t in common:
            self._apply(s, r, t, tokens, now)
        if chosen >= 0:
            s, r, t = candidates[chosen]
            self._apply(s, r, t, tokens, now)
        if concurrency is not None:
            self._inflight[concurrency[0]][member] = now + concurrency[2]
        return True, chosen, 0.0

    def settle(self, scopes: list[tuple[str, int | None]], delta: int, member: str, concurrency_key: str | None,
               estimate: int = 0) -> None:
        """`delta` = real - estimated tokens (0: the reservation stands); each scope was charged
        min(estimate, share), so it is settled against that charge."""
        if concurrency_key is not None:
            self._inflight.get(concurrency_key, {}).pop(member, None)
        now = time.monotonic()
        for scope, tpm in scopes:
            share = self._share(tpm)
            if share and delta and scope in self._tat:
                charge = delta + estimate - min(estimate, share)
                self._tat[scope] = max(now, self._tat[scope] + charge * WINDOW / share)
