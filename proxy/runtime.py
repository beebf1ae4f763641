"""Shared, lazily opened resources of one gateway app: adapters, the upstream HTTP client, the store.

Contract: `Runtime` is built once per app from the config and handed to every middleware as `deps`.
Resources open on first use (a Starlette `Mount` forwards no lifespan events) and close in
`aclose()`. It holds no per-request state.
"""
from __future__ import annotations

import asyncio
from typing import Any

import httpx

from config.models import Config
from providers import build_adapters
from providers.base import Adapter


class Runtime:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.adapters: dict[str, Adapter] = build_adapters()
        self._client: httpx.AsyncClient | None = None
        self._store: Any = None
        self._lock = asyncio.Lock()
        self.closers: list[Any] = []

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # Redirects never followed; no environment proxies; timeouts are set per request.
            self._client = httpx.AsyncClient(
                timeout=None,
                follow_redirects=False,
                trust_env=False,
                limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30),
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        for closer in self.closers:
            result = closer()
            if asyncio.iscoroutine(result):
                await result
