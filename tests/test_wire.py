"""The default upstream wire (`proxy.upstream.wire.WireTransport`) against scripted raw TCP servers on 127.0.0.1.

Each server is a real asyncio socket server whose handler reads one request head (and body) and
writes exactly the bytes a test scripts, so framing, keep-alive, timeouts, backpressure and
failure mapping are checked at the byte level. TLS uses a throwaway trustme CA.
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
import pytest

from proxy.upstream.wire import WireTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]
pytestmark = pytest.mark.anyio  # anyio's pytest plugin (installed with httpx) runs the async tests
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return lines[0], headers, body


@contextlib.asynccontextmanager
async def server(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"connections": 0, "requests": [], "writers": []}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["connections"] += 1
        state["writers"].append(writer)
        with contextlib.suppress(Exception):
            await handler(reader, writer, state)
        writer.close()

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_context)
    port = srv.sockets[0].getsockname()[1]
    state["url"] = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    try:
        yield state
    finally:
        for writer in state["writers"]:
            writer.close()
        srv.close()


def keep_alive(*responses: bytes) -> Handler:
    """Answer successive requests on one connection with the given responses."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        for response in responses:
            state["requests"].append(await read_request(reader))
            writer.write(response)
            await writer.drain()
        await reader.read()  # hold the connection open until the client closes it

    return handler


def request(url: str, *, method: str = "POST", body: bytes = b"{}", timeout: dict[str, float] | None = None,
            headers: list[tuple[str, str]] | None = None) -> httpx.Request:
    return httpx.Request(method, url + "/v1/chat/completions?x=%2F1", content=body,
                         headers=headers or [("Content-Type", "application/json")],
                         extensions={"timeout": timeout or {"connect": 2, "read": 2, "write": 2, "pool": 2}})


async def fetch(wire: WireTransport, req: httpx.Request) -> tuple[httpx.Response, bytes]:
    response = await wire.handle_async_request(req)
    try:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return response, body


async def test_request_bytes_and_keep_alive_reuse() -> None:
    async with server(keep_alive(OK, OK)) as srv:
        wire = WireTransport(max_connections=4)
        for _ in range(2):
            response, body = await fetch(wire, request(srv["url"], body=b'{"model":"m"}'))
            assert (response.status_code, body) == (200, b'{"ok":true}')
            assert response.headers.raw[0] == (b"Content-Type", b"application/json")  # name case as received
        line, headers, body = srv["requests"][0]
        assert line == b"POST /v1/chat/completions?x=%2F1 HTTP/1.1"  # the path exactly as encoded
        assert headers[b"content-length"] == b"13" and body == b'{"model":"m"}'
        assert headers[b"host"] == srv["url"].split("//")[1].encode()
        assert b"user-agent" not in headers and b"accept-encoding" not in headers  # nothing of our own
        assert srv["connections"] == 1 and wire.stats() == (0, 1)
        await wire.aclose()


async def test_chunked_body_streams_as_it_arrives() -> None:
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"7\r\ndata: 1\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with server(handler) as srv:
        wire = WireTransport()
        response = await wire.handle_async_request(request(srv["url"]))
        chunks = response.aiter_raw()
        assert await chunks.__anext__() == b"data: 1"  # before the server sent the rest
        gate.set()
        assert b"".join([c async for c in chunks]) == b"data: 2"
        await response.aclose()
        assert wire.stats() == (0, 1)  # fully read chunked body: kept alive
        await wire.aclose()


async def test_close_delimited_body_and_no_reuse() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":1}")
        await writer.drain()
        writer.close()

    async with server(handler) as srv:
        wire = WireTransport()
        response, body = await fetch(wire, request(srv["url"]))
        assert (response.status_code, body) == (200, b'{"a":1}')
        assert wire.stats() == (0, 0)
        await wire.aclose()


