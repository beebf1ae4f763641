"""Every upstream transport the config offers, checked byte for byte against scripted TCP servers.

Each test runs once per value of `gateway.upstream_transport` (`tests/wirekit.py`): the default
httptools wire, aiohttp and httpcore. The servers are real asyncio sockets on 127.0.0.1 that read a
raw request and write exactly the scripted bytes, so what goes out (head, path, headers, body) and
what comes back (status, header names and repeats, framing, still-compressed bodies) is what a
pass-through must keep. Failures, timeouts and pool limits are in tests/test_wire_failures.py.
"""
from __future__ import annotations

import asyncio
import gzip
import ssl
from typing import Any

import httpx
import pytest

from config import parse_config
from proxy.runtime import Runtime
from tests.wirekit import anyio_backend, wire  # noqa: F401 - the shared fixtures
from tests.wirekit import (NAMES, OK, PATH, Wires, fetch, handlers_done, header, keep_alive, open_transport, pool_stats,
                           read_request, request, server)

pytestmark = pytest.mark.anyio  # anyio's pytest plugin (installed with httpx) runs the async tests


def test_every_configured_transport_is_covered_and_built_as_the_runtime_builds_it() -> None:
    for name in NAMES:
        runtime = Runtime(parse_config(f"gateway: {{upstream_transport: {name}}}", "t.yaml", {}))
        assert type(runtime.wire) is type(open_transport(name)), name


async def test_request_bytes_pass_exactly_and_the_connection_is_reused(wire: Wires) -> None:
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nSet-Cookie: a=1\r\nX-Up: 1\r\n"
             b"set-cookie: b=2\r\nContent-Length: 11\r\n\r\n{\"ok\":true}")
    async with server(keep_alive(reply, reply)) as srv:
        transport = wire()
        sent = [("Content-Type", "application/json"), ("X-Dup", "1"), ("x-dup", "2"), ("anthropic-version", "v")]
        for _ in range(2):
            response, body = await fetch(transport, request(srv["url"], body=b'{"model":"m"}', headers=sent))
            assert (response.status_code, body) == (200, b'{"ok":true}')
            # response header names as received, repeats kept in order
            assert response.headers.raw[:5] == [(b"Content-Type", b"application/json"), (b"Set-Cookie", b"a=1"),
                                                (b"X-Up", b"1"), (b"set-cookie", b"b=2"), (b"Content-Length", b"11")]
        line, headers, body = srv["requests"][0]
        assert line == f"POST {PATH} HTTP/1.1".encode()  # %3A and %2F as written
        host = srv["url"].split("//")[1].encode()
        # nothing of the transport's own (no user-agent, accept, accept-encoding, connection), names as given;
        # aiohttp sends a repeat under its first spelling (it would drop one of the two otherwise)
        again = b"X-Dup" if wire.name == "aiohttp" else b"x-dup"
        assert sorted(headers) == sorted([(b"Host", host), (b"Content-Type", b"application/json"), (b"X-Dup", b"1"),
                                          (again, b"2"), (b"anthropic-version", b"v"), (b"Content-Length", b"13")])
        assert [v for k, v in headers if k.lower() == b"x-dup"] == [b"1", b"2"]
        assert body == b'{"model":"m"}' and srv["requests"][1][2] == b'{"model":"m"}'
        assert srv["connections"] == 1 and pool_stats(transport) == (0, 1)


async def test_chunked_body_streams_as_it_arrives(wire: Wires) -> None:
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
        transport = wire()
        response = await transport.handle_async_request(request(srv["url"]))
        chunks = response.aiter_raw()
        assert await chunks.__anext__() == b"data: 1"  # before the server sent the rest
        gate.set()
        assert b"".join([c async for c in chunks]) == b"data: 2"
        await response.aclose()
        assert pool_stats(transport) == (0, 1)  # a fully read chunked body: kept alive


