"""Fences on the OpenTelemetry SDK internals proxy/telemetry/otlp.py relies on, with the installed versions.

The gateway's span export feeds its own OTLP bytes to the SDK's exporters through private names
(see the otlp module's contract). An SDK release that renames one does not break export: the slower
public path takes over and `otel_fast_path_unavailable` is logged once. These tests make such an
upgrade fail here instead: each checks, against a real collector stand-in on 127.0.0.1, that the
fast path is the one actually taken (HTTP through the SDK's client and urllib3 transport, gRPC
through the bytes stub, also after a reconnection, metrics through the reader's collect hook), and
that a missing internal falls back, still exports, and warns exactly once.
"""
from __future__ import annotations

import threading
import tomllib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind
from packaging.requirements import Requirement
from prometheus_client import CollectorRegistry, Counter

from config.models import OtelSettings
from proxy.telemetry import otlp
from proxy.telemetry.export import resource
from proxy.telemetry.spanwire import SpanEncoder
from tests.conftest import span_record

pytestmark = pytest.mark.e2e  # real collectors on 127.0.0.1 (HTTP and gRPC)
RECORDS = [span_record("POST openai chat", {"gateway.request_id": "gw-1"}, static={"http.request.method": "POST"}),
           span_record("chat gpt-4o-mini", {"gen_ai.usage.input_tokens": 19}, kind=SpanKind.CLIENT, span_id=7,
                       parent_id=0x00F067AA0BA902B7, static={"gen_ai.provider.name": "openai"})]


class Warnings:
    """Stands in for the module's logger: what `otel_fast_path_unavailable` said, and how often."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})

    def paths(self) -> list[str]:
        return [e["path"] for e in self.events if e["event"] == "otel_fast_path_unavailable"]


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> Warnings:
    seen = Warnings()
    monkeypatch.setattr(otlp, "log", seen)
    monkeypatch.setattr(otlp, "_warned", set())  # "once" is per process; each test starts afresh
    return seen


@pytest.fixture
def http_collector() -> Iterator[dict[str, Any]]:
    state: dict[str, Any] = {"bodies": [], "headers": []}

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            state["headers"].append({k.lower(): v for k, v in self.headers.items()})
            state["bodies"].append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()


@pytest.fixture
def grpc_collector() -> Iterator[dict[str, Any]]:
    """A TraceService that keeps each request as the bytes that arrived (no protobuf parsing)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    state: dict[str, Any] = {"bodies": []}

    def export(request: bytes, context: Any) -> ExportTraceServiceResponse:
        state["bodies"].append(request)
        return ExportTraceServiceResponse()

    respond = ExportTraceServiceResponse.SerializeToString
    handler = grpc.method_handlers_generic_handler("opentelemetry.proto.collector.trace.v1.TraceService", {
        "Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=None, response_serializer=respond)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    state["endpoint"] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield state
    server.stop(0)


def expected_bytes() -> bytes:
    encoder = SpanEncoder(resource(), otlp.SCOPE)
    return encoder.request(encoder.spans(RECORDS))


def test_installed_versions_are_inside_the_pinned_range() -> None:
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    pins = {r.name: r for r in map(Requirement, pyproject["project"]["dependencies"])}
    for name in ("opentelemetry-sdk", "opentelemetry-exporter-otlp"):
        spec = pins[name].specifier
        assert any(s.operator == "<" for s in spec), f"{name}: a private path needs an upper bound"
        assert spec.contains(version(name)), (name, version(name), str(spec))


def test_http_posts_the_encoders_bytes_through_the_sdk_client_over_urllib3(
        http_collector: dict[str, Any], fallbacks: Warnings, monkeypatch: pytest.MonkeyPatch) -> None:
    import opentelemetry.exporter.otlp.proto.http.trace_exporter as sdk_http

    def sdk_encoder(*args: Any) -> Any:
        raise AssertionError("the SDK's own encoder ran: the fast path is off")

    monkeypatch.setattr(sdk_http, "encode_spans", sdk_encoder)
    exporter = otlp.fast_span_exporter(OtelSettings(endpoint=http_collector["url"], protocol="http/protobuf"),
                                       resource())
    try:
        assert type(exporter._client._transport).__name__ == "Urllib3HTTPTransport"
        assert exporter.export(exporter.encode_records(RECORDS)) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert http_collector["bodies"] == [expected_bytes()]
    assert http_collector["headers"][0]["content-type"] == "application/x-protobuf"
    assert fallbacks.paths() == []


def test_http_through_requests_takes_the_sdks_certificate_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallbacks: Warnings) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "bundle.pem"))
    for own, expected in ((None, "bundle.pem"), ("otel.pem", "otel.pem")):
        if own:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(tmp_path / own))
        exporter = otlp.fast_span_exporter(OtelSettings(endpoint="https://collector.example:4318",
                                                        protocol="http/protobuf"), resource())
        session = exporter._client._transport._session  # handed in through the public `session=` keyword
        assert session.verify == str(tmp_path / expected) and session.trust_env is False
        exporter.shutdown()
    assert fallbacks.paths() == []


