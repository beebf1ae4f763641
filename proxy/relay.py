"""The response side of one upstream attempt: relay the bytes unchanged, read usage on the way.

Contract (`relay(ctx, attempt, response, send, observer)`, called by the forwarder per attempt):
- An upstream error status is read whole (bounded) and classified by the adapter; when
  `ctx.may_retry` and it is retryable (transient, rate limited, or a quota another deployment may
  not have) it raises `UpstreamFailure` with the native response kept, else it is sent verbatim
  (or translated for a cross-family deployment) with the `x-gateway-*` headers.
- A status that cannot be relayed (a final 1xx, or outside 100-599 such as `999`) is a retryable
  `upstream_error` (a native 502 when it is the last attempt), never a head sent to the client.
- Otherwise the head goes out with the `x-gateway-*` headers (hop-by-hop and account headers
  dropped), then every chunk as it arrives. The commit point (the head sent) is:
  - a plain (non-stream) answer: its first BODY byte. The head is held until then; a stall past
    the deployment's `first_byte` timeout (counted from the attempt's start, bounded by the
    deadline) or a break before it is a retryable failure, like one before the head. An error
    status is read whole within the same budget (what arrived by then is used).
  - a stream: its head, or with `ctx.hold_stream` its first events, held until the adapter's
    verdict says healthy (an in-band error or a stall there is a retryable failure).
  Only the documented OpenAI usage-chunk filter changes bytes.
- The adapter's usage tap sees every byte; a tap that raises is switched off, never the relay.
  Counts that are not non-negative integers are dropped. For a key with `log_bodies`, the response
  body's first `BODY_LOG_LIMIT` bytes (as the upstream sent them, with their content-encoding; an
  error's as the client got it) are kept on the context for the access log.
- A sized body relayed as is ends with its last chunk (`more_body: False`); the stream is still
  drained so the connection goes back to the pool. A stream's first chunk is reported once
  (`observer.first_chunk`). A failure after the head raises `upstream_stream_error`.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from proxy.context import Attempt, RequestContext
from proxy.errors import GatewayError, UpstreamFailure
from proxy.headers import gateway_headers
from proxy.telemetry.observer import Observer
from providers.base import forward_response_headers

_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson", b"application/vnd.amazon.eventstream")
ERROR_BODY_LIMIT = 1024 * 1024  # upstream error bodies are read whole (bounded) to classify them
HOLD_LIMIT = 64 * 1024  # a stream that shows nothing conclusive in this much is committed anyway
BODY_LOG_LIMIT = 64 * 1024  # of a `log_bodies` key's response, kept for its access-log line


async def relay(ctx: RequestContext, attempt: Attempt, response: httpx.Response, send: Any,
                observer: Observer) -> None:
    """Relay one upstream response (or raise a retryable failure before anything was sent)."""
    # Names as the upstream wrote them ("Content-Type" from nginx, Go, AWS); every check here is lower-case.
    raw_headers = [(k.lower(), v) for k, v in response.headers.raw]
    adapter = ctx.adapter
    status = response.status_code
    if not 200 <= status <= 599:  # ASGI servers (and HTTP clients) cannot take it: a bad upstream answer
        raise UpstreamFailure("upstream_error", f"deployment {ctx.deployment.name!r} answered an invalid "  # type: ignore[union-attr]  # the router set ctx.deployment
                              f"HTTP status ({status})", kind="transient")
    ctx.status = status
    # The rate limiter's headers replace the upstream's own (the error layer adds them to the response).
    replaced = adapter.rate_limit_prefixes if ctx.response_headers else ()
    if status >= 400:
        body = await _read_bounded(response, ERROR_BODY_LIMIT, _first_byte_budget(ctx, attempt))
        kind = adapter.classify(status, raw_headers, body)
        native = adapter.error_response(ctx, status, forward_response_headers(raw_headers, drop_length=True,
                                                                              replaced=replaced), body)
        # A billing quota may be failed over to another account, never retried on this one.
        if ctx.may_retry and (kind in ("transient", "rate_limited")
                              or (kind == "quota" and len(ctx.candidates) > len(set(ctx.tried)))):
            raise UpstreamFailure(
                "upstream_rate_limited" if kind in ("rate_limited", "quota") else "upstream_error",
                f"deployment {ctx.deployment.name!r} answered {status}",  # type: ignore[union-attr]  # the router set ctx.deployment
                kind=kind, retry_after=retry_after_of(raw_headers), response=native)
        attempt.outcome = kind
        await _send_error(ctx, attempt, native, kind, send)
        return
    ctype = next((v for k, v in raw_headers if k == b"content-type"), b"")
    streaming = any(t in ctype for t in _STREAM_TYPES)
    flt = adapter.stream_filter(ctx) if streaming else None
    inner = adapter.tap(ctx, raw_headers)
    tap: _SafeTap | _Capture | None = _SafeTap(inner) if inner is not None else None
    if ctx.principal is not None and ctx.principal.log_bodies:  # the key asked for its bodies in the log
        tap = _Capture(ctx, tap, next((v for k, v in raw_headers if k == b"content-encoding"), b""))
    # The transport's byte stream itself (`Response.stream`): `aiter_raw` would re-chunk and
    # re-wrap every chunk for nothing; our transports already raise httpx's exceptions.
    chunks = aiter(response.stream)  # type: ignore[arg-type]  # an async transport's response: an AsyncByteStream
    held = b""
    if not streaming:  # a plain answer commits on its first body byte, not on its head
        chunks = await _first_body(ctx, attempt, chunks)
    elif ctx.hold_stream:
        held = await _hold(ctx, chunks, tap, flt)
    headers = adapter.response_headers(ctx, forward_response_headers(raw_headers, drop_length=flt is not None,
                                                                               replaced=replaced), streaming)
    headers += gateway_headers(ctx)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    ctx.committed = True
    # A sized body relayed as is ends with its last byte: that chunk closes the response (one
    # ASGI message less per plain JSON answer); the stream is still drained to free the connection.
    left = _content_length(raw_headers) if flt is None and not held else None
    try:
        first = streaming and ctx.stream  # a stream's time to first chunk is reported once, when sent
        if held:  # already tapped and filtered while held
            attempt.ttfc = time.perf_counter() - attempt.started
            observer.first_chunk(ctx, attempt.ttfc)
            first = False
            await send({"type": "http.response.body", "body": held, "more_body": True})
        async for chunk in chunks:
            if left is not None and len(chunk) >= left > 0:
                left = 0
                if tap is not None:
                    _feed(tap, chunk)
                _finish(ctx, tap)
                attempt.relayed = True
                await send({"type": "http.response.body", "body": chunk, "more_body": False})
                continue
            if left:
                left -= len(chunk)
            if await _emit(chunk, tap, flt, send) and first:
                first = False
                attempt.ttfc = time.perf_counter() - attempt.started
                observer.first_chunk(ctx, attempt.ttfc)
    except httpx.HTTPError as exc:
        _finish(ctx, tap)
        kind = "idle timeout" if isinstance(exc, httpx.TimeoutException) else "connection lost"
        raise GatewayError("upstream_stream_error", f"upstream stream failed ({kind})",
                           status=504 if isinstance(exc, httpx.TimeoutException) else 502) from None
    if left == 0 and attempt.relayed:
        return
    _finish(ctx, tap)
    rest = flt.flush() if flt is not None and hasattr(flt, "flush") else b""
    attempt.relayed = True
    await send({"type": "http.response.body", "body": rest, "more_body": False})

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

async def _send_error(ctx: RequestContext, attempt: Attempt, native: tuple[int, list[tuple[bytes, bytes]], bytes],
                      kind: str, send: Any) -> None:
    """An upstream error that is not retried: verbatim (or translated for a cross-family deployment)."""
    status, headers, body = native
    headers = [(k, v) for k, v in headers if k not in (b"content-length", b"x-should-retry")]
    headers += [(b"content-length", str(len(body)).encode()), *gateway_headers(ctx)]
    if ctx.failed_over or kind == "quota":
        headers.append((b"x-should-retry", b"false"))
    else:
        headers += [(k, v) for k, v in native[1] if k == b"x-should-retry"]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    ctx.committed = True
    attempt.relayed = True
    if ctx.principal is not None and ctx.principal.log_bodies:
        ctx.response_body = bytearray(body[:BODY_LOG_LIMIT])
        ctx.response_encoding = next((v for k, v in headers if k == b"content-encoding"), b"").decode("latin-1")
    await send({"type": "http.response.body", "body": body})


def _first_byte_budget(ctx: RequestContext, attempt: Attempt) -> float:
    """What is left of the deployment's `first_byte` timeout for this attempt (bounded by the deadline)."""
    now = time.perf_counter()
    budget = ctx.deployment.timeouts.first_byte - (now - attempt.started)  # type: ignore[union-attr]  # the router set ctx.deployment
    if ctx.deadline is not None:
        budget = min(budget, ctx.deadline - now)
    return max(0.001, budget)


