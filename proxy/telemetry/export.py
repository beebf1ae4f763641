"""Where telemetry goes: this process's OTel resource, the span and metric exporters, and their shutdown.

Contract:
- `resource()`: the SDK's resource (it reads `OTEL_RESOURCE_ATTRIBUTES` / `OTEL_SERVICE_NAME`) with
  `service.instance.id` = `<hostname>-<pid>`; `service.name` is `llm-gateway` unless one is set.
- `Exporters(config, metrics, span_exporter=None, metric_reader=None)` builds what is configured:
  - `tracer`: a `proxy.telemetry.tracing.Tracer` (ParentBased TraceIdRatio(`sample_rate`)) when
    `monitoring.tracing.enabled` and spans have somewhere to go: the given SDK exporter, or
    `monitoring.otel.endpoint` through `proxy.telemetry.otlp.fast_span_exporter`. One `BoundedSpanProcessor`
    exports them; its drops and export failures are counted in `metrics` (when metrics are on).
    None otherwise, and then nothing is traced.
  - `reader`: when metrics are on and a reader is given or an endpoint is configured, that reader
    (default: a `PeriodicExportingMetricReader` over the OTLP metric exporter) collecting from the
    Prometheus registry through `proxy.telemetry.otlp.PrometheusBridge`. None otherwise.
  - The resource is made only when something is exported; nothing global (no SDK provider) is set.
- `flush()` exports the queued spans now. `aclose()` runs once: it flushes and stops both in a
  daemon thread and waits at most `SHUTDOWN_WAIT` s, so a dead collector never holds up shutdown.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading

from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter

from config.models import Config
from proxy.telemetry import otlp
from proxy.telemetry.metrics import ATTRIBUTES, GatewayMetrics
from proxy.telemetry.tracing import BoundedSpanProcessor, Tracer

SHUTDOWN_WAIT = 3.0


def resource() -> Resource:
    base = Resource.create({"service.instance.id": f"{socket.gethostname()}-{os.getpid()}"})
    if str(base.attributes.get("service.name", "unknown_service")).startswith("unknown_service"):
        base = base.merge(Resource({"service.name": "llm-gateway"}))
    return base


class Exporters:
    def __init__(self, config: Config, metrics: GatewayMetrics | None, span_exporter: SpanExporter | None = None,
                 metric_reader: MetricReader | None = None) -> None:
        mon = config.monitoring
        self.tracer: Tracer | None = None
        self.processor: BoundedSpanProcessor | None = None
        self.reader: MetricReader | None = None
        self.closed = False
        # Set whenever a branch below can run (`res is not None` there only tells the type checker so)
        res = resource() if (mon.otel.endpoint or span_exporter or metric_reader) else None
        if mon.tracing.enabled and res is not None and (span_exporter is not None or mon.otel.endpoint):
            m = metrics
            self.processor = BoundedSpanProcessor(
                span_exporter if span_exporter is not None else otlp.fast_span_exporter(mon.otel, res),
                res,
                on_drop=(lambda n: m.spans_dropped.inc(n)) if m else (lambda n: None),
                on_fail=(lambda n: m.export_failures.inc(n)) if m else (lambda n: None))
            self.tracer = Tracer(mon.tracing.sample_rate, self.processor)
        if metrics is not None and res is not None and (metric_reader is not None or mon.otel.endpoint):
            bridge = otlp.PrometheusBridge(metrics.registry, metrics.otel, ATTRIBUTES, res)
            reader = metric_reader if metric_reader is not None else \
                PeriodicExportingMetricReader(otlp.metric_exporter(mon.otel))
            self.reader = bridge.attach(reader)

    def flush(self) -> None:
        if self.processor is not None:
            self.processor.flush()

    def _shutdown(self) -> None:
        if self.processor is not None:
            self.processor.shutdown()
        if self.reader is not None:
            self.reader.shutdown()

    async def aclose(self) -> None:
        """Flush and stop the exporters; a dead collector delays shutdown by at most `SHUTDOWN_WAIT` s."""
        if self.closed:
            return
        self.closed = True
        if self.processor is None and self.reader is None:
            return
        worker = threading.Thread(target=self._shutdown, name="llm-gateway-telemetry-shutdown", daemon=True)
        worker.start()
        await asyncio.to_thread(worker.join, SHUTDOWN_WAIT)
