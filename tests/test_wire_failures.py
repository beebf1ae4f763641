"""Every upstream transport the config offers, under failure: timeouts, dead peers, full pools, slow readers.

Each test runs once per value of `gateway.upstream_transport` (`tests/wirekit.py`) against real
asyncio socket servers on 127.0.0.1 that script the failure byte by byte. What is checked is what
the forwarder relies on: each failure surfaces as the httpx exception it maps to an error code, a
request the upstream never read goes out once more, and no failure leaves a connection held.
"""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.wirekit import anyio_backend, wire  # noqa: F401 - the shared fixtures
from tests.wirekit import OK, Wires, fetch, keep_alive, pool_stats, read_request, request, server

pytestmark = pytest.mark.anyio


async def test_an_idle_connection_the_peer_closed_is_not_used_again(wire: Wires) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        state["requests"].append(await read_request(reader))
        writer.write(OK)
        await writer.drain()
        writer.transport.abort()  # the peer drops its idle keep-alive connection
        await writer.wait_closed()
        state["drop"].set()  # closed on the server's side; the client may not have noticed yet

    async with server(handler) as srv:
        srv["drop"] = asyncio.Event()
        transport = wire()
        await fetch(transport, request(srv["url"]))
        await srv["drop"].wait()
        response, body = await fetch(transport, request(srv["url"]))
        assert (response.status_code, body) == (200, b'{"ok":true}')
        assert srv["connections"] == 2 and len(srv["requests"]) == 2


async def test_a_reused_connection_closed_unanswered_is_resent_once_a_fresh_one_never(wire: Wires) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        state["requests"].append(await read_request(reader))
        if state["connections"] in (2, 3):
            writer.transport.abort()  # closed as the request arrived: no response byte at all
            return
        writer.write(OK)
        await writer.drain()
        state["requests"].append(await read_request(reader))
        writer.transport.abort()  # the race with an idle-timeout close: the request was never read

    async with server(handler) as srv:
        transport = wire()
        await fetch(transport, request(srv["url"]))  # connection 1, then kept alive
        with pytest.raises(httpx.RemoteProtocolError):
            # reused connection 1 dies unanswered: one resend, on connection 2, whose own failure
            # (a fresh connection: the upstream may have acted on it) is never resent
            await transport.handle_async_request(request(srv["url"]))
        assert srv["connections"] == 2 and len(srv["requests"]) == 3
        assert pool_stats(transport) == (0, 0)


async def test_a_late_head_is_a_read_timeout_and_the_connection_is_dropped(wire: Wires) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    async with server(handler) as srv:
        transport = wire()
        with pytest.raises(httpx.ReadTimeout):
            await transport.handle_async_request(request(srv["url"], timeout={"connect": 2, "read": 0.2, "write": 2,
                                                                              "pool": 2}))
        assert pool_stats(transport) == (0, 0)


async def test_the_idle_timeout_is_read_when_the_body_starts(wire: Wires) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # stalls mid-body

    async with server(handler) as srv:
        transport = wire()
        timeouts = {"connect": 2, "read": 30.0, "write": 2, "pool": 2}
        response = await transport.handle_async_request(request(srv["url"], timeout=timeouts))
        timeouts["read"] = 0.2  # first byte -> idle, as the forwarder does
        seen = []
        with pytest.raises(httpx.ReadTimeout):
            async for chunk in response.aiter_raw():
                seen.append(chunk)
        await response.aclose()
        assert seen == [b"abc"] and pool_stats(transport) == (0, 0)


async def test_a_peer_closing_mid_body_is_a_protocol_error(wire: Wires) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    async with server(handler) as srv:
        transport = wire()
        response = await transport.handle_async_request(request(srv["url"]))
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in response.aiter_raw():
                pass
        await response.aclose()
        assert pool_stats(transport) == (0, 0)


async def test_garbage_and_refused_connections_map_to_httpx_errors(wire: Wires) -> None:
    transport = wire()
    async with server(keep_alive(b"NOT HTTP AT ALL\r\n\r\n")) as srv:
        with pytest.raises(httpx.RemoteProtocolError):
            await transport.handle_async_request(request(srv["url"]))
        url = srv["url"]
    with pytest.raises(httpx.ConnectError):  # the server is gone: connection refused
        await transport.handle_async_request(request(url))
    assert pool_stats(transport) == (0, 0)


