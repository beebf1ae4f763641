"""An httpx transport over one shared aiohttp `ClientSession` (`gateway.upstream_transport: aiohttp`).

The forwarder keeps speaking the httpx API (`build_request`, `send(stream=True)`, `aiter_raw`,
`aclose`, `headers.raw`, `status_code`); only the wire client underneath changes.

Contract:
- Bytes pass untouched both ways: `auto_decompress=False` (so `aiter_raw` yields wire bytes and a
  compressed body stays compressed), the request URL is sent exactly as httpx encoded it (no
  requoting: Bedrock's `%3A` / `%2F` survive), response headers arrive as received (name case kept).
  A request header repeated under another case is sent under its first spelling (aiohttp would
  otherwise keep only the last one). CR, LF or NUL in a header is refused before connecting.
- aiohttp adds nothing of its own: no User-Agent / Accept / Accept-Encoding / Content-Type
  (`skip_auto_headers`), no cookie jar, no environment proxies (`trust_env=False`), no redirects.
- At most `max_connections` exchanges run at once, across origins; a request waits up to the
  `pool` timeout for one to end, then raises PoolTimeout (the gateway's own limit, not the
  deployment's fault). Idle keep-alive connections close after `keepalive_expiry`.
- Timeouts come from `request.extensions["timeout"]` (httpx's {"connect", "read", "write", "pool"}):
  `connect` bounds the TCP/TLS connect, `read` bounds the wait for the response head (first byte,
  counted from the end of the upload). aiohttp has no write timeout, so the head phase is also
  bounded by connect + write + read (a stalled upload ends as WriteTimeout then). When the body
  iteration STARTS, `read` is read again from the same dict and becomes the per-chunk idle
  timeout, so a caller may change it after the headers arrived (the forwarder does: first byte -> idle).
- Failures raise the httpx exception httpcore would: ConnectError / ConnectTimeout before a
  connection, ReadTimeout for a late head or a stalled body, RemoteProtocolError for a peer that
  closed early or spoke bad HTTP, ReadError / WriteError for other socket errors. A request whose
  reused keep-alive connection was closed before any response byte arrived is sent once more (the
  peer never read it); a fresh connection's failure is never resent.
- `aclose()` on the response returns the connection to the pool only if the body was read to the
  end; otherwise (error, early close, the consumer cancelled mid-stream) the connection is closed.
  Nothing is leaked. The session opens lazily on the first request, in the running loop.
- HTTP/1.1 only.
"""
from __future__ import annotations

import asyncio
import re
import ssl
import weakref
from collections import deque
from contextvars import ContextVar
from itertools import chain
from typing import Any, AsyncIterator

import aiohttp
import httpx
from yarl import URL

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_DROP_REQUEST_HEADERS = frozenset({b"transfer-encoding"})  # we always send a sized body
_CONTROL = re.compile(rb"[\r\n\0]")
# Set by `_Connector.connect` in the requesting task: whether this attempt got a kept-alive connection.
_REUSED: ContextVar[bool] = ContextVar("aiohttp_transport_reused", default=False)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, noting per request whether the connection handed out was used before:
    only a request on a reused connection may be resent after the peer closed it unanswered."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: Any, *args: Any, **kwargs: Any) -> Any:
        conn = await super().connect(req, *args, **kwargs)
        proto = conn.protocol
        if proto is not None:
            _REUSED.set(proto in self._used)
            self._used.add(proto)
        return conn


def _as_httpx_error(exc: BaseException, *, body: bool) -> httpx.TransportError:
    """Map an aiohttp/OS failure to the httpx exception the forwarder already handles."""
    message = str(exc) or exc.__class__.__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                        aiohttp.ClientResponseError)):
        return httpx.RemoteProtocolError(message)
    if body or isinstance(exc, aiohttp.ClientConnectionError):
        return httpx.ReadError(message)
    if isinstance(exc, OSError):
        return httpx.WriteError(message)
    return httpx.TransportError(message)


