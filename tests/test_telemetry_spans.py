"""The cheap span and metric paths, in process: shared span shapes, the wire encoder, metric routes.

- The observer's hooks, driven directly with a request context: spans carry exactly the documented
  names and attributes; spans of the same shape share one attribute dict (never mutated), a span's
  own values win over it, and the cache of shapes stays bounded.
- `proxy.telemetry.spanwire.SpanEncoder` writes the bytes the SDK's encoder writes, for records with shared
  dicts, long and non-ASCII strings, floats, negative and large ints, bools next to ints under one
  key (True == 1 must not share a cache entry), tuples, events, errors and trace state.
- `GatewayMetrics.route` resolves a (deployment, model, operation) once; a series exists only once used.
"""
from __future__ import annotations

from typing import Any

import pytest
import requests
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from config import parse_config
from config.models import OtelSettings
from proxy.telemetry import span_shapes
from proxy.context import Principal, RequestContext
from proxy.telemetry.observability import GatewayObserver
from proxy.telemetry.otlp import SCOPE, fast_span_exporter
from proxy.telemetry.spanwire import SpanEncoder
from proxy.telemetry.export import resource
from proxy.telemetry.tracing import BoundedSpanProcessor, SpanStart
from tests.conftest import span_record

CONFIG = """
auth:
  keys:
    - {id: team-a, sha256: "%s"}
providers:
  openai-good: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-x, models: [gpt-4o-mini]}
monitoring:
  metrics: {enabled: true, prefix: llm_gateway}
  tracing: {enabled: true, sample_rate: 1.0}
""" % ("0" * 64)


CFG = parse_config(CONFIG, "t.yaml", {})
DEP = CFG.providers[0]


