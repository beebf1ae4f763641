"""Response cache: answer identical requests from a stored answer, and coalesce the ones in flight.

Contract (between inspection and routing; `cache.enabled: false` makes it a pass-through):
- `proxy.cache.key.CachePolicy` decides whether the cache applies and computes the key; otherwise
  the answer goes out with `x-gateway-cache: bypass`. Malformed `x-gateway-cache-*` headers are a
  native 400 (`caller_invalid_request`).
- Hit (`x-gateway-cache: hit`, `age: N`): the stored status, content headers and body bytes, with
  fresh `x-gateway-request-id` and `x-gateway-attempts: 0`. The request still passes the router
  (no candidates), the rate limiter (one request, `ctx.estimated_tokens = 0`: zero tokens, no
  deployment) and the failover layer, which calls `ctx.replay(ctx, send)` instead of any attempt.
- Coalescing (`cache.coalesce`): on this replica one request per key resolves it (a
  `proxy.cache.flight.Flight`); identical ones attach to it and get its answer: replayed whole, or
  followed live as its chunks arrive once its 2xx head is out (`x-gateway-cache: coalesced`).
  Across replicas the Redis lock makes one request the leader; the others wait for its pub/sub
  notice (the store's tick as a fallback) and then read the entry. If the owner fails before its
  head, one waiting request resolves again and may lead; a follower whose leader's answer breaks
  after the head gets its own native error frame. Waiting is bounded by `cache.coalesce_wait` (and
  `gateway.timeout`), then the request goes upstream itself; a client that leaves stops waiting.
- Miss (`x-gateway-cache: miss`): forwarded; the answer is captured (bounded by
  `cache.max_entry_bytes`) and stored once it completed: 2xx, no client gone, no error, its family's
  normal ending (`proxy.cache.entry.entry_of`). Storing, releasing the lock and notifying waiters is
  one Redis call, answered by a callback after the response. A store that fails (Redis away) is a
  pass-through. On the embedded store a hit or a lone miss is decided without yielding.
- Every decision is reported once per request (`observer.cache_result`: result, saved tokens, saved
  cost from the answering deployment's `cost`) and counted for `cache stats`. Gateway errors raised
  below carry `x-gateway-cache` too.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from typing import Any

import structlog

from config.models import Config
from proxy.cache.entry import Entry, entry_of
from proxy.cache.flight import ENTRY, HEADER, LIVE, PENDING, Flight
from proxy.cache.key import CachePolicy, CacheRequest
from proxy.cache.embedded import LocalCache
from proxy.cache.store import HIT, LEAD, NOT_FOUND, WAIT, SharedCache
from proxy.context import RequestContext, get_context
from proxy.errors import GatewayError
from proxy.headers import gateway_headers
from proxy.runtime import Runtime

log = structlog.get_logger("llm_gateway.cache")
LABELS = {name: name.encode() for name in ("hit", "miss", "bypass", "coalesced")}


class CacheMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.runtime = deps
        c = config.cache
        self.enabled = c.enabled
        self.policy = CachePolicy(config)
        self.coalesce = c.coalesce
        self.wait = min(c.coalesce_wait, config.gateway.timeout) if config.gateway.timeout else c.coalesce_wait
        self.limit = c.max_entry_bytes
        self.prices = {d.name: d.cost for d in config.providers}
        self.flights: dict[str, Flight] = {}  # process-wide, like a pool: one owner per key at a time
        # Lock tokens, unique across replicas without a random draw per request: a random prefix, a counter.
        self.token_prefix = os.urandom(6).hex()
        self.token_seq = itertools.count()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self.enabled or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        req = self.policy.request(ctx)
        source: Entry | Flight | None = None
        following: Flight | None = None
        try:
            if req is None:
                ctx.cache_status = "bypass"
                await self.app(scope, receive, functools.partial(_labelled, send, LABELS["bypass"]))
                return
            cache = self.runtime.cache
            kind, label, age = "", "", None
            value: Any = None
            if isinstance(cache, LocalCache):  # in process and at once: a hit or a lone miss needs no coroutine
                if req.read:
                    found = cache.get(req)
                    if found.kind == HIT:
                        kind, value, label, age = "entry", found.entry, "hit", found.age
                if not kind and (not req.read or not self.coalesce or req.max_age_ms >= 0):
                    kind, value = "lead", (Flight(), None)
                elif not kind and req.digest not in self.flights:  # the store just missed: this request owns the key
                    flight = self.flights[req.digest] = Flight()
                    kind, value = "lead", (flight, None)
            if not kind:
                kind, value, label, age = await self._resolve(ctx, req, receive)
            if kind == "lead":
                ctx.cache_status = "miss"
                flight, token = value
                ok = False
                try:
                    await self.app(scope, receive, flight.upstream(send, LABELS["miss"], self.limit))
                    ok = flight.complete and not ctx.client_disconnected
                finally:
                    self._finish(ctx, req, flight, token, ok)
                return
            if kind == "gone":
                return
            ctx.cache_status = label
            ctx.estimated_tokens = 0  # the limiter counts the request, never tokens
            if kind == "entry":
                source = value
                ctx.replay = functools.partial(_replay_entry, value, LABELS[label], age)
            else:  # live: the owner's answer, as it arrives
                source = following = value
                value.followers += 1
                ctx.replay = functools.partial(_replay_live, value)
            await self.app(scope, receive, send)
        except GatewayError as err:
            if ctx.cache_status:
                err.headers.setdefault("x-gateway-cache", ctx.cache_status)
            raise
        finally:
            ctx.replay = None
            if following is not None:
                following.followers -= 1
            if ctx.cache_status:
                self._report(ctx, ctx.cache_status, source)

    # --- deciding --------------------------------------------------------------------------------
    async def _resolve(self, ctx: RequestContext, req: CacheRequest, receive: Any) -> tuple[str, Any, str, int | None]:
        """("entry", entry, label, age) | ("live", flight, ...) | ("lead", (flight, token), ...) | ("gone", ...)."""
        if not req.read:  # no-cache: a fresh answer, stored for the others; nobody to wait for
            return "lead", (Flight(), None), "miss", None
        coalesce = self.coalesce and req.max_age_ms < 0
        deadline = time.perf_counter() + self.wait
        while True:
            flight = None
            if coalesce:
                flight = self.flights.get(req.digest)
                if flight is not None and flight.joinable:
                    waited = flight.state == PENDING
                    state = await _follow(ctx, flight, deadline, receive)
                    if state == ENTRY:  # "coalesced" only for an upstream answer it waited for
                        label = "coalesced" if waited and flight.origin == "coalesced" else "hit"
                        return "entry", flight.entry, label, (flight.age or 0) if label == "hit" else None
                    if state == LIVE:
                        return "live", flight, "coalesced", None
                    if state in ("gone", "timeout"):
                        return ("gone", None, "", None) if state == "gone" else ("lead", (Flight(), None), "miss", None)
                    continue  # its owner failed: resolve again (the first one woken owns the next flight)
                flight = self.flights[req.digest] = Flight()
            try:
                return await self._own(ctx, req, flight, deadline, receive)
            except BaseException:
                if flight is not None:
                    self._end_flight(req.digest, flight)
                raise

    async def _own(self, ctx: RequestContext, req: CacheRequest, flight: Flight | None, deadline: float,
                   receive: Any) -> tuple[str, Any, str, int | None]:
        """This request resolves the key for the replica: the store's entry, its lock (lead), or waiting."""
        cache = self.runtime.cache
        shared = cache if isinstance(cache, SharedCache) and flight is not None else None
        token = f"{self.token_prefix}{next(self.token_seq):x}" if shared is not None else None
        waited = False
        notice: asyncio.Future[bool] | None = None
        while True:
            try:
                found = await cache.lookup(req, token)
            except Exception as exc:  # noqa: BLE001 - the store is away: pass through, never an error
                log.debug("cache_lookup_failed", error=type(exc).__name__)
                found = NOT_FOUND
            if found.kind != WAIT and shared is not None and notice is not None:
                shared.unlisten(req.digest, notice)
            if found.kind == HIT and found.entry is not None:
                label = "coalesced" if waited else "hit"
                if flight is not None:
                    flight.resolve(found.entry, label, found.age)
                    self._drop(req.digest, flight)
                return "entry", found.entry, label, found.age if label == "hit" else None
            if found.kind != WAIT or shared is None:
                return "lead", (flight or Flight(), token if found.kind == LEAD else None), "miss", None
            if notice is None or notice.done():
                # Listen first, then look again: a notice published before this one was listening is never
                # waited for (the common cases, hit and lead, never pay for listening at all).
                notice = shared.listen(req.digest)
                continue
            waited = True
            outcome = await _wait(ctx, receive, notice, deadline)
            if outcome == "gone":
                shared.unlisten(req.digest, notice)
                if flight is not None:
                    self._end_flight(req.digest, flight)
                return "gone", None, "", None
            if outcome == "timeout":  # waited long enough: go upstream alone (the entry is still stored)
                shared.unlisten(req.digest, notice)
                return "lead", (flight or Flight(), None), "miss", None

    # --- after going upstream ----------------------------------------------------------------------
    def _finish(self, ctx: RequestContext, req: CacheRequest, flight: Flight, token: str | None, ok: bool) -> None:
        """Store a complete answer, release the lock, tell the waiters: in process at once, or one Redis call
        answered by a callback (no task on the request's way)."""
        u = ctx.usage
        tokens = (u.input_tokens or 0, u.output_tokens or 0)
        deployment = ctx.deployment.name if ctx.deployment is not None and ctx.attempts else ""
        entry = None
        if ok and 200 <= flight.status < 300 and not flight.overflow:
            chunks = flight.chunks
            entry = entry_of(ctx.family, ctx.path, flight.status, flight.headers,
                             chunks[0] if len(chunks) == 1 else b"".join(chunks), ctx.adapter.rate_limit_prefixes,
                             tokens, deployment, time.time())
            if entry is None:
                log.info("cache_not_stored", request_id=ctx.request_id, reason="incomplete answer")
        flight.finish(ok, entry, tokens, deployment)
        cache = self.runtime.cache
        if isinstance(cache, LocalCache):
            if entry is not None:
                cache.put(req, entry)
            self._drop(req.digest, flight)
        elif entry is not None or token:
            try:
                done = cache.finish_soon(req, entry, token)
            except Exception as exc:  # noqa: BLE001 - the store is away (breaker open): not stored
                log.debug("cache_store_failed", error=type(exc).__name__)
                self._drop(req.digest, flight)
            else:
                done.add_done_callback(functools.partial(self._stored, req.digest, flight))
        else:
            self._drop(req.digest, flight)

    def _stored(self, digest: str, flight: Flight, done: "asyncio.Future[Any]") -> None:
        if not done.cancelled() and done.exception() is not None:  # not stored (Redis away): a later miss
            log.debug("cache_store_failed", error=type(done.exception()).__name__)
        self._drop(digest, flight)

    def _end_flight(self, digest: str, flight: Flight) -> None:
        """Its owner gave up before going upstream: a follower resolves again."""
        flight.finish(False, None, (0, 0), "")
        self._drop(digest, flight)

    def _drop(self, digest: str, flight: Flight) -> None:
        if self.flights.get(digest) is flight:
            del self.flights[digest]

    def _report(self, ctx: RequestContext, result: str, source: Entry | Flight | None) -> None:
        tokens, cost = 0, 0.0
        if source is not None and ctx.committed and 200 <= (ctx.status or 0) < 300:
            (inp, out), deployment = ((source.input_tokens, source.output_tokens) if isinstance(source, Entry)
                                      else source.tokens), source.deployment
            tokens = inp + out
            price = self.prices.get(deployment)
            if price is not None:
                cost = inp / 1000 * price.input_per_1k + out / 1000 * price.output_per_1k
        runtime = self.runtime
        runtime.observer.cache_result(ctx, result, tokens, cost)
        runtime.cache.count(result, tokens, cost)


