"""Observability: spans, metrics (Prometheus and OTLP), access logs and the overhead header.

Four paths through a real gateway on a real socket, against the simulated provider:
a success (plain and streamed), a failover (first deployment answers 503), a gateway 429, and a
stream the upstream cuts. Spans go to an in-memory exporter through the product's own span
processor; OTLP metrics come from an in-memory reader fed by the product's Prometheus bridge;
`/metrics` is parsed with prometheus_client's parser. Access logs come from a real `serve`
process. A black-holed or closed collector must cost zero errors.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from config import parse_config
from proxy.app import build_app
from proxy.mock import MockOptions, build_mock_app
from proxy.telemetry.observability import GatewayObserver
from proxy.telemetry.tracing import BoundedSpanProcessor, SpanRecord, SpanStart, Tracer
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA, clear_recorded, recorded, span_record
from tests.procs import Procs, procs  # noqa: F401 - `procs` is a fixture
from tests.servers import free_port, serve

LIMITED_KEY = "gw-test-limited-0123456789"
AUDITED_KEY = "gw-test-audited-0123456789"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
CONTRACT = ("llm_requests", "llm_request_duration_seconds", "llm_errors", "llm_tokens_used",
            "llm_rate_limit_hits", "provider_health_status")


def config_text(good: str, bad: str, extra: str = "") -> str:
    return f"""
gateway: {{timeout: 30s, max_retries: 2}}
auth:
  keys:
    - id: team-test
      sha256: {GATEWAY_KEY_SHA}
      metadata: {{team: search, tags: "alpha,beta", api_key: not-for-logs}}
    - id: limited
      sha256: {hashlib.sha256(LIMITED_KEY.encode()).hexdigest()}
      rate_limit: {{requests_per_minute: 1}}
    - id: audited
      sha256: {hashlib.sha256(AUDITED_KEY.encode()).hexdigest()}
      log_bodies: true
providers:
  openai-bad: {{type: openai, base_url: "{bad}/v1", api_key: sk-bad, models: [gpt-4o]}}
  openai-good: {{type: openai, base_url: "{good}/v1", api_key: sk-good, models: [gpt-4o-mini, gpt-4o]}}
  anthropic: {{type: anthropic, base_url: "{good}", api_key: sk-ant}}
