"""A lean, auto-pipelined Redis connection for the limiter's hot path (the Lua scripts by EVALSHA).

Contract:
- `RedisWire(url, scripts, lag)` keeps one persistent connection (an asyncio.Protocol; hiredis packs
  and parses). Callers share it: each command is queued at once and every command queued in one loop
  turn goes out in one write; replies resolve the callers' futures in FIFO order.
- `script(name, keys, args, timeout)` sends EVALSHA and returns a future of the raw reply; `keys` may
  be a `Packed` call (numkeys, keys and arguments packed by the caller, who packs what repeats once). A Redis
  error reply is a `redis.exceptions.ResponseError` *value*, never raised: the caller decides. On
  NOSCRIPT (flush, restart, failover) the script did not run, so that call alone is resent as EVAL,
  which also reloads it. Nothing else is ever resent: a reservation is never applied twice.
- Deadlines without a task or a timer per call: one sweep timer, armed for the earliest deadline
  pending. A call expires with `WireTimeout` once `timeout` plus twice the loop lag (read when the
  sweep runs) has passed, and only after the socket was polled again, so a reply already there counts.
- A caller that gives up (deadline, cancellation) keeps its place in the FIFO: its reply is read and
  discarded, so every later caller still gets its own. A command whose caller gave up before it
  could be written (still waiting for the connection) is never sent.
- A lost connection fails every call pending on it at once with `WireConnectionError`; so does
  `reset()` (the store's breaker opened). The next call reconnects: AUTH and SELECT from the URL run
  before any queued command is written.
- URLs are parsed by redis-py: redis://, rediss:// (TLS with redis-py's `ssl_*` query options and
  defaults: certificate and host name verified), unix://; username/password and db.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
from collections import deque
from typing import Any, Callable, Mapping, final

import hiredis
from redis.asyncio.connection import RedisSSLContext, SSLConnection, parse_url
from redis.exceptions import ResponseError

# Loop turns an expiring call still waits after its sweep: at least one full poll of the socket on
# asyncio and on uvloop (they order ready callbacks and I/O differently).
GRACE_TURNS = 3
# future, due, then for a script call its source and its packed numkeys/keys/args (for an EVAL resend)
Entry = tuple["asyncio.Future[Any]", float, "bytes | None", "tuple[bytes, ...]", int]


class WireError(Exception):
    """The call got no reply (the caller maps this to `StoreUnavailable`)."""


class WireTimeout(WireError):
    """The deadline passed with no reply."""


class WireConnectionError(WireError):
    """Not connected: refused, lost, reset, or the AUTH/SELECT handshake failed."""


class _Conn(asyncio.Protocol):
    """One connection: the FIFO of calls written on it, the reply parser and the write buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[["_Conn"], None]) -> None:
        self.loop = loop
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.pending: deque[Entry] = deque()
        self.out: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, packed: bytes, entry: Entry) -> None:
        self.pending.append(entry)
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(packed)

    def flush(self) -> None:
        out, self.out = self.out, []
        if out and not self.closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def data_received(self, data: bytes) -> None:
        reader, pending = self.reader, self.pending
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                fut, due, source, body, count = pending.popleft()
                if fut.done():  # its caller gave up: the reply is read and dropped, the FIFO stays aligned
                    continue
                if source is not None and type(reply) is ResponseError and str(reply).startswith("NOSCRIPT"):
                    self.send(b"".join((b"*%d\r\n$4\r\nEVAL\r\n$%d\r\n" % (count + 2, len(source)), source,
                                        b"\r\n", *body)), (fut, due, None, (), 0))
                    continue
                fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.abort(WireConnectionError(f"protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(WireConnectionError(f"connection lost: {exc or 'closed by the server'}"))
        self.on_lost(self)

    def fail(self, exc: WireError) -> None:
        self.closed = True
        self.out = []
        pending, self.pending = self.pending, deque()
        for entry in pending:
            if not entry[0].done():
                entry[0].set_exception(exc)

    def abort(self, exc: WireError) -> None:
        self.fail(exc)
        if self.transport is not None:
            self.transport.abort()


def bulks(parts: Any) -> bytes:
    """`parts` as RESP bulk strings without the array header: a piece of a command."""
    packed = hiredis.pack_command(tuple(parts))
    return packed[packed.index(b"\n") + 1:]


def bulk(value: bytes) -> bytes:
    """One RESP bulk string (cheaper than `bulks` for a single short value)."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


@final  # no subclasses: `type(keys) is Packed` (RedisWire.script) narrows both ways for the type checker
class Packed:
    """A script call's numkeys, KEYS and ARGV, already packed as RESP bulk strings: the limiter packs
    what repeats (a plan's keys and constant arguments) once and joins the pieces per batch."""

    __slots__ = ("count", "body")

    def __init__(self, count: int, body: bytes) -> None:
        self.count, self.body = count, body  # count: numkeys + keys + args

    @classmethod
    def of(cls, keys: list[Any], args: list[Any]) -> "Packed":
        return cls(1 + len(keys) + len(args), bulks((len(keys), *keys, *args)))


class RedisWire:
    def __init__(self, url: str, scripts: dict[str, str], lag: Callable[[], float] = lambda: 0.0) -> None:
        options = parse_url(url)
        self.path: str | None = options.get("path")
        self.host: str = options.get("host") or "localhost"
        self.port = int(options.get("port") or 6379)
        self.ssl = _ssl_context(options) if options.get("connection_class") is SSLConnection else None
        self.hello: list[tuple[Any, ...]] = []  # run on every (re)connection, before anything else
        user, password = options.get("username"), options.get("password")
        if user or password:
            self.hello.append(("AUTH", user, password or "") if user else ("AUTH", password))
        if options.get("db"):
            self.hello.append(("SELECT", int(options["db"])))
        self.scripts: dict[str, tuple[bytes, bytes]] = {}
        self.add_scripts(scripts)
        self.lag = lag
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: _Conn | None = None  # connected and handshaken
        self.connecting: asyncio.Task[None] | None = None
        self.waiting: list[tuple[bytes, Entry]] = []  # queued until the connection is ready
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0

    def add_scripts(self, scripts: dict[str, str]) -> None:
        """More scripts callable by name (their SHA1 computed once; loaded by the first NOSCRIPT's EVAL)."""
        self.scripts.update({name: (hashlib.sha1(src.encode(), usedforsecurity=False).hexdigest().encode(), src.encode())
                             for name, src in scripts.items()})

    # --- calls ------------------------------------------------------------------------------------
    def script(self, name: str, keys: "list[Any] | Packed", args: list[Any], timeout: float) -> asyncio.Future[Any]:
        """EVALSHA `name` with `keys` and `args`, or with a `Packed` call (then `args` is empty)."""
        sha, source = self.scripts[name]
        if type(keys) is Packed:
            body: tuple[bytes, ...] = (keys.body,)
            count = keys.count
        else:
            body = (bulks((len(keys), *keys, *args)),)
            count = 1 + len(keys) + len(args)
        return self._submit(b"".join((b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (count + 2, sha), *body)),
                            timeout, source, body, count)

    def _submit(self, packed: bytes, timeout: float, source: bytes | None, body: tuple[bytes, ...],
                count: int) -> asyncio.Future[Any]:
        loop = self.loop
        if loop is None or loop.is_closed():  # first use, or a new event loop (tests)
            loop = self._rebind(asyncio.get_running_loop())
        fut = loop.create_future()
        due = loop.time() + timeout
        entry = (fut, due, source, body, count)
        if self.conn is not None:
            self.conn.send(packed, entry)
        else:
            self.waiting.append((packed, entry))
            if self.connecting is None:
                self.connecting = loop.create_task(self._connect())
        if self.timer is None or due < self.timer_due:
            self._arm(due)
        return fut

    # --- connection -------------------------------------------------------------------------------
    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        conn = _Conn(loop, self._lost)
        replies = [loop.create_future() for _ in self.hello]
        try:
            if self.path:
                await loop.create_unix_connection(lambda: conn, self.path)
            else:
                await loop.create_connection(lambda: conn, self.host, self.port, ssl=self.ssl)
            for parts, reply in zip(self.hello, replies):  # no deadline here: the callers' deadlines bound it
                conn.send(hiredis.pack_command(parts), (reply, math.inf, None, (), 0))
            for reply in replies:
                answer = await reply
                if isinstance(answer, ResponseError):
                    raise WireConnectionError(f"handshake refused: {answer}")
        except BaseException as exc:  # refused, unreachable, TLS, AUTH, reset: all "not connected"
            error = exc if isinstance(exc, WireConnectionError) else WireConnectionError(f"{type(exc).__name__}: {exc}")
            conn.abort(error)
            for reply in replies:  # retrieved, so no "exception never retrieved" noise
                if not reply.cancel() and not reply.cancelled():
                    reply.exception()
            if self.connecting is me:
                self.connecting = None
                self._fail_waiting(error)
            if not isinstance(exc, Exception):  # cancelled (reset), or the process is stopping
                raise
            return
        if self.connecting is not me:  # reset meanwhile
            conn.abort(WireConnectionError("reset while connecting"))
            return
        self.connecting, self.conn = None, conn
        waiting, self.waiting = self.waiting, []
        for packed, entry in waiting:
            if not entry[0].done():  # its caller already gave up: never sent
                conn.send(packed, entry)

    def _lost(self, conn: _Conn) -> None:
        if self.conn is conn:
            self.conn = None

    def _fail_waiting(self, exc: WireError) -> None:
        waiting, self.waiting = self.waiting, []
        for _, entry in waiting:
            if not entry[0].done():
                entry[0].set_exception(exc)

    def reset(self, reason: str = "reset") -> None:
        """Drop the connection now (every pending call fails); the next call reconnects."""
        exc = WireConnectionError(reason)
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort(exc)
        self._fail_waiting(exc)

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        """Nothing of a closed loop can be reused: connections, tasks and timers belonged to it."""
        self.conn, self.connecting, self.waiting, self.timer = None, None, [], None
        self.loop = loop
        return loop

    def flush(self) -> None:
        """Write what this turn queued now instead of at the end of the turn (a caller that batched
        its commands a turn late wins that turn back)."""
        if self.conn is not None:
            self.conn.flush()

    def close(self) -> None:
        self.reset("closed")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # --- deadlines --------------------------------------------------------------------------------
    def _arm(self, due: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_due = due
        self.timer = asyncio.get_running_loop().call_at(due + 2 * self.lag(), self._sweep)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = None
        now, slack = loop.time(), 2 * self.lag()
        expired: list[asyncio.Future[Any]] = []
        earliest = math.inf
        entries = [e for _, e in self.waiting]
        if self.conn is not None:
            entries.extend(self.conn.pending)
        for fut, due, *_ in entries:
            if fut.done():
                continue
            if due + slack <= now:
                expired.append(fut)
            elif due < earliest:
                earliest = due
        if expired:
            loop.call_soon(self._expire, expired, GRACE_TURNS)
        if earliest < math.inf:
            self._arm(earliest)

    def _expire(self, expired: list[asyncio.Future[Any]], turns: int) -> None:
        if turns:  # let a reply that is already on the socket land first
            asyncio.get_running_loop().call_soon(self._expire, expired, turns - 1)
            return
        for fut in expired:
            if not fut.done():
                fut.set_exception(WireTimeout("deadline exceeded"))


def _ssl_context(options: Mapping[str, Any]) -> Any:
    """redis-py's TLS semantics for the same URL (the admin path uses redis-py on the same URL)."""
    tls = {name[4:]: value for name, value in options.items() if name.startswith("ssl_")}
    tls.setdefault("cert_reqs", "required")
    tls.setdefault("check_hostname", True)
    return RedisSSLContext(**tls).get()