def observer() -> tuple[GatewayObserver, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return GatewayObserver(CFG, span_exporter=exporter), exporter


def request(obs: GatewayObserver, *, status: int = 200, request_id: str = "gw-1", tokens: bool = True,
            traceparent: str | None = None) -> RequestContext:
    """One request with one attempt, through every hook the middlewares and the forwarder call."""
    headers = [(b"traceparent", traceparent.encode())] if traceparent else []
    ctx = RequestContext(request_id=request_id, family="openai", adapter=None, method="POST",  # type: ignore[arg-type]
                         path="/v1/chat/completions", query="", headers=headers)
    ctx.principal, ctx.model, ctx.operation = Principal("team-a"), "gpt-4o-mini", "chat"
    ctx.deployment, ctx.candidates = DEP, [DEP]
    handle = obs.request_start(ctx, {})
    upstream_headers = [("traceparent", traceparent)] if traceparent else []
    attempt = obs.attempt_start(ctx, DEP, "http://x", upstream_headers)
    assert [v for k, v in upstream_headers if k == "traceparent"] == [SpanStart._make(handle).traceparent(attempt[1])]
    ctx.attempts, ctx.committed, ctx.status = 1, True, status
    ctx.tried.append(DEP.name)
    if tokens:  # what the tap read from the answer
        ctx.usage.input_tokens, ctx.usage.output_tokens = 19, 8
        ctx.usage.response_model, ctx.usage.finish_reasons = "gpt-4o-mini-2024-07-18", ("stop",)
    obs.attempt_end(ctx, DEP, attempt, status, None if status < 400 else "upstream_error")
    obs.request_end(ctx, handle, status, "ok" if status < 400 else "upstream_error")
    return ctx


def test_spans_keep_their_names_and_share_their_shape() -> None:
    obs, exporter = observer()
    first, second = request(obs, request_id="gw-1"), request(obs, request_id="gw-2")
    obs.flush()
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(servers) == len(clients) == 2
    assert {s.name for s in servers} == {"POST openai chat"} and {s.name for s in clients} == {"chat gpt-4o-mini"}
    assert dict(servers[0].attributes) == {
        "http.request.method": "POST", "url.path": "/v1/chat/completions", "http.response.status_code": 200,
        "gateway.attempts": 1, "gen_ai.request.model": "gpt-4o-mini", "gateway.key_id": "team-a",
        "gateway.request_id": "gw-1", "gateway.overhead_ms": servers[0].attributes["gateway.overhead_ms"]}
    assert servers[1].attributes["gateway.request_id"] == "gw-2"
    assert dict(clients[0].attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.provider.name": "openai",
        "gateway.deployment": "openai-good", "server.address": "127.0.0.1", "server.port": 9,
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18", "gateway.attempt": 1, "http.response.status_code": 200,
        "gen_ai.response.finish_reasons": ("stop",), "gen_ai.usage.input_tokens": 19, "gen_ai.usage.output_tokens": 8}
    a, b = SpanStart._make(first.trace), SpanStart._make(second.trace)
    assert a.trace_hex == first.trace_id != second.trace_id == b.trace_hex
    (shape,) = obs.shapes.servers.values()  # both requests ended alike: one shared name and dict
    assert shape[0] == "POST openai chat" and shape[1]["http.response.status_code"] == 200
    (kind,) = obs.shapes.attempts.values()  # both attempts ended alike: one final shape, shared
    final = (200, 1, "", "gpt-4o-mini-2024-07-18", ("stop",))
    assert list(kind[3]) == [final] and kind[3][final]["gateway.attempt"] == 1


def test_an_unsampled_request_propagates_its_trace_and_records_no_span() -> None:
    """sample_rate 0: the upstream still gets a traceparent (flag 00, checked in `request`) and the log a
    trace id, but no span is made or queued; metrics count the request as always."""
    exporter = InMemorySpanExporter()
    obs = GatewayObserver(parse_config(CONFIG.replace("sample_rate: 1.0", "sample_rate: 0.0"), "t.yaml", {}),
                          span_exporter=exporter)
    ctx = request(obs)
    obs.flush()
    assert ctx.trace is not None and not SpanStart._make(ctx.trace).sampled and len(ctx.trace_id or "") == 32
    assert exporter.get_finished_spans() == () and not obs.exporters.processor.queue  # type: ignore[union-attr]
    assert 'status="200"} 1.0' in obs.render_metrics().decode()  # type: ignore[union-attr]


def test_a_request_counts_under_the_deployment_it_ends_on() -> None:
    """request_end reuses the last attempt's metrics series only when the request ended on that
    attempt's deployment (a failover may pick a next one that is never called)."""
    cfg = parse_config(CONFIG.replace("providers:\n", "providers:\n  openai-next: {type: openai, base_url: "
                                                     "\"http://127.0.0.1:8/v1\", api_key: sk-y, models: [gpt-4o-mini]}\n"),
                       "t.yaml", {})
    first, nxt = (next(d for d in cfg.providers if d.name == name) for name in ("openai-good", "openai-next"))
    obs = GatewayObserver(cfg, span_exporter=InMemorySpanExporter())
    ctx = RequestContext(request_id="gw-1", family="openai", adapter=None, method="POST",  # type: ignore[arg-type]
                         path="/v1/chat/completions", query="", headers=[])
    ctx.principal, ctx.model, ctx.operation, ctx.deployment = Principal("team-a"), "gpt-4o-mini", "chat", first
    handle = obs.request_start(ctx, {})
    attempt = obs.attempt_start(ctx, first, "http://x", [])
    ctx.attempts, ctx.status = 1, 503
    obs.attempt_end(ctx, first, attempt, 503, "upstream_error")
    ctx.deployment = nxt  # chosen for a retry that never ran
    obs.request_end(ctx, handle, 503, "upstream_error")
    text = obs.render_metrics().decode()  # type: ignore[union-attr]
    assert 'llm_gateway_llm_requests_total{model="gpt-4o-mini",provider="openai-next",status="503"} 1.0' in text
    assert 'provider="openai-good",status="503"' not in text


def test_a_failed_attempt_and_a_continued_trace() -> None:
    obs, exporter = observer()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    ctx = request(obs, status=503, tokens=False, traceparent=f"00-{trace}-00f067aa0ba902b7-01")
    obs.flush()
    (server,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    (client,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert ctx.trace_id == trace and f"{server.context.trace_id:032x}" == trace
    assert server.attributes["error.type"] == client.attributes["error.type"] == "upstream_error"
    assert server.status.status_code == client.status.status_code == StatusCode.ERROR
    assert "gen_ai.usage.input_tokens" not in client.attributes


def test_own_values_win_over_the_shared_shape() -> None:
    processor = BoundedSpanProcessor(InMemorySpanExporter(), resource(), on_drop=lambda n: None,
                                     on_fail=lambda n: None)
    shared = {"a": 1, "b": "shared"}
    record = span_record("x", {"b": "own", "c": 2.5}, shared)
    assert record.all_attributes() == {"a": 1, "b": "own", "c": 2.5} and shared == {"a": 1, "b": "shared"}
    assert processor.readable(record).attributes == {"a": 1, "b": "own", "c": 2.5}
    processor.shutdown()


def test_shapes_are_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(span_shapes, "SHAPES_LIMIT", 8)
    obs, _ = observer()
    for i in range(30):
        ctx = request(obs, status=200 + i)
        ctx.model = f"model-{i}"
        obs.attempt_end(ctx, DEP, obs.attempt_start(ctx, DEP, "http://x", []), 200, None)
    assert 0 < len(obs.shapes.servers) <= 8 and 0 < len(obs.shapes.attempts) <= 8


def test_encoder_writes_what_the_sdk_writes() -> None:
    res = resource()
    processor = BoundedSpanProcessor(InMemorySpanExporter(), res, on_drop=lambda n: None, on_fail=lambda n: None)
    shared = {"http.request.method": "POST", "gen_ai.request.model": "modèle-ü", "server.port": 443,
              "gen_ai.response.finish_reasons": ("stop", "length")}
    long_text = "x" * 200
    records = []
    for value in (True, 1, False, 0, 7):  # one key: bools and ints must never share a cached encoding
        records.append(span_record("POST openai chat", {"flag": value}, shared))
    remote = {"parent_id": 0x00F067AA0BA902B7, "remote": True, "trace_state": "vendor=a"}
    server = span_record("POST bedrock converse", {"gateway.request_id": "gw-" + long_text, "url.path": "/ü/" + long_text,
                                                   "gateway.overhead_ms": 0.123, "neg": -7, "big": 2**62 + 5,
                                                   "tried": ("a", "b"), "n": 1.0}, shared,
                         events=[("failover", {"gateway.failed": "a", "attempt": 2, "ratio": 0.5}, 1_700_000_000_000_000_100)],
                         error="upstream_error", **remote)
    client = span_record("chat " + long_text, {"gateway.attempt": 2}, {"k" * 130: "v"}, kind=SpanKind.CLIENT, span_id=5,
                         parent_id=server.span_id, trace_state="vendor=a")
    # the same shared dict under another name or kind: encoded with its own, never a cached head
    records += [server, client, span_record("POST openai chat", {}, shared, kind=SpanKind.INTERNAL, span_id=6,
                                            parent_id=server.span_id)]
    encoder = SpanEncoder(res, SCOPE)
    for _ in range(3):  # then from the caches
        ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in records]))
        assert ours == encode_spans([processor.readable(r) for r in records])
    values = [span.attributes[-1].value for span in ours.resource_spans[0].scope_spans[0].spans[:5]]
    assert [v.WhichOneof("value") for v in values] == ["bool_value", "int_value", "bool_value", "int_value",
                                                         "int_value"]
    processor.shutdown()


