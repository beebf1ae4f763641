"""Harness for the byte-level upstream transport tests (tests/test_wire.py, tests/test_wire_failures.py).

Contract:
- `NAMES` is every value `gateway.upstream_transport` accepts (`proxy.runtime.TRANSPORTS`), and
  `open_transport(name, ...)` builds that transport as the runtime does (a name it does not know
  fails the test), so a transport added to the config is tested at the byte level or not at all.
- `server(handler)` is a real asyncio socket server on 127.0.0.1 whose handler reads raw request
  bytes and writes exactly the bytes a test scripts; `state` counts connections and keeps what
  the handler recorded. TLS when given a server context. `handlers_done(state)` waits until every
  connection's handler has returned.
- `pool_stats(wire)` is (connections busy, connections open) for any of the transports: what a leak
  check looks at. Connections a transport has not yet noticed are closed still count as open.
- `Wires` opens transports of one kind and closes them after the test; the `wire` fixture (one per
  transport in `NAMES`) and `anyio_backend` are defined here and imported by the wire test files.
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
import pytest

from proxy.runtime import TRANSPORTS

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]
NAMES: tuple[str, ...] = TRANSPORTS
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
PATH = "/model/anthropic.claude-3%3A0/invoke?x=%2F1"  # percent-escapes must reach the upstream as written


def open_transport(name: str, *, max_connections: int = 100,
                   ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncBaseTransport:
    """The transport `gateway.upstream_transport: <name>` selects, built with the runtime's settings."""
    if name == "httptools":
        from proxy.upstream.wire import WireTransport

        return WireTransport(max_connections=max_connections, keepalive_expiry=30.0, ssl_context=ssl_context)
    if name == "aiohttp":
        from proxy.upstream.transport import AiohttpTransport

        return AiohttpTransport(max_connections=max_connections, keepalive_expiry=30.0, ssl_context=ssl_context)
    raise AssertionError(f"no byte-level harness for upstream transport {name!r}: add it here")


class Wires:
    """Transports of one kind for one test; `wire()` opens one, `aclose()` closes them all."""

    def __init__(self, node: pytest.FixtureRequest, name: str) -> None:
        self.node, self.name = node, name
        self.opened: list[httpx.AsyncBaseTransport] = []

    def __call__(self, **kwargs: Any) -> httpx.AsyncBaseTransport:
        self.opened.append(open_transport(self.name, **kwargs))
        return self.opened[-1]

    async def aclose(self) -> None:
        for transport in self.opened:
            await transport.aclose()


def pool_stats(wire: httpx.AsyncBaseTransport) -> tuple[int, int]:
    if hasattr(wire, "stats"):  # proxy.upstream.wire
        return wire.stats()
    pool = getattr(wire, "_pool", None)  # httpx over httpcore
    if pool is not None:
        conns = [c for c in pool.connections if not c.is_closed()]
        return sum(1 for c in conns if not c.is_idle()), len(conns)
    session = getattr(wire, "_session", None)  # aiohttp
    connector = session.connector if session is not None else None
    if connector is None:
        return 0, 0
    busy = len(connector._acquired)
    idle = sum(1 for conns in connector._conns.values() for proto, *_ in conns if proto.is_connected())
    return busy, busy + idle


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """(request line, header lines as sent, body): names keep their case, repeats stay repeated."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
    length = next((int(v) for k, v in headers if k.lower() == b"content-length"), 0)
    return lines[0], headers, await reader.readexactly(length)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k.lower() == name), None)


@contextlib.asynccontextmanager
async def server(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"connections": 0, "finished": 0, "requests": [], "writers": []}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["connections"] += 1
        state["writers"].append(writer)
        with contextlib.suppress(Exception, asyncio.CancelledError):  # a script may end any way it likes
            await handler(reader, writer, state)
        writer.close()
        state["finished"] += 1

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_context)
    port = srv.sockets[0].getsockname()[1]
    state["url"] = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    try:
        yield state
    finally:
        for writer in state["writers"]:
            writer.close()
        srv.close()


async def handlers_done(state: dict[str, Any], limit: float = 5.0) -> None:
    """Wait until every connection's handler has returned (the client closed them all)."""
    async with asyncio.timeout(limit):
        while state["finished"] < state["connections"]:
            await asyncio.sleep(0.01)


def keep_alive(*responses: bytes) -> Handler:
    """Answer successive requests on each connection with the given responses, then hold it open."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        for response in responses:
            state["requests"].append(await read_request(reader))
            writer.write(response)
            await writer.drain()
        await reader.read()

    return handler


def request(url: str, *, method: str = "POST", body: bytes = b"{}", timeout: dict[str, float] | None = None,
            headers: list[tuple[str, str]] | None = None, path: str = PATH) -> httpx.Request:
    """A request in the forwarder's form: httpx sets Host and Content-Length, nothing else is added."""
    return httpx.Request(method, url + path, content=body,
                         headers=headers if headers is not None else [("Content-Type", "application/json")],
                         extensions={"timeout": timeout or {"connect": 2, "read": 2, "write": 2, "pool": 2}})


async def fetch(wire: httpx.AsyncBaseTransport, req: httpx.Request) -> tuple[httpx.Response, bytes]:
    response = await wire.handle_async_request(req)
    try:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return response, body


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=NAMES)
async def wire(request: pytest.FixtureRequest) -> AsyncIterator[Wires]:
    """Opens transports of the parametrized kind; all are closed when the test ends, pass or fail."""
    wires = Wires(request, request.param)
    yield wires
    await wires.aclose()
