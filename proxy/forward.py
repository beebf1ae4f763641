"""The terminal ASGI app: send one attempt upstream through the runtime's wire transport (httpx's
transport API; the gateway's own HTTP/1.1 client by default) and relay the response unchanged.

Contract:
- Builds the upstream request with the inbound adapter for `ctx.deployment` (URL, auth, signing)
  as an `httpx.Request` in its server-side form (`stream=`; Host and Content-Length set here) and
  drives `runtime.wire` directly; parsed URLs are cached (bounded).
- Timeouts: connect, first byte (bounded by what is left of `gateway.timeout`, or the failover
  layer's deadline) and stream idle; httpx's default 5 s read timeout never applies.
- Before the first byte, failures raise `UpstreamFailure` (504 timeout, 502 unreachable) so the
  failover layer can retry or render them; our own full connection pool is a 503
  `gateway_unavailable`. The response itself is relayed by `proxy.relay`.
- A client disconnect cancels the attempt and closes the upstream stream at once (the watcher
  starts `WATCH_AFTER` into an attempt; a disconnect before that is seen when it starts).
- Every attempt is reported to the observer (`attempt_start` / `attempt_end`).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from config.models import Config
from proxy.context import Attempt, RequestContext, get_context
from proxy.errors import GatewayError, UpstreamFailure
from proxy.relay import relay
from proxy.runtime import Runtime

URL_CACHE = 4096  # parsed upstream URLs kept (deployment x path x query repeats); cleared when full
# The disconnect watcher (a task) starts only for attempts still running after this long: most
# non-streaming calls finish sooner, and a client that left is still noticed well within 1 s.
WATCH_AFTER = 0.05


class Forwarder:
    def __init__(self, config: Config, *, deps: Runtime) -> None:
        self.config = config
        self.runtime = deps
        self.budget = config.gateway.timeout
        self.urls: dict[str, tuple[httpx.URL, str]] = {}

    def _url(self, raw: str) -> tuple[httpx.URL, str]:
        """The parsed URL and its Host header value."""
        found = self.urls.get(raw)
        if found is None:
            if len(self.urls) >= URL_CACHE:
                self.urls.clear()
            url = httpx.URL(raw)
            found = self.urls[raw] = (url, url.netloc.decode("ascii"))
        return found

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        ctx = get_context(scope)
        dep = ctx.deployment
        assert dep is not None, "the router runs before the forwarder"
        adapter = ctx.adapter
        up = adapter.upstream(ctx, dep)
        deadline = ctx.deadline  # the failover layer's: gateway.timeout, or the client's when lower
        if deadline is not None:
            remaining: float | None = max(0.001, deadline - time.perf_counter())
        else:
            remaining = max(0.001, self.budget - (time.perf_counter() - ctx.started)) if self.budget else None
        t = dep.timeouts
        timeouts = {
            "connect": min(t.connect, remaining) if remaining else t.connect,
            "read": min(t.first_byte, remaining) if remaining else t.first_byte,
            "write": t.connect if not remaining else min(max(t.connect, 30.0), remaining),
            "pool": t.connect,
        }
        wire = self.runtime.wire
        observer = self.runtime.observer
        span = observer.attempt_start(ctx, dep, up.url, up.headers)
        # The httpx Request/Response API straight on the transport: no client-level cookie, auth,
        # redirect or header-merging work per request (redirects are never followed anyway).
        # A proxy builds its request "server side" (httpx's `stream=` form): Host and Content-Length
        # are ours to set, and httpx skips its content encoding and header defaults.
        url, host = self._url(up.url)
        request = httpx.Request(up.method, url, headers=[("host", host), *up.headers,
                                                         ("content-length", str(len(up.body)))],
                                stream=httpx.ByteStream(up.body), extensions={"timeout": timeouts})
        ctx.attempts += 1
        ctx.tried.append(dep.name)
        # a new attempt: its time is upstream time until it closes, and a client leaving cancels it
        attempt = ctx.attempt = Attempt(ctx.attempts, dep, time.perf_counter())
        watch = _Watch(receive, ctx, attempt)
        try:
            try:
                response = await wire.handle_async_request(request)
            except httpx.PoolTimeout:  # our own pool is full: not the deployment's fault
                observer.pool_saturated(ctx)
                raise GatewayError("gateway_unavailable", "the gateway is at its upstream connection limit; retry shortly",
                                   retry_after=1.0) from None
            except httpx.TimeoutException:
                raise UpstreamFailure("upstream_timeout", f"deployment {dep.name!r} did not answer in time") from None
            except (httpx.TransportError, OSError):
                raise UpstreamFailure("upstream_unreachable", f"deployment {dep.name!r} is unreachable") from None
            timeouts["read"] = t.idle  # httpcore reads this when the body iteration starts
            attempt.ttfb = time.perf_counter() - attempt.started
            try:
                await relay(ctx, attempt, response, send, observer)
            finally:  # the transport's stream, as relayed (httpx's Response.aclose adds a context per call)
                await response.stream.aclose()  # type: ignore[union-attr]  # our transports' streams are async
        except asyncio.CancelledError:
            attempt.error = "client_disconnected" if ctx.client_disconnected else "cancelled"
            self._close(ctx, attempt, watch)
            if not ctx.client_disconnected:
                observer.attempt_end(ctx, dep, span, ctx.status, "cancelled")
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # inside a task by construction
            observer.client_disconnected(ctx)
            observer.attempt_end(ctx, dep, span, ctx.status, "client_disconnected")
        except GatewayError as err:
            attempt.error = err.code
            self._close(ctx, attempt, watch)
            observer.attempt_end(ctx, dep, span, ctx.status or err.status, err.code)
            raise
        else:
            if attempt.outcome:
                attempt.error = f"upstream_{attempt.outcome}"
            self._close(ctx, attempt, watch)
            observer.attempt_end(ctx, dep, span, ctx.status, attempt.error)
        finally:  # any other exception too: the attempt never stays open
            self._close(ctx, attempt, watch)

    @staticmethod
    def _close(ctx: RequestContext, attempt: Attempt, watch: "_Watch") -> None:
        """End the attempt's upstream time (before telemetry sees it: traffic never waits on telemetry)."""
        if attempt.open:
            attempt.open = False
            attempt.relayed = True
            watch.stop()
            ctx.upstream_seconds += time.perf_counter() - attempt.started


class _Watch:
    """Cancel the attempt when the client disconnects; the watching task starts after WATCH_AFTER."""

    __slots__ = ("receive", "ctx", "attempt", "owner", "timer", "task")

    def __init__(self, receive: Any, ctx: RequestContext, attempt: Attempt) -> None:
        self.receive, self.ctx, self.attempt = receive, ctx, attempt
        self.owner = asyncio.current_task()
        self.task: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.attempt.relayed and self.owner is not None:
                    self.ctx.client_disconnected = True
                    self.owner.cancel()
                return

    def stop(self) -> None:
        self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