def test_one_off_values_encode_like_the_sdk() -> None:
    """Request ids, overheads and first-chunk times take ready heads per key and length: same bytes as the SDK."""
    res = resource()
    processor = BoundedSpanProcessor(InMemorySpanExporter(), res, on_drop=lambda n: None, on_fail=lambda n: None)
    values: list[Any] = ["gw-0123456789abcdef", "gw-fedcba9876543210", "gw-ü", "", "x" * 90, "x" * 140, 0.0, -2.5,
                         1e300, 3, True, ("a", "b")]
    records = [span_record("x", {"gateway.request_id": v, "gateway.overhead_ms": v,
                                 "gen_ai.response.time_to_first_chunk": v}) for v in values]
    encoder = SpanEncoder(res, SCOPE)
    for _ in range(2):  # then with the heads made
        ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in records]))
        assert ours == encode_spans([processor.readable(r) for r in records])
    processor.shutdown()


def test_route_finish_records_status_duration_and_non_zero_tokens() -> None:
    from proxy.telemetry.metrics import GatewayMetrics

    metrics = GatewayMetrics(CFG)
    route = metrics.route(DEP.name, "gpt-4o-mini", "chat")
    route.finish(200, 0.03, 12, 0)
    route.finish(200, 0.05, None, 4)
    route.finish(502, 0.01, None, None)
    text = metrics.render().decode()
    assert 'status="200"} 2.0' in text and 'status="502"} 1.0' in text
    assert 'llm_request_duration_seconds_count{model="gpt-4o-mini",provider="openai-good"} 3.0' in text
    assert 'token_type="input"} 12.0' in text and 'token_type="output"} 4.0' in text
    assert text.count("gen_ai_client_token_usage_count") == 2


