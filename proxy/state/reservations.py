"""Reservations batched per event-loop turn: one reserve.lua call for every request that asked in
the same turn, each still all or nothing, in arrival order, and exact.

Contract:
- `ReserveBatcher(owner)` (calls go to `owner.store`, which may be reopened); `reserve(block, member,
  tokens)` returns a future of this request's `Reservation` (reserve.lua's per-request reply, by
  name: callers never index a Lua reply). `block` is the request's KEYS as a tuple, shared by every
  request of one plan and sent once per batch; `record` is its ARGV record without the length and
  key offset (member, estimate, common scopes, concurrency cap, lease, probe lock, then the
  per-scope default limits).
- The first reservation of a turn schedules the call for the end of the turn; at most `MAX_BATCH`
  requests share one call (more make several calls in that turn). The call is submitted from that
  callback (`Store.script_soon`, no task) and written at once, so a reservation leaves in the next
  turn, as a direct call's would: batching never waits for company.
- Why: what a reservation costs Redis is mostly per call and per key (the call itself, TIME, each
  scope's live limits, trim and count, token state, expiry), and reserve.lua does that once per
  key per batch. The gateway packs one command and parses one reply per batch, too.
- Failure: no reply (deadline, connection, breaker: `StoreUnavailable`) or an error reply reaches
  every request of the batch as its own exception, and each falls back as after a single call. A
  request whose caller gave up still counts if the call ran, as with a single call.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, NamedTuple

from proxy.state.redis_wire import Packed, bulk, bulks
from proxy.state.store import StoreOwner, StoreUnavailable

MAX_BATCH = 128  # reserve.lua unpacks one ZADD argument pair per request and key
# Why a request was not admitted (`Reservation.marker`)
LIMITED, CONCURRENCY, ALL_AT_LIMIT, NONE_MAY_SERVE = 0, -2, -3, -4
REQUESTS, TOKENS = 1, 2  # `Reservation.refused_limit`


class Figure(NamedTuple):
    """The most constraining checked scope in one dimension (requests or tokens)."""

    scope: int  # 1-based position among the plan's scopes (common first, then candidates)
    limit: int
    remaining: int
    reset_ms: int


class Reservation(NamedTuple):
    """reserve.lua's reply for one request (layout: the script's header)."""

    admitted: bool
    chosen: int  # 1-based candidate position, 0 = none
    retry_ms: int
    now_ms: int
    marker: int  # LIMITED (also when admitted), CONCURRENCY, ALL_AT_LIMIT, NONE_MAY_SERVE
    probe: bool  # this request is the half-open circuit's probe
    requests: Figure | None
    tokens: Figure | None
    refused_scope: int  # 1-based scope position whose limit refused it (0: none)
    refused_limit: int  # REQUESTS or TOKENS (0: none)
    live: tuple[int, ...]  # (scope position, rpm, tpm) per checked scope with a live limit set

    @classmethod
    def of(cls, r: list[Any]) -> "Reservation":
        return cls(r[0] == 1, r[1], r[2], r[3], r[4], r[5] == 1,
                   Figure(r[6], r[7], r[8], r[9]) if r[6] else None,
                   Figure(r[10], r[11], r[12], r[13]) if r[10] else None,
                   r[14], r[15], tuple(r[16:]))


class Block:
    __slots__ = ("keys", "tail", "packed_keys", "packed_tail", "packed_length")

    def __init__(self, keys: tuple[bytes, ...], tail: list[Any]) -> None:
        self.keys, self.tail = keys, tail
        self.packed_keys = bulks(keys) if keys else b""
        self.packed_tail = bulks(tail)
        self.packed_length = bulk(b"%d" % (len(tail) + 4))  # a record: length, key offset, member, estimate, tail


Waiter = tuple[Block, str, int, "asyncio.Future[Any]"]


class ReserveBatcher:
    def __init__(self, runtime: StoreOwner) -> None:
        self.runtime = runtime
        self.queue: list[Waiter] = []

    def reserve(self, block: Block, member: str, tokens: int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.queue:
            loop.call_soon(self._flush)
        self.queue.append((block, member, tokens, fut))
        return fut

    def _flush(self) -> None:
        queue, self.queue = self.queue, []
        store = self.runtime.store
        for start in range(0, len(queue), MAX_BATCH):
            batch = queue[start:start + MAX_BATCH]
            if store.embedded:
                asyncio.ensure_future(self._embedded(batch))
                continue
            try:  # submitted here, not from a task: the write leaves in this turn (flushed below)
                store.script_soon("reserve", _packed(batch), []).add_done_callback(functools.partial(_deliver, batch))
            except Exception as exc:  # noqa: BLE001 - the breaker is open: every waiter falls back
                _fail(batch, exc)
        if not store.embedded:
            store.wire.flush()

    async def _embedded(self, batch: list[Waiter]) -> None:
        try:
            replies = await self.runtime.store.script("reserve", *_lists(batch))
        except BaseException as exc:  # handed to each waiter, which decides
            _fail(batch, exc)
            if not isinstance(exc, Exception):  # cancelled (shutting down): the waiters are told
                raise
            return
        for (*_, fut), reply in zip(batch, replies):
            if not fut.done():
                fut.set_result(Reservation.of(reply))


def _deliver(batch: list[Waiter], done: "asyncio.Future[Any]") -> None:
    if done.cancelled():
        _fail(batch, StoreUnavailable("reservation cancelled"))
        return
    if (exc := done.exception()) is not None:
        _fail(batch, exc)
        return
    for (*_, fut), reply in zip(batch, done.result()):
        if not fut.done():
            fut.set_result(Reservation.of(reply))


def _fail(batch: list[Waiter], exc: BaseException) -> None:
    for *_, fut in batch:
        if not fut.done():
            fut.set_exception(_copy(exc))


def _lists(batch: list[Waiter]) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV as values (the embedded store)."""
    keys: list[Any] = []
    args: list[Any] = []
    offsets: dict[int, int] = {}
    for block, member, tokens, _ in batch:
        koff = offsets.get(id(block))  # the blocks stay referenced by `batch`: ids are unique
        if koff is None:
            koff = offsets[id(block)] = len(keys)
            keys.extend(block.keys)
        args.extend((len(block.tail) + 4, koff, member, tokens, *block.tail))
    return keys, args


def _packed(batch: list[Waiter]) -> Packed:
    """The same call as `_lists`, from the blocks' packed pieces: per request only three values are packed."""
    key_parts: list[bytes] = []
    records: list[bytes] = []
    offsets: dict[int, bytes] = {}
    nkeys = nargs = 0
    for block, member, tokens, _ in batch:
        koff = offsets.get(id(block))
        if koff is None:
            koff = offsets[id(block)] = bulk(b"%d" % nkeys)
            key_parts.append(block.packed_keys)
            nkeys += len(block.keys)
        m, t = member.encode(), b"%d" % tokens
        records.append(b"%b%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (block.packed_length, koff, len(m), m, len(t), t,
                                                                block.packed_tail))
        nargs += len(block.tail) + 4
    return Packed(1 + nkeys + nargs, b"".join((bulk(b"%d" % nkeys), *key_parts, *records)))


def _copy(exc: BaseException) -> BaseException:
    """One instance per waiter (each raise adds its own traceback); a cancellation becomes the
    store being unavailable for these requests."""
    if not isinstance(exc, Exception):
        return StoreUnavailable("reservation cancelled")
    try:
        return type(exc)(*exc.args)
    except Exception:  # noqa: BLE001 - an exception type with another constructor
        return StoreUnavailable(str(exc))
