"""The state store: the only module that talks to Redis (or the embedded fakeredis stand-in).

Contract:
- `Store(config)` connects lazily to `state.redis_url`; with no URL it runs the same Lua scripts in
  process on fakeredis (with lupa), on the same code path.
- The hot path (`script`: the Lua scripts, its own and those another room adds with `add_scripts`)
  goes through `proxy/state/redis_wire.py`, one auto-pipelined connection shared by every caller; everything else (admin, live limits, usage,
  keys, health figures) through redis-py in `call`. NOSCRIPT after a flush, restart or failover is
  transparent on both (EVAL resend / redis-py's `Script`); no other call is ever resent.
- Every call has its own deadline (`state.redis_timeout`, plus the measured event-loop lag). A reply
  already on the socket when the deadline fires still counts, so a burst on this process is not
  mistaken for a slow Redis.
- A local breaker opens on a connection error (or a LOADING / READONLY / MASTERDOWN reply) or
  `MISSES_TO_OPEN` consecutive deadline misses (never on one slow reply); opening it drops the hot
  connection, and one probe per `PROBE_INTERVAL` reconnects until Redis answers. While it is open,
  calls raise `StoreUnavailable` at once and callers apply `state.on_redis_error`.
- Every key shares the hash tag `{llmgw}` so scripts work on Redis Cluster; every key has a TTL
  except the live-limit and managed-key hashes that ops own.
"""
from __future__ import annotations

import asyncio
import functools
import time
from importlib import resources
from typing import Any, Protocol

import redis.exceptions as rex
import structlog

from config.models import Config
from proxy.telemetry.observer import Observer
from proxy.state.redis_wire import Packed, RedisWire, WireError, WireTimeout

log = structlog.get_logger("llm_gateway.state")
TAG = "{llmgw}"
MISSES_TO_OPEN = 3
PROBE_INTERVAL = 1.0
SCRIPTS = ("reserve", "reconcile", "health")
# Error replies that mean "this server cannot serve the scripts now" (loading its dataset, a replica
# after a failover, no master): like a lost connection, not like a bug in the call.
UNAVAILABLE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN")


def limits_key(scope: str) -> str:
    return f"llmgw:{TAG}:limits:{scope}"


def counter_keys(scope: str) -> tuple[str, str]:
    return f"llmgw:{TAG}:rl:{scope}:req", f"llmgw:{TAG}:rl:{scope}:tok"


def concurrency_key(key_id: str) -> str:
    return f"llmgw:{TAG}:inflight:{key_id}"


def done_key(member: str) -> str:
    return f"llmgw:{TAG}:settled:{member}"


class StoreOwner(Protocol):
    """Whatever holds the process's current `Store` (the runtime, which may reopen it)."""

    @property
    def store(self) -> "Store": ...


class StoreUnavailable(Exception):
    """Redis cannot be used right now (down, timing out, or the breaker is open)."""


