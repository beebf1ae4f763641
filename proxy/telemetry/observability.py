"""The telemetry `Observer`: OpenTelemetry traces and Prometheus metrics behind the kernel's hooks.

Contract:
- Traces (when `monitoring.tracing.enabled` and an OTLP endpoint is configured, or an exporter is
  given): one SERVER span per client request continuing the caller's W3C `traceparent`, one CLIENT
  span per upstream attempt named `{gen_ai.operation.name} {model}` with the GenAI attributes, and
  the attempt's `traceparent` sent upstream in place of the client's. Sampler: ParentBased
  TraceIdRatio(`sample_rate`). Rate-limit, failover, retry-budget, disconnect and pool decisions are
  span events; the routing choice is an attempt attribute. Spans are light records on the request
  path (`proxy.telemetry.tracing`), exported through the SDK's exporters (`proxy.telemetry.export`, which
  also owns their shutdown); nothing global is touched. A request's trace position (a `SpanStart`
  tuple) waits in `ctx.trace` and its events in `ctx.trace_events`; each span is made
  once, complete, when it ends (an attempt's in `attempt_end`, the request's in `request_end`). The
  request span carries `gateway.cache` (hit, miss, bypass, coalesced) when the response cache is on.
- Metrics (`monitoring.metrics.enabled`): `proxy.telemetry.metrics.GatewayMetrics` (the response
  cache's through `cache_result` and `cache_bytes`); pushed over OTLP too
  when an endpoint is configured (`proxy.telemetry.otlp.PrometheusBridge`).
- Every hook is guarded: telemetry never raises into traffic, and traffic never depends on it:
  the observer writes only its own fields (`ctx.trace`, `ctx.trace_id`, `ctx.trace_events`,
  `ctx.client_traceparent`, `ctx.series`) and reads the rest (the attempt's time to first chunk
  and error are the forwarder's and the relay's, on `ctx.attempt`).
- Cost (a few microseconds a request): metrics go through one `Route` per (deployment, model,
  operation); a span sets only its own values (request id, overhead, tokens) and takes the rest
  (an attempt's number, status and error type included) from a shared, cached "shape"
  (`proxy.telemetry.span_shapes`: name and attribute dict per request or attempt kind), which the exporter
  also encodes once.
"""
from __future__ import annotations

import random
import time
from typing import Any

import structlog
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind

from config.models import Config, Deployment
from proxy.context import RequestContext
from proxy.telemetry.metrics import GatewayMetrics, error_type
from proxy.telemetry.observer import Observer
from proxy.telemetry.span_shapes import SpanShapes
from proxy.telemetry.export import Exporters
from proxy.telemetry.tracing import parse_traceparent

log = structlog.get_logger("llm_gateway.telemetry")
_perf_counter, _time_ns = time.perf_counter, time.time_ns  # module globals: one lookup, not two, a hook
_getrandbits = random.getrandbits
_SERVER, _CLIENT = SpanKind.SERVER, SpanKind.CLIENT


