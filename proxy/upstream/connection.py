"""One upstream HTTP/1.1 connection: an asyncio protocol that parses responses with httptools.

Contract (used by `proxy.upstream.wire` only):
- `exchange(head, body, ...)` writes one request and waits for the response head; afterwards
  `status`, `reason`, `headers` (name case as received) describe it and `next_chunk()` /
  `wait_body()` hand out the body as it arrives. One exchange at a time (no pipelining).
- Reading pauses while more than `high_water` body bytes wait for the consumer.
- Errors surface as httpx exceptions: ReadTimeout (head or idle), WriteTimeout / WriteError,
  RemoteProtocolError (peer closed early, bad HTTP). `Stale` means a reused connection was found
  closed before any response byte arrived: the request can safely go out again elsewhere.
- A body without length or chunking ends with the connection (HTTP/1.0 style); such a connection
  is never reused, nor one the peer asked to close, nor one whose exchange did not finish, nor
  one that sent bytes past the end of its response (the response itself still counts).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Callable

import httptools
import httpx

MAX_HEAD_BYTES = 256 * 1024  # a response head larger than this is not an LLM API talking


class Stale(Exception):
    """A reused keep-alive connection was closed by the peer before the request was answered."""


class Connection(asyncio.Protocol):
    def __init__(self, origin: tuple[str, str, int], high_water: int) -> None:
        self.origin = origin
        self.high_water = high_water
        self.low_water = high_water // 4
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.counted = True  # held against the pool's limit until forgotten
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.on_idle_close: Callable[[Connection], None] | None = None  # the pool drops it at once
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.sized = False  # Content-Length or chunked: the end is known without the connection closing
        self.informational = False
        self.received = False
        self.head_size = 0
        self.error: BaseException | None = None
        self.head_waiter: asyncio.Future[None] | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.skip_body = False
        self.active = False

    # ------------------------------------------------------------------ pool life
    def usable(self, now: float, expiry: float) -> bool:
        if self.closed or now - self.idle_since > expiry:
            return False
        self.reused = True
        return True

    def reusable(self) -> bool:
        return (not self.closed and self.complete and self.keep_alive and self.error is None
                and not self.paused and not self.chunks)

    def park(self, now: float) -> None:
        self.idle_since = now
        self.active = False

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ one exchange
    async def exchange(self, head: bytes, body: bytes, skip_body: bool, write_timeout: float | None,
                       read_timeout: float | None) -> None:
        reused = self.reused
        self._reset()
        self.active = True
        self.skip_body = skip_body
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            if reused:
                raise Stale()
            raise httpx.RemoteProtocolError("connection closed")
        loop = asyncio.get_running_loop()
        try:
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
        except (OSError, RuntimeError) as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__) from None
        if transport.get_write_buffer_size() and not self.closed:
            self.drain_waiter = loop.create_future()
            await self._wait(self.drain_waiter, write_timeout, httpx.WriteTimeout, "request upload timed out")
        if self.status == 0 and self.error is None and not self.closed:
            waiter = self.head_waiter = loop.create_future()
            timer = loop.call_later(read_timeout, _expire, waiter, httpx.ReadTimeout, "no response head in time") \
                if read_timeout is not None else None
            try:  # inline, not `_wait`: this wait is on every request
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
        if self.error is not None:
            if reused and not self.received:
                raise Stale()
            raise self.error
        if self.status == 0:
            if reused and not self.received:
                raise Stale()
            raise httpx.RemoteProtocolError("server disconnected without sending a response")

    async def _wait(self, waiter: asyncio.Future[None], timeout: float | None, error: type[Exception],
                    message: str) -> None:
        timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter, error, message) \
            if timeout is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    def next_chunk(self) -> bytes | None:
        if self.chunks:
            chunk = self.chunks.popleft()
            self.buffered -= len(chunk)
            if self.paused and self.buffered <= self.low_water and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            return chunk
        if self.error is not None and not self.complete:
            raise self.error
        return None

    async def wait_body(self, idle: float | None) -> None:
        self.body_waiter = asyncio.get_running_loop().create_future()
        await self._wait(self.body_waiter, idle, httpx.ReadTimeout, "upstream stream idle for too long")

    def _wake(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        for waiter in (self.head_waiter, self.body_waiter, self.drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ asyncio protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes nobody asked for: the connection cannot be trusted any more
            self.abort()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._wake(httpx.RemoteProtocolError("unexpected protocol upgrade"))
            self.abort()
        except httptools.HttpParserError as exc:
            if not self.complete:  # after a complete response only the connection is spoiled, not the answer
                self._wake(httpx.RemoteProtocolError(f"invalid HTTP response: {exc}"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.active:
            if self.on_idle_close is not None:
                self.on_idle_close(self)
            return
        if self.complete:
            return
        if self.status and not self.sized and self.error is None:
            self.complete = True  # a body delimited by the connection closing has ended
            self.keep_alive = False
            self._wake()
            return
        self._wake(httpx.RemoteProtocolError("upstream closed the connection mid-response")
                   if self.status else httpx.RemoteProtocolError("server disconnected without sending a response"))

    def pause_writing(self) -> None:
        pass  # the exchange waits for the buffer to drain itself (`get_write_buffer_size`)

    def resume_writing(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the response we asked for: never trust (or reuse) this connection
            raise httptools.HttpParserError("data after the end of the response")

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("response head too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 103 Early Hints and the like: the real head follows
            self.informational = True
            self.headers = []
            self.reason = b""
            return
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                self.sized = True
        self.status = status
        if self.skip_body:  # a HEAD response has no body whatever its headers say; don't reuse
            self.complete = True
            self.keep_alive = False
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.skip_body:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > self.high_water and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if not self.skip_body:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None], error: type[Exception], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(error(message))