class Store:
    def __init__(self, config: Config, observer: Observer | None = None) -> None:
        self.observer = observer or Observer()
        self.mode = config.state.on_redis_error
        self.url = str(config.state.redis_url)
        self.timeout = config.state.redis_timeout
        self.embedded = not self.url
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._wire: RedisWire | None = None
        self._extra: dict[str, str] = {}  # other rooms' scripts on the hot-path connection (`add_scripts`)
        self._misses = 0
        self._open_until = 0.0
        self.degraded = False
        self.live_limits = False  # a live limit was set through this process (embedded store)
        self.degraded_transitions = 0
        self.on_change: list[Any] = []  # callbacks(degraded: bool)
        self.loop_lag = 0.0
        self._lag_task: asyncio.Task[None] | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            if self.embedded:
                import fakeredis

                self._client = fakeredis.FakeAsyncRedis()
            else:
                import redis.asyncio as redis
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff

                self._client = redis.Redis.from_url(
                    # no socket timeouts: `call` bounds every operation, connecting included, with a
                    # lag-aware deadline (a fixed connect timeout fires during a local burst).
                    # No client retries either: a reservation must never be sent twice.
                    self.url, socket_connect_timeout=None, socket_timeout=None,
                    health_check_interval=0, max_connections=256, retry=Retry(NoBackoff(), 0),
                    retry_on_timeout=False)
            for name, source in _sources().items():
                self._scripts[name] = self._client.register_script(source)
        return self._client

    @property
    def wire(self) -> RedisWire:
        """The hot path's pipelined connection (connects on first use)."""
        if self._wire is None:
            self._wire = RedisWire(self.url, {**_sources(), **self._extra}, lag=lambda: self.loop_lag)
        return self._wire

    def add_scripts(self, sources: dict[str, str]) -> None:
        """Lua scripts of another room (the response cache) that `script`/`script_soon` then run by name on the
        same pipelined connection, deadline and breaker (Redis only: the embedded store runs only its own)."""
        self._extra.update(sources)
        if self._wire is not None:
            self._wire.add_scripts(sources)

    async def _watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.05)
            self.loop_lag = max(0.0, loop.time() - start - 0.05, self.loop_lag * 0.8)

    def _set_degraded(self, value: bool, reason: str = "") -> None:
        if value != self.degraded:
            self.degraded = value
            self.degraded_transitions += value
            (log.warning if value else log.info)("store_degraded" if value else "store_recovered", reason=reason)
            self.observer.limiter_mode(value, self.mode)
            for callback in self.on_change:
                callback(value)

    def _miss(self) -> None:
        self._misses += 1
        if self._misses >= MISSES_TO_OPEN:
            self._trip(f"{self._misses} consecutive deadline misses")

    def _trip(self, reason: str) -> None:
        self._open_until = time.monotonic() + PROBE_INTERVAL
        self._set_degraded(True, reason)
        if self._wire is not None:  # a connection that stopped answering may be dead: the probe reconnects
            self._wire.reset(f"breaker opened: {reason}")

    def _enter(self) -> None:
        """Before any Redis call: the lag watcher runs, and the breaker lets the call through or not."""
        if self._lag_task is None or self._lag_task.done():
            self._lag_task = asyncio.ensure_future(self._watch_lag())
        if self._open_until:
            now = time.monotonic()
            if self._open_until > now:
                raise StoreUnavailable("breaker open")
            self._open_until = now + PROBE_INTERVAL  # half-open: this call is the probe; others fail fast

    def _answered(self, started: float) -> None:
        self.observer.redis_call(time.perf_counter() - started, True)
        if self._misses or self._open_until or self.degraded:
            self._misses = 0
            self._open_until = 0.0
            self._set_degraded(False)

    def _unanswered(self, exc: Exception, started: float) -> StoreUnavailable:
        """A hot-path call without a reply, or with one that says the server cannot serve now."""
        if isinstance(exc, WireTimeout):
            self._miss()
            return StoreUnavailable("deadline exceeded")
        self.observer.redis_call(time.perf_counter() - started, False)
        self._trip(str(exc))
        return StoreUnavailable(str(exc))

    async def call(self, op: Any, *, deadline: float | None = None) -> Any:
        """Run one redis-py operation under the deadline and the breaker (everything but the scripts)."""
        if self.embedded:  # in process: nothing to wait for, nothing that can hang
            return await _keep_cancel(op(self.client))
        self._enter()
        task = asyncio.ensure_future(op(self.client))
        loop = asyncio.get_running_loop()
        start = loop.time()
        started = time.perf_counter()
        try:
            while not task.done():
                # The lag is read again when the timer fires: a burst that started after this call
                # did must not turn the call into a miss (the lag watcher runs during the wait).
                left = start + (deadline or self.timeout) + 2 * self.loop_lag - loop.time()
                if left <= 0:
                    break
                await asyncio.wait({task}, timeout=left)
            for _ in range(3):  # let a reply that is already on the socket land
                if task.done():
                    break
                await asyncio.sleep(0)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self._miss()
                raise StoreUnavailable("deadline exceeded")
            result = task.result()
        except asyncio.CancelledError:
            task.cancel()
            raise
        except StoreUnavailable:
            raise
        except Exception as exc:
            if isinstance(exc, (rex.TimeoutError, TimeoutError)):  # e.g. connecting under a local burst: a miss
                self._miss()
                raise StoreUnavailable(type(exc).__name__) from None
            if isinstance(exc, (OSError, ConnectionError, rex.ConnectionError, rex.BusyLoadingError)):
                self.observer.redis_call(time.perf_counter() - started, False)
                self._trip(type(exc).__name__)
                raise StoreUnavailable(type(exc).__name__) from None
            raise
        self._answered(started)
        return result

    async def script(self, name: str, keys: list[Any] | Packed, args: list[Any]) -> Any:
        """One Lua script call: its reply, or `StoreUnavailable`; an error reply is raised as such.
        A `Packed` call (keys and arguments packed by the caller) is for Redis, not the embedded store."""
        if self.embedded:
            if isinstance(keys, Packed):
                raise TypeError("the embedded store takes keys and arguments, not a packed call")
            script = self._embedded_script(name)
            return await _keep_cancel(script(keys=keys, args=args, client=self.client))
        return await self.script_soon(name, keys, args)

    def script_soon(self, name: str, keys: list[Any] | Packed, args: list[Any]) -> "asyncio.Future[Any]":
        """`script` on Redis, submitted at once (no task needed): a future of its reply, resolved by a
        callback with the reply, `StoreUnavailable` or the error reply. Raises `StoreUnavailable` at
        once when the breaker is open. Cancelling the future gives the call up (the wire drops it)."""
        self._enter()
        started = time.perf_counter()
        sent = self.wire.script(name, keys, args, self.timeout)
        out: asyncio.Future[Any] = sent.get_loop().create_future()

        def settle(f: asyncio.Future[Any]) -> None:
            error: BaseException | None = None
            if f.cancelled():
                error = StoreUnavailable("call given up")
            elif (exc := f.exception()) is not None:
                error = self._unanswered(exc, started) if isinstance(exc, WireError) else exc
            elif type(reply := f.result()) is rex.ResponseError:
                error = self._unanswered(reply, started) if str(reply).startswith(UNAVAILABLE_REPLIES) else reply
            else:
                self._answered(started)
            if out.done():
                return
            if error is not None:
                out.set_exception(error)
            else:
                out.set_result(f.result())

        def given_up(o: asyncio.Future[Any]) -> None:
            if o.cancelled():
                sent.cancel()

        sent.add_done_callback(settle)
        out.add_done_callback(given_up)
        return out

    def _embedded_script(self, name: str) -> Any:
        self.client  # noqa: B018 - registers the scripts on first use
        return self._scripts[name]

    async def aclose(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            self._lag_task = None
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


async def _keep_cancel(call: Any) -> Any:
    """Await an embedded-store call without losing a cancel: fakeredis waits for its reply with
    `asyncio.wait_for`, which on Python 3.11 returns the reply and drops a cancel that lands with it.
    A dropped cancel left the health refresher running forever, and shutdown waiting on it."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    result = await call
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result


@functools.lru_cache(maxsize=1)
def _sources() -> dict[str, str]:
    return {name: resources.files("proxy.state").joinpath("lua", f"{name}.lua").read_text() for name in SCRIPTS}

