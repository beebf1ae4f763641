"""Traces with a cheap request path: light span records, exported through the OpenTelemetry SDK.

Contract:
- What the request path pays: `Tracer.begin(traceparent, tracestate)` when a request starts (a
  tuple in `SpanStart`'s order: ids from `random.getrandbits`, one draw for a new trace's id and
  its root span's id, and the sampling decision), and, once a sampled span has ended, one tuple in
  `SpanRecord`'s order handed to `Tracer.end`. A span is made once, complete, never updated: its
  attributes come in two parts, `static`, a dict shared by many spans (the caller caches it per
  outcome shape and never mutates it; the exporter encodes it once), and `attributes`, this span's
  own values. No SDK span objects, locks or context objects are made per request (measured: they
  cost the gateway ~10% of its throughput, half of it in garbage collection of spans that wait in
  the export queue).
- Sampling is ParentBased(TraceIdRatio(`sample_rate`)): a remote parent's sampled flag decides,
  otherwise the low 64 bits of the trace id against the ratio (the SDK's TraceIdRatioBased rule).
  An unsampled request still gets ids (for `traceparent` and logs) but no record.
- `BoundedSpanProcessor.end(record)` queues a record; every 128th span prepares the queued ones at
  once, while they are young, where they ended: wire bytes from the gateway's own OTLP exporter
  (`encode_records` of `proxy.telemetry.otlp.fast_span_exporter`), or SDK `ReadableSpan`s for any other SDK
  `SpanExporter` (an in-memory one in tests). One daemon thread exports them in batches of 1024, or
  whatever waits once the oldest has waited `delay` (1 s), preparing a quiet spell's leftovers
  itself. At most 4096 spans wait, prepared or not: beyond that new ones are dropped and counted,
  unprepared, with no log line per span; nothing is queued after shutdown. A slow or dead collector
  blocks only that thread; the request path never waits for it or its locks.
"""
from __future__ import annotations

import random
import threading
import time
from collections import deque
from typing import Any, Callable, NamedTuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

SCOPE = InstrumentationScope("llm-gateway")
_LOW64 = (1 << 64) - 1
_getrandbits = random.getrandbits
_time_ns = time.time_ns


class SpanRecord(NamedTuple):
    """One ended span, as queued and exported. The request path builds plain tuples in this order (a
    NamedTuple's constructor is a Python call, a tuple display is one instruction); the encoder and
    `readable` take either."""

    name: str
    kind: SpanKind
    static: dict[str, Any] | None  # shared by many spans, never mutated
    trace_id: int
    span_id: int
    parent_id: int  # 0: a root span
    remote: bool  # the parent came in the caller's traceparent
    trace_state: str
    start: int  # unix ns
    end: int
    attributes: dict[str, Any] | None = None  # this span's own values, which win over `static`
    events: list[tuple[str, dict[str, Any], int]] | None = None  # (name, attributes, unix ns)
    error: str | None = None  # status ERROR with this message; None: UNSET

    def all_attributes(self) -> dict[str, Any]:
        """`static` then `attributes` (this span's own win), as exported."""
        return {**(self.static or {}), **(self.attributes or {})}


class SpanStart(NamedTuple):
    """A request's trace position, from `Tracer.begin`: what its span and its attempts need until they end."""

    trace_id: int
    span_id: int
    parent_id: int
    remote: bool
    sampled: bool
    trace_state: str
    trace_hex: str  # 32 hex digits: access logs and `traceparent`
    start: int  # unix ns

    def traceparent(self, span_id: int) -> str:
        """The W3C traceparent of a child span (an attempt) of this one."""
        return f"00-{self.trace_hex}-{span_id.to_bytes(8, 'big').hex()}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """W3C traceparent -> (trace id, parent span id, sampled), or None when absent or invalid."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(flags & 1)


class Tracer:
    def __init__(self, sample_rate: float, processor: "BoundedSpanProcessor") -> None:
        self.bound = round(max(0.0, min(1.0, sample_rate)) * (_LOW64 + 1))
        self.processor = processor
        self.end = processor.end  # `end(record)`: one call a span, not two

    end: Callable[[tuple[Any, ...]], None]

    def begin(self, traceparent: str | None, tracestate: str | None) -> tuple[Any, ...]:
        """A server span's ids and sampling decision, continuing `traceparent` when it is valid: a plain
        tuple in `SpanStart`'s order (`SpanStart._make` names its fields; a NamedTuple costs a call more)."""
        parent = parse_traceparent(traceparent) if traceparent is not None else None
        if parent is not None:
            trace_id, parent_id, sampled = parent
            return (trace_id, _getrandbits(64) or 1, parent_id, True, sampled, tracestate or "", f"{trace_id:032x}",
                    _time_ns())
        ids = _getrandbits(192)  # one draw: the trace id (high 128 bits) and this span's id
        trace_id, span_id = ids >> 64, ids & _LOW64
        if not (trace_id and span_id):  # all zeros are invalid ids (a 2**-64 chance)
            trace_id, span_id = trace_id or 1, span_id or 1
        return (trace_id, span_id, 0, False, (trace_id & _LOW64) < self.bound, "", trace_id.to_bytes(16, "big").hex(),
                _time_ns())


