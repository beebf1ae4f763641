"""`EdgeProtocol`: uvicorn's httptools protocol with the edge limits of `server:` (see `limits.py`).

Contract, per connection, before any request reaches the app (so before authentication):
- Connection cap: a connection accepted while its server already holds `max_connections` gets a
  503 (short JSON body, `Retry-After: 1`, `Connection: close`) without its request being read, and is
  closed. The others are untouched.
- Request head: the whole head (request line and headers) must arrive within `header_timeout` of the
  connection opening (first request) or of the head's first byte (later ones on a keep-alive
  connection), else a 408; a new connection that sends nothing is closed without a response. More than
  `max_headers` fields is a 431; more than `max_header_bytes` of URL plus header names and values is a
  431 (a 414 when the URL alone is over it). An unfinished head is cut as soon as its raw size passes
  `Limits.head_cap`: the parser never buffers more than that plus one or two reads (a read is at most
  256 KiB under uvloop, 64 KiB under asyncio).
- Request body: while the client owes body bytes and the gateway is reading, a connection is closed
  when no byte came for `body_timeout`, or when, `body_timeout` after the body began, it has arrived at
  less than `body_min_rate` bytes/s on average (the deadline is `body_timeout + received /
  body_min_rate` seconds after the body's clock started; time the gateway spends not reading, when its
  buffer is full or a `100-continue` is not yet sent, does not count). The client gets a 408 when no
  response has started, and the app sees a disconnect.
- Clocks: a first head is timed from the connection's opening; a later head, and a body, from the first
  check that finds it unfinished (so up to one tick late, in the client's favour): a request whose head
  and body arrive between two checks never reads the clock.
- Every refusal answers with `Connection: close`, half-closes the socket, and drops whatever the client
  still sends for up to `LINGER` seconds, so that the client reads the answer rather than a reset.
- Cost on the request path: no timer and no clock read per request; three parser callbacks and the
  read handler do a few slot writes. One timer per event loop (`_Watch`) checks the connections every
  `Limits.tick` (a quarter of the shortest timeout, 50 ms to 1 s).

Needs httptools (a dependency): with `http="h11"` uvicorn uses its own protocol and none of this applies.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from proxy.server.limits import Limits, current

LINGER = 1.0  # seconds a refused connection may keep sending (discarded) before it is closed

# What the connection waits for from the client. IDLE: nothing (the app is answering, or the keep-alive
# wait that uvicorn times); NEW: a first request head, nothing received yet; HEAD: the rest of a request
# head; BODY: request body bytes; DONE: refused or lost, whatever arrives is dropped. The watch checks
# the connections in NEW, HEAD and BODY.
IDLE, NEW, HEAD, BODY, DONE = range(5)


def _answer(status: int, message: str, kind: str, extra: bytes = b"") -> bytes:
    """The head and body of a refusal, except uvicorn's default headers (the Date header)."""
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    return (b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n%s"
            % (len(body), extra, body))


_HEAD_TIMEOUT = (408, _answer(408, "the request headers did not arrive in time", "request_timeout"))
_BODY_TIMEOUT = (408, _answer(408, "the request body did not arrive in time", "request_timeout"))
_HEADERS_TOO_LARGE = (431, _answer(431, "request header fields too large", "invalid_request_error"))
_TOO_MANY_HEADERS = (431, _answer(431, "too many request header fields", "invalid_request_error"))
_URL_TOO_LONG = (414, _answer(414, "request URL too long", "invalid_request_error"))
_BUSY = (503, _answer(503, "the gateway has too many open connections; retry shortly", "overloaded_error",
                      b"retry-after: 1\r\n"))


class _Refuse(Exception):
    """Raised from a parser callback to stop parsing; `EdgeProtocol._refusal` says how to answer."""