# --- waiting --------------------------------------------------------------------------------------
async def _wait(ctx: RequestContext, receive: Any, awaitable: Any, deadline: float) -> str:
    """"ok" when `awaitable` is done, "timeout" at the deadline, "gone" when the client disconnects."""
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        return "timeout"
    waiter = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(receive())  # the body is read: the next message is the disconnect
    try:
        done, _ = await asyncio.wait((waiter, watch), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, watch):
            if not task.done():
                task.cancel()
    if watch in done and not watch.cancelled() and watch.exception() is None \
            and watch.result().get("type") == "http.disconnect":
        ctx.client_disconnected = True
        return "gone"
    return "ok" if done else "timeout"


async def _follow(ctx: RequestContext, flight: Flight, deadline: float, receive: Any) -> str:
    """Wait until the flight resolves: its state, or "timeout" / "gone"."""
    while flight.state == PENDING:
        outcome = await _wait(ctx, receive, flight.wait_event().wait(), deadline)
        if outcome != "ok":
            return outcome
    return flight.state


# --- replaying ------------------------------------------------------------------------------------
async def _labelled(send: Any, label: bytes, message: dict[str, Any]) -> None:
    if message["type"] == "http.response.start":
        message = {**message, "headers": [*message.get("headers", ()), (HEADER, label)]}
    await send(message)