class BoundedSpanProcessor:
    def __init__(self, exporter: SpanExporter, resource: Resource, *, on_drop: Callable[[int], None],
                 on_fail: Callable[[int], None], max_queue: int = 4096, batch: int = 1024, chunk: int = 128,
                 delay: float = 1.0) -> None:
        self.exporter, self.resource, self.on_drop, self.on_fail = exporter, resource, on_drop, on_fail
        # Our OTLP exporter encodes the records itself (`encode_records`): wire bytes, made `chunk` at a time.
        # 128: the encoder wants batches (chunks of 8 or 2 measured +2% and +5% CPU), records want to die
        # young (held for a whole batch, they cost more than their encoding); 32 measured the same as 128.
        self.prepare: Callable[[list[tuple[Any, ...]]], list[Any]] = getattr(exporter, "encode_records", None) or \
            (lambda records: [self.readable(r) for r in records])
        self.max_queue, self.batch, self.chunk, self.delay = max_queue, batch, min(chunk, batch), delay
        # `max_queue` bounds what waits: prepared chunks, and unprepared records with two chunks' room (one
        # may fill while the thread prepares leftovers). `limit` (unprepared) is 0 once stopped.
        self.ready_limit = max(1, max_queue // self.chunk - 2)
        self.limit = max(self.chunk, max_queue - self.ready_limit * self.chunk)
        self.wake_at = self.chunk - 1
        self.wake_chunks = max(1, self.batch // self.chunk)
        self.queue: deque[tuple[Any, ...]] = deque()  # ended records, not yet prepared
        self.ready: deque[list[Any]] = deque()  # prepared chunks, for the export thread
        self.pending: list[Any] = []  # export thread only: prepared spans waiting for a full batch
        self.since = 0.0  # monotonic time the oldest pending span was taken
        self.wake = threading.Event()
        self.preparing = threading.Lock()  # one preparer at a time: the encoder's caches are not shared
        self.lock = threading.Lock()  # one drain at a time (worker or flush)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="llm-gateway-span-export", daemon=True)
        self.thread.start()

    def end(self, record: tuple[Any, ...]) -> None:
        """Queue an ended, sampled span (a `SpanRecord` or a tuple in its order); a full queue drops it."""
        queue = self.queue
        queued = len(queue)
        if queued >= self.limit:  # `limit` is 0 once stopped: nothing is queued (nor counted) after shutdown
            if not self.stopped:
                self.on_drop(1)
            return
        queue.append(record)
        if queued >= self.wake_at:
            self._prepare_chunk()

    def _prepare_chunk(self) -> None:
        """Prepare one chunk where the span ended (the event loop), while its records are young.

        Measured against preparing in the export thread (woken every chunk): ~2.5% less gateway CPU,
        the thread's wake-ups and GIL hand-offs cost more than the work they moved. Never waits: while
        the thread prepares a quiet spell's leftovers, the next span tries again."""
        if not self.preparing.acquire(False):
            return
        try:
            queue = self.queue
            records = [queue.popleft() for _ in range(min(self.chunk, len(queue)))]
            if len(self.ready) >= self.ready_limit:  # the collector is behind: drop, and spend nothing on them
                self.on_drop(len(records))
                return
            try:
                prepared = self.prepare(records)
            except Exception:  # noqa: BLE001 - export never reaches traffic
                self.on_fail(len(records))
                return
            ready = self.ready
            ready.append(prepared)
            if len(ready) >= self.wake_chunks and not self.wake.is_set():  # a batch is ready
                self.wake.set()
        finally:
            self.preparing.release()

    def _run(self) -> None:
        while not self.stopped:
            due = self.since + self.delay - time.monotonic() if self.pending else self.delay
            woken = self.wake.wait(max(0.0, due))
            self.wake.clear()
            self._drain(final=not woken)  # a timeout: what waits is due

    def _drain(self, final: bool = True) -> None:
        """Send full batches of what is prepared. When `final` (a quiet spell, a flush, shutdown), prepare
        the unprepared leftovers too; when `final` or once the oldest is due, send everything."""
        with self.lock:
            ready, pending = self.ready, self.pending
            if final and self.queue:
                with self.preparing:  # the request path never waits for this lock, it tries again later
                    records = [self.queue.popleft() for _ in range(len(self.queue))]
                    try:
                        ready.append(self.prepare(records))
                    except Exception:  # noqa: BLE001 - export never reaches traffic
                        self.on_fail(len(records))
            while ready:
                if not pending:
                    self.since = time.monotonic()
                pending.extend(ready.popleft())
                while len(pending) >= self.batch:
                    self._send(pending[:self.batch])
                    del pending[:self.batch]
                    self.since = time.monotonic()
            if pending and (final or time.monotonic() - self.since >= self.delay):
                self._send(pending[:])
                pending.clear()

    def _send(self, spans: list[Any]) -> None:
        try:
            ok = self.exporter.export(spans) is SpanExportResult.SUCCESS
        except Exception:  # noqa: BLE001 - export never reaches traffic
            ok = False
        if not ok:
            self.on_fail(len(spans))

    def readable(self, record: tuple[Any, ...]) -> ReadableSpan:
        r = SpanRecord._make(record)
        state = TraceState.from_header([r.trace_state]) if r.trace_state else None
        context = SpanContext(r.trace_id, r.span_id, False, TraceFlags(TraceFlags.SAMPLED), state)
        parent = SpanContext(r.trace_id, r.parent_id, r.remote, TraceFlags(TraceFlags.SAMPLED), state) \
            if r.parent_id else None
        events = [Event(name, attrs, ts) for name, attrs, ts in r.events or ()]
        status = Status(StatusCode.ERROR, r.error) if r.error is not None else Status(StatusCode.UNSET)
        return ReadableSpan(r.name, context, parent, self.resource, r.all_attributes(), events, (), r.kind, None,
                            status, r.start, r.end, SCOPE)

    def flush(self) -> None:
        self._drain()

    def shutdown(self) -> None:
        """Stop accepting spans, export what is queued (bounded by the exporter's timeout), close."""
        if self.stopped:
            return
        self.stopped = True
        self.limit = 0
        self.wake.set()
        self.thread.join()
        self._drain()
        try:
            self.exporter.shutdown()
        except Exception:  # noqa: BLE001
            pass
