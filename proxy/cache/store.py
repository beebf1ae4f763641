"""The response cache shared by every replica, in Redis; and what both cache stores offer.

Contract:
- `lookup(req, token)` is one round trip (`lua/lookup.lua`): the entry (`HIT`, with its age from
  Redis TIME, so replica clocks never matter), else with a token the single-flight lock (`LEAD`) or
  "another request holds it" (`WAIT`, and a flag saying someone waits), else `MISS`. Both scripts
  run on the store's pipelined hot-path connection (`Store.script`, added with `Store.add_scripts`);
  an entry over `INLINE_MAX` is read, and written, on a pool connection instead.
- `finish(req, entry, token)` (`lua/finish.lua`): store the entry with its TTL (hash `t`, `v`),
  release the lock if this token still holds it, and publish the digest on `CHANNEL` when the
  flag says someone waits, all in one call.
- Waiting across replicas needs no loop per request: `listen(digest)` is a future that one pub/sub
  subscription per process (`CHANNEL`) resolves; a process-wide tick (`TICK`) wakes the waiters of
  a key whose lock is gone (a lost message, a leader that died and let its lock expire), and flushes
  this process's counters into the shared stats hash (`STATS_KEY`: hit, miss, bypass, coalesced,
  saved_tokens, saved_cost_usd).
- Everything goes through the store (`Store.script` / `Store.call`: deadline and breaker); any
  failure is the caller's to turn into a pass-through (a miss), never an error.
- `stats()` and `purge(...)` scan the entries (`SCAN`, batches of `BATCH`), for operators.
"""
from __future__ import annotations

import asyncio
import functools
from importlib import resources
from typing import Any, NamedTuple

import structlog

from config.models import Config
from proxy.cache.entry import Entry, decode, encode
from proxy.cache.key import PREFIX, CacheRequest, scope_tag
from proxy.state.store import Store
from proxy.telemetry.observer import Observer

log = structlog.get_logger("llm_gateway.cache")
MISS, HIT, LEAD, WAIT, BIG = 0, 1, 2, 3, 4
# Entries up to this size travel on the store's pipelined hot-path connection (the limiter's); larger
# ones on a pool connection, so that a big transfer never holds up the reservations queued behind it.
INLINE_MAX = 64 * 1024
CHANNEL = f"{PREFIX}done"
STATS_KEY = f"{PREFIX}stats"
STATS_TTL_MS = 30 * 86400 * 1000
TICK = 1.0
BATCH = 500
RESULTS = ("hit", "miss", "bypass", "coalesced")


class Lookup(NamedTuple):
    kind: int
    entry: Entry | None = None
    age: int | None = None  # whole seconds, for a hit


NOT_FOUND = Lookup(MISS)


class Counters:
    """Requests by cache result, and what hits saved: this process's, since start."""

    __slots__ = ("results", "saved_tokens", "saved_cost")

    def __init__(self) -> None:
        self.results = dict.fromkeys(RESULTS, 0)
        self.saved_tokens = 0
        self.saved_cost = 0.0

    def add(self, result: str, tokens: int, cost: float) -> None:
        self.results[result] += 1
        self.saved_tokens += tokens
        self.saved_cost += cost

    def view(self) -> dict[str, Any]:
        return {"requests": dict(self.results), "saved_tokens": self.saved_tokens,
                "saved_cost_usd": round(self.saved_cost, 6)}


@functools.lru_cache(maxsize=1)
def _sources() -> dict[str, str]:
    return {f"cache_{name}": resources.files("proxy.cache").joinpath("lua", f"{name}.lua").read_text()
            for name in ("lookup", "finish")}


def purge_pattern(key_id: str | None = None, namespace: str | None = None) -> str:
    """The entry keys a purge removes: one key's scope, one namespace, or (neither) all."""
    if key_id is not None:
        return f"{PREFIX}e:{scope_tag('k', key_id)}:*"
    if namespace is not None:
        return f"{PREFIX}e:*:n.{namespace}:*"
    return f"{PREFIX}e:*"