async def _replay_entry(entry: Entry, label: bytes, age: int | None, ctx: RequestContext, send: Any) -> None:
    headers = [*entry.headers]
    if not entry.streaming:
        headers.append((b"content-length", b"%d" % len(entry.body)))
    headers += gateway_headers(ctx)
    headers.append((HEADER, label))
    if age is not None:
        headers.append((b"age", b"%d" % age))
    ctx.status = entry.status
    await send({"type": "http.response.start", "status": entry.status, "headers": headers})
    ctx.committed = True
    await send({"type": "http.response.body", "body": entry.body})


async def _replay_live(flight: Flight, ctx: RequestContext, send: Any) -> None:
    prefixes = ctx.adapter.rate_limit_prefixes
    headers = [(k, v) for k, v in flight.headers if not k.startswith(b"x-gateway-")
               and not (prefixes and k.startswith(prefixes))]
    headers += gateway_headers(ctx)
    headers.append((HEADER, LABELS["coalesced"]))
    ctx.status = flight.status
    await send({"type": "http.response.start", "status": flight.status, "headers": headers})
    ctx.committed = True
    sent = 0
    chunks = flight.chunks
    while True:
        done = flight.done  # read first: chunks added before it was set are all in the list
        while sent < len(chunks):
            await send({"type": "http.response.body", "body": chunks[sent], "more_body": True})
            sent += 1
        if done:
            break
        await flight.wait_event().wait()
    if not flight.ok:
        raise GatewayError("upstream_stream_error", "the upstream answer this request shared was cut")
    await send({"type": "http.response.body", "body": b"", "more_body": False})
