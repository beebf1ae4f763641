"""The response cache of one process (no Redis URL): an LRU bounded by `cache.max_bytes`.

Contract: the same operations as `proxy.cache.store.SharedCache`, answered in process and at once
(`get` is synchronous, so the hit path never yields). An entry is kept as one plain tuple of plain
values (its expiry on the monotonic clock, its size, then `Entry`'s fields), which the garbage
collector stops tracking at its first look: no copy, no parse, and no collection cost however full
the cache (a decoded object per entry made every collection walk the whole cache). An entry found expired
is dropped. Storing past `max_bytes` evicts the least recently used entries first; an entry larger
than the whole bound is not stored. The size (the body, plus `HEADER_SIZE` a header and `OVERHEAD` an
entry) is reported to the observer as `llm_cache_bytes`. There are no locks and no waiting: the in-process
single flight is the only coalescing one process needs.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from proxy.cache.entry import Entry
from proxy.cache.key import PREFIX, CacheRequest
from proxy.cache.store import HIT, NOT_FOUND, Counters, Lookup, purge_pattern
from proxy.telemetry.observer import Observer

OVERHEAD = 256  # bytes counted per entry for its key, its objects and the LRU's own
HEADER_SIZE = 64  # bytes counted per stored header: no need to measure each (they are a few dozen)


class LocalCache:
    def __init__(self, max_bytes: int, observer: Observer | None = None) -> None:
        self.max_bytes = max_bytes
        self.observer = observer or Observer()
        # key -> (expires, size, *the entry's fields): one plain tuple of plain values, which the collector
        # stops tracking at its first look (a named tuple, a subclass, it would track for ever)
        self.entries: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self.bytes = 0
        self.counters = Counters()

    def get(self, req: CacheRequest) -> Lookup:
        if not req.read:
            return NOT_FOUND
        key = req.entry_key
        found = self.entries.get(key)
        if found is None:
            return NOT_FOUND
        if found[0] <= time.monotonic():
            self._drop(key)
            return NOT_FOUND
        entry = Entry._make(found[2:])
        age = time.time() - entry.created
        if 0 <= req.max_age_ms < age * 1000:
            return NOT_FOUND
        self.entries.move_to_end(key)
        return Lookup(HIT, entry, max(0, int(age)))

    async def lookup(self, req: CacheRequest, token: str | None) -> Lookup:
        return self.get(req)

    def put(self, req: CacheRequest, entry: Entry) -> None:
        size = len(entry.body) + HEADER_SIZE * len(entry.headers) + OVERHEAD
        if size > self.max_bytes:
            return
        key = req.entry_key
        if key in self.entries:
            self._drop(key, report=False)
        while self.entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self.entries)), report=False)
        self.entries[key] = (time.monotonic() + req.ttl_ms / 1000, size, *entry)
        self.bytes += size
        self.observer.cache_bytes(self.bytes)

    async def finish(self, req: CacheRequest, entry: Entry | None, token: str | None) -> None:
        if entry is not None:
            self.put(req, entry)

    def _drop(self, key: str, report: bool = True) -> None:
        self.bytes -= self.entries.pop(key)[1]
        if report:
            self.observer.cache_bytes(self.bytes)

    def count(self, result: str, tokens: int, cost: float) -> None:
        counters = self.counters
        counters.results[result] += 1
        if tokens:
            counters.saved_tokens += tokens
            counters.saved_cost += cost

    async def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        for key in [k for k, found in self.entries.items() if found[0] <= now]:
            self._drop(key)
        return {"backend": "embedded", "entries": len(self.entries), "bytes": self.bytes,
                "max_bytes": self.max_bytes, **self.counters.view()}

    async def purge(self, key_id: str | None = None, namespace: str | None = None) -> int:
        # the same selection as the Redis store's SCAN pattern: `e:<scope>:<ns>:<digest>`
        pattern = purge_pattern(key_id, namespace)[len(PREFIX) + 2:]  # after "e:"
        scope, _, rest = pattern.partition(":")
        namespace_tag = rest.partition(":")[0] if rest else "*"
        removed = 0
        for key in list(self.entries):
            k_scope, k_ns, _ = key[len(PREFIX) + 2:].split(":", 2)
            if (scope in ("*", k_scope)) and (namespace_tag in ("*", k_ns)):
                self._drop(key, report=False)
                removed += 1
        self.observer.cache_bytes(self.bytes)
        return removed

    async def aclose(self) -> None:
        self.entries.clear()
        self.bytes = 0