async def test_a_full_pool_waits_then_times_out_and_a_freed_connection_goes_to_the_waiter(wire: Wires) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        while True:
            state["requests"].append(await read_request(reader))
            await release.wait()
            writer.write(OK)
            await writer.drain()

    async with server(handler) as srv:
        transport = wire(max_connections=1)
        first = asyncio.ensure_future(fetch(transport, request(srv["url"])))
        async with asyncio.timeout(5):
            while not srv["requests"]:
                await asyncio.sleep(0.01)
        with pytest.raises(httpx.PoolTimeout):
            await transport.handle_async_request(request(srv["url"], timeout={"connect": 2, "read": 2, "write": 2,
                                                                              "pool": 0.2}))
        waiting = asyncio.ensure_future(fetch(transport, request(srv["url"])))
        await asyncio.sleep(0.05)
        release.set()
        assert (await first)[1] == b'{"ok":true}' and (await waiting)[1] == b'{"ok":true}'
        assert srv["connections"] == 1  # the waiter got the released connection


async def test_an_idle_connection_to_another_origin_makes_room(wire: Wires) -> None:
    async with server(keep_alive(OK)) as one, server(keep_alive(OK)) as two:
        transport = wire(max_connections=1)
        await fetch(transport, request(one["url"]))  # kept alive, idle
        response, body = await fetch(transport, request(two["url"], timeout={"connect": 2, "read": 2, "write": 2,
                                                                              "pool": 0.5}))
        assert body == b'{"ok":true}' and pool_stats(transport)[0] == 0
        if wire.name != "aiohttp":  # aiohttp bounds the exchanges in flight, not idle sockets (closed when expired)
            assert pool_stats(transport)[1] == 1


async def test_a_cancelled_caller_frees_its_connection(wire: Wires) -> None:
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        arrived.set()
        await reader.read()

    async with server(handler) as srv:
        transport = wire(max_connections=1)
        task = asyncio.ensure_future(transport.handle_async_request(request(srv["url"])))
        await arrived.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool_stats(transport) == (0, 0)


async def test_a_slow_consumer_holds_back_the_upstream(wire: Wires) -> None:
    size, piece = 128 * 1024 * 1024, 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * piece
        for _ in range(size // piece):
            writer.write(block)
            await writer.drain()  # blocks once the client stops taking bytes
            state["written"] += piece
        await reader.read()

    async with server(handler) as srv:
        srv["written"] = 0
        transport = wire()
        response = await transport.handle_async_request(request(srv["url"]))
        seen, still = -1, 0
        async with asyncio.timeout(20):
            while still < 5:  # the server's progress has stopped for five looks in a row
                await asyncio.sleep(0.05)
                seen, still = srv["written"], still + 1 if srv["written"] == seen else 0
        # what the kernel buffers on both sides (a few MiB; at most ~36 with Linux's largest default
        # windows) plus the transport's own bounded buffer: far from the whole body
        assert srv["written"] <= size // 2, srv["written"]
        total = sum([len(c) async for c in response.aiter_raw()])
        await response.aclose()
        assert total == size and pool_stats(transport) == (0, 1)


async def test_a_large_upload_is_sent_whole_and_a_stalled_one_times_out(wire: Wires) -> None:
    size = 16 * 1024 * 1024
    stall = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        if state["connections"] == 2:
            await stall.wait()  # never reads: the upload cannot drain
            return
        _, _, body = await read_request(reader)
        state["requests"].append(len(body))
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async with server(handler) as srv:
        response, body = await fetch(wire(), request(srv["url"], body=b"x" * size))
        assert body == b'{"ok":true}' and srv["requests"] == [size]
        stalled = wire()
        with pytest.raises(httpx.WriteTimeout):  # the second connection's peer never reads
            await stalled.handle_async_request(request(srv["url"], body=b"y" * size,
                                                       timeout={"connect": 2, "read": 2, "write": 0.3, "pool": 2}))
        stall.set()
        assert pool_stats(stalled) == (0, 0)