async def _first_body(ctx: RequestContext, attempt: Attempt, chunks: Any) -> Any:
    """Wait for a plain answer's first body byte (its commit point); the chunks again, that one first.

    A stall past the first-byte budget or a break before that byte is a retryable failure: nothing
    has reached the client yet. A body that ends empty commits as it is."""
    try:
        async with asyncio.timeout(_first_byte_budget(ctx, attempt)):
            first = await anext(chunks)
    except StopAsyncIteration:
        return chunks
    except (httpx.TimeoutException, TimeoutError):
        raise UpstreamFailure("upstream_timeout", f"deployment {ctx.deployment.name!r} sent no body in time",  # type: ignore[union-attr]  # the router set ctx.deployment
                              kind="transient") from None
    except httpx.HTTPError:
        raise UpstreamFailure("upstream_unreachable", "the upstream connection broke before the body",
                              kind="transient") from None
    return _prepend(first, chunks)


async def _prepend(first: bytes, chunks: Any) -> Any:
    yield first
    async for chunk in chunks:
        yield chunk


async def _hold(ctx: RequestContext, chunks: Any, tap: Any, flt: Any) -> bytes:
    """Read a stream's first events until the adapter can tell it is healthy (commit point).

    Returns the held bytes already tapped and filtered, ready to send."""
    held = b""
    first_byte = ctx.deployment.timeouts.first_byte  # type: ignore[union-attr]  # the router set ctx.deployment
    if ctx.deadline is not None:
        first_byte = max(0.001, min(first_byte, ctx.deadline - time.perf_counter()))
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


class _Capture:
    """Keeps the response's first `BODY_LOG_LIMIT` bytes (for a `log_bodies` key), then feeds the usage tap."""

    __slots__ = ("ctx", "inner")

    def __init__(self, ctx: RequestContext, inner: Any, encoding: bytes) -> None:
        self.ctx, self.inner = ctx, inner
        ctx.response_body = bytearray()  # this attempt's: a failed one before it never reached the client
        ctx.response_encoding = encoding.decode("latin-1").strip().lower()

    def feed(self, chunk: bytes) -> None:
        kept = self.ctx.response_body
        if kept is not None and len(kept) < BODY_LOG_LIMIT:
            kept += chunk[:BODY_LOG_LIMIT - len(kept)]
        if self.inner is not None:
            self.inner.feed(chunk)

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()


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


async def _read_bounded(response: httpx.Response, limit: int, seconds: float) -> bytes:
    """An error body, whole up to `limit` bytes: what arrived within `seconds` (a stall ends it)."""
    body = b""
    try:
        async with asyncio.timeout(seconds):
            async for chunk in response.stream:  # type: ignore[union-attr]  # an async transport's: an AsyncByteStream
                body += chunk
                if len(body) >= limit:
                    break
    except (httpx.HTTPError, TimeoutError):
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
