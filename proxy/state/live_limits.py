"""Live limits and usage: the ops-owned limit hashes in Redis, and what a scope has used so far.

Contract:
- A live limit is one hash per scope (`state.limits_key(scope)`) with `requests_per_minute` and/or
  `tokens_per_minute`. reserve.lua and reconcile.lua read it on every call, so a change applies on
  the next request on every replica, without resetting counters. These hashes have no TTL: ops own
  them (the admin API and `llm-gateway limits` write them; so may redis-cli).
- `set_limit` writes only the fields given (None leaves a field as it is) and marks the store as
  having live limits (the embedded store then stops skipping the limiter); `get_limit` returns the
  known fields as ints; `clear_limit` deletes the hash (True if there was one); `list_limits`
  scans every scope with a non-empty hash.
- `usage(scope)`: requests in the current 60 s window and how far (ms) the token bucket's TAT is
  ahead of Redis TIME, read in one transaction.
- Every call goes through `Store.call` (deadline and breaker; `StoreUnavailable` when Redis cannot
  answer), with an admin deadline of at least 2 s (5 s for the scan): these are operator calls,
  never on the request path. `Store` keeps thin methods of the same names for its callers.
"""
from __future__ import annotations

from typing import Any

from proxy.state.store import Store, counter_keys, limits_key

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute")


def _deadline(store: Store) -> float:
    return max(store.timeout, 2.0)


async def set_limit(store: Store, scope: str, rpm: int | None, tpm: int | None) -> None:
    mapping = {k: v for k, v in zip(LIMIT_FIELDS, (rpm, tpm)) if v is not None}
    store.live_limits = True
    if mapping:
        await store.call(lambda c: c.hset(limits_key(scope), mapping=mapping), deadline=_deadline(store))


async def get_limit(store: Store, scope: str) -> dict[str, int]:
    raw = await store.call(lambda c: c.hgetall(limits_key(scope)), deadline=_deadline(store))
    return {k.decode(): int(v) for k, v in raw.items() if k.decode() in LIMIT_FIELDS}


async def clear_limit(store: Store, scope: str) -> bool:
    return bool(await store.call(lambda c: c.delete(limits_key(scope)), deadline=_deadline(store)))


async def list_limits(store: Store) -> dict[str, dict[str, int]]:
    prefix = limits_key("")

    async def op(c: Any) -> list[bytes]:
        return [k async for k in c.scan_iter(match=prefix + "*", count=500)]

    out: dict[str, dict[str, int]] = {}
    for raw in sorted(await store.call(op, deadline=max(store.timeout, 5.0))):
        scope = raw.decode()[len(prefix):]
        values = await get_limit(store, scope)
        if values:
            out[scope] = values
    return out


async def usage(store: Store, scope: str) -> dict[str, float]:
    """Requests in the current 60 s window, and how far (ms) the token bucket's TAT is ahead of now."""
    req, tok = counter_keys(scope)

    async def op(c: Any) -> list[Any]:
        async with c.pipeline(transaction=True) as p:
            p.time()
            p.zrange(req, 0, -1, withscores=True)
            p.get(tok)
            return await p.execute()

    (sec, usec), entries, tat = await store.call(op, deadline=_deadline(store))
    now = sec * 1000 + usec // 1000
    return {"requests": sum(1 for _, score in entries if score > now - 60000),
            "tokens_ahead_ms": max(0.0, float(tat) - now) if tat else 0.0}
