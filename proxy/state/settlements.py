"""Settlements: every finished reservation reconciled with its real usage, batched off the request path.

Contract:
- `Settlements(owner, deployments)` (calls go to `owner.store`) (`SettleBlock` per deployment name);
  `add(tag, member, conc_key, delta, common, deployments, estimate)` queues one reconcile.lua
  record (see the script's header): `tag` names its done marker (each record settles once),
  `conc_key` frees a concurrency slot, `common` is the plan's `SettleBlock` (or None) and
  `deployments` the names of the deployment scopes to settle too.
- The first record queued arms a timer; SETTLE_EVERY seconds later everything queued goes as one
  reconcile.lua call per SETTLE_BATCH records. The next timer is armed only when that call has
  answered, so a slow Redis means bigger batches, never more round trips in flight.
- On Redis the call is packed from pieces made once per plan and per deployment: per record only
  the done marker, the member and two numbers are new; it is written at the end of the loop turn,
  together with that turn's reservations. The embedded store gets the same call as
  values. A failed call is logged (`reconcile_skipped` when the store is unavailable) and dropped:
  settling never reaches a request.
- `drain()` sends what is queued now and waits for it (tests, shutdown).
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any

import structlog

from proxy.state.redis_wire import Packed, bulk, bulks
from proxy.state.store import StoreOwner, StoreUnavailable, TAG

log = structlog.get_logger("llm_gateway.ratelimit")
SETTLE_EVERY = 0.005
SETTLE_BATCH = 500  # records per reconcile.lua call
_DONE = f"llmgw:{TAG}:settled:"  # proxy.state.store.done_key, as a prefix


class SettleBlock:
    """A fixed group of scopes as reconcile.lua takes them: token TAT and live-limit keys, default tpm."""

    __slots__ = ("keys", "limits", "packed_keys", "packed_limits", "shapes")

    def __init__(self, keys: list[bytes], limits: list[int]) -> None:
        self.keys, self.limits = keys, limits
        self.packed_keys = bulks(keys) if keys else b""
        self.packed_limits = bulks(limits) if limits else b""
        self.shapes: dict[Any, Shape] = {}  # the deployments' ids -> `_shape` of this block with them


_NONE = SettleBlock([], [])
_SHAPES_LIMIT = 256
Record = tuple[str, str, "str | None", int, SettleBlock, list[SettleBlock], int]
# A record's repeating part: its scope keys, its first two ARGV bulks, its limits, its KEYS and ARGV counts,
# and the deployments' blocks (held, so the ids keying it stay theirs)
Shape = tuple[bytes, bytes, bytes, int, int, list[SettleBlock]]


class Settlements:
    def __init__(self, runtime: StoreOwner, deployments: dict[str, SettleBlock]) -> None:
        self.runtime = runtime
        self.deployments = deployments
        self.queue: list[Record] = []
        self.timer: asyncio.TimerHandle | None = None
        self.in_flight: list[asyncio.Future[Any]] = []

    def deployment(self, name: str) -> SettleBlock:
        return self.deployments.get(name) or _NONE

    def add(self, tag: str, member: str, conc_key: str | None, delta: int, common: SettleBlock | None,
            deployments: list[str], estimate: int) -> None:
        blocks = [self.deployments.get(deployments[0]) or _NONE] if len(deployments) == 1 else \
            [self.deployment(d) for d in deployments]
        self.queue.append((tag, member, conc_key, delta, common or _NONE, blocks, estimate))
        if self.timer is None and not self.in_flight:
            self.timer = asyncio.get_running_loop().call_later(SETTLE_EVERY, self._flush)

    def _flush(self) -> None:
        self.timer = None
        queued, self.queue = self.queue, []
        store = self.runtime.store
        for start in range(0, len(queued), SETTLE_BATCH):
            batch = queued[start:start + SETTLE_BATCH]
            try:
                if store.embedded:
                    sent: asyncio.Future[Any] = asyncio.ensure_future(store.script("reconcile", *_lists(batch)))
                else:
                    sent = store.script_soon("reconcile", _packed(batch), [])
            except StoreUnavailable:  # the breaker is open
                log.warning("reconcile_skipped", count=len(batch), reason="store unavailable")
                continue
            except Exception as exc:  # noqa: BLE001 - a timer callback: nothing above it would log this
                log.error("reconcile_failed", count=len(batch), error=repr(exc))
                continue
            self.in_flight.append(sent)
            sent.add_done_callback(functools.partial(self._answered, count=len(batch)))
        # No explicit flush: the connection writes at the end of this loop turn, in one write with
        # any reservations made in the same turn (one syscall less per settlement batch under load).

    def _answered(self, done: "asyncio.Future[Any]", count: int) -> None:
        self.in_flight.remove(done)
        if done.cancelled():
            log.warning("reconcile_skipped", count=count, reason="cancelled")
        elif isinstance(done.exception(), StoreUnavailable):
            log.warning("reconcile_skipped", count=count, reason="store unavailable")
        elif done.exception() is not None:
            log.error("reconcile_failed", count=count, error=repr(done.exception()))
        if self.queue and self.timer is None and not self.in_flight:
            self.timer = asyncio.get_running_loop().call_later(SETTLE_EVERY, self._flush)

    async def drain(self) -> None:
        """Send what is queued now and wait until every call has answered."""
        if self.timer is not None:
            self.timer.cancel()
        if self.queue:
            self._flush()
        while self.in_flight:
            await asyncio.gather(*self.in_flight, return_exceptions=True)


def _lists(batch: list[Record]) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV as values (the embedded store)."""
    keys: list[Any] = []
    args: list[Any] = []
    for tag, member, conc_key, delta, common, deployments, estimate in batch:
        done = (_DONE + tag).encode()
        record_keys = [done, conc_key.encode() if conc_key else done, *common.keys]
        limits = [*common.limits]
        for d in deployments:
            record_keys += d.keys
            limits += d.limits
        keys += record_keys
        args += [len(limits) + 5, len(record_keys), member, delta, *limits, estimate]
    return keys, args


