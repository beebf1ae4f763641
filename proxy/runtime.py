"""Shared, lazily opened resources of one gateway app: adapters, the upstream HTTP client, the store.

Contract: `Runtime` is built once per app from the config and handed to every middleware as `deps`.
It also holds the response cache's store (`cache`), which the cache layer and the admin API share.
Resources open on first use (a Starlette `Mount` forwards no lifespan events) and close in
`aclose()`, after the `drains` (queued work that still needs them) have run. It holds no per-request state.
The forwarder drives the upstream wire (an httpx transport) directly; `client`, an `httpx.AsyncClient`
over the same wire, serves the few calls off the hot path (model lists). The wire is chosen by the
`transport` argument, else `gateway.upstream_transport`: `httptools` (the default, chosen by
measurement: `proxy.upstream.wire.WireTransport`) or `aiohttp` (`proxy.upstream.transport.AiohttpTransport`).
The former `httpx` choice (httpcore) was dropped: it hands stray bytes after a response to the next
request on that connection as its answer, never resends on the keep-alive close race, and cost 7x
the CPU a request (tests/test_wire.py, README). A callable returning an `httpx.AsyncBaseTransport`
is still accepted (benchmarks). An unknown name fails at construction.
"""
from __future__ import annotations

import asyncio
from http.cookiejar import CookieJar
from typing import Any, Callable

import httpx

from config.models import Config
from providers import build_adapters
from providers.base import Adapter
from proxy.cache import ResponseCache, open_cache
from proxy.state.health import SharedHealth
from proxy.telemetry.observer import Observer
from proxy.state.store import Store


TRANSPORTS = ("httptools", "aiohttp")
_KEEPALIVE_EXPIRY = 30.0


class _NoCookies(CookieJar):
    """The upstream client keeps no cookies: one upstream's Set-Cookie must never ride along on another
    caller's request (Set-Cookie itself still reaches the client that got it)."""

    def add_cookie_header(self, request: Any) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


class Runtime:
    def __init__(self, config: Config, *,
                 transport: str | Callable[[], httpx.AsyncBaseTransport] | None = None) -> None:
        self.config = config
        choice = transport or config.gateway.upstream_transport
        if isinstance(choice, str) and choice not in TRANSPORTS:
            raise ValueError(f"unknown upstream transport {choice!r} (one of: {', '.join(TRANSPORTS)})")
        self.transport = choice
        self.adapters: dict[str, Adapter] = build_adapters()
        self._client: httpx.AsyncClient | None = None
        self._wire: httpx.AsyncBaseTransport | None = None
        self._store: Store | None = None
        self._health: SharedHealth | None = None
        self._cache: ResponseCache | None = None
        self._lock = asyncio.Lock()
        self.closers: list[Any] = []
        self.drains: list[Any] = []  # run first on close, while the store is still open (queued settlements)
        self.observer: Observer = Observer()  # replaced by the telemetry layer when enabled

    @property
    def wire(self) -> httpx.AsyncBaseTransport:
        """The upstream transport the forwarder drives directly (httpx Request/Response API)."""
        if self._wire is None:
            size = self.config.gateway.upstream_max_connections
            if callable(self.transport):
                self._wire = self.transport()
            elif self.transport == "httptools":
                from proxy.upstream.wire import WireTransport

                self._wire = WireTransport(max_connections=size, keepalive_expiry=_KEEPALIVE_EXPIRY)
            else:
                from proxy.upstream.transport import AiohttpTransport

                self._wire = AiohttpTransport(max_connections=size, keepalive_expiry=_KEEPALIVE_EXPIRY)
        return self._wire

    @property
    def client(self) -> httpx.AsyncClient:
        """A full httpx client over the same transport, for the few calls off the hot path."""
        if self._client is None:
            # Redirects never followed; no environment proxies; no cookies; timeouts set per request.
            client = httpx.AsyncClient(timeout=None, follow_redirects=False, trust_env=False,
                                       cookies=_NoCookies(), transport=self.wire)
            client.headers = httpx.Headers()  # send only what the client sent: no user-agent or accept of ours
            self._client = client
        return self._client

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.config, self.observer)
        return self._store

    @property
    def health(self) -> SharedHealth:
        if self._health is None:
            self._health = SharedHealth(self.config, self.store, self.config.gateway.failure_threshold, self.observer)
        return self._health

    @property
    def cache(self) -> ResponseCache:
        """The response cache's store (`proxy.cache`): Redis when the state store has a URL, else in process."""
        if self._cache is None:
            self._cache = open_cache(self.config, self.store, self.observer)
        return self._cache

    async def aclose(self) -> None:
        for drain in self.drains:
            try:  # bounded: a dead Redis fails these calls within its deadline
                await asyncio.wait_for(drain(), self.config.state.redis_timeout * 4 + 1)
            except Exception:  # noqa: BLE001 - closing goes on whatever the store says
                pass
        health, self._health = self._health, None
        if health is not None:
            await health.aclose()
        cache, self._cache = self._cache, None
        if cache is not None:  # before the store it writes through
            await cache.aclose()
        store, self._store = self._store, None
        if store is not None:
            await store.aclose()
        client, self._client = self._client, None
        wire, self._wire = self._wire, None
        if client is not None:
            await client.aclose()  # closes the shared transport too
        elif wire is not None:
            await wire.aclose()
        for closer in self.closers:
            result = closer()
            if asyncio.iscoroutine(result):
                await result