async def test_idle_connection_closed_by_the_peer_is_not_used_again() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        state["requests"].append(await read_request(reader))
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # the peer drops its idle keep-alive connection

    async with server(handler) as srv:
        wire = WireTransport()
        await fetch(wire, request(srv["url"]))
        await asyncio.sleep(0.2)
        assert wire.stats() == (0, 0)  # noticed while idle
        response, body = await fetch(wire, request(srv["url"]))
        assert (response.status_code, body) == (200, b'{"ok":true}')
        assert srv["connections"] == 2 and len(srv["requests"]) == 2
        await wire.aclose()


async def test_reused_connection_closing_before_any_response_byte_is_retried_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        state["requests"].append(await read_request(reader))
        if state["connections"] in (2, 3):
            writer.transport.abort()  # closed as the request arrived: no response byte at all
            return
        writer.write(OK)
        await writer.drain()
        state["requests"].append(await read_request(reader))
        writer.transport.abort()

    async with server(handler) as srv:
        wire = WireTransport()
        await fetch(wire, request(srv["url"]))  # connection 1, then kept alive
        with pytest.raises(httpx.RemoteProtocolError):
            # reused connection 1 dies unanswered -> one retry on connection 2, which a fresh
            # connection's failure never triggers again
            await wire.handle_async_request(request(srv["url"]))
        assert srv["connections"] == 2 and len(srv["requests"]) == 3
        assert wire.stats() == (0, 0)
        await wire.aclose()


async def test_early_hints_are_skipped() -> None:
    async with server(keep_alive(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK)) as srv:
        wire = WireTransport()
        response, body = await fetch(wire, request(srv["url"]))
        assert response.status_code == 200 and body == b'{"ok":true}'
        assert all(k != b"Link" for k, _ in response.headers.raw)
        await wire.aclose()


async def test_bytes_after_the_response_are_not_taken_for_the_next_one() -> None:
    async with server(keep_alive(OK + OK.replace(b'{"ok":true}', b'{"no":true}'))) as srv:
        wire = WireTransport()
        response, body = await fetch(wire, request(srv["url"]))
        assert (response.status_code, body) == (200, b'{"ok":true}')
        assert wire.stats() == (0, 0)  # an unasked-for second response: the connection is dropped
        await wire.aclose()


async def test_header_injection_is_refused_before_anything_is_sent() -> None:
    async with server(keep_alive(OK)) as srv:
        wire = WireTransport()
        bad = request(srv["url"], headers=[("x-a", "1\r\nx-injected: 1")])
        with pytest.raises(httpx.LocalProtocolError):
            await wire.handle_async_request(bad)
        assert srv["connections"] == 0
        await wire.aclose()


async def test_head_timeout_then_the_connection_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    async with server(handler) as srv:
        wire = WireTransport()
        with pytest.raises(httpx.ReadTimeout):
            await wire.handle_async_request(request(srv["url"], timeout={"connect": 2, "read": 0.2, "pool": 2}))
        assert wire.stats() == (0, 0)
        await wire.aclose()


async def test_idle_timeout_applies_to_the_body_and_can_be_changed_after_the_head() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # stalls mid-body

    async with server(handler) as srv:
        wire = WireTransport()
        timeouts = {"connect": 2, "read": 30.0, "pool": 2}
        response = await wire.handle_async_request(request(srv["url"], timeout=timeouts))
        timeouts["read"] = 0.2  # first byte -> idle, as the forwarder does
        seen = []
        with pytest.raises(httpx.ReadTimeout):
            async for chunk in response.aiter_raw():
                seen.append(chunk)
        await response.aclose()
        assert seen == [b"abc"] and wire.stats() == (0, 0)
        await wire.aclose()


async def test_peer_closing_mid_body_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    async with server(handler) as srv:
        wire = WireTransport()
        response = await wire.handle_async_request(request(srv["url"]))
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in response.aiter_raw():
                pass
        await response.aclose()
        assert wire.stats() == (0, 0)
        await wire.aclose()