def test_histogram_values_are_counted_at_every_read_and_every_fold_every_requests() -> None:
    """A histogram's observe only appends; every read (/metrics, OTLP) counts what waits, in the right
    `le` buckets (a value on a bound belongs to it), and the observer folds every FOLD_EVERY requests."""
    import threading

    from prometheus_client import Histogram
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.telemetry.local_metrics import LocalMetric
    from proxy.telemetry.metrics import FOLD_EVERY

    h = LocalMetric(Histogram, "t_seconds", "t", ("a",), (0.1, 1.0))
    series = h.labels("x")
    for v in (0.05, 0.1, 0.5, 1.0, 2.0, 0.1):
        series.observe(v)
    assert series.counts == [0, 0, 0] and len(series.values) == 6  # nothing counted yet
    family = h.family()
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 3, "1.0": 5, "+Inf": 6} and series.values == []
    assert [s.value for s in family.samples if s.name.endswith("_sum")] == [pytest.approx(3.75)]

    # a NaN goes to +Inf alone (as a per-value bisection put it) and leaves the other buckets right
    nan_series = h.labels("nan")
    for v in (0.5, float("nan"), 0.05, 2.0):
        nan_series.observe(v)
    h.fold()
    assert nan_series.counts == [1, 1, 2]

    # a fold in another thread while the loop thread appends: every value counted exactly once
    stop = threading.Event()

    def fold() -> None:
        while not stop.is_set():
            h.fold()

    folder = threading.Thread(target=fold)
    folder.start()
    for _ in range(50_000):
        series.observe(0.5)
    stop.set()
    folder.join()
    h.fold()
    assert sum(series.counts) == 50_006 and series.counts[1] == 50_002 and series.values == []

    obs, _ = observer()
    assert obs.metrics is not None
    for _ in range(FOLD_EVERY - 1):
        request(obs, tokens=False)
    duration = obs.metrics.route(DEP.name, "gpt-4o-mini", "chat").duration()
    assert len(duration.values) == FOLD_EVERY - 1
    request(obs, tokens=False)
    assert duration.values == [] and sum(duration.counts) == FOLD_EVERY  # folded without any read
    text = obs.render_metrics().decode()  # type: ignore[union-attr]
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "llm_gateway_llm_request_duration_seconds"]
    assert [s.value for s in family.samples if s.name.endswith("_count")] == [FOLD_EVERY]


def test_metric_routes_are_resolved_once_and_series_made_on_use() -> None:
    obs, _ = observer()
    m = obs.metrics
    assert m is not None
    route = m.route("openai-good", "gpt-4o-mini", "chat")
    assert m.route("openai-good", "gpt-4o-mini", "chat") is route and route.status(200) is route.status(200)
    assert m.route(None, "gpt-4o-mini", "chat").provider == "none"
    request(obs, tokens=False)
    text = m.render().decode()
    assert 'llm_gateway_llm_requests_total{model="gpt-4o-mini",provider="openai-good",status="200"} 1.0' in text
    assert "llm_gateway_llm_tokens_used_total{" not in text and "gen_ai_client_token_usage_bucket{" not in text
    assert "gen_ai_server_time_to_first_token_seconds_bucket{" not in text
    request(obs)
    text = m.render().decode()
    tokens = 'llm_gateway_llm_tokens_used_total{model="gpt-4o-mini",provider="openai-good",token_type="input"}'
    assert f"{tokens} 19.0" in text
    for i in range(200):  # unbounded client models never make unbounded routes
        m.route(None, f"made-up-{i}", "chat")
    assert len({r.model for r in m._routes.values()}) <= len(m.models) + 2


def test_http_exporter_reads_the_environment_once(monkeypatch: Any, tmp_path: Any) -> None:
    """Proxies, CA bundle and netrc are resolved when the exporter is made, as requests would per POST;
    a plain http collector that needs none of them gets the SDK's urllib3 transport."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine collector.example login user password secret\n"
                     "machine signed.example login user2 password secret2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "bypassed.example,signed.example")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    for host, proxied, auth in (("collector.example", True, ("user", "secret")),
                                ("signed.example", False, ("user2", "secret2"))):
        exporter = fast_span_exporter(OtelSettings(endpoint=f"http://{host}:4318", protocol="http/protobuf"), resource())
        session = exporter._client._transport._session
        url = f"http://{host}:4318/v1/traces"
        assert session.trust_env is False
        assert session.proxies.get("http") == ("http://proxy.example:3128" if proxied else None)
        assert session.verify == str(tmp_path / "ca.pem")
        assert session.auth == auth
        prepared = session.prepare_request(requests.Request("POST", url, data=b"x"))
        assert session.merge_environment_settings(url, {}, None, None, None)["proxies"] == session.proxies
        assert "Authorization" in prepared.headers
        exporter.shutdown()
    exporter = fast_span_exporter(OtelSettings(endpoint="http://bypassed.example:4318", protocol="http/protobuf"),
                                  resource())
    assert type(exporter._client._transport).__name__ == "Urllib3HTTPTransport"
    exporter.shutdown()
    exporter = fast_span_exporter(OtelSettings(endpoint="https://bypassed.example:4318", protocol="http/protobuf"),
                                  resource())
    assert exporter._client._transport._session.verify == str(tmp_path / "ca.pem")  # TLS: requests, as before
    exporter.shutdown()
