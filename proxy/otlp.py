"""OTLP plumbing: exporters from `monitoring.otel`, a bounded span processor, and the metrics bridge.

Contract:
- `span_exporter(otel)` / `metric_exporter(otel)`: `grpc` takes `host:port` (plaintext unless
  `https://` is given or `OTEL_EXPORTER_OTLP_INSECURE` says otherwise); `http/protobuf` takes a URL
  and gets `/v1/traces` or `/v1/metrics` appended. Everything else (headers, timeout, compression,
  certificates) comes from the standard `OTEL_EXPORTER_OTLP_*` variables, read by the SDK itself.
- `BoundedSpanProcessor`: a fixed-size queue drained by one daemon thread. A full queue drops the
  new span and counts it (no log line per span); a failed export is counted. The request path only
  appends to a deque, so a slow or dead collector costs no errors and no latency.
- `PrometheusBridge`: turns the Prometheus registry into OTLP `MetricsData` (cumulative), so each
  metric is recorded once and pushed by a standard `PeriodicExportingMetricReader`
  (`OTEL_METRIC_EXPORT_INTERVAL` honoured) with this process's `service.instance.id`.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric,
                                              MetricReader, MetricsData, NumberDataPoint, ResourceMetrics,
                                              ScopeMetrics, Sum)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from config.models import OtelSettings

SCOPE = InstrumentationScope("llm-gateway")


def _url(otel: OtelSettings, signal: str) -> str:
    endpoint = otel.endpoint.strip()
    base = endpoint if "://" in endpoint else f"http://{endpoint}"
    if otel.protocol == "grpc":
        return base
    base = base.rstrip("/")
    for tail in ("/v1/traces", "/v1/metrics"):
        if base.endswith(tail):
            base = base[: -len(tail)]
    return f"{base}/v1/{signal}"


def span_exporter(otel: OtelSettings) -> SpanExporter:
    if otel.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    return OTLPSpanExporter(endpoint=_url(otel, "traces"))


def metric_exporter(otel: OtelSettings) -> Any:
    if otel.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # type: ignore[assignment]
    return OTLPMetricExporter(endpoint=_url(otel, "metrics"))


class BoundedSpanProcessor(SpanProcessor):
    def __init__(self, exporter: SpanExporter, *, on_drop: Callable[[int], None], on_fail: Callable[[int], None],
                 max_queue: int = 2048, batch: int = 512, delay: float = 2.0) -> None:
        self.exporter, self.on_drop, self.on_fail = exporter, on_drop, on_fail
        self.max_queue, self.batch, self.delay = max_queue, batch, delay
        self.queue: deque[ReadableSpan] = deque()
        self.wake = threading.Event()
        self.lock = threading.Lock()  # one export at a time (worker or flush)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="llm-gateway-span-export", daemon=True)
        self.thread.start()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self.stopped:
            return
        if len(self.queue) >= self.max_queue:
            self.on_drop(1)
            return
        self.queue.append(span)
        if len(self.queue) >= self.batch:
            self.wake.set()

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait(self.delay)
            self.wake.clear()
            self._drain()

    def _drain(self) -> None:
        with self.lock:
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(self.batch, len(self.queue)))]
                try:
                    ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
                except Exception:  # noqa: BLE001 - export never reaches traffic
                    ok = False
                if not ok:
                    self.on_fail(len(batch))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._drain()
        return True

    def shutdown(self) -> None:
        """Stop accepting spans, export what is queued (bounded by the exporter's timeout), close."""
        if self.stopped:
            return
        self.stopped = True
        self.wake.set()
        self.thread.join()
        self._drain()
        try:
            self.exporter.shutdown()
        except Exception:  # noqa: BLE001
            pass


class PrometheusBridge:
    """Reads a prometheus_client registry and answers a MetricReader's collect with OTLP data."""

    def __init__(self, registry: Any, names: dict[str, tuple[str, str]], attributes: dict[str, str],
                 resource: Resource) -> None:
        self.registry, self.names, self.attributes, self.resource = registry, names, attributes, resource
        self.start = time.time_ns()

    def attach(self, reader: MetricReader) -> MetricReader:
        reader._set_collect_callback(self.collect)  # the SDK's reader hook: our registry is the only source
        return reader

    def _attrs(self, labels: dict[str, str]) -> dict[str, str]:
        return {self.attributes.get(k, k): v for k, v in labels.items() if v and k != "le"}

    def collect(self, reader: Any = None, timeout_millis: float = 10_000) -> MetricsData:
        now = time.time_ns()
        metrics: list[Metric] = []
        for family in self.registry.collect():
            name, unit = self.names.get(family.name, (family.name, ""))
            if family.type == "counter":
                points = [NumberDataPoint(self._attrs(s.labels), self.start, now, s.value)
                          for s in family.samples if s.name.endswith("_total")]
                data: Any = Sum(points, AggregationTemporality.CUMULATIVE, True)
            elif family.type == "gauge":
                data = Gauge([NumberDataPoint(self._attrs(s.labels), self.start, now, s.value) for s in family.samples])
            elif family.type == "histogram":
                data = Histogram(self._histogram(family, now), AggregationTemporality.CUMULATIVE)
            else:
                continue
            if data.data_points:
                metrics.append(Metric(name, family.documentation, unit, data))
        return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(SCOPE, metrics, "")], "")])

    def _histogram(self, family: Any, now: int) -> list[HistogramDataPoint]:
        series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for s in family.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            row = series.setdefault(key, {"buckets": [], "count": 0, "sum": 0.0})
            if s.name.endswith("_bucket"):
                row["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                row["count"] = int(s.value)
            elif s.name.endswith("_sum"):
                row["sum"] = s.value
        points = []
        for key, row in series.items():
            cumulative = sorted(row["buckets"])
            bounds = [le for le, _ in cumulative if le != float("inf")]
            counts, previous = [], 0.0
            for _, value in cumulative:
                counts.append(int(value - previous))
                previous = value
            points.append(HistogramDataPoint(self._attrs(dict(key)), self.start, now, row["count"], row["sum"],
                                             counts, bounds, None, None))  # type: ignore[arg-type]
        return points