class GatewayObserver(Observer):
    def __init__(self, config: Config, *, span_exporter: SpanExporter | None = None,
                 metric_reader: MetricReader | None = None) -> None:
        self.metrics = GatewayMetrics(config) if config.monitoring.metrics.enabled else None
        self.overhead = self.metrics.child(self.metrics.overhead) if self.metrics else None
        self.strategy = config.gateway.routing_strategy
        self.overrides = config.gateway.routing_overrides
        self.shapes = SpanShapes(self.metrics, config.providers)
        self.exporters = Exporters(config, self.metrics, span_exporter, metric_reader)
        self.tracer = self.exporters.tracer  # None: nothing is traced
        self.reader = self.exporters.reader  # the OTLP metric reader, if any (embedders and tests flush it)
        self.cache_series: dict[str, Any] = {}  # the response cache's result counters, by result
        self.cache_size: Any = None

    # --- request ---------------------------------------------------------------------------------
    def request_start(self, ctx: RequestContext, scope: dict[str, Any]) -> Any:
        try:
            traceparent = ctx.header(b"traceparent")
            if self.tracer is None:
                parsed = parse_traceparent(traceparent)
                if parsed is not None:
                    ctx.trace_id = f"{parsed[0]:032x}"
                return None
            if traceparent is not None:
                ctx.client_traceparent = True  # attempts replace it
            # the span itself is made once, when the request ends: its name and shape depend on the outcome
            begun = self.tracer.begin(traceparent, ctx.header(b"tracestate") if traceparent else None)
            ctx.trace = begun
            ctx.trace_id = begun[6]
            return begun
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="request_start")
            return None

    def request_end(self, ctx: RequestContext, handle: Any, status: int, outcome: str) -> None:
        try:
            total = _perf_counter() - ctx.started
            overhead = total - ctx.upstream_seconds
            dep = ctx.deployment if ctx.attempts else None
            code = None if outcome == "ok" else error_type(outcome)
            m = self.metrics
            if m is not None:
                if dep is not None:  # tokens count only when a deployment was called
                    route = ctx.series  # the last attempt's: the same series, no lookup
                    if route is None or route.provider != dep.name:
                        route = m.route(dep.name, ctx.model, ctx.operation)
                    u = ctx.usage
                    route.finish(status, total, u.input_tokens, u.output_tokens)
                else:
                    route = m.route(None, ctx.model, ctx.operation)
                    route.finish(status, total, None, None)
                self.overhead.observe(overhead if overhead > 0.0 else 0.0)  # type: ignore[union-attr]  # set with metrics
                if code:
                    route.error(code).inc()
                m.until_fold -= 1
                if not m.until_fold:
                    m.fold()
            if handle is not None and handle[4]:  # sampled
                # Usage, deployment and upstream details are on the attempt spans, the family and operation
                # in the name, the outcome in error.type. Shared per outcome shape; the span's own values
                # are the request id, the overhead and, when there was a choice, the routing.
                key = (ctx.method, ctx.path, ctx.family, ctx.operation, status, ctx.attempts, ctx.model,
                       ctx.principal.key_id if ctx.principal is not None else None, code)
                name, static = self.shapes.servers.get(key) or self.shapes.server(key)
                own = {"gateway.request_id": ctx.request_id,
                       "gateway.overhead_ms": round(overhead * 1_000_000) / 1000}
                if ctx.cache_status is not None:
                    own["gateway.cache"] = ctx.cache_status
                if len(ctx.tried) > 1:
                    own["gateway.tried"] = tuple(ctx.tried)
                if len(ctx.candidates) > 1:
                    own["gateway.routing.candidates"] = tuple(d.name for d in ctx.candidates)
                    own["gateway.routing.strategy"] = self.overrides.get(ctx.model or "", self.strategy)
                # a cut stream is an error after a 200
                error = (code or str(status)) if status >= 500 or (code and status < 400) else None
                trace_id, span_id, parent_id, remote, _, state, _, start = handle
                self.tracer.end((name, _SERVER, static, trace_id, span_id, parent_id,  # type: ignore[union-attr]  # sampled: a tracer exists
                                 remote, state, start, _time_ns(), own, ctx.trace_events, error))
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="request_end")

    # --- attempts --------------------------------------------------------------------------------
    def attempt_start(self, ctx: RequestContext, dep: Deployment, url: str, headers: list[tuple[str, str]]) -> Any:
        """Returns (perf counter, the attempt span's id or 0, its shape or None, unix ns, the request's `SpanStart`)."""
        started = _perf_counter()
        if self.tracer is None and self.metrics is None:
            return (started, 0, None, 0, None)
        try:
            key = (dep.name, ctx.operation, ctx.model)
            kind = self.shapes.attempts.get(key) or self.shapes.attempt(key, dep)
            begun = ctx.trace
            if begun is None:
                return (started, 0, kind, 0, None)
            span_id = _getrandbits(64) or 1  # the span is made when the attempt ends (sampled only)
            if ctx.client_traceparent:
                headers[:] = [(k, v) for k, v in headers if k.lower() != "traceparent"]
            headers.append(("traceparent", f"00-{begun[6]}-{span_id.to_bytes(8, 'big').hex()}-"
                                           f"{'01' if begun[4] else '00'}"))
            return (started, span_id, kind, _time_ns(), begun)
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="attempt_start")
            return (started, 0, None, 0, None)

    def attempt_end(self, ctx: RequestContext, dep: Deployment, handle: Any, status: int | None,
                    error_type_: str | None) -> None:
        try:
            started, span_id, kind, start, begun = handle if handle.__class__ is tuple else \
                (_perf_counter(), 0, None, 0, None)
            seconds = _perf_counter() - started
            code = error_type(error_type_) if error_type_ else ""  # no call for a successful attempt
            m = self.metrics
            if m is not None:
                route = kind[2] if kind is not None else m.route(dep.name, ctx.model, ctx.operation)
                route.attempt(code).observe(seconds)
                ctx.series = route  # request_end's series too, when this is the last attempt
                if code == "upstream_rate_limited":
                    m.child(m.rate_limit_hits, dep.name, route.model, code).inc()
            if span_id:
                if begun[4] and kind is not None:  # sampled
                    # the forwarder counted this attempt in ctx.attempts after its start
                    own: dict[str, Any] | None = None
                    if ctx.committed:
                        u = ctx.usage
                        # the answering model and finish reasons repeat: shared, encoded once per combination
                        final = (status, ctx.attempts, code, u.response_model, u.finish_reasons)
                        own = {}
                        if u.input_tokens is not None:
                            own["gen_ai.usage.input_tokens"] = u.input_tokens
                        if u.output_tokens is not None:
                            own["gen_ai.usage.output_tokens"] = u.output_tokens
                        if u.cached_tokens:
                            own["gen_ai.usage.cache_read.input_tokens"] = u.cached_tokens
                        ttfc = ctx.attempt.ttfc if ctx.attempt is not None else None
                        if ttfc is not None:
                            own["gen_ai.response.time_to_first_chunk"] = ttfc
                    else:
                        final = (status, ctx.attempts, code, None, None)
                    static = kind[3].get(final) or self.shapes.attempt_final(kind, final)
                    self.tracer.end((kind[0], _CLIENT, static, begun[0], span_id, begun[1],  # type: ignore[union-attr]  # sampled: a tracer exists
                                     False, begun[5], start, _time_ns(), own, None, code or None))
        except Exception:  # noqa: BLE001
            log.exception("telemetry_hook_failed", hook="attempt_end")

    def first_chunk(self, ctx: RequestContext, seconds: float) -> None:
        m = self.metrics
        if m is not None and ctx.deployment is not None:
            try:  # the gateway is the server here: request start to the first chunk sent
                m.route(ctx.deployment.name, ctx.model, ctx.operation).ttft().observe(_perf_counter() - ctx.started)
            except Exception:  # noqa: BLE001
                log.exception("telemetry_hook_failed", hook="first_chunk")

    # --- decisions -------------------------------------------------------------------------------
    def _event(self, ctx: RequestContext | None, name: str, attrs: dict[str, Any]) -> None:
        """An event on the request's span (sampled only), made when the request ends."""
        begun = ctx.trace if ctx is not None else None
        if begun is not None and begun[4]:  # sampled
            events = ctx.trace_events  # type: ignore[union-attr]  # begun implies ctx
            if events is None:
                events = ctx.trace_events = []  # type: ignore[union-attr]  # begun implies ctx
            events.append((name, attrs, _time_ns()))

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
                dep = ctx.deployment
                m.route(dep.name if dep is not None else None, ctx.model, ctx.operation).disconnects().inc()
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

    def cache_result(self, ctx: RequestContext, result: str, saved_tokens: int, saved_cost_usd: float) -> None:
        m = self.metrics
        if m is not None:
            try:
                series = self.cache_series.get(result)  # once a request: the series, not a label lookup
                if series is None:
                    series = self.cache_series[result] = m.child(m.cache_requests, result)
                series.inc()
                if saved_tokens:
                    m.cache_saved_tokens.inc(saved_tokens)
                if saved_cost_usd:
                    m.cache_saved_cost.inc(saved_cost_usd)
            except Exception:  # noqa: BLE001
                log.exception("telemetry_hook_failed", hook="cache_result")

    def cache_bytes(self, size: int) -> None:
        m = self.metrics
        if m is not None:
            try:
                if self.cache_size is None:
                    self.cache_size = m.child(m.cache_bytes)
                self.cache_size.set(size)
            except Exception:  # noqa: BLE001
                log.exception("telemetry_hook_failed", hook="cache_bytes")

    # --- lifecycle -------------------------------------------------------------------------------
    def render_metrics(self) -> bytes | None:
        return self.metrics.render() if self.metrics is not None else None

    def flush(self) -> None:
        self.exporters.flush()

    async def aclose(self) -> None:
        """Flush and stop the exporters (`proxy.telemetry.export.Exporters.aclose`)."""
        await self.exporters.aclose()


def build_observer(config: Config) -> GatewayObserver:
    return GatewayObserver(config)