class _Watch:
    """The connections of one event loop and the single timer that checks their deadlines."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop, self.tick = loop, tick
        self.conns: set[EdgeProtocol] = set()
        self.handle: asyncio.TimerHandle | None = None
        self.last = loop.time()

    def add(self, conn: "EdgeProtocol") -> None:
        self.conns.add(conn)
        if self.handle is None:
            self.last = self.loop.time()
            self.handle = self.loop.call_later(self.tick, self.sweep)

    def sweep(self) -> None:
        now = self.loop.time()
        elapsed, self.last = now - self.last, now
        for conn in [c for c in self.conns if IDLE < c._phase < DONE]:
            try:
                conn._check(now, elapsed)
            except Exception:  # one broken connection must not stop the checks of the others
                conn.logger.exception("edge limit check failed")
                conn.transport.close()
        if self.conns:
            self.handle = self.loop.call_later(self.tick, self.sweep)
        else:
            self.handle = None
            if _WATCHES.get(self.loop) is self:
                del _WATCHES[self.loop]


_WATCHES: dict[asyncio.AbstractEventLoop, _Watch] = {}
_base = HttpToolsProtocol


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing what the edge limits forbid (module docstring)."""

    # Slots, not instance attributes: past 30 keys CPython stops sharing the instance dict's keys, and
    # then every attribute access of uvicorn's own code gets slower (about 10% more instructions a request).
    __slots__ = ("limits", "_phase", "_since", "_raw", "_exact", "_at_boundary", "_read", "_received", "_body_from",
                 "_seen", "_progress", "_refusal", "_watch", "_linger")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: Limits = current()
        self._phase = NEW
        # The clocks start lazily: a head or body still unfinished at the watch's next check is timed from
        # that check (0.0: not yet), so that a request pays no clock read. A first head is timed from the
        # connection's opening.
        self._since = 0.0  # NEW/HEAD: when the head's clock started; BODY: when the body's did
        self._raw = 0  # raw bytes of the current head in the reads before this one (a bound when _exact)
        self._exact = True  # the current head began at the start of a read, so _raw counts all of it
        self._at_boundary = True  # the current read starts at a message boundary (IDLE or NEW)
        self._read = 0  # size of the current read
        self._received = 0  # bytes of the reads that left a body unfinished
        self._body_from = 0  # BODY: _received when the body's clock started
        self._seen = 0  # BODY: _received at the last check that saw progress
        self._progress = 0.0  # BODY: when that was
        self._refusal: tuple[int, bytes] | None = None
        self._watch: _Watch | None = None
        self._linger: asyncio.TimerHandle | None = None

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature is looser
        cap = self.limits.max_connections
        if cap and len(self.connections) >= cap:  # this server's open connections, before this one
            self.transport = transport
            self._phase = DONE
            self._send(_BUSY)
            self._close_softly()
            return
        super().connection_made(transport)
        self._since = self.loop.time()
        tick = self.limits.tick
        if tick:
            watch = _WATCHES.get(self.loop)
            if watch is None:
                watch = _WATCHES[self.loop] = _Watch(self.loop, tick)
            watch.add(self)
            self._watch = watch

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = DONE
        self._unwatch()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.conns.discard(self)
            self._watch = None

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == DONE:  # refused: drop what the client still sends until the linger ends
            return
        self._unset_keepalive_if_required()
        self._at_boundary = phase <= NEW
        self._read = size = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._phase = DONE  # the connection is a websocket's from now on: no HTTP limits
                self._unwatch()
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refusal is not None:  # raised by one of our callbacks
                self._refuse(self._refusal)
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        if self._phase >= HEAD:  # the read left a head or a body unfinished (DONE is not reached here)
            self._unfinished(size)

    # Parser callbacks (uvicorn's, with the phase kept). Not super(): a direct call is cheaper, and
    # these run for every request.

    def on_message_begin(self) -> None:
        _base.on_message_begin(self)
        exact = self._at_boundary
        self._at_boundary = False  # a second request begun in this read begins after other bytes
        self._exact = exact
        self._raw = 0 if exact else -self._read  # not exact: only the next reads are counted
        if self._phase != NEW:
            self._since = 0.0
        self._phase = HEAD

    def on_headers_complete(self) -> None:
        limits = self.limits
        if len(self.headers) > limits.headers_cap:
            self._stop(_TOO_MANY_HEADERS)
        if not (self._exact and self._raw + self._read <= limits.bytes_cap):  # else no sum: the reads fit
            cap = limits.bytes_cap
            if len(self.url) > cap:
                self._stop(_URL_TOO_LONG)
            if len(self.url) + sum(len(name) + len(value) for name, value in self.headers) > cap:
                self._stop(_HEADERS_TOO_LARGE)
        self._phase = BODY  # until on_message_complete, which comes at once for a request without a body
        self._since = 0.0
        _base.on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._phase = IDLE
        _base.on_message_complete(self)

    # The limits

    def _unfinished(self, size: int) -> None:
        """After a read that left a request unfinished: count it, and cut a head grown past the caps."""
        if self._phase == BODY:
            self._received += size  # the body's progress (with the head's share when it ended in this read)
            return
        self._raw += size
        limits = self.limits
        if self._raw > limits.head_cap:
            self._refuse(_HEADERS_TOO_LARGE)
        elif len(self.headers) > limits.headers_cap:
            self._refuse(_TOO_MANY_HEADERS)

    def _check(self, now: float, elapsed: float) -> None:
        """The watch's periodic check of a connection that owes the server a head or a body."""
        limits = self.limits
        if not self._since:  # a head or body this check sees first: its clock starts now
            self._since = self._progress = now
            self._body_from = self._seen = self._received
            return
        if self._phase != BODY:
            if limits.header_timeout and now - self._since >= limits.header_timeout:
                if self._phase == NEW:  # nothing was asked: no answer is owed
                    self._phase = DONE
                    self.transport.close()
                else:
                    self._refuse(_HEAD_TIMEOUT)
            return
        if not limits.body_timeout:
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._since += elapsed  # the gateway is not reading: the client is not late
            self._progress = now
            return
        if self._received != self._seen:
            self._seen, self._progress = self._received, now
        elif now - self._progress >= limits.body_timeout:
            self._refuse(_BODY_TIMEOUT)
            return
        rate = limits.body_min_rate
        if rate and now - self._since > limits.body_timeout + (self._received - self._body_from) / rate:
            self._refuse(_BODY_TIMEOUT)

    def _stop(self, refusal: tuple[int, bytes]) -> None:
        self._refusal = refusal
        raise _Refuse(refusal[0])

    def _refuse(self, refusal: tuple[int, bytes]) -> None:
        """Answer `refusal` when this connection can still take a response, and close."""
        phase, self._phase = self._phase, DONE
        cycle = self.cycle
        if phase == BODY:  # the answer is the current request's, if its app has not answered yet
            writable = cycle is not None and not cycle.response_started
        else:  # a head: nothing may be in flight before it
            writable = (cycle is None or cycle.response_complete) and not self.pipeline
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() says http.disconnect; its sends are dropped
            cycle.message_event.set()
        if writable:
            self._send(refusal)
        self._close_softly()

    def _send(self, refusal: tuple[int, bytes]) -> None:
        if self.transport.is_closing():
            return
        status, rest = refusal
        default = b"".join(b"%s: %s\r\n" % pair for pair in self.server_state.default_headers)
        self.transport.write(STATUS_LINE[status] + default + rest)

    def _close_softly(self) -> None:
        """Half-close (the client reads the answer, then EOF), drop its further bytes, close after LINGER."""
        transport = self.transport
        if transport.is_closing():
            return
        try:
            if not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        if self.flow is not None:
            self.flow.resume_reading()
        self._linger = self.loop.call_later(LINGER, transport.close)