monitoring:
  metrics: {{enabled: true, prefix: llm_gateway}}
  tracing: {{enabled: true, sample_rate: 1.0}}
{extra}
"""


@pytest.fixture(scope="module")
def faulty_upstream() -> Iterator[str]:
    """A provider that answers every request 503 (the failover's first deployment)."""
    with serve(build_mock_app(MockOptions(chunk_interval_ms=0, fault_status=503)), lifespan="off") as base:
        yield base


class Rig:
    def __init__(self, base: str, observer: GatewayObserver, spans: InMemorySpanExporter,
                 reader: InMemoryMetricReader) -> None:
        self.base, self.observer, self.exporter, self.reader = base, observer, spans, reader

    def post(self, path: str, body: dict[str, Any], key: str = GATEWAY_KEY, **headers: str) -> httpx.Response:
        return httpx.post(self.base + path, json=body, headers={"authorization": f"Bearer {key}", **headers},
                          timeout=30)

    def spans(self, request_id: str, count: int) -> list[Any]:
        """Every span of the trace whose SERVER span carries this request id (waits for `count`)."""
        deadline = time.monotonic() + 10
        while True:
            self.observer.flush()
            finished = self.exporter.get_finished_spans()
            server = [s for s in finished if s.attributes.get("gateway.request_id") == request_id]
            if server:
                trace = server[0].context.trace_id
                found = [s for s in finished if s.context.trace_id == trace]
                if len(found) >= count:
                    return found
            if time.monotonic() > deadline:
                raise AssertionError(f"spans for {request_id}: {[s.name for s in finished]}")
            time.sleep(0.02)

    def scrape(self) -> dict[str, Any]:
        text = httpx.get(self.base + "/metrics").text
        return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def rig(mock_upstream: str, faulty_upstream: str) -> Iterator[Rig]:
    cfg = parse_config(config_text(mock_upstream, faulty_upstream), "test.yaml", {})
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    observer = GatewayObserver(cfg, span_exporter=exporter, metric_reader=reader)
    with serve(build_app(cfg, observer=observer)) as base:
        yield Rig(base, observer, exporter, reader)


def by_kind(spans: list[Any], kind: SpanKind) -> list[Any]:
    return sorted((s for s in spans if s.kind == kind), key=lambda s: s.start_time)


def sample(families: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    total = 0.0
    for s in families[family].samples:
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


# ------------------------------------------------------------------------------------------ traces

def test_success_spans_continue_the_caller_trace_and_propagate_upstream(rig: Rig, mock_upstream: str) -> None:
    clear_recorded(mock_upstream)
    r = rig.post("/v1/chat/completions", CHAT, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01")
    assert r.status_code == 200, r.text
    assert float(r.headers["x-gateway-overhead-ms"]) >= 0
    spans = rig.spans(r.headers["x-gateway-request-id"], 2)
    (server,), (client,) = by_kind(spans, SpanKind.SERVER), by_kind(spans, SpanKind.CLIENT)
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{server.parent.span_id:016x}" == PARENT_ID and server.parent.is_remote
    assert client.parent.span_id == server.context.span_id
    assert client.name == "chat gpt-4o-mini"
    a = client.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "gpt-4o-mini"  # as the mock answers
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == int(mock_upstream.rsplit(":", 1)[1])
    assert a["gateway.deployment"] == "openai-good" and a["http.response.status_code"] == 200
    assert "error.type" not in a and client.status.status_code != StatusCode.ERROR
    s = server.attributes
    assert s["http.response.status_code"] == 200 and "error.type" not in s and s["gateway.key_id"] == "team-test"
    assert s["gateway.attempts"] == 1 and s["gen_ai.request.model"] == "gpt-4o-mini" and server.name == "POST openai chat"
    # the upstream saw the attempt span's context, not the caller's parent id
    sent = [tuple(h) for h in recorded(mock_upstream)[-1]["headers"] if h[0].lower() == "traceparent"]
    assert sent == [("traceparent", f"00-{TRACE_ID}-{client.context.span_id:016x}-01")]


def test_streamed_success_reports_time_to_first_chunk(rig: Rig) -> None:
    with httpx.stream("POST", rig.base + "/v1/chat/completions", json={**CHAT, "stream": True},
                      headers={"authorization": f"Bearer {GATEWAY_KEY}"}, timeout=30) as r:
        assert r.status_code == 200
        assert float(r.headers["x-gateway-overhead-ms"]) >= 0
        body = r.read()
    assert b"[DONE]" in body
    spans = rig.spans(r.headers["x-gateway-request-id"], 2)
    (client,) = by_kind(spans, SpanKind.CLIENT)
    assert client.attributes["gen_ai.response.time_to_first_chunk"] > 0
    assert client.attributes["gen_ai.usage.output_tokens"] > 0
    assert client.attributes["gen_ai.response.finish_reasons"] == ("stop",)  # from the stream's last content chunk
    families = rig.scrape()
    assert sample(families, "gen_ai_server_time_to_first_token_seconds", "_count", gen_ai_request_model="gpt-4o-mini") >= 1


def test_anthropic_sdk_stream_reports_the_answering_model_and_stop_reason(rig: Rig) -> None:
    """Through the official SDK: the stop reason comes from the stream's last `message_delta`."""
    import anthropic

    client = anthropic.Anthropic(base_url=rig.base, api_key=GATEWAY_KEY, max_retries=0)
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                messages=[{"role": "user", "content": "hello there"}]) as stream:
        message = stream.get_final_message()
        request_id = stream.response.headers["x-gateway-request-id"]
    assert message.stop_reason == "end_turn"
    (client_span,) = by_kind(rig.spans(request_id, 2), SpanKind.CLIENT)
    assert client_span.attributes["gen_ai.response.model"] == message.model
    assert client_span.attributes["gen_ai.response.finish_reasons"] == (message.stop_reason,)
    assert client_span.attributes["gen_ai.provider.name"] == "anthropic"


def test_failover_shows_two_attempts_and_the_decision(rig: Rig) -> None:
    before = rig.scrape()
    r = rig.post("/v1/chat/completions", {**CHAT, "model": "gpt-4o"})  # openai-bad first, then openai-good
    assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "2", r.text
    spans = rig.spans(r.headers["x-gateway-request-id"], 3)
    (server,), clients = by_kind(spans, SpanKind.SERVER), by_kind(spans, SpanKind.CLIENT)
    assert [c.attributes["gateway.deployment"] for c in clients] == ["openai-bad", "openai-good"]
    assert [c.attributes["gateway.attempt"] for c in clients] == [1, 2]
    assert clients[0].attributes["error.type"] == "upstream_error"
    assert clients[0].attributes["http.response.status_code"] == 503
    assert clients[0].status.status_code == StatusCode.ERROR
    assert "error.type" not in clients[1].attributes and all(c.parent.span_id == server.context.span_id for c in clients)
    events = [e for e in server.events if e.name == "failover"]
    assert events and events[0].attributes["gateway.failed"] == "openai-bad"
    assert events[0].attributes["gateway.next"] == "openai-good"
    assert server.attributes["gateway.tried"] == ("openai-bad", "openai-good")
    assert server.attributes["gateway.routing.candidates"] == ("openai-bad", "openai-good")
    assert server.attributes["gateway.routing.strategy"] == "health_based"
    after = rig.scrape()
    for family in ("llm_gateway_failovers", "llm_gateway_retries"):
        assert sample(after, family, "_total", provider="openai-bad", error_type="upstream_error") == \
            sample(before, family, "_total", provider="openai-bad", error_type="upstream_error") + 1
    assert sample(after, "gen_ai_client_operation_duration_seconds", "_count", error_type="upstream_error") >= 1


def test_gateway_rate_limit_is_a_span_event_and_a_hit(rig: Rig) -> None:
    first = rig.post("/v1/chat/completions", CHAT, key=LIMITED_KEY)
    second = rig.post("/v1/chat/completions", CHAT, key=LIMITED_KEY)
    assert first.status_code == 200 and second.status_code == 429
    assert float(second.headers["x-gateway-overhead-ms"]) >= 0
    spans = rig.spans(second.headers["x-gateway-request-id"], 1)
    (server,) = spans  # no upstream attempt
    assert server.attributes["http.response.status_code"] == 429
    assert server.attributes["error.type"] == "policy_rate_limited"
    assert any(e.name == "rate_limited" and e.attributes["gateway.limit.source"] == "gateway" for e in server.events)
    families = rig.scrape()
    assert sample(families, "llm_gateway_llm_rate_limit_hits", "_total", error_type="policy_rate_limited") >= 1
    assert sample(families, "llm_gateway_llm_errors", "_total", error_type="policy_rate_limited") >= 1
    assert sample(families, "llm_gateway_llm_requests", "_total", status="429", provider="none") >= 1


def test_cut_stream_is_an_error_after_a_200(rig: Rig) -> None:
    with httpx.stream("POST", rig.base + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30,
                      headers={"authorization": f"Bearer {GATEWAY_KEY}", "x-mock-cut-after": "3"}) as r:
        assert r.status_code == 200
        body = r.read()
    assert b'"error"' in body and b"[DONE]" not in body
    spans = rig.spans(r.headers["x-gateway-request-id"], 2)
    (server,), clients = by_kind(spans, SpanKind.SERVER), by_kind(spans, SpanKind.CLIENT)
    assert clients[-1].attributes["error.type"] == "upstream_stream_error"
    assert server.attributes["error.type"] == "upstream_stream_error"
    assert server.attributes["http.response.status_code"] == 200
    assert server.status.status_code == StatusCode.ERROR
    families = rig.scrape()
    assert sample(families, "llm_gateway_llm_errors", "_total", error_type="upstream_stream_error",
                  provider="openai-good") >= 1


# ------------------------------------------------------------------------------------------ metrics

def test_prometheus_exposition_has_every_metric_with_bounded_labels(rig: Rig) -> None:
    rig.post("/v1/chat/completions", CHAT)
    rig.post("/v1/chat/completions", {**CHAT, "model": "no-such-model-xyz"})
    families = rig.scrape()
    for name in CONTRACT:
        assert f"llm_gateway_{name}" in families, name
    for name in ("gen_ai_client_token_usage", "gen_ai_client_operation_duration_seconds",
                 "gen_ai_server_time_to_first_token_seconds", "llm_gateway_retries", "llm_gateway_failovers",
                 "llm_gateway_circuit_state_changes", "llm_gateway_limiter_degraded",
                 "llm_gateway_redis_call_duration_seconds", "llm_gateway_pool_saturated",
                 "llm_gateway_client_disconnects", "llm_gateway_overhead_seconds",
                 "llm_gateway_telemetry_spans_dropped", "llm_gateway_retry_budget_exhausted"):
        assert name in families, name
    requests = families["llm_gateway_llm_requests"]
    # the models this module's requests named and were served (the Anthropic SDK test's too), or the buckets
    assert {s.labels["model"] for s in requests.samples} <= {"gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "none",
                                                             "other"}
    assert not any("request_id" in s.labels or "path" in s.labels for f in families.values() for s in f.samples)
    assert sample(families, "llm_gateway_llm_tokens_used", "_total", provider="openai-good", token_type="input") > 0
    assert sample(families, "llm_gateway_llm_tokens_used", "_total", provider="openai-good", token_type="output") > 0
    assert sample(families, "llm_gateway_provider_health_status", provider="openai-good") == 1
    usage = families["gen_ai_client_token_usage"]
    bounds = sorted({float(s.labels["le"]) for s in usage.samples if s.name.endswith("_bucket")})
    assert bounds[:3] == [1.0, 4.0, 16.0] and bounds[-2] == 67108864.0
    assert {s.labels.get("gen_ai_token_type") for s in usage.samples} >= {"input", "output"}
    assert sample(families, "llm_gateway_overhead_seconds", "_count") >= 1


def test_otlp_metrics_use_semantic_convention_names(rig: Rig) -> None:
    rig.post("/v1/chat/completions", CHAT)
    data = rig.reader.get_metrics_data()
    (resource_metrics,) = data.resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == "llm-gateway"
    assert resource_metrics.resource.attributes["service.instance.id"]
    metrics = {m.name: m for sm in resource_metrics.scope_metrics for m in sm.metrics}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration", "llm_gateway_llm_requests_total",
            "llm_gateway_llm_request_duration_seconds", "llm_gateway_provider_health_status"} <= set(metrics)
    usage = metrics["gen_ai.client.token.usage"]
    assert usage.unit == "{token}"
    point = next(p for p in usage.data.data_points if p.attributes.get("gen_ai.token.type") == "output")
    assert point.attributes["gen_ai.provider.name"] == "openai"
    assert point.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert list(point.explicit_bounds)[:4] == [1, 4, 16, 64] and point.count >= 1
    assert sum(point.bucket_counts) == point.count
    requests = metrics["llm_gateway_llm_requests_total"]
    assert requests.data.is_monotonic and sum(p.value for p in requests.data.data_points) >= 1
    duration = metrics["gen_ai.client.operation.duration"]
    assert duration.unit == "s" and list(duration.data.data_points[0].explicit_bounds)[:3] == [0.01, 0.02, 0.04]


def test_metrics_off_means_404_and_header_can_be_turned_off(make_gateway: Callable[..., str], mock_upstream: str) -> None:
    base = make_gateway(config_text(mock_upstream, mock_upstream, "").replace(
        "metrics: {enabled: true, prefix: llm_gateway}", "metrics: {enabled: false}\n  overhead_header: false"))
    assert httpx.get(base + "/metrics").status_code == 404
    r = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
    assert r.status_code == 200 and "x-gateway-overhead-ms" not in r.headers


def test_model_label_cardinality_is_capped(mock_upstream: str) -> None:
    from proxy.telemetry.metrics import DYNAMIC_MODELS, GatewayMetrics

    cfg = parse_config(config_text(mock_upstream, mock_upstream), "t.yaml", {})
    m = GatewayMetrics(cfg)
    assert m.model("gpt-4o", False) == "gpt-4o" and m.model(None, False) == "none"
    assert m.model("made-up", False) == "other"  # never routed: never a label
    labels = {m.model(f"served-{i}", True) for i in range(DYNAMIC_MODELS + 20)}
    assert len(labels) == DYNAMIC_MODELS + 1 and "other" in labels


# ------------------------------------------------------------------------------------------ logs

def test_access_log_lines_are_json_with_the_required_fields(procs: Procs, mock_upstream: str) -> None:  # noqa: F811
    (gw,) = procs.gateways(config_text(mock_upstream, mock_upstream), 1)
    ok = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=30,
                    headers={"authorization": f"Bearer {GATEWAY_KEY}", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    denied = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer wrong"})
    assert ok.status_code == 200 and denied.status_code == 401
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
        access = {line["request_id"]: line for line in lines if line.get("event") == "request"}
        if len(access) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    line = access[ok.headers["x-gateway-request-id"]]
    for field in ("request_id", "trace_id", "key_id", "key_metadata", "family", "model", "deployment", "status",
                  "attempts", "input_tokens", "output_tokens", "overhead_ms", "duration_ms", "outcome", "timestamp"):
        assert field in line, field
    assert line["trace_id"] == TRACE_ID and line["key_id"] == "team-test" and line["outcome"] == "ok"
    assert line["key_metadata"]["team"] == "search" and line["key_metadata"]["api_key"] == "***"
    assert line["status"] == 200 and line["attempts"] == 1 and line["output_tokens"] > 0
    assert line["overhead_ms"] >= 0 and line["duration_ms"] >= line["overhead_ms"]
    refused = access[denied.headers["x-gateway-request-id"]]
    assert refused["status"] == 401 and refused["outcome"] == "caller_invalid_credentials" and refused["key_id"] is None
    text = gw.log_path.read_text()
    assert "hello there" not in text and "sk-good" not in text and GATEWAY_KEY not in text


def test_a_log_bodies_key_gets_its_bodies_in_its_lines_and_no_other_key_does(procs: Procs,  # noqa: F811
                                                                            mock_upstream: str) -> None:
    import openai

    (gw,) = procs.gateways(config_text(mock_upstream, mock_upstream), 1)
    audit = openai.OpenAI(base_url=gw.url + "/v1", api_key=AUDITED_KEY, max_retries=0)
    plain = openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0)
    secret = {"metadata": {"password": "hunter2-canary"}}  # a secret-named field inside a body
    audited = audit.chat.completions.with_raw_response.create(**CHAT, extra_body=secret)
    streamed = audit.chat.completions.with_raw_response.create(**CHAT, stream=True)
    chunks = list(streamed.parse())
    other = plain.chat.completions.with_raw_response.create(**CHAT, extra_body=secret)
    assert chunks and audited.status_code == streamed.status_code == other.status_code == 200
    ids = [r.headers["x-gateway-request-id"] for r in (audited, streamed, other)]
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
        access = {line["request_id"]: line for line in lines if line.get("event") == "request"}
        if all(i in access for i in ids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    line, stream_line, other_line = (access[i] for i in ids)
    assert line["key_id"] == "audited" and line["request_body"]["messages"] == CHAT["messages"]
    assert line["request_body"]["metadata"] == {"password": "***"}
    answer = audited.parse().choices[0].message.content
    assert line["response_body"]["choices"][0]["message"]["content"] == answer
    assert stream_line["request_body"]["stream"] is True and "data: " in stream_line["response_body"]
    assert "request_body" not in other_line and "response_body" not in other_line
    assert "hunter2-canary" not in gw.log_path.read_text()


# ------------------------------------------------------------------------------------------ collector down

@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        server.close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_dead_collector_costs_no_errors(make_gateway: Callable[..., str], mock_upstream: str, protocol: str) -> None:
    with black_hole() as port:
        hole = f"http://127.0.0.1:{port}" if protocol == "http/protobuf" else f"127.0.0.1:{port}"
        for endpoint in (hole, f"127.0.0.1:{free_port()}"):  # black-holed, then closed
            base = make_gateway(config_text(mock_upstream, mock_upstream, f"  otel: {{endpoint: '{endpoint}', protocol: {protocol}}}"))
            statuses: list[int] = []

            async def burst() -> None:
                import asyncio

                async with httpx.AsyncClient(timeout=10) as client:
                    async def one(i: int) -> None:
                        body = {**CHAT, "stream": True} if i % 3 == 0 else CHAT
                        r = await client.post(base + "/v1/chat/completions", json=body,
                                              headers={"authorization": f"Bearer {GATEWAY_KEY}"})
                        statuses.append(r.status_code)

                    for _ in range(4):
                        await asyncio.gather(*(one(i) for i in range(50)))

            import asyncio

            started = time.monotonic()
            asyncio.run(burst())
            assert statuses == [200] * 200, sorted(set(statuses))
            assert time.monotonic() - started < 20
            assert httpx.get(base + "/metrics").status_code == 200


def test_span_queue_is_bounded_and_drops_are_counted() -> None:
    release = threading.Event()
    dropped: list[int] = []
    failed: list[int] = []

    class Stuck:
        def export(self, batch: list[Any]) -> SpanExportResult:
            release.wait(5)
            return SpanExportResult.FAILURE

        def shutdown(self) -> None:
            pass

    processor = BoundedSpanProcessor(Stuck(), None, on_drop=dropped.append, on_fail=failed.append,  # type: ignore[arg-type]
                                     max_queue=8, batch=4, delay=0.01)
    for _ in range(100):
        processor.end(span_record("GET x"))
    assert len(processor.queue) <= 8 and sum(dropped) >= 100 - 8 - 4
    release.set()
    processor.shutdown()
    assert not processor.queue and sum(failed) >= 1


def test_span_records_are_prepared_young_and_sent_in_batches_or_when_due() -> None:
    """Records are prepared every `chunk` spans, as the chunk's last span ends (none waits in the
    queue for a whole batch, so none lives long enough to burden the garbage collector), batches go
    out full, and a partial batch goes out once its oldest span has waited `delay`, with no flush."""
    prepared: list[int] = []
    sent: list[list[Any]] = []

    class Recording:
        def encode_records(self, records: list[SpanRecord]) -> list[bytes]:
            prepared.append(len(records))
            return [r.name.encode() for r in records]

        def export(self, spans: list[Any]) -> SpanExportResult:
            sent.append(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    processor = BoundedSpanProcessor(Recording(), None, on_drop=lambda n: None, on_fail=lambda n: None,  # type: ignore[arg-type]
                                     batch=32, chunk=8, delay=0.5)
    try:
        for i in range(40):
            processor.end(span_record(f"s{i}"))
        # prepared where they ended, a chunk at a time: none waits in the queue for a whole batch
        assert prepared == [8] * 5 and not processor.queue
        deadline = time.monotonic() + 5
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert [len(b) for b in sent] == [32] and sent[0][0] == b"s0"  # one full batch, in order
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [len(b) for b in sent] == [32, 8] and sent[1][-1] == b"s39"  # the rest, once due
        assert not processor.queue and not processor.ready and not processor.pending
    finally:
        processor.shutdown()


def test_span_preparation_never_waits_for_the_export_thread_nor_raises() -> None:
    """While the export thread holds the preparation lock (it prepares a quiet spell's leftovers),
    a span ending on the request path returns at once and its chunk is prepared by a later span; an
    encoder that raises costs its chunk (counted as failed), never the caller."""
    prepared: list[list[str]] = []
    failed: list[int] = []
    sent: list[list[Any]] = []
    boom = {"on": False}

    class Recording:
        def encode_records(self, records: list[SpanRecord]) -> list[str]:
            if boom["on"]:
                raise ValueError("encoder bug")
            prepared.append([r.name for r in records])
            return [r.name for r in records]

        def export(self, spans: list[Any]) -> SpanExportResult:
            sent.append(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    processor = BoundedSpanProcessor(Recording(), None, on_drop=lambda n: None, on_fail=failed.append,  # type: ignore[arg-type]
                                     max_queue=64, batch=16, chunk=4, delay=30)
    try:
        assert processor.preparing.acquire(timeout=1)  # as the export thread does for leftovers
        # six spans end in another thread (the request path): a waiting end() would never return here
        ending = threading.Thread(target=lambda: [processor.end(span_record(f"s{i}")) for i in range(6)])
        ending.start()
        ending.join(10)
        returned, prepared_meanwhile, queued = not ending.is_alive(), list(prepared), len(processor.queue)
        processor.preparing.release()  # before asserting: a waiting end() must not hang the test
        ending.join(10)
        assert returned and prepared_meanwhile == [] and queued == 6
        processor.end(span_record("s6"))  # the next span prepares what waits, one chunk
        assert prepared == [["s0", "s1", "s2", "s3"]] and len(processor.queue) == 3
        boom["on"] = True
        processor.end(span_record("s7"))  # the chunk s4..s7: the encoder raises, the caller does not see it
        assert failed == [4] and not processor.queue
        boom["on"] = False
        processor.flush()
        assert sent == [["s0", "s1", "s2", "s3"]]
    finally:
        processor.shutdown()


def test_sampling_is_parent_based_trace_id_ratio() -> None:
    exporter = InMemorySpanExporter()
    processor = BoundedSpanProcessor(exporter, None, on_drop=lambda n: None, on_fail=lambda n: None)  # type: ignore[arg-type]
    never, always = Tracer(0.0, processor), Tracer(1.0, processor)
    def begin(tracer: Tracer, traceparent: str | None, tracestate: str | None = None) -> SpanStart:
        return SpanStart._make(tracer.begin(traceparent, tracestate))  # a plain tuple, named here

    assert not begin(never, None).sampled and begin(always, None).sampled
    unsampled_parent = f"00-{TRACE_ID}-{PARENT_ID}-00"
    span = begin(always, unsampled_parent)
    assert not span.sampled and f"{span.trace_id:032x}" == span.trace_hex == TRACE_ID
    assert span.traceparent(0xABC) == f"00-{TRACE_ID}-{0xABC:016x}-00"  # propagated, not recorded
    sampled = begin(never, f"00-{TRACE_ID}-{PARENT_ID}-01", "vendor=1")
    assert sampled.sampled and sampled.remote and f"{sampled.parent_id:016x}" == PARENT_ID
    never.end(SpanRecord("x", SpanKind.SERVER, None, sampled.trace_id, sampled.span_id, sampled.parent_id,
                         sampled.remote, sampled.trace_state, sampled.start, sampled.start + 1, {"a": 1}))
    processor.shutdown()
    (exported,) = exporter.get_finished_spans()
    assert exported.parent.is_remote and f"{exported.parent.span_id:016x}" == PARENT_ID
    assert exported.context.trace_state.get("vendor") == "1" and exported.attributes["a"] == 1
    half = Tracer(0.5, processor)
    share = sum(begin(half, None).sampled for _ in range(4000)) / 4000
    assert 0.45 < share < 0.55
    assert len(always.begin(None, None)) == len(SpanStart._fields)


def test_several_workers_lose_no_counts(procs: Procs, mock_upstream: str) -> None:  # noqa: F811
    """`serve --workers 2`: /metrics sums every worker (prometheus_client multiprocess mode)."""
    import sys

    config = procs.directory / "workers.yaml"
    config.write_text(config_text(mock_upstream, mock_upstream).replace("tracing: {enabled: true", "tracing: {enabled: false"))
    port = free_port()
    gw = procs.spawn("workers", [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--host",
                                 "127.0.0.1", "--port", str(port), "--workers", "2"], port)
    procs.wait_http(gw, "/healthz")
    sent = 40
    tokens = {"input": 0, "output": 0}
    for _ in range(sent):
        with httpx.Client() as client:  # a new connection each time, so both workers take some
            r = client.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
            assert r.status_code == 200
            tokens["input"] += r.json()["usage"]["prompt_tokens"]
            tokens["output"] += r.json()["usage"]["completion_tokens"]
    assert tokens["input"] > 0 and tokens["output"] > 0
    for _ in range(3):  # whichever worker answers the scrape reports every worker's counts
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text)}
        assert sample(families, "llm_gateway_llm_requests", "_total", status="200") == sent
        assert sample(families, "llm_gateway_llm_request_duration_seconds", "_count") == sent
        for kind, count in tokens.items():  # prometheus_client's own series (SharedRoute), summed over workers
            assert sample(families, "llm_gateway_llm_tokens_used", "_total", token_type=kind) == count
        assert sample(families, "llm_gateway_provider_health_status", provider="openai-good") == 1


def test_otlp_http_export_reaches_a_collector(mock_upstream: str) -> None:
    """The real OTLP/HTTP exporters, to a local collector stand-in that decodes what it receives."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: dict[str, list[bytes]] = {"/v1/traces": [], "/v1/metrics": []}

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.setdefault(self.path, []).append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
        cfg = parse_config(config_text(mock_upstream, mock_upstream, f"  otel: {{endpoint: '{endpoint}', protocol: http/protobuf}}"),
                           "t.yaml", {})
        app = build_app(cfg)
        with serve(app) as base:
            r = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
            assert r.status_code == 200
            deadline = time.monotonic() + 10
            while len(received["/v1/traces"]) == 0 and time.monotonic() < deadline:
                app.runtime.observer.flush()
                time.sleep(0.05)
            app.runtime.observer.reader.force_flush()
        names, attrs = set(), {}
        for body in received["/v1/traces"]:
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                assert any(a.key == "service.name" and a.value.string_value == "llm-gateway" for a in rs.resource.attributes)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        names.add(span.name)
                        attrs.update({a.key: a.value for a in span.attributes})
        assert {"chat gpt-4o-mini", "POST openai chat"} <= names
        assert attrs["gen_ai.provider.name"].string_value == "openai" and attrs["gen_ai.usage.output_tokens"].int_value > 0
        metric_names = {m.name for body in received["/v1/metrics"]
                        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics
                        for sm in rm.scope_metrics for m in sm.metrics}
        assert {"gen_ai.client.token.usage", "llm_gateway_llm_requests_total"} <= metric_names
    finally:
        collector.shutdown()


def test_fast_span_encoding_matches_the_sdk_encoder() -> None:
    """proxy.telemetry.spanwire.SpanEncoder writes exactly what the SDK's OTLP encoder writes for the same spans."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from proxy.telemetry.otlp import SCOPE
    from proxy.telemetry.spanwire import SpanEncoder
    from proxy.telemetry.export import resource

    res = resource()
    processor = BoundedSpanProcessor(InMemorySpanExporter(), res, on_drop=lambda n: None, on_fail=lambda n: None)
    remote = {"parent_id": int(PARENT_ID, 16), "remote": True, "trace_state": "vendor=a,other=b"}
    server = span_record("POST openai chat", {"http.request.method": "POST", "gateway.request_id": "gw-1", "n": 3,
                                              "neg": -7, "ratio": 0.25, "ok": True, "tried": ("a", "b"), "big": 2**40},
                         events=[("failover", {"gateway.failed": "a", "attempt": 2}, 1_700_000_000_000_000_500)],
                         error="upstream_error", **remote)
    client = span_record("chat gpt-4o-mini", {"gen_ai.provider.name": "openai"}, kind=SpanKind.CLIENT,
                         span_id=7, parent_id=server.span_id, trace_state=server.trace_state)
    root = span_record("GET x", span_id=9, trace_id=0x1234)
    encoder = SpanEncoder(res, SCOPE)
    for _ in range(2):  # second round from the attribute cache
        ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in (server, client, root)]))
        sdk = encode_spans([processor.readable(r) for r in (server, client, root)])
        assert ours == sdk
    processor.shutdown()


