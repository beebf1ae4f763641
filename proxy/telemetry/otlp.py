"""OTLP plumbing: exporters from `monitoring.otel`, and the Prometheus-to-OTLP metrics bridge.

Contract:
- `span_exporter(otel)` / `metric_exporter(otel)`: `grpc` takes `host:port` (plaintext unless
  `https://` is given or `OTEL_EXPORTER_OTLP_INSECURE` says otherwise); `http/protobuf` takes a URL
  and gets `/v1/traces` or `/v1/metrics` appended. Everything else (headers, timeout, compression,
  certificates) comes from the standard `OTEL_EXPORTER_OTLP_*` variables, read by the SDK itself.
- `fast_span_exporter(otel, resource)`: the SDK's OTLP span exporter (transport, retries, settings)
  fed with spans it encoded itself from span records (`encode_records`, `proxy.telemetry.spanwire.SpanEncoder`);
  over gRPC through a stub that sends those bytes as they are (`_BytesTraceStub`, also after the
  SDK reconnects). Over http/protobuf the proxies, CA bundle and netrc credentials the `requests`
  transport would look up on every POST are resolved once, and the session is handed in through
  the exporter's `session=` argument; a plain `http://` collector that needs none of them gets the
  SDK's urllib3 transport instead (no credential provider configured in either case).
- Private SDK names this relies on, present in the versions pyproject.toml pins (1.45.x) and
  checked by tests/test_otlp_fences.py: the HTTP exporter's `_client.export(bytes)` and `_transport=`
  keyword (`opentelemetry.exporter.http.transport._urllib3`); the gRPC exporter's `_translate_data`,
  `_stub`, `_client`, `_channel` and `_initialize_channel_and_stub`; `MetricReader._set_collect_callback`.
  Where one is missing the slower public path is taken (or, for the metrics bridge, OTLP metrics
  are off) and `otel_fast_path_unavailable` is logged once per path with the installed version.
- `PrometheusBridge`: turns the Prometheus registry into OTLP `MetricsData` (cumulative), so each
  metric is recorded once and pushed by a standard `PeriodicExportingMetricReader`
  (`OTEL_METRIC_EXPORT_INTERVAL` honoured) with this process's `service.instance.id`.
"""
from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric,
                                              MetricReader, MetricsData, NumberDataPoint, ResourceMetrics,
                                              ScopeMetrics, Sum)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from config.models import OtelSettings
from proxy.telemetry.spanwire import SpanEncoder
from proxy.telemetry.tracing import SCOPE  # one instrumentation scope for spans and metrics

if TYPE_CHECKING:  # annotations only: the exporters are imported when used (the gRPC one loads grpc)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

log = structlog.get_logger("llm_gateway.telemetry")
_warned: set[str] = set()


def _fallback(path: str, cost: str) -> None:
    """Say once per process that a fast path is off: an SDK upgrade must not slow export down unseen."""
    if path in _warned:
        return
    _warned.add(path)
    try:
        installed = version("opentelemetry-exporter-otlp-proto-common")
    except PackageNotFoundError:
        installed = "unknown"
    log.warning("otel_fast_path_unavailable", path=path, cost=cost, opentelemetry=installed,
                detail="the installed OpenTelemetry SDK lacks an internal this path uses; see pyproject.toml")


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


def _span_class(otel: OtelSettings) -> type[GrpcSpanExporter] | type[HttpSpanExporter]:
    if otel.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
        return GrpcSpanExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
    return HttpSpanExporter


def span_exporter(otel: OtelSettings) -> SpanExporter:
    return _span_class(otel)(endpoint=_url(otel, "traces"))


def metric_exporter(otel: OtelSettings) -> Any:
    if otel.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
        return GrpcMetricExporter(endpoint=_url(otel, "metrics"))
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
    return HttpMetricExporter(endpoint=_url(otel, "metrics"))


class PrometheusBridge:
    """Reads a prometheus_client registry and answers a MetricReader's collect with OTLP data."""

    def __init__(self, registry: Any, names: dict[str, tuple[str, str]], attributes: dict[str, str],
                 resource: Resource) -> None:
        self.registry, self.names, self.attributes, self.resource = registry, names, attributes, resource
        self.start = time.time_ns()

    def attach(self, reader: MetricReader) -> MetricReader:
        hook = getattr(reader, "_set_collect_callback", None)  # the SDK's reader hook: our registry is the only source
        if not callable(hook):
            _fallback("metrics bridge", "no OTLP metrics (Prometheus /metrics still served)")
            reader.shutdown()  # nothing to collect: stop its export thread
            return reader
        hook(self.collect)
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
                                             counts, bounds, None, None))  # type: ignore[arg-type]  # min/max None: unset (not in Prometheus)
        return points