async def test_garbage_and_refused_connections_map_to_httpx_errors() -> None:
    async with server(keep_alive(b"NOT HTTP AT ALL\r\n\r\n")) as srv:
        wire = WireTransport()
        with pytest.raises(httpx.RemoteProtocolError):
            await wire.handle_async_request(request(srv["url"]))
        url = srv["url"]
    with pytest.raises(httpx.ConnectError):  # the server is gone: connection refused
        await wire.handle_async_request(request(url))
    assert wire.stats() == (0, 0)
    await wire.aclose()


async def test_pool_limit_waits_then_times_out() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(OK)
            await writer.drain()

    async with server(handler) as srv:
        wire = WireTransport(max_connections=1)
        first = asyncio.ensure_future(fetch(wire, request(srv["url"])))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await wire.handle_async_request(request(srv["url"], timeout={"connect": 2, "read": 2, "pool": 0.2}))
        waiting = asyncio.ensure_future(fetch(wire, request(srv["url"])))
        await asyncio.sleep(0.05)
        release.set()
        assert (await first)[1] == b'{"ok":true}' and (await waiting)[1] == b'{"ok":true}'
        assert srv["connections"] == 1  # the waiter got the released connection
        await wire.aclose()


async def test_cancelled_caller_frees_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        await reader.read()

    async with server(handler) as srv:
        wire = WireTransport(max_connections=1)
        task = asyncio.ensure_future(wire.handle_async_request(request(srv["url"])))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert wire.stats() == (0, 0)
        await wire.aclose()


async def test_slow_consumer_pauses_the_upstream_socket() -> None:
    size = 8 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()
        await reader.read()

    async with server(handler) as srv:
        wire = WireTransport()
        response = await wire.handle_async_request(request(srv["url"]))
        await asyncio.sleep(0.3)  # the server pushes while nobody reads
        conn = response.stream._conn  # type: ignore[attr-defined]
        assert conn.paused and conn.buffered < 2 * 1024 * 1024  # bounded, not the whole 8 MiB
        total = sum([len(c) async for c in response.aiter_raw()])
        await response.aclose()
        assert total == size and wire.stats() == (0, 1)
        await wire.aclose()


async def test_head_request_has_no_body() -> None:
    async with server(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")) as srv:
        wire = WireTransport()
        response, body = await fetch(wire, request(srv["url"], method="HEAD", body=b""))
        assert response.status_code == 200 and body == b""
        await wire.aclose()


async def test_tls_upstream_with_a_private_ca() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with server(keep_alive(OK, OK), ssl_context=server_context) as srv:
        wire = WireTransport(ssl_context=client_context)
        for _ in range(2):
            response, body = await fetch(wire, request(srv["url"]))
            assert (response.status_code, body) == (200, b'{"ok":true}')
        assert srv["connections"] == 1
        await wire.aclose()
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate never connects
            await WireTransport().handle_async_request(request(srv["url"]))


async def test_a_large_upload_is_sent_whole_and_a_stalled_one_times_out() -> None:
    size = 16 * 1024 * 1024
    stall = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        if state["connections"] == 2:
            await stall.wait()  # never reads: the upload cannot drain
            return
        _, headers, body = await read_request(reader)
        state["requests"].append(len(body))
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async with server(handler) as srv:
        wire = WireTransport()
        response, body = await fetch(wire, request(srv["url"], body=b"x" * size))
        assert body == b'{"ok":true}' and srv["requests"] == [size]
        with pytest.raises(httpx.WriteTimeout):  # the second connection's peer never reads
            wire2 = WireTransport()
            await wire2.handle_async_request(request(srv["url"], body=b"y" * size,
                                                     timeout={"connect": 2, "read": 2, "write": 0.3, "pool": 2}))
        stall.set()
        assert wire2.stats() == (0, 0)
        await wire.aclose()
        await wire2.aclose()
