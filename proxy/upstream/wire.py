"""The default upstream wire: pooled HTTP/1.1 keep-alive connections on asyncio protocols, parsed by httptools.

The forwarder speaks the httpx API (`httpx.Request` in, `httpx.Response` with `aiter_raw` out);
this transport is what sits underneath. It exists because a pass-through needs far less than a
general client: no cookies, redirects, proxies, decompression, auto headers or URL requoting.
Measured per request it costs a fraction of aiohttp's client (see README, "upstream transport").

Contract:
- Bytes pass untouched both ways: the request head is the request's method, `raw_path` and
  headers exactly as given (Host and Content-Length come from httpx), the body is sent sized;
  response headers keep the upstream's name case; the body is yielded as it arrives, still
  compressed and de-chunked. CR, LF or NUL inside a header is refused (no request smuggling).
- Timeouts come from `request.extensions["timeout"]` (httpx's connect / read / write / pool):
  `pool` bounds waiting for a free connection, `connect` the TCP+TLS connect, `write` flushing a
  large upload, `read` the wait for the response head (first byte). When the body iteration
  STARTS, `read` is read again from the same dict and becomes the per-chunk idle timeout, so the
  caller may switch it after the head arrived (the forwarder does: first byte -> idle).
- Failures raise what httpcore would: PoolTimeout, ConnectError / ConnectTimeout, WriteTimeout /
  WriteError, ReadTimeout for a late head or a stalled body, RemoteProtocolError for a peer that
  closed early or spoke bad HTTP. A request whose reused keep-alive connection turns out closed
  before any response byte arrived is sent once more on a fresh connection (the peer never read it).
- `aclose()` on the response returns the connection to the pool only when the body was read to
  the end and the peer keeps it alive; otherwise (error, early close, the consumer cancelled) it
  is closed. Nothing leaks: at most `max_connections` connections exist, across all origins.
- A slow consumer pauses reading from the upstream socket (bounded buffering).
- HTTP/1.1 only; no environment proxies; redirects are returned, never followed.
"""
from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, AsyncIterator

import httpx

from proxy.upstream.connection import Connection, Stale

HIGH_WATER = 256 * 1024  # buffered response bytes before the upstream socket is paused
Origin = tuple[str, str, int]


class _Body(httpx.AsyncByteStream):
    """The response body as wire bytes; idle timeout taken from the timeout dict at first iteration."""

    __slots__ = ("_wire", "_conn", "_timeouts", "_closed")

    def __init__(self, wire: "WireTransport", conn: Connection, timeouts: dict[str, Any]) -> None:
        self._wire, self._conn, self._timeouts, self._closed = wire, conn, timeouts, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        idle = self._timeouts.get("read")
        while True:
            chunk = conn.next_chunk()
            if chunk is not None:
                yield chunk
                continue
            if conn.complete:
                return
            await conn.wait_body(idle)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._wire.release(self._conn)


class WireTransport(httpx.AsyncBaseTransport):
    """httpx transport over this module's own connection pool (one per gateway app, shared)."""

    def __init__(self, *, max_connections: int = 1000, keepalive_expiry: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max(1, max_connections)
        self.keepalive_expiry = keepalive_expiry
        self._ssl = ssl_context
        self._idle: dict[Origin, list[Connection]] = {}
        self._count = 0  # every open connection, idle or busy
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    # ------------------------------------------------------------------ the exchange
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https") or not url.host:
            raise httpx.UnsupportedProtocol(f"unsupported URL {url!r}")
        origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):  # the forwarder's form: the body is already in memory
            body = b"".join(stream)
        else:
            try:
                body = request.content
            except httpx.RequestNotRead:
                body = await request.aread()
        head = _head(request, body)
        method_head = request.method == "HEAD"
        for attempt in (0, 1):
            conn = self._pooled(origin) or await self._acquire(origin, timeouts)
            try:
                await conn.exchange(head, body, method_head, timeouts.get("write"), timeouts.get("read"))
            except Stale:
                self.release(conn)
                if attempt == 0:
                    continue  # the pooled connection was closed by the peer before it read anything
                raise httpx.RemoteProtocolError("server disconnected without sending a response") from None
            except BaseException:
                conn.abort()
                self.release(conn)
                raise
            extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
            if conn.reason:
                extensions["reason_phrase"] = conn.reason
            return httpx.Response(status_code=conn.status, headers=conn.headers,
                                  stream=_Body(self, conn, timeouts), request=request, extensions=extensions)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ the pool
    def _pooled(self, origin: Origin) -> Connection | None:
        """An idle kept-alive connection to `origin`, if there is one (the common case: no await)."""
        idle = self._idle.get(origin)
        if idle and not self._closed:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()
                if conn.usable(now, self.keepalive_expiry):
                    return conn
                conn.abort()
                self._forget(conn)
        return None

    async def _acquire(self, origin: Origin, timeouts: dict[str, Any]) -> Connection:
        if self._closed:
            raise httpx.ConnectError("the upstream transport is closed")
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            conn = self._pooled(origin)  # again after every wake-up: a released connection may be ours
            if conn is not None:
                return conn
            now = loop.time()
            if self._count >= self.max_connections:
                self._evict_idle()  # an idle connection to another origin makes room
            if self._count < self.max_connections:
                self._count += 1
                try:
                    return await self._connect(origin, timeouts.get("connect"))
                except BaseException:
                    self._count -= 1
                    self._wake()
                    raise
            if deadline is None:
                pool = timeouts.get("pool")
                deadline = None if pool is None else now + pool
                if deadline is None:
                    deadline = float("inf")
            left = deadline - now
            if left <= 0:
                raise httpx.PoolTimeout("no upstream connection became free in time")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_later(left, _expire, waiter) if left != float("inf") else None
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                if not waiter.done():
                    waiter.cancel()

    async def _connect(self, origin: Origin, timeout: float | None) -> Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            if self._ssl is None:  # same trust store as httpx (certifi); the environment is ignored
                self._ssl = httpx.create_ssl_context(trust_env=False)
            context = self._ssl
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(origin, HIGH_WATER), host, port, ssl=context,
                    server_hostname=host if context is not None else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return conn

    def release(self, conn: Connection) -> None:
        """A finished exchange: keep the connection for the next request, or close it."""
        if not self._closed and conn.reusable():
            conn.park(asyncio.get_running_loop().time())
            conn.on_idle_close = self._idle_closed
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.abort()
            self._forget(conn)
        self._wake()

    def _idle_closed(self, conn: Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
            self._forget(conn)
            self._wake()

    def _forget(self, conn: Connection) -> None:
        if conn.counted:
            conn.counted = False
            self._count -= 1

    def _evict_idle(self) -> None:
        oldest: Connection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is not None:
            self._idle[oldest.origin].remove(oldest)
            oldest.abort()
            self._forget(oldest)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def stats(self) -> tuple[int, int]:
        """(connections busy, connections open): what a leak audit looks at."""
        idle = sum(len(c) for c in self._idle.values())
        return self._count - idle, self._count

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
                self._forget(conn)
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)  # the acquire loop sees the deadline passed and raises PoolTimeout


def _head(request: httpx.Request, body: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if name.lower() != b"transfer-encoding":  # the body is always sent sized
            lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    head = b"".join(lines)
    # Every CR and LF must be a line end we wrote: one in a name or value would split the request.
    if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines) or b"\0" in head:
        raise httpx.LocalProtocolError("a request header contains CR, LF or NUL")
    return head

