"""OTLP plumbing: exporters from `monitoring.otel`, and the Prometheus-to-OTLP metrics bridge.

Contract:
- `span_exporter(otel)` / `metric_exporter(otel)`: `grpc` takes `host:port` (plaintext unless
  `https://` is given or `OTEL_EXPORTER_OTLP_INSECURE` says otherwise); `http/protobuf` takes a URL
  and gets `/v1/traces` or `/v1/metrics` appended. Everything else (headers, timeout, compression,
  certificates) comes from the standard `OTEL_EXPORTER_OTLP_*` variables, read by the SDK itself.
- `fast_span_exporter(otel, resource)`: the SDK's OTLP span exporter (transport, retries, settings)
  fed with spans it encoded itself from span records (`encode_records`, `proxy.telemetry.spanwire.SpanEncoder`);
  over gRPC through a stub that sends those bytes as they are (`_BytesTraceStub`, also after the
  SDK reconnects). On an SDK whose internals differ, the SDK's own exporter and encoder.
- `settle_environment(exporter, url)`: over http/protobuf the exporter's `requests` session gets
  its proxies, CA bundle and netrc credentials from the environment once, at start, instead of
  on every POST (where that look-up was ~30% of a batch's HTTP cost). Then, for a plain `http://`
  collector that needs none of them, the span exporter posts through the SDK's urllib3 transport.
- `PrometheusBridge`: turns the Prometheus registry into OTLP `MetricsData` (cumulative), so each
  metric is recorded once and pushed by a standard `PeriodicExportingMetricReader`
  (`OTEL_METRIC_EXPORT_INTERVAL` honoured) with this process's `service.instance.id`.
"""
from __future__ import annotations

import os
import time
from typing import Any

from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric,
                                              MetricReader, MetricsData, NumberDataPoint, ResourceMetrics,
                                              ScopeMetrics, Sum)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from config.models import OtelSettings
from proxy.telemetry.spanwire import SpanEncoder
from proxy.telemetry.tracing import SCOPE  # one instrumentation scope for spans and metrics


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


def settle_environment(exporter: Any, url: str) -> None:
    """Read the environment's HTTP settings for `url` once, not on every POST.

    The SDK's HTTP exporters post through a `requests.Session`, which by default looks up proxies
    (`*_PROXY`, `NO_PROXY`), the CA bundle (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`) and `~/.netrc`
    on each request: a scan of the whole environment twice per POST, about a third of the exporter
    thread's CPU per batch. They are resolved here for the exporter's one URL, with the session's
    own settings winning as before, and the session stops asking. A session of another shape
    (another SDK transport) is left alone."""
    session = getattr(getattr(getattr(exporter, "_client", None), "_transport", None), "_session", None)
    if session is None or not getattr(session, "trust_env", False):
        return
    try:
        from requests.utils import get_netrc_auth

        settings = session.merge_environment_settings(url, {}, None, session.verify, None)
        auth = get_netrc_auth(url) if session.auth is None else None
        session.proxies, session.verify = settings["proxies"], settings["verify"]
        if auth:
            session.auth = auth
        session.trust_env = False
    except Exception:  # noqa: BLE001 - the per-request lookups still work
        return


def _lean(exporter: Any, cls: Any, url: str) -> Any:
    """Over plain http, with no proxy, netrc credentials or session from the environment for this URL,
    the SDK's urllib3 transport instead of its requests one: a batch's POST costs ~40% less CPU
    (measured: 0.46 -> 0.28 us a span), for the same retries and settings. Anything else keeps requests."""
    session = getattr(getattr(getattr(exporter, "_client", None), "_transport", None), "_session", None)
    if (session is None or not url.startswith("http://") or session.trust_env or session.auth is not None
            or session.cert is not None or any(session.proxies.values())
            or any(os.environ.get(f"OTEL_PYTHON_EXPORTER_OTLP_HTTP{s}_CREDENTIAL_PROVIDER") for s in ("", "_TRACES"))):
        return exporter  # a credential provider's session (entry point) may sign or mount adapters
    try:
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport

        lean = cls(endpoint=url, _transport=Urllib3HTTPTransport())
    except Exception:  # noqa: BLE001 - an SDK without that transport or keyword: requests it is
        return exporter
    exporter.shutdown()
    return lean


_TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _BytesTraceStub:
    """The SDK's `TraceServiceStub` with the request as bytes: the encoder's output is already the
    message, and parsing it into protobuf objects for the stub to serialize again cost the gRPC
    exporter ~5 us of CPU a request (two spans). Made by the SDK on each (re)connection."""

    def __init__(self, channel: Any) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        self.Export = channel.unary_unary(_TRACE_EXPORT, request_serializer=None,
                                          response_deserializer=ExportTraceServiceResponse.FromString)


def fast_span_exporter(otel: OtelSettings, resource: Resource) -> SpanExporter:
    """The SDK's OTLP exporter (transport, retries, env settings), fed by `SpanEncoder`.

    `encode_records(records)` encodes span records (where the processor prepares them) and `export`
    takes what it returns. On an SDK whose internals differ, the SDK's own exporter (and encoder) is returned
    instead."""
    base = type(span_exporter(otel))
    encoder = SpanEncoder(resource, SCOPE)

    class FastExporter(base):  # type: ignore[valid-type, misc]
        encode_records = staticmethod(encoder.spans)  # span records -> encoded spans, which `export` takes

        def _translate_data(self, data: Any) -> Any:  # gRPC
            if self._stub is _BytesTraceStub:
                return encoder.request(data)
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            return ExportTraceServiceRequest.FromString(encoder.request(data))  # the SDK's stub serializes it again

        def export(self, spans: Any) -> SpanExportResult:
            if otel.protocol == "grpc":
                return self._export(spans)  # the SDK's retries and checks, with `_translate_data` above
            if getattr(self, "_shutdown", False):
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS if self._client.export(encoder.request(spans)).success \
                else SpanExportResult.FAILURE

    exporter = FastExporter(endpoint=_url(otel, "traces"))
    if otel.protocol == "grpc" and callable(getattr(exporter, "_initialize_channel_and_stub", None)) \
            and getattr(exporter, "_stub", None) is not None:
        exporter._stub = _BytesTraceStub  # the SDK's reconnection makes its client from `_stub` too
        exporter._client = _BytesTraceStub(exporter._channel)
    if otel.protocol != "grpc":
        settle_environment(exporter, _url(otel, "traces"))
        exporter = _lean(exporter, FastExporter, _url(otel, "traces"))
    internals = getattr(exporter, "_export", None) if otel.protocol == "grpc" else \
        getattr(getattr(exporter, "_client", None), "export", None)
    if callable(internals):
        return exporter
    exporter.shutdown()
    return base(endpoint=_url(otel, "traces"))