def _http_exporter(cls: Any, url: str) -> Any:
    """The http/protobuf span exporter with the environment's HTTP settings for `url` read once.

    The SDK's requests transport looks up proxies (`*_PROXY`, `NO_PROXY`), the CA bundle
    (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`) and `~/.netrc` on each POST (about a third of the export
    thread's CPU per batch). Resolved here instead, into a session handed to the exporter, with the
    SDK's own certificate settings (`OTEL_EXPORTER_OTLP_*CERTIFICATE`) still first. Over plain http
    with none of them, the SDK's urllib3 transport: measured 0.35 against 0.65 us a span (requests)."""
    if any(os.environ.get(f"OTEL_PYTHON_EXPORTER_OTLP_HTTP{s}_CREDENTIAL_PROVIDER") for s in ("", "_TRACES")):
        return cls(endpoint=url)  # the provider's session may sign requests or mount adapters: the SDK's way
    import requests
    from requests.utils import get_netrc_auth

    session = requests.Session()
    settings = session.merge_environment_settings(url, {}, None, True, None)
    auth = get_netrc_auth(url)
    if url.startswith("http://") and not auth and not any(settings["proxies"].values()):
        try:
            from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport

            lean = cls(endpoint=url, _transport=Urllib3HTTPTransport())
            session.close()
            return lean
        except Exception:  # noqa: BLE001 - an SDK without that transport or keyword: requests it is
            pass
        _fallback("http urllib3 transport", "~0.3 us a span (requests instead)")
    session.proxies, session.trust_env = settings["proxies"], False
    if auth:
        session.auth = auth
    own = any(os.environ.get(f"OTEL_EXPORTER_OTLP{s}_CERTIFICATE") for s in ("", "_TRACES"))
    bundle = settings["verify"] if isinstance(settings["verify"], str) and not own else None
    return cls(endpoint=url, session=session, certificate_file=bundle)


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
    takes what it returns. On an SDK whose internals differ, the SDK's own exporter (and encoder,
    ~30 us a span) is returned instead, and that is logged once."""
    base: Any = _span_class(otel)
    encoder = SpanEncoder(resource, SCOPE)
    url = _url(otel, "traces")
    over_grpc = otel.protocol == "grpc"

    class FastExporter(base):
        encode_records = staticmethod(encoder.spans)  # span records -> encoded spans, which `export` takes
        closed = False

        def _translate_data(self, data: Any) -> Any:  # gRPC: the SDK's `export` (retries, reconnects) asks here
            if self._stub is _BytesTraceStub:
                return encoder.request(data)
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            return ExportTraceServiceRequest.FromString(encoder.request(data))  # the SDK's stub serializes it again

        if not over_grpc:
            def export(self, spans: Any) -> SpanExportResult:  # the SDK's retrying HTTP client, given our bytes
                if self.closed:
                    return SpanExportResult.FAILURE
                return SpanExportResult.SUCCESS if self._client.export(encoder.request(spans)).success \
                    else SpanExportResult.FAILURE

            def shutdown(self) -> None:
                self.closed = True
                super().shutdown()

    if over_grpc:
        exporter = FastExporter(endpoint=url)
        usable = callable(getattr(exporter, "_export", None)) and callable(getattr(base, "_translate_data", None))
        if usable and callable(getattr(exporter, "_initialize_channel_and_stub", None)) \
                and getattr(exporter, "_stub", None) is not None and getattr(exporter, "_channel", None) is not None:
            exporter._stub = _BytesTraceStub  # the SDK's reconnection makes its client from `_stub` too
            exporter._client = _BytesTraceStub(exporter._channel)
        elif usable:
            _fallback("grpc bytes stub", "~0.8 us a span (each batch parsed into protobuf objects again)")
    else:
        exporter = _http_exporter(FastExporter, url)
        usable = callable(getattr(getattr(exporter, "_client", None), "export", None))
    if usable:
        return exporter
    exporter.shutdown()
    _fallback("span encoder", "~30 us a span (the SDK's own encoder)")
    return base(endpoint=url)
