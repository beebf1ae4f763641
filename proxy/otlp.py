"""OTLP plumbing: exporters from `monitoring.otel`, and the Prometheus-to-OTLP metrics bridge.

Contract:
- `span_exporter(otel)` / `metric_exporter(otel)`: `grpc` takes `host:port` (plaintext unless
  `https://` is given or `OTEL_EXPORTER_OTLP_INSECURE` says otherwise); `http/protobuf` takes a URL
  and gets `/v1/traces` or `/v1/metrics` appended. Everything else (headers, timeout, compression,
  certificates) comes from the standard `OTEL_EXPORTER_OTLP_*` variables, read by the SDK itself.
- `PrometheusBridge`: turns the Prometheus registry into OTLP `MetricsData` (cumulative), so each
  metric is recorded once and pushed by a standard `PeriodicExportingMetricReader`
  (`OTEL_METRIC_EXPORT_INTERVAL` honoured) with this process's `service.instance.id`.
"""
from __future__ import annotations

import struct
import time
from typing import Any

from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric,
                                              MetricReader, MetricsData, NumberDataPoint, ResourceMetrics,
                                              ScopeMetrics, Sum)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

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


# --- fast span encoding ----------------------------------------------------------------------------
# The SDK's encoder builds one protobuf object per attribute (~35 us a span here): more than the rest of
# the gateway's telemetry together. This writes the same OTLP wire bytes straight from the span records,
# reusing the bytes of attribute pairs that repeat (method, provider, model, deployment, status, ...).
_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_UNIQUE = frozenset({"gateway.request_id", "url.path", "gateway.overhead_ms", "gen_ai.response.time_to_first_chunk"})
_CACHE_LIMIT = 8192
_pack_q, _pack_i, _pack_d = struct.Struct("<Q").pack, struct.Struct("<I").pack, struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (tag already encoded)."""
    return tag + _varint(len(payload)) + payload


def _any(value: Any) -> bytes:
    """An AnyValue message."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, str):
        return _ld(b"\x0a", value.encode())
    if isinstance(value, bytes):
        return _ld(b"\x3a", value)
    if isinstance(value, (tuple, list)):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any(v)) for v in value))
    return _ld(b"\x0a", str(value).encode())


def _key_values(tag: bytes, attributes: Any) -> bytes:
    return b"".join(_ld(tag, _ld(b"\x0a", str(k).encode()) + _ld(b"\x12", _any(v))) for k, v in attributes.items())


class SpanEncoder:
    """Span records -> an OTLP `ExportTraceServiceRequest`, as bytes."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        head = _ld(b"\x0a", scope.name.encode()) + (_ld(b"\x12", scope.version.encode()) if scope.version else b"")
        self.scope = _ld(b"\x0a", head)
        self.resource = _ld(b"\x0a", _key_values(b"\x0a", resource.attributes))
        self.cache: dict[str, dict[Any, bytes]] = {}

    def _attribute(self, key: str, value: Any) -> bytes:
        kind = type(value)
        if (kind is str or kind is int) and key not in _UNIQUE:  # bool is not int here: True == 1
            values = self.cache.get(key)
            if values is None:
                if len(self.cache) >= _CACHE_LIMIT:
                    self.cache.clear()
                values = self.cache[key] = {}
            found = values.get(value)
            if found is None:
                if len(values) >= _CACHE_LIMIT:
                    values.clear()
                found = values[value] = _ld(b"\x4a", _ld(b"\x0a", key.encode()) + _ld(b"\x12", _any(value)))
            return found
        return _ld(b"\x4a", _ld(b"\x0a", key.encode()) + _ld(b"\x12", _any(value)))  # Span.attributes = 9

    def span(self, r: Any) -> bytes:
        parts = [b"\x0a\x10" + r.trace_id.to_bytes(16, "big"), b"\x12\x08" + r.span_id.to_bytes(8, "big")]
        if r.trace_state:
            parts.append(_ld(b"\x1a", r.trace_state.encode()))
        if r.parent_id:
            parts.append(b"\x22\x08" + r.parent_id.to_bytes(8, "big"))
        parts.append(_ld(b"\x2a", r.name.encode()))
        parts.append(b"\x30" + bytes((_KIND[r.kind],)))
        parts.append(b"\x39" + _pack_q(r.start) + b"\x41" + _pack_q(r.end_time))
        attribute = self._attribute
        for k, v in r.attributes.items():
            parts.append(attribute(k, v))
        for name, attrs, ts in r.events or ():  # Span.events = 11: time 1 (fixed64), name 2, attributes 3
            parts.append(_ld(b"\x5a", b"\x09" + _pack_q(ts) + _ld(b"\x12", name.encode()) + _key_values(b"\x1a", attrs)))
        if r.error is not None:  # Status = 15: message 2, code 3 (2 = ERROR)
            parts.append(_ld(b"\x7a", _ld(b"\x12", r.error.encode()) + b"\x18\x02"))
        else:
            parts.append(b"\x7a\x00")
        parts.append(b"\x85\x01" + _pack_i(0x300 if r.remote else 0x100))  # flags = 16: has/is remote parent
        return b"".join(parts)

    def request(self, records: list[Any]) -> bytes:
        spans = b"".join(_ld(b"\x12", self.span(r)) for r in records)
        resource_spans = self.resource + _ld(b"\x12", self.scope + spans)
        return _ld(b"\x0a", resource_spans)


def fast_span_exporter(otel: OtelSettings, resource: Resource) -> SpanExporter:
    """The SDK's OTLP exporter (transport, retries, env settings), fed by `SpanEncoder`.

    Its `export` takes span records (`takes_records`); on an SDK whose internals differ it falls back
    to the SDK's own encoder through `readable`."""
    base = type(span_exporter(otel))
    encoder = SpanEncoder(resource, SCOPE)

    class FastExporter(base):  # type: ignore[valid-type, misc]
        takes_records = True
        readable: Any = None  # set by the span processor: record -> ReadableSpan

        def _translate_data(self, data: Any) -> Any:  # gRPC: the stub serializes the request again (in C)
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            return ExportTraceServiceRequest.FromString(encoder.request(data))

        def export(self, records: Any) -> SpanExportResult:
            if otel.protocol == "grpc":
                return self._export(records)
            client = getattr(self, "_client", None)
            if client is None or not hasattr(client, "export") or getattr(self, "_shutdown", False):
                return super().export([self.readable(r) for r in records])
            return SpanExportResult.SUCCESS if client.export(encoder.request(records)).success \
                else SpanExportResult.FAILURE

    exporter = FastExporter(endpoint=_url(otel, "traces"))
    return exporter