class SharedCache:
    def __init__(self, config: Config, store: Store, observer: Observer | None = None) -> None:
        self.store = store
        self.lock_ms = max(1000, int(min(config.cache.coalesce_wait, config.gateway.timeout or 1e9) * 1000))
        self.put_deadline = max(1.0, config.state.redis_timeout * 4)
        self.counters = Counters()
        self._pending = Counters()
        self._scripts: dict[str, Any] = {}
        store.add_scripts(_sources())
        self.waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def _script(self, name: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.store.client.register_script(_sources()[name])
        return script

    async def lookup(self, req: CacheRequest, token: str | None) -> Lookup:
        keys = [req.entry_key, req.lock_key, req.waiters_key]
        reply = await self.store.script_soon("cache_lookup", keys,
                                             [1 if req.read else 0, req.max_age_ms, token or "", self.lock_ms, INLINE_MAX])
        kind = int(reply[0])
        if kind not in (HIT, BIG):
            return Lookup(kind)
        blob = reply[2] if kind == HIT else await self.store.call(lambda r: r.hget(req.entry_key, "v"),
                                                                   deadline=self.put_deadline)
        if blob is None:  # expired between the two calls
            return NOT_FOUND
        try:
            return Lookup(HIT, decode(blob), int(reply[1]) // 1000)
        except ValueError:
            log.warning("cache_entry_unreadable", key=req.entry_key)
            return NOT_FOUND

    def finish_soon(self, req: CacheRequest, entry: Entry | None, token: str | None) -> "asyncio.Future[Any]":
        """`finish`, submitted at once: a future of its outcome (no task for the common, small entry).
        Raises `StoreUnavailable` at once when the store's breaker is open."""
        keys = [req.entry_key, req.lock_key, req.waiters_key]
        blob = encode(entry) if entry is not None else b""
        args: list[Any] = [blob, req.ttl_ms, token or "", CHANNEL, req.digest]
        if len(blob) <= INLINE_MAX:
            return self.store.script_soon("cache_finish", keys, args)
        script = self._script("cache_finish")
        return asyncio.ensure_future(self.store.call(lambda r: script(keys=keys, args=args, client=r),
                                                    deadline=self.put_deadline))

    async def finish(self, req: CacheRequest, entry: Entry | None, token: str | None) -> None:
        await self.finish_soon(req, entry, token)

    # --- waiting across replicas -----------------------------------------------------------------
    def listen(self, digest: str) -> "asyncio.Future[bool]":
        """A future resolved when the key's owner (on any replica) is done, or the tick finds its lock gone."""
        self._start()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(digest, []).append(future)
        return future

    def unlisten(self, digest: str, future: "asyncio.Future[bool]") -> None:
        found = self.waiters.get(digest)
        if found is not None and future in found:
            found.remove(future)
            if not found:
                del self.waiters[digest]

    def _wake(self, digest: str) -> None:
        for future in self.waiters.pop(digest, ()):
            if not future.done():
                future.set_result(True)

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(self._subscribe()), asyncio.ensure_future(self._tick())]

    async def _subscribe(self) -> None:
        while True:
            pubsub = None
            try:
                pubsub = self.store.client.pubsub()
                await pubsub.subscribe(CHANNEL)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=TICK)
                    if message is not None and message.get("type") == "message":
                        self._wake(message["data"].decode("latin-1"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: the tick covers waiters; retry later
                log.debug("cache_subscription_lost", error=type(exc).__name__)
                await asyncio.sleep(TICK)
            finally:
                if pubsub is not None:
                    try:
                        await pubsub.aclose()
                    except Exception:  # noqa: BLE001
                        pass

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            digests = list(self.waiters)
            if digests:
                locks = [f"{PREFIX}l:{d}" for d in digests]
                try:
                    held = await self.store.call(lambda r: _exists(r, locks))
                except Exception:  # noqa: BLE001 - Redis away: every waiter goes its own way now
                    held = [0] * len(digests)
                for digest, present in zip(digests, held):
                    if not present:
                        self._wake(digest)
            await self._flush()

    # --- counters, stats, purge ------------------------------------------------------------------
    def count(self, result: str, tokens: int, cost: float) -> None:
        self.counters.add(result, tokens, cost)
        self._pending.add(result, tokens, cost)
        if not self._tasks:
            self._start()

    async def _flush(self) -> None:
        pending = self._pending
        if not any(pending.results.values()):
            return
        self._pending = Counters()

        async def write(r: Any) -> None:
            async with r.pipeline(transaction=False) as p:
                for name, n in pending.results.items():
                    if n:
                        p.hincrby(STATS_KEY, name, n)
                if pending.saved_tokens:
                    p.hincrby(STATS_KEY, "saved_tokens", pending.saved_tokens)
                if pending.saved_cost:
                    p.hincrbyfloat(STATS_KEY, "saved_cost_usd", pending.saved_cost)
                p.pexpire(STATS_KEY, STATS_TTL_MS)
                await p.execute()

        try:
            await self.store.call(write)
        except Exception:  # noqa: BLE001 - counts of one second lost with Redis away: stats only
            pass

    async def stats(self) -> dict[str, Any]:
        await self._flush()
        shared = await self.store.call(lambda r: r.hgetall(STATS_KEY))
        values = {k.decode(): v.decode() for k, v in shared.items()}
        entries, size = await self.store.call(_sizes, deadline=60.0)
        return {"backend": "redis", "entries": entries, "bytes": size,
                "requests": {name: int(values.get(name, 0)) for name in RESULTS},
                "saved_tokens": int(values.get("saved_tokens", 0)),
                "saved_cost_usd": round(float(values.get("saved_cost_usd", 0.0)), 6),
                "this_replica": self.counters.view()}

    async def purge(self, key_id: str | None = None, namespace: str | None = None) -> int:
        pattern = purge_pattern(key_id, namespace)
        return await self.store.call(lambda r: _unlink(r, pattern), deadline=60.0)

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for digest in list(self.waiters):
            self._wake(digest)
        await self._flush()


async def _exists(r: Any, keys: list[str]) -> list[int]:
    async with r.pipeline(transaction=False) as p:
        for key in keys:
            p.exists(key)
        return await p.execute()


async def _sizes(r: Any) -> tuple[int, int]:
    entries = size = 0
    batch: list[bytes] = []

    async def measure() -> int:
        async with r.pipeline(transaction=False) as p:
            for key in batch:
                p.hstrlen(key, "v")
            return sum(await p.execute())

    async for key in r.scan_iter(match=f"{PREFIX}e:*", count=BATCH):
        batch.append(key)
        if len(batch) >= BATCH:
            entries, size, batch = entries + len(batch), size + await measure(), []
    if batch:
        entries, size = entries + len(batch), size + await measure()
    return entries, size


async def _unlink(r: Any, pattern: str) -> int:
    removed = 0
    batch: list[bytes] = []
    async for key in r.scan_iter(match=pattern, count=BATCH):
        batch.append(key)
        if len(batch) >= BATCH:
            removed += await r.unlink(*batch)
            batch = []
    if batch:
        removed += await r.unlink(*batch)
    return removed