def test_grpc_sends_the_encoders_bytes_as_they_are_also_after_a_reconnection(
        grpc_collector: dict[str, Any], fallbacks: Warnings) -> None:
    exporter = otlp.fast_span_exporter(OtelSettings(endpoint=grpc_collector["endpoint"], protocol="grpc"), resource())
    try:
        assert exporter._stub is otlp._BytesTraceStub and type(exporter._client) is otlp._BytesTraceStub
        assert exporter.export(exporter.encode_records(RECORDS)) is SpanExportResult.SUCCESS
        exporter._channel.close()
        exporter._initialize_channel_and_stub()  # what the SDK does on UNAVAILABLE
        assert type(exporter._client) is otlp._BytesTraceStub
        assert exporter.export(exporter.encode_records(RECORDS)) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert grpc_collector["bodies"] == [expected_bytes()] * 2
    assert fallbacks.paths() == []


def bridge() -> otlp.PrometheusBridge:
    registry = CollectorRegistry()
    Counter("llm_gateway_fence", "a fence counter", registry=registry).inc(3)
    return otlp.PrometheusBridge(registry, {}, {}, resource())


def test_the_metrics_bridge_is_the_readers_source(fallbacks: Warnings) -> None:
    reader = bridge().attach(InMemoryMetricReader())
    data = reader.get_metrics_data()
    points = {m.name: m.data.data_points[0].value for rm in data.resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics}
    assert points == {"llm_gateway_fence": 3.0}
    assert fallbacks.paths() == []


def test_a_missing_internal_falls_back_exports_and_warns_once(
        http_collector: dict[str, Any], grpc_collector: dict[str, Any], fallbacks: Warnings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.common.http import _OTLPHTTPClient
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    with monkeypatch.context() as patch:
        patch.delattr(_OTLPHTTPClient, "export")  # an SDK whose HTTP client is shaped otherwise
        for _ in range(2):
            exporter = otlp.fast_span_exporter(OtelSettings(endpoint=http_collector["url"],
                                                            protocol="http/protobuf"), resource())
            assert type(exporter) is OTLPSpanExporter and not hasattr(exporter, "encode_records")  # the SDK's own
            exporter.shutdown()

    class OlderGrpc(GrpcExporter):  # the shape before the SDK's reconnection hook: no stub to swap
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._initialize_channel_and_stub = None

    monkeypatch.setattr(otlp, "_span_class", lambda otel: OlderGrpc)
    for _ in range(2):
        exporter = otlp.fast_span_exporter(OtelSettings(endpoint=grpc_collector["endpoint"], protocol="grpc"),
                                           resource())
        assert type(exporter._client) is not otlp._BytesTraceStub
        assert exporter.export(exporter.encode_records(RECORDS)) is SpanExportResult.SUCCESS  # parsed, then sent
        exporter.shutdown()
    assert len(grpc_collector["bodies"]) == 2
    monkeypatch.delattr(MetricReader, "_set_collect_callback")
    for _ in range(2):
        bridge().attach(InMemoryMetricReader())
    assert fallbacks.paths() == ["span encoder", "grpc bytes stub", "metrics bridge"]  # each once
    assert all(e["opentelemetry"] == version("opentelemetry-exporter-otlp-proto-common") for e in fallbacks.events)
