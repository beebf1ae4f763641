"""An httpx transport over one shared aiohttp `ClientSession` (`gateway.upstream_transport: aiohttp`).

The forwarder keeps speaking the httpx API (`build_request`, `send(stream=True)`, `aiter_raw`,
`aclose`, `headers.raw`, `status_code`); only the wire client underneath changes.

Contract:
- Bytes pass untouched both ways: `auto_decompress=False` (so `aiter_raw` yields wire bytes and a
  compressed body stays compressed), the request URL is sent exactly as httpx encoded it (no
  requoting: Bedrock's `%3A` / `%2F` survive), response headers arrive as received (name case kept).
- aiohttp adds nothing of its own: no User-Agent / Accept / Accept-Encoding / Content-Type
  (`skip_auto_headers`), no cookie jar, no environment proxies (`trust_env=False`), no redirects.
- Timeouts come from `request.extensions["timeout"]` (httpx's {"connect", "read", "write", "pool"}):
  `pool` + `connect` bound getting a connection, `connect` bounds the TCP/TLS connect, `read` bounds
  the wait for the response head (first byte, counted from the end of the upload). aiohttp has no
  write timeout, so the whole head phase is also bounded by connect + pool + write + read (a stalled
  upload ends as WriteTimeout then). When the body iteration STARTS, `read` is read again from the
  same dict and becomes the per-chunk idle timeout, so a caller may change it after the headers
  arrived (the forwarder does: first byte -> idle).
- Failures raise the httpx exception httpcore would: ConnectError / ConnectTimeout before a
  connection, ReadTimeout for a late head or a stalled body, RemoteProtocolError for a peer that
  closed early or spoke bad HTTP, ReadError / WriteError for other socket errors.
- `aclose()` on the response returns the connection to the pool only if the body was read to the
  end; otherwise (error, early close, the consumer cancelled mid-stream) the connection is closed.
  Nothing is leaked. The session opens lazily on the first request, in the running loop.
- HTTP/1.1 only (as the default httpx transport here).
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Any, AsyncIterator

import aiohttp
import httpx
from yarl import URL

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_DROP_REQUEST_HEADERS = frozenset({b"transfer-encoding"})  # we always send a sized body


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

    __slots__ = ("_response", "_timeouts", "_closed")

    def __init__(self, response: aiohttp.ClientResponse, timeouts: dict[str, Any]) -> None:
        self._response = response
        self._timeouts = timeouts
        self._closed = False

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


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx transport backed by one lazily created, shared `aiohttp.ClientSession`."""

    def __init__(self, *, max_connections: int = 1000, keepalive_expiry: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, max_field_size: int = 16384) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self.max_field_size = max_field_size
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Same trust store as httpx (certifi), environment ignored like the httpx client.
        context = self.ssl_context or httpx.create_ssl_context(trust_env=False)
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
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
        connect, pool = timeouts.get("connect"), timeouts.get("pool")
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect, sock_read=timeouts.get("read"),
            connect=None if connect is None or pool is None else connect + pool,
        )
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                   if k.lower() not in _DROP_REQUEST_HEADERS]
        parts = [timeouts.get(name) for name in ("connect", "pool", "write", "read")]
        head = asyncio.timeout(None if None in parts else sum(parts))  # type: ignore[arg-type]
        try:
            async with head:
                response = await session.request(
                    request.method, URL(str(request.url), encoded=True), headers=headers,
                    data=body or None, allow_redirects=False, timeout=timeout,
                )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if head.expired():
                raise httpx.WriteTimeout("no response head within connect + pool + write + read") from exc
            raise _as_httpx_error(exc, body=False) from exc
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(status_code=response.status, headers=list(response.raw_headers),
                              stream=_ResponseBody(response, timeouts), request=request,
                              extensions=extensions)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