def _shape(common: SettleBlock, deployments: list[SettleBlock]) -> Shape:
    """What every record of this plan settling these deployments repeats, packed once."""
    key = id(deployments[0]) if len(deployments) == 1 else tuple(map(id, deployments))
    found = common.shapes.get(key)
    if found is None:
        scopes = len(common.limits) + sum(len(d.limits) for d in deployments)
        found = (common.packed_keys + b"".join(d.packed_keys for d in deployments),
                 bulks([scopes + 5, 2 + 2 * scopes]),
                 common.packed_limits + b"".join(d.packed_limits for d in deployments),
                 2 + 2 * scopes, scopes + 5, deployments)
        if len(common.shapes) < _SHAPES_LIMIT:
            common.shapes[key] = found
    return found


def _packed(batch: list[Record]) -> Packed:
    """The same call as `_lists`, joined from packed pieces: per record only the done marker, the
    concurrency key, the member and two numbers are packed."""
    key_parts: list[bytes] = []
    arg_parts: list[bytes] = []
    nkeys = nargs = 0
    for tag, member, conc_key, delta, common, deployments, estimate in batch:
        keys, counts, limits, record_keys, record_args, _ = _shape(common, deployments)
        done = (_DONE + tag).encode()
        conc = conc_key.encode() if conc_key else done
        key_parts.append(b"$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (len(done), done, len(conc), conc, keys))
        m, d, e = member.encode(), b"%d" % delta, b"%d" % estimate
        arg_parts.append(b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n" % (counts, len(m), m, len(d), d, limits,
                                                                          len(e), e))
        nkeys += record_keys
        nargs += record_args
    return Packed(1 + nkeys + nargs, b"".join((bulk(b"%d" % nkeys), *key_parts, *arg_parts)))
