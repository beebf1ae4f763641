"""Recording wrappers shared by the end-to-end suites: what the upstream sent, what the gateway saw.

- `Tape` wraps an upstream ASGI app and keeps the exact response bytes it sent.
- `Contexts` wraps the gateway and keeps each finished request's `RequestContext`.
- Fixtures `upstream` (a taped simulated provider), `gw_module` / `gw` (a recorded gateway in front
  of it, reset before each test); import them into a test module to use them.
"""
from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from config import parse_config
from proxy.app import build_app
from proxy.mock import MockOptions, build_mock_app
from tests.conftest import clear_recorded, standard_config
from tests.servers import serve


class Tape:
    """ASGI wrapper around an upstream app: keeps (raw_path, status, headers, body bytes) of every answer."""

    def __init__(self, app: Any) -> None:
        self.app, self.responses, self.base = app, [], ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/__mock/"):
            await self.app(scope, receive, send)
            return
        entry = SimpleNamespace(raw_path=scope["raw_path"].decode(), status=0, headers=[], body=bytearray())
        self.responses.append(entry)

        async def taped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                entry.status, entry.headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                entry.body += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, taped)


class Contexts:
    """ASGI wrapper around the gateway: keeps each request's RequestContext once the gateway is done with it."""

    def __init__(self, app: Any) -> None:
        self.app, self.done, self.active, self.cv = app, [], 0, threading.Condition()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        with self.cv:
            self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            with self.cv:
                self.active -= 1
                self.done.append(state.get("gateway"))
                self.cv.notify_all()

    def reset(self) -> None:
        """Forget finished requests, once the previous test's requests are all finished too."""
        with self.cv:
            assert self.cv.wait_for(lambda: self.active == 0, timeout=5), "a request never finished"
            self.done.clear()

    def last(self, count: int) -> Any:
        """The context of the `count`-th request (1-based), waiting for the gateway to finish it."""
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.done) >= count, timeout=5), "gateway never finished"
            return self.done[count - 1]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Tape]:
    tape = Tape(build_mock_app(MockOptions(chunk_interval_ms=0)))
    with serve(tape, lifespan="off") as base:
        tape.base = base
        yield tape


@pytest.fixture(scope="module")
def gw_module(upstream: Tape) -> Iterator[SimpleNamespace]:
    contexts = Contexts(build_app(parse_config(standard_config(upstream.base), "test.yaml", {})))
    with serve(contexts) as base:
        yield SimpleNamespace(url=base, contexts=contexts)


@pytest.fixture
def gw(gw_module: SimpleNamespace, upstream: Tape) -> SimpleNamespace:
    gw_module.contexts.reset()  # the previous test's requests are over: nothing more will be recorded
    clear_recorded(upstream.base)
    upstream.responses.clear()
    return gw_module


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