async def test_compressed_body_passes_as_the_wire_bytes(wire: Wires) -> None:
    payload = gzip.compress(b'{"usage":{"prompt_tokens":1}}' * 50)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (payload[:40], payload[40:])) + b"0\r\n\r\n"
    sized = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    async with server(keep_alive(sized, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                                        b"Transfer-Encoding: chunked\r\n\r\n" + chunked)) as srv:
        transport = wire()
        for _ in range(2):  # never inflated, never re-chunked: the body is what the upstream sent, de-framed
            response, body = await fetch(transport, request(srv["url"], headers=[("Accept-Encoding", "gzip")]))
            assert body == payload and response.headers["content-encoding"] == "gzip"
        assert header(srv["requests"][0][1], b"accept-encoding") == b"gzip"


async def test_redirects_are_returned_never_followed(wire: Wires) -> None:
    async with server(keep_alive(OK)) as target:
        moved = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %s/stolen\r\nContent-Length: 0\r\n\r\n"
        async with server(keep_alive(moved % target["url"].encode())) as srv:
            response, body = await fetch(wire(), request(srv["url"]))
            assert response.status_code == 307 and body == b""
            assert response.headers["location"] == target["url"] + "/stolen"
        assert target["connections"] == 0


async def test_close_delimited_body_ends_with_the_connection_and_is_not_reused(wire: Wires) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":1}")
        await writer.drain()
        writer.close()

    async with server(handler) as srv:
        transport = wire()
        for _ in range(2):
            response, body = await fetch(transport, request(srv["url"]))
            assert (response.status_code, body) == (200, b'{"a":1}')
        assert srv["connections"] == 2 and pool_stats(transport) == (0, 0)


async def test_early_hints_are_skipped(wire: Wires) -> None:
    async with server(keep_alive(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK)) as srv:
        response, body = await fetch(wire(), request(srv["url"]))
        assert response.status_code == 200 and body == b'{"ok":true}'
        assert all(k.lower() != b"link" for k, _ in response.headers.raw)


async def test_bytes_after_a_response_are_never_the_next_answer(wire: Wires) -> None:
    extra = OK.replace(b'{"ok":true}', b'{"no":true}')
    async with server(keep_alive(OK + extra, OK)) as srv:
        transport = wire()
        for _ in range(2):
            try:
                response, body = await fetch(transport, request(srv["url"]))
            except httpx.RemoteProtocolError:
                continue  # refusing the spoiled connection loudly is fine too; answering from it is not
            assert (response.status_code, body) == (200, b'{"ok":true}')


async def test_head_response_has_no_body_whatever_its_length_says(wire: Wires) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        while True:
            line, _, _ = await read_request(reader)
            state["requests"].append(line)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" if line.startswith(b"HEAD ") else OK)
            await writer.drain()

    async with server(handler) as srv:
        transport = wire()
        response, body = await fetch(transport, request(srv["url"], method="HEAD", body=b""))
        assert response.status_code == 200 and body == b""
        response, body = await fetch(transport, request(srv["url"]))  # the next answer is intact
        assert body == b'{"ok":true}' and srv["requests"][0].startswith(b"HEAD ")


async def test_header_injection_is_refused_before_any_byte_is_sent(wire: Wires) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        state["requests"].append(await reader.read())  # whatever arrives, up to the close

    async with server(handler) as srv:
        transport = wire()
        for value in ("1\r\nx-injected: 1", "1\nx-injected: 1", "1\rx: 1", "nul\0byte"):
            with pytest.raises(httpx.LocalProtocolError):
                await transport.handle_async_request(request(srv["url"], headers=[("x-a", value)]))
        await transport.aclose()
        await handlers_done(srv)  # each handler read to the close: all a transport sent
        assert not any(srv["requests"])


async def test_tls_upstream_with_a_private_ca(wire: Wires) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with server(keep_alive(OK, OK), ssl_context=server_context) as srv:
        transport = wire(ssl_context=client_context)
        for _ in range(2):
            response, body = await fetch(transport, request(srv["url"]))
            assert (response.status_code, body) == (200, b'{"ok":true}')
        assert srv["connections"] == 1
        with pytest.raises(httpx.ConnectError):  # the default trust store: this certificate never connects
            await wire().handle_async_request(request(srv["url"]))