class _ResponseBody(httpx.AsyncByteStream):
    """The response body as wire bytes; idle timeout taken from the timeout dict at first iteration."""

    __slots__ = ("_response", "_timeouts", "_closed", "_transport")

    def __init__(self, response: aiohttp.ClientResponse, timeouts: dict[str, Any],
                 transport: "AiohttpTransport") -> None:
        self._response = response
        self._timeouts = timeouts
        self._closed = False
        self._transport = transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        response = self._response
        content = response.content
        connection = response.connection
        if connection is not None and connection.protocol is not None and not content.is_eof():
            # aiohttp's sock_read timer is per connection; switch it from first-byte to idle now.
            connection.protocol.read_timeout = self._timeouts.get("read")
            connection.protocol.start_timeout()
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _as_httpx_error(exc, body=True) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        response = self._response
        if response.content.is_eof() and response.content.exception() is None:
            response.release()  # fully read: the connection goes back to the pool
        else:
            response.close()  # unread or broken body: the connection cannot be reused
        self._transport._release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx transport backed by one lazily created, shared `aiohttp.ClientSession`."""

    def __init__(self, *, max_connections: int = 1000, keepalive_expiry: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, max_field_size: int = 16384) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self.max_field_size = max_field_size
        self._session: aiohttp.ClientSession | None = None
        self._busy = 0  # exchanges holding a connection, from the request until the body's aclose
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _open(self) -> aiohttp.ClientSession:
        # Same trust store as httpx (certifi), environment ignored like the httpx client.
        context = self.ssl_context or httpx.create_ssl_context(trust_env=False)
        connector = _Connector(limit=self.max_connections, limit_per_host=0,
                               keepalive_timeout=self.keepalive_expiry, ssl=context)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None), max_line_size=self.max_field_size,
            max_field_size=self.max_field_size,
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
        connect = timeouts.get("connect")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=timeouts.get("read"),
                                        connect=connect)
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        headers = _headers(request)
        parts = [timeouts.get(name) for name in ("connect", "write", "read")]
        budget = None if None in parts else sum(parts)  # type: ignore[arg-type]  # `None in parts` ruled None out
        url = URL(str(request.url), encoded=True)
        await self._acquire(timeouts.get("pool"))
        try:
            for attempt in (0, 1):
                _REUSED.set(False)
                head = asyncio.timeout(budget)
                try:
                    async with head:
                        response = await session.request(request.method, url, headers=headers, data=body or None,
                                                         allow_redirects=False, timeout=timeout)
                    break
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    if attempt == 0 and _REUSED.get() and _unanswered(exc):
                        continue  # the kept-alive connection was closed by the peer before it read anything
                    if head.expired():
                        raise httpx.WriteTimeout("no response head within connect + write + read") from exc
                    raise _as_httpx_error(exc, body=False) from exc
                except ValueError as exc:  # aiohttp refusing what it was asked to send
                    raise httpx.LocalProtocolError(str(exc)) from exc
        except BaseException:
            self._release()
            raise
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(status_code=response.status, headers=list(response.raw_headers),
                              stream=_ResponseBody(response, timeouts, self), request=request,
                              extensions=extensions)

    async def _acquire(self, pool: float | None) -> None:
        """A slot among `max_connections`, waiting up to `pool` seconds; freed slots go to waiters in order."""
        if self._busy < self.max_connections and not self._waiters:
            self._busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(pool):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived as the timer fired: take it
            raise httpx.PoolTimeout("no upstream connection became free in time") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot while being cancelled: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; the count stays
                return
        self._busy -= 1

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _headers(request: httpx.Request) -> list[tuple[str, str]]:
    """The request's headers for aiohttp: refused whole if one holds CR/LF/NUL, repeats under one spelling."""
    raw = request.headers.raw
    if _CONTROL.search(b"".join(chain.from_iterable(raw))):  # one search for all: this runs per request
        raise httpx.LocalProtocolError("a request header contains CR, LF or NUL")
    out: list[tuple[str, str]] = []
    spellings: dict[bytes, str] = {}
    for name, value in raw:
        lower = name.lower()
        if lower in _DROP_REQUEST_HEADERS:
            continue
        spelled = spellings.get(lower)
        if spelled is None:  # aiohttp keeps only the last of two names that differ only in case
            spelled = spellings[lower] = name.decode("latin-1")
        out.append((spelled, value.decode("latin-1")))
    return out


def _unanswered(exc: BaseException) -> bool:
    """The connection ended before any response byte: closed cleanly with nothing parsed, or reset."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return not isinstance(exc.message, aiohttp.http.RawResponseMessage)
    return isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
