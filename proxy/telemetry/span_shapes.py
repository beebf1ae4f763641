"""Span shapes: the name and attributes that repeat from span to span, made once and shared.

Contract:
- Most span attributes repeat from request to request. They live in one dict per combination
  (a "shape"), never mutated once made: a span takes it as its `static` part and sets only its own
  values, and the exporter (`proxy.telemetry.spanwire`) encodes each shape once.
- `SpanShapes(metrics, deployments)` (metrics may be None: spans only) makes and remembers them:
  `server(key)` gives a request's span name (`{method} {family} {operation}`) and shared
  attributes, for key (method, path, family, operation, status, attempts, model, key id, error
  type); `attempt(key, dep)` gives an attempt's span name (`{operation} {model}`, or the operation
  alone), shared GenAI and server attributes, metrics `Route` (None without metrics) and its final
  shapes, for key (deployment, operation, model): one lookup per attempt serves spans and metrics.
  `attempt_final(kind, (status, attempt number, error type, response model, finish reasons))` gives
  an ended attempt's shared attributes: the shape's plus those, made once per combination.
- The request path looks in `servers` / `attempts` first and calls those only on a miss. Each
  cache holds at most `SHAPES_LIMIT` shapes and is cleared when full: many key ids or paths only
  make it miss more, never grow without bound.
"""
from __future__ import annotations

from typing import Any

from config.models import Deployment
from proxy.telemetry.metric_routes import Route, Upstream
from proxy.telemetry.metrics import GatewayMetrics

SHAPES_LIMIT = 2048
FINALS_LIMIT = 64  # per attempt shape: (status, attempt number, error type, model, reasons) combinations


class SpanShapes:
    def __init__(self, metrics: GatewayMetrics | None, deployments: list[Deployment]) -> None:
        self.metrics = metrics
        # per-deployment label values: the metrics' own when there are metrics, else made here
        self.upstreams = metrics.upstreams if metrics else {d.name: Upstream(d) for d in deployments}
        self.servers: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
        self.attempts: dict[tuple[Any, ...], tuple[str, dict[str, Any], Route | None, dict[Any, Any]]] = {}

    def server(self, key: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
        """A request's span name and shared attributes, once its outcome is known."""
        method, path, family, operation, status, attempts, model, key_id, code = key
        attrs: dict[str, Any] = {"http.request.method": method, "url.path": path, "http.response.status_code": status,
                                 "gateway.attempts": attempts}
        if model:
            attrs["gen_ai.request.model"] = model
        if key_id is not None:
            attrs["gateway.key_id"] = key_id
        if code:
            attrs["error.type"] = code
        if len(self.servers) >= SHAPES_LIMIT:
            self.servers.clear()
        found = self.servers[key] = (f"{method} {family} {operation}", attrs)
        return found

    def attempt(self, key: tuple[Any, ...],
                dep: Deployment) -> tuple[str, dict[str, Any], Route | None, dict[Any, Any]]:
        """An attempt's span name and shared attributes, and its metrics route: one lookup per attempt."""
        _, operation, model = key
        up = self.upstreams.get(dep.name) or Upstream(dep)
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": model or "",
                                 "gen_ai.provider.name": up.provider_name, "gateway.deployment": up.name}
        if up.address:
            attrs["server.address"], attrs["server.port"] = up.address, up.port
        attrs["gen_ai.response.model"] = model or ""
        route = self.metrics.route(dep.name, model, operation) if self.metrics is not None else None
        if len(self.attempts) >= SHAPES_LIMIT:
            self.attempts.clear()
        found = self.attempts[key] = (f"{operation} {model}" if model else operation, attrs, route, {})
        return found

    @staticmethod
    def attempt_final(kind: tuple[Any, ...], final: tuple[Any, ...]) -> dict[str, Any]:
        """An ended attempt's shared attributes: its shape's, then those of `final`, (status, attempt number,
        error type, the model the response named, its finish reasons); the response's model replaces
        the requested one as `gen_ai.response.model`.

        Kept in the shape (`kind[3]`, at most `FINALS_LIMIT`): all five repeat, so the exporter encodes
        each combination once instead of five attributes a span."""
        status, attempt, code, model, reasons = final
        attrs = {**kind[1], "gateway.attempt": attempt}
        if status:
            attrs["http.response.status_code"] = status
        if code:
            attrs["error.type"] = code
        if model:
            attrs["gen_ai.response.model"] = model
        if reasons:
            attrs["gen_ai.response.finish_reasons"] = reasons
        finals = kind[3]
        if len(finals) >= FINALS_LIMIT:
            finals.clear()
        finals[final] = attrs
        return attrs
