"""The response cache: exact answers shared by every replica, streams replayed natively.

Lives here: `key` (which requests are cached, their key and the client's controls), `entry` (the
stored answer and the check that an answer ended normally), `flight` (in-process single flight and
the capture of an answer on its way to the client), `store` (the Redis store: one-round-trip
lookup and lock, pub/sub wake-ups, shared stats) and `embedded` (the in-process LRU when there is
no Redis URL), `ops` (stats and purge for the admin API and the CLI), `lua/`.
The request path itself is `middlewares/cache.py`; the kernel only sees `ctx.cache_status` and
`ctx.replay`.

May import: `config`, the kernel's types (`proxy.context`, `proxy.errors`), `providers`,
`proxy.telemetry` (the observer hooks) and `proxy.state` (the store's client, deadlines and breaker).
Never the kernel's runtime, middlewares, admin or the CLI.
"""
from __future__ import annotations

from typing import Union

from config.models import Config
from proxy.cache.embedded import LocalCache
from proxy.cache.store import SharedCache
from proxy.state.store import Store
from proxy.telemetry.observer import Observer

ResponseCache = Union[LocalCache, SharedCache]


def open_cache(config: Config, store: Store, observer: Observer | None = None) -> ResponseCache:
    """The process's cache store: Redis when the state store has a URL, else the embedded LRU."""
    if store.embedded:
        return LocalCache(config.cache.max_bytes, observer)
    return SharedCache(config, store, observer)


__all__ = ["LocalCache", "ResponseCache", "SharedCache", "open_cache"]
