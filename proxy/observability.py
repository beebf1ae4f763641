"""The telemetry `Observer`: OpenTelemetry traces and Prometheus metrics behind the kernel's hooks.

Contract:
- Traces (when `monitoring.tracing.enabled` and an OTLP endpoint is configured, or an exporter is
  given): one SERVER span per client request continuing the caller's W3C `traceparent`, one CLIENT
  span per upstream attempt named `{gen_ai.operation.name} {model}` with the GenAI attributes, and
  the attempt's `traceparent` sent upstream in place of the client's. Sampler: ParentBased
  TraceIdRatio(`sample_rate`). Rate-limit, failover, retry-budget, disconnect and pool decisions are
  span events; the routing choice is an attempt attribute. Spans are light records on the request
  path (`proxy.tracing`), exported through the SDK's exporters; nothing global is touched.
- Metrics (`monitoring.metrics.enabled`): `proxy.metrics.GatewayMetrics`; pushed over OTLP too
  when an endpoint is configured (`proxy.otlp.PrometheusBridge`).
- Every hook is guarded: telemetry never raises into traffic. The observer also keeps
  `ctx.extra["attempt_open"]` so the app can compute the overhead header mid-attempt, and
  `ctx.extra["trace_id"]` for the access log.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import structlog
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind

from config.models import Config, Deployment
from proxy import otlp
from proxy.context import RequestContext
from proxy.metrics import ATTRIBUTES, GatewayMetrics, Upstream, error_type
from proxy.observer import Observer
from proxy.tracing import BoundedSpanProcessor, Tracer, parse_traceparent

log = structlog.get_logger("llm_gateway.telemetry")
_SHUTDOWN_WAIT = 3.0


def resource() -> Resource:
    base = Resource.create({"service.instance.id": f"{socket.gethostname()}-{os.getpid()}"})
    if base.attributes.get("service.name", "unknown_service").startswith("unknown_service"):
        base = base.merge(Resource({"service.name": "llm-gateway"}))
    return base


def _attempt_attributes(up: Upstream) -> dict[str, Any]:
    attrs: dict[str, Any] = {"gen_ai.provider.name": up.provider_name, "gateway.deployment": up.name}
    if up.address:
        attrs["server.address"], attrs["server.port"] = up.address, up.port
    return attrs


class GatewayObserver(Observer):
    def __init__(self, config: Config, *, span_exporter: SpanExporter | None = None,
                 metric_reader: MetricReader | None = None) -> None:
        mon = config.monitoring
        self.metrics = GatewayMetrics(config) if mon.metrics.enabled else None
        self.upstreams = self.metrics.upstreams if self.metrics else {d.name: Upstream(d) for d in config.providers}
        self.strategy = config.gateway.routing_strategy
        self.overrides = config.gateway.routing_overrides
        self.tracer: Tracer | None = None
        self.attempt_attributes: dict[str, dict[str, Any]] = {}
        self.processor: BoundedSpanProcessor | None = None
        self.reader: MetricReader | None = None
        self.closed = False
        res = resource() if (mon.otel.endpoint or span_exporter or metric_reader) else None
        if mon.tracing.enabled and (span_exporter is not None or mon.otel.endpoint):
            m = self.metrics
            self.processor = BoundedSpanProcessor(
                span_exporter if span_exporter is not None else otlp.fast_span_exporter(mon.otel, res),  # type: ignore[arg-type]
                res,  # type: ignore[arg-type]
                on_drop=(lambda n: m.spans_dropped.inc(n)) if m else (lambda n: None),
                on_fail=(lambda n: m.export_failures.inc(n)) if m else (lambda n: None))
            self.tracer = Tracer(mon.tracing.sample_rate, self.processor)
        if self.metrics is not None and (metric_reader is not None or mon.otel.endpoint):
            bridge = otlp.PrometheusBridge(self.metrics.registry, self.metrics.otel, ATTRIBUTES, res)  # type: ignore[arg-type]
            reader = metric_reader if metric_reader is not None else \
                PeriodicExportingMetricReader(otlp.metric_exporter(mon.otel))
            self.reader = bridge.attach(reader)

    # --- request ---------------------------------------------------------------------------------
    def request_start(self, ctx: RequestContext, scope: dict[str, Any]) -> Any:
        try:
            traceparent = ctx.header(b"traceparent")
            if self.tracer is None:
                parsed = parse_traceparent(traceparent)
                if parsed is not None:
                    ctx.extra["trace_id"] = f"{parsed[0]:032x}"
                return None
            if traceparent is not None:
                ctx.extra["client_traceparent"] = True  # attempts replace it
            span = self.tracer.start_server(f"{ctx.method} {ctx.family}", traceparent,
                                            ctx.header(b"tracestate") if traceparent else None,
                                            {"http.request.method": ctx.method, "url.path": ctx.path,
                                             "gateway.request_id": ctx.request_id})
            ctx.extra["otel.span"] = span
            ctx.extra["trace_id"] = f"{span.trace_id:032x}"
            return span
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="request_start")
            return None

    def request_end(self, ctx: RequestContext, handle: Any, status: int, outcome: str) -> None:
        try:
            total = time.perf_counter() - ctx.started
            dep = ctx.deployment if ctx.attempts else None
            code = None if outcome == "ok" else error_type(outcome)
            m = self.metrics
            if m is not None:
                provider = dep.name if dep else "none"
                model = m.model(ctx.model, dep is not None)
                m.child(m.requests, provider, model, str(status)).inc()
                m.child(m.duration, provider, model).observe(total)
                m.overhead.observe(max(0.0, total - ctx.upstream_seconds))
                if code:
                    m.child(m.errors, provider, model, code).inc()
                u = ctx.usage
                if dep is not None and u.known:
                    up = m.upstreams.get(dep.name)
                    genai = m.genai(ctx.operation, up, model)
                    for kind, value in (("input", u.input_tokens), ("output", u.output_tokens)):
                        if value:
                            m.child(m.tokens, provider, model, kind).inc(value)
                            m.child(m.token_usage, *genai, kind).observe(value)
            span = handle
            if span is not None and span.sampled:
                # Few attributes (each costs ~2 us to export): usage, deployment and upstream details are
                # on the attempt spans, the family and operation in the name, the outcome in error.type.
                attrs = span.attributes
                attrs["http.response.status_code"] = status
                attrs["gateway.attempts"] = ctx.attempts
                attrs["gateway.overhead_ms"] = round((total - ctx.upstream_seconds) * 1000, 3)
                if ctx.model:
                    attrs["gen_ai.request.model"] = ctx.model
                if ctx.principal is not None:
                    attrs["gateway.key_id"] = ctx.principal.key_id
                if len(ctx.tried) > 1:
                    attrs["gateway.tried"] = tuple(ctx.tried)
                if len(ctx.candidates) > 1:
                    attrs["gateway.routing.candidates"] = tuple(d.name for d in ctx.candidates)
                    attrs["gateway.routing.strategy"] = self.overrides.get(ctx.model or "", self.strategy)
                if code:
                    attrs["error.type"] = code
                if status >= 500 or (code and status < 400):  # a cut stream is an error after a 200
                    span.error = code or str(status)
                span.name = f"{ctx.method} {ctx.family} {ctx.operation}"
            if span is not None and self.tracer is not None:
                self.tracer.end(span)
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="request_end")

    # --- attempts --------------------------------------------------------------------------------
    def attempt_start(self, ctx: RequestContext, dep: Deployment, url: str, headers: list[tuple[str, str]]) -> Any:
        ctx.extra["attempt_open"] = True
        started = time.perf_counter()
        if self.tracer is None:
            return (started, None)
        try:
            parent = ctx.extra.get("otel.span")
            if parent is None:
                return (started, None)
            model = ctx.model or ""
            if parent.sampled:
                base = self.attempt_attributes.get(dep.name)
                if base is None:
                    base = self.attempt_attributes[dep.name] = _attempt_attributes(self.upstreams.get(dep.name) or Upstream(dep))
                attrs: dict[str, Any] = {"gen_ai.operation.name": ctx.operation, "gen_ai.request.model": model, **base,
                                         "gateway.attempt": ctx.attempts + 1}
                name = f"{ctx.operation} {model}" if model else ctx.operation
                span = self.tracer.start_child(parent, name, SpanKind.CLIENT, attrs)
            else:  # ids only, for the upstream's traceparent
                span = self.tracer.start_child(parent, "", SpanKind.CLIENT, {})
            if ctx.extra.get("client_traceparent"):
                headers[:] = [(k, v) for k, v in headers if k.lower() != "traceparent"]
            headers.append(("traceparent", span.traceparent))
            return (started, span)
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="attempt_start")
            return (started, None)

    def attempt_end(self, ctx: RequestContext, dep: Deployment, handle: Any, status: int | None,
                    error_type_: str | None) -> None:
        ctx.extra["attempt_open"] = False
        try:
            started, span = handle if isinstance(handle, tuple) else (time.perf_counter(), None)
            seconds = time.perf_counter() - started
            code = error_type(error_type_)
            if code:
                ctx.extra["attempt_error"] = code
            m = self.metrics
            if m is not None:
                model = m.model(ctx.model, True)
                up = m.upstreams.get(dep.name)
                m.child(m.op_duration, *m.genai(ctx.operation, up, model), code).observe(seconds)
                if code == "upstream_rate_limited":
                    m.child(m.rate_limit_hits, dep.name, model, code).inc()
            if span is not None and span.sampled:
                attrs = span.attributes
                attrs["gen_ai.response.model"] = ctx.model or ""
                if status:
                    attrs["http.response.status_code"] = status
                if code:
                    attrs["error.type"] = code
                u = ctx.usage
                if ctx.committed and u.known:
                    if u.input_tokens is not None:
                        attrs["gen_ai.usage.input_tokens"] = u.input_tokens
                    if u.output_tokens is not None:
                        attrs["gen_ai.usage.output_tokens"] = u.output_tokens
                    if u.cached_tokens:
                        attrs["gen_ai.usage.cache_read.input_tokens"] = u.cached_tokens
                ttfc = ctx.extra.get("ttfc")
                if ttfc is not None and ctx.committed:
                    attrs["gen_ai.response.time_to_first_chunk"] = ttfc
                if code:
                    span.error = code
            if span is not None and self.tracer is not None:
                self.tracer.end(span)
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="attempt_end")

    def first_chunk(self, ctx: RequestContext, seconds: float) -> None:
        ctx.extra["ttfc"] = seconds
        m = self.metrics
        if m is not None and ctx.deployment is not None:
            try:  # the gateway is the server here: request start to the first chunk sent
                genai = m.genai(ctx.operation, m.upstreams.get(ctx.deployment.name), m.model(ctx.model, True))
                m.child(m.ttft, *genai[:3]).observe(time.perf_counter() - ctx.started)
            except Exception:  # noqa: BLE001
                log.exception("telemetry_hook_failed", hook="first_chunk")

    # --- decisions -------------------------------------------------------------------------------
    def _event(self, ctx: RequestContext | None, name: str, attrs: dict[str, Any]) -> None:
        span = ctx.extra.get("otel.span") if ctx is not None else None
        if span is not None:
            span.event(name, attrs)

    def failover(self, ctx: RequestContext, failed: Deployment, nxt: Deployment, reason: str) -> None:
        try:
            code = error_type(reason)
            if self.metrics is not None:
                self.metrics.child(self.metrics.retries, failed.name, code).inc()
                if nxt.name != failed.name:
                    self.metrics.child(self.metrics.failovers, failed.name, code).inc()
            self._event(ctx, "failover" if nxt.name != failed.name else "retry",
                        {"gateway.failed": failed.name, "gateway.next": nxt.name, "error.type": code})
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="failover")

    def retry_budget_exhausted(self, ctx: RequestContext) -> None:
        try:
            if self.metrics is not None:
                self.metrics.budget_exhausted.inc()
            self._event(ctx, "retry_budget_exhausted", {})
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="retry_budget_exhausted")

    def rate_limited(self, ctx: RequestContext, scope: str, source: str) -> None:
        try:
            m = self.metrics
            if source == "gateway" and m is not None:  # a provider's 429 is counted at attempt_end
                code = "policy_concurrency_limited" if "concurren" in scope else "policy_rate_limited"
                m.child(m.rate_limit_hits, "none", m.model(ctx.model, False), code).inc()
            self._event(ctx, "rate_limited", {"gateway.limit.scope": scope, "gateway.limit.source": source})
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="rate_limited")

    def limiter_mode(self, degraded: bool, mode: str) -> None:
        try:
            if self.metrics is not None:
                self.metrics.limiter_degraded.labels(mode).set(1 if degraded else 0)
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="limiter_mode")

    def redis_call(self, seconds: float, ok: bool) -> None:
        try:
            if self.metrics is not None:
                self.metrics.child(self.metrics.redis, "ok" if ok else "error").observe(seconds)
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="redis_call")

    def circuit_changed(self, deployment: str, is_open: bool) -> None:
        try:
            m = self.metrics
            if m is not None and deployment in m.upstreams:
                m.health.labels(deployment).set(0 if is_open else 1)
                m.child(m.circuit_changes, deployment, "open" if is_open else "closed").inc()
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="circuit_changed")

    def client_disconnected(self, ctx: RequestContext) -> None:
        try:
            m = self.metrics
            if m is not None:
                provider = ctx.deployment.name if ctx.deployment else "none"
                m.child(m.disconnects, provider, m.model(ctx.model, ctx.deployment is not None)).inc()
            self._event(ctx, "client_disconnected", {})
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="client_disconnected")

    def pool_saturated(self, ctx: RequestContext) -> None:
        try:
            if self.metrics is not None and ctx.deployment is not None:
                self.metrics.child(self.metrics.pool_saturated, ctx.deployment.name).inc()
            self._event(ctx, "pool_saturated", {})
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="pool_saturated")

    # --- lifecycle -------------------------------------------------------------------------------
    def render_metrics(self) -> bytes | None:
        return self.metrics.render() if self.metrics is not None else None

    def flush(self) -> None:
        if self.processor is not None:
            self.processor.flush()

    def _shutdown(self) -> None:
        if self.processor is not None:
            self.processor.shutdown()
        if self.reader is not None:
            self.reader.shutdown()

    async def aclose(self) -> None:
        """Flush and stop the exporters; a dead collector delays shutdown by at most `_SHUTDOWN_WAIT` s."""
        if self.closed:
            return
        self.closed = True
        if self.processor is None and self.reader is None:
            return
        worker = threading.Thread(target=self._shutdown, name="llm-gateway-telemetry-shutdown", daemon=True)
        worker.start()
        await asyncio.to_thread(worker.join, _SHUTDOWN_WAIT)


def build_observer(config: Config) -> GatewayObserver:
    return GatewayObserver(config)
