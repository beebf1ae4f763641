"""The terminal ASGI app: send one attempt upstream with httpx and relay the response unchanged.

Contract:
- Builds the upstream request with the inbound adapter for `ctx.deployment` (URL, auth, signing).
- Timeouts: connect, first byte (bounded by what is left of `gateway.timeout`) and stream idle;
  httpx's default 5 s read timeout never applies.
- Before the first byte, failures raise `UpstreamFailure` (504 timeout, 502 unreachable; and, when
  `ctx.may_retry`, a retryable upstream status with the upstream's own response kept) so the
  failover layer can retry or render them. With `ctx.hold_stream`, a stream's first events are
  held until the adapter says it is healthy; an in-band error there is a retryable failure too. After it, bytes flow as they arrive, untouched except for the
  documented OpenAI usage-chunk removal; a failure then raises `upstream_stream_error` with
  `ctx.committed` set so the error layer writes the family's error frame.
- A client disconnect cancels the relay and closes the upstream stream at once.
- Usage is read by the adapter's tap into `ctx.usage` on every path.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from config.models import Config
from proxy.context import RequestContext, get_context
from proxy.errors import GatewayError, UpstreamFailure
from proxy.runtime import Runtime
from providers.base import forward_response_headers

_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson", b"application/vnd.amazon.eventstream")
ERROR_BODY_LIMIT = 1024 * 1024  # upstream error bodies are read whole (bounded) to classify them
HOLD_LIMIT = 64 * 1024  # a stream that shows nothing conclusive in this much is committed anyway
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
        deadline = ctx.extra.get("deadline")  # the failover layer's: gateway.timeout, or the client's when lower
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
        ctx.extra["relay_done"] = False  # a new attempt: a client leaving now must cancel it
        ctx.upstream_started = time.perf_counter()
        watch = _Watch(receive, ctx)
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
            ctx.upstream_ttfb = time.perf_counter() - ctx.upstream_started
            try:
                await self._relay(ctx, response, send)
            finally:
                await response.aclose()
        except asyncio.CancelledError:
            if not ctx.client_disconnected:
                observer.attempt_end(ctx, dep, span, ctx.status, "cancelled")
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            observer.client_disconnected(ctx)
            observer.attempt_end(ctx, dep, span, ctx.status, "client_disconnected")
        except GatewayError as err:
            observer.attempt_end(ctx, dep, span, ctx.status or err.status, err.code)
            raise
        else:
            outcome = ctx.extra.get("upstream_outcome")
            observer.attempt_end(ctx, dep, span, ctx.status, None if not outcome else f"upstream_{outcome}")
        finally:
            ctx.extra["relay_done"] = True
            watch.stop()
            ctx.upstream_seconds += time.perf_counter() - (ctx.upstream_started or time.perf_counter())

    async def _relay(self, ctx: RequestContext, response: httpx.Response, send: Any) -> None:
        # Names as the upstream wrote them ("Content-Type" from nginx, Go, AWS); every check here is lower-case.
        raw_headers = [(k.lower(), v) for k, v in response.headers.raw]
        adapter = ctx.adapter
        status = response.status_code
        ctx.status = status
        held = b""
        if status >= 400:
            body = await _read_bounded(response, ERROR_BODY_LIMIT)
            kind = adapter.classify(status, raw_headers, body)
            native = adapter.error_response(ctx, status, forward_response_headers(raw_headers, drop_length=True), body)
            # A billing quota may be failed over to another account, never retried on this one.
            if ctx.may_retry and (kind in ("transient", "rate_limited")
                                  or (kind == "quota" and len(ctx.candidates) > len(set(ctx.tried)))):
                raise UpstreamFailure(
                    "upstream_rate_limited" if kind in ("rate_limited", "quota") else "upstream_error",
                    f"deployment {ctx.deployment.name!r} answered {status}",  # type: ignore[union-attr]
                    kind=kind, retry_after=retry_after_of(raw_headers), response=native)
            ctx.extra["upstream_outcome"] = kind
            await self._send_error(ctx, native, kind, send)
            return
        ctype = next((v for k, v in raw_headers if k == b"content-type"), b"")
        streaming = any(t in ctype for t in _STREAM_TYPES)
        flt = adapter.stream_filter(ctx) if streaming else None
        inner = adapter.tap(ctx, raw_headers)
        tap = _SafeTap(inner) if inner is not None else None
        # The transport's byte stream itself (`Response.stream`): `aiter_raw` would re-chunk and
        # re-wrap every chunk for nothing; our transports already raise httpx's exceptions.
        chunks = aiter(response.stream)  # type: ignore[arg-type]
        held = b""
        if streaming and ctx.hold_stream:
            held = await self._hold(ctx, chunks, tap, flt)
        headers = adapter.response_headers(ctx, forward_response_headers(raw_headers, drop_length=flt is not None), streaming)
        headers += [(b"x-gateway-request-id", ctx.request_id.encode()),
                    (b"x-gateway-provider", ctx.deployment.name.encode()),  # type: ignore[union-attr]
                    (b"x-gateway-attempts", str(ctx.attempts).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        ctx.committed = True
        # A sized body relayed as is ends with its last byte: that chunk closes the response (one
        # ASGI message less per plain JSON answer); the stream is still drained to free the connection.
        left = _content_length(raw_headers) if flt is None and not held else None
        try:
            first = streaming and ctx.stream  # a stream's time to first chunk is reported once, when sent
            if held:  # already tapped and filtered while held
                self.runtime.observer.first_chunk(ctx, time.perf_counter() - ctx.upstream_started)  # type: ignore[operator]
                first = False
                await send({"type": "http.response.body", "body": held, "more_body": True})
            async for chunk in chunks:
                if left is not None and len(chunk) >= left > 0:
                    left = 0
                    if tap is not None:
                        _feed(tap, chunk)
                    _finish(ctx, tap)
                    ctx.extra["relay_done"] = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    continue
                if left:
                    left -= len(chunk)
                if await self._emit(chunk, tap, flt, send) and first:
                    first = False
                    self.runtime.observer.first_chunk(ctx, time.perf_counter() - ctx.upstream_started)  # type: ignore[operator]
        except httpx.HTTPError as exc:
            _finish(ctx, tap)
            kind = "idle timeout" if isinstance(exc, httpx.TimeoutException) else "connection lost"
            raise GatewayError("upstream_stream_error", f"upstream stream failed ({kind})",
                               status=504 if isinstance(exc, httpx.TimeoutException) else 502) from None
        if left == 0 and ctx.extra["relay_done"]:
            return
        _finish(ctx, tap)
        rest = flt.flush() if flt is not None and hasattr(flt, "flush") else b""
        ctx.extra["relay_done"] = True
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    @staticmethod
    async def _emit(chunk: bytes, tap: Any, flt: Any, send: Any) -> bool:
        """Tap, filter and relay one chunk; False when the filter left nothing to send."""
        if tap is not None:
            _feed(tap, chunk)
        if flt is not None:
            chunk = flt(chunk)
            if not chunk:
                return False
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        return True

    async def _send_error(self, ctx: RequestContext, native: tuple[int, list[tuple[bytes, bytes]], bytes],
                          kind: str, send: Any) -> None:
        """An upstream error that is not retried: verbatim (or translated for a cross-family deployment)."""
        status, headers, body = native
        headers = [(k, v) for k, v in headers if k not in (b"content-length", b"x-should-retry")]
        headers += [(b"content-length", str(len(body)).encode()),
                    (b"x-gateway-request-id", ctx.request_id.encode()),
                    (b"x-gateway-provider", ctx.deployment.name.encode()),  # type: ignore[union-attr]
                    (b"x-gateway-attempts", str(ctx.attempts).encode())]
        if ctx.failed_over or kind == "quota":
            headers.append((b"x-should-retry", b"false"))
        else:
            headers += [(k, v) for k, v in native[1] if k == b"x-should-retry"]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        ctx.committed = True
        ctx.extra["relay_done"] = True
        await send({"type": "http.response.body", "body": body})

    async def _hold(self, ctx: RequestContext, chunks: Any, tap: Any, flt: Any) -> bytes:
        """Read a stream's first events until the adapter can tell it is healthy (commit point).

        Returns the held bytes already tapped and filtered, ready to send."""
        held = b""
        first_byte = ctx.deployment.timeouts.first_byte  # type: ignore[union-attr]
        if ctx.extra.get("deadline") is not None:
            first_byte = max(0.001, min(first_byte, ctx.extra["deadline"] - time.perf_counter()))
        try:
            async with asyncio.timeout(first_byte):  # the body read timeout is already the idle one
                async for chunk in chunks:
                    if tap is not None:
                        _feed(tap, chunk)
                    held += flt(chunk) if flt is not None else chunk
                    verdict = ctx.adapter.stream_verdict(held)
                    if verdict == "ok" or len(held) > HOLD_LIMIT:
                        return held
                    if verdict == "error":
                        raise UpstreamFailure("upstream_error", "the upstream stream failed before its first content",
                                              kind="transient")
        except (httpx.TimeoutException, TimeoutError):
            raise UpstreamFailure("upstream_timeout", "the upstream stream stalled before its first content",
                                  kind="transient") from None
        except httpx.HTTPError:
            raise UpstreamFailure("upstream_unreachable", "the upstream stream broke before its first content",
                                  kind="transient") from None
        return held  # the stream ended inside the hold: relay what there is


class _SafeTap:
    """Usage reading must never break the relay: a tap that raises is switched off."""

    __slots__ = ("inner", "broken")

    def __init__(self, inner: Any) -> None:
        self.inner, self.broken = inner, False

    def feed(self, chunk: bytes) -> None:
        if not self.broken:
            try:
                self.inner.feed(chunk)
            except Exception:  # noqa: BLE001
                self.broken = True

    def finish(self) -> None:
        if not self.broken:
            try:
                self.inner.finish()
            except Exception:  # noqa: BLE001
                self.broken = True


def _feed(tap: Any, chunk: bytes) -> None:
    tap.feed(chunk)


def _finish(ctx: RequestContext, tap: Any) -> None:
    if tap is not None:
        tap.finish()
    u = ctx.usage  # whatever a provider reported, only non-negative integers count
    for name in ("input_tokens", "output_tokens", "cached_tokens"):
        value = getattr(u, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            setattr(u, name, None)


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    body = b""
    try:
        async for chunk in response.stream:  # type: ignore[union-attr]
            body += chunk
            if len(body) >= limit:
                break
    except httpx.HTTPError:
        pass
    return body


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def retry_after_of(headers: list[tuple[bytes, bytes]]) -> float | None:
    """Server-directed delay: `retry-after-ms`, `x-amz-retry-after` (ms), then `retry-after` (s)."""
    found: dict[bytes, bytes] = {k: v for k, v in headers if k in (b"retry-after-ms", b"x-amz-retry-after", b"retry-after")}
    for name, scale in ((b"retry-after-ms", 0.001), (b"x-amz-retry-after", 0.001), (b"retry-after", 1.0)):
        value = found.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


class _Watch:
    """Cancel the attempt when the client disconnects; the watching task starts after WATCH_AFTER."""

    __slots__ = ("receive", "ctx", "owner", "timer", "task")

    def __init__(self, receive: Any, ctx: RequestContext) -> None:
        self.receive, self.ctx = receive, ctx
        self.owner = asyncio.current_task()
        self.task: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.ctx.extra.get("relay_done") and self.owner is not None:
                    self.ctx.client_disconnected = True
                    self.owner.cancel()
                return

    def stop(self) -> None:
        self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
