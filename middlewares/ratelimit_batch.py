"""Reservations batched per event-loop turn: one reserve.lua call for every request that asked in
the same turn, each still all or nothing, in arrival order, and exact.

Contract:
- `ReserveBatcher(runtime)` (calls go to `runtime.store`, which may be reopened); `reserve(block, record)` returns a future of this request's reply
  (reserve.lua's per-request reply). `block` is the request's KEYS as a tuple, shared by every
  request of one plan and sent once per batch; `record` is its ARGV record without the length and
  key offset (member, estimate, common scopes, concurrency cap, lease, probe lock, then the
  per-scope default limits).
- The first reservation of a turn schedules the call for the end of the turn; at most `MAX_BATCH`
  requests share one call (more make several calls in that turn). A request that arrives alone is
  sent alone, one loop turn later than a direct call: batching never waits for company.
- Why: what a reservation costs Redis is mostly per call and per key (the call itself, TIME, each
  scope's live limits, trim and count, token state, expiry), and reserve.lua does that once per
  key per batch. The gateway packs one command and parses one reply per batch, too.
- Failure: no reply (deadline, connection, breaker: `StoreUnavailable`) or an error reply reaches
  every request of the batch as its own exception, and each falls back as after a single call. A
  request whose caller gave up still counts if the call ran, as with a single call.
"""
from __future__ import annotations

import asyncio
from typing import Any

from proxy.runtime import Runtime
from proxy.state import StoreUnavailable

MAX_BATCH = 128  # reserve.lua unpacks one ZADD argument pair per request and key


class ReserveBatcher:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.queue: list[tuple[tuple[Any, ...], list[Any], asyncio.Future[Any]]] = []

    def reserve(self, block: tuple[Any, ...], record: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.queue:
            loop.call_soon(self._flush)
        self.queue.append((block, record, fut))
        return fut

    def _flush(self) -> None:
        queue, self.queue = self.queue, []
        for start in range(0, len(queue), MAX_BATCH):
            asyncio.ensure_future(self._call(queue[start:start + MAX_BATCH]))

    async def _call(self, batch: list[tuple[tuple[Any, ...], list[Any], asyncio.Future[Any]]]) -> None:
        keys: list[Any] = []
        args: list[Any] = []
        offsets: dict[int, int] = {}
        for block, record, _ in batch:
            koff = offsets.get(id(block))  # the blocks stay referenced by `batch`: ids are unique
            if koff is None:
                koff = offsets[id(block)] = len(keys)
                keys.extend(block)
            args.append(len(record) + 2)
            args.append(koff)
            args.extend(record)
        try:
            replies = await self.runtime.store.script("reserve", keys, args)
        except BaseException as exc:  # handed to each waiter, which decides
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(_copy(exc))
            if not isinstance(exc, Exception):  # cancelled (shutting down): the waiters are told
                raise
            return
        for (_, _, fut), reply in zip(batch, replies):
            if not fut.done():
                fut.set_result(reply)


def _copy(exc: BaseException) -> BaseException:
    """One instance per waiter (each raise adds its own traceback); a cancellation becomes the
    store being unavailable for these requests."""
    if not isinstance(exc, Exception):
        return StoreUnavailable("reservation cancelled")
    try:
        return type(exc)(*exc.args)
    except Exception:  # noqa: BLE001 - an exception type with another constructor
        return StoreUnavailable(str(exc))