def test_otlp_grpc_export_survives_a_collector_that_starts_late(mock_upstream: str) -> None:
    """The SDK reconnects on UNAVAILABLE and makes a new client from the exporter's stub: the bytes
    stub must survive that, and the batch is delivered once the collector is up."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[Any] = []

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = parse_config(config_text(mock_upstream, mock_upstream, f"  otel: {{endpoint: '127.0.0.1:{port}', protocol: grpc}}"),
                       "t.yaml", {})
    app = build_app(cfg)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    try:
        with serve(app) as base:
            r = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
            assert r.status_code == 200
            flushing = threading.Thread(target=app.runtime.observer.flush)  # first try: UNAVAILABLE, then retries
            flushing.start()
            time.sleep(0.3)
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
            server.start()
            flushing.join(15)
            assert not flushing.is_alive()
            assert type(app.runtime.observer.exporters.processor.exporter._client).__name__ == "_BytesTraceStub"
        names = {span.name for request in received for rs in request.resource_spans for ss in rs.scope_spans
                 for span in ss.spans}
        assert {"chat gpt-4o-mini", "POST openai chat"} <= names
    finally:
        server.stop(0)


def test_otlp_grpc_export_reaches_a_collector(mock_upstream: str) -> None:
    """The gRPC path: the SDK's gRPC exporter fed by the fast encoder, to a real gRPC TraceService."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[Any] = []

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        cfg = parse_config(config_text(mock_upstream, mock_upstream, f"  otel: {{endpoint: '127.0.0.1:{port}', protocol: grpc}}"),
                           "t.yaml", {})
        app = build_app(cfg)
        with serve(app) as base:
            r = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
            assert r.status_code == 200
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                app.runtime.observer.flush()
                time.sleep(0.05)
            # the encoder's bytes go out as they are: no protobuf objects made to be serialized again
            assert type(app.runtime.observer.exporters.processor.exporter._client).__name__ == "_BytesTraceStub"
        spans = {span.name: span for request in received for rs in request.resource_spans for ss in rs.scope_spans
                 for span in ss.spans}
        assert {"chat gpt-4o-mini", "POST openai chat"} <= set(spans)
        attempt = {kv.key: kv.value for kv in spans["chat gpt-4o-mini"].attributes}
        assert attempt["gen_ai.request.model"].string_value == "gpt-4o-mini"
        assert attempt["gen_ai.usage.input_tokens"].int_value > 0
        assert spans["chat gpt-4o-mini"].parent_span_id == spans["POST openai chat"].span_id
    finally:
        server.stop(0)
