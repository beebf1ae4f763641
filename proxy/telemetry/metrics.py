"""Prometheus metrics: the contract metrics, the GenAI histograms and the gateway's own decisions.

Contract:
- One `CollectorRegistry` per app (several apps may live in one process). A record is a label
  lookup plus an increment on a plain slotted object (`proxy.telemetry.local_metrics.LocalMetric`, no locks:
  every hook runs on the event loop thread), exposed through a prometheus_client collector; with
  several workers the metrics are prometheus_client's own multiprocess ones instead. OTLP push reads
  the same registry (`proxy.telemetry.otlp.PrometheusBridge`), so nothing is recorded twice.
- Names: the six contract metrics and the response cache's four (`llm_cache_requests_total{result}`,
  `llm_cache_saved_tokens_total`, `llm_cache_saved_cost_usd_total`, `llm_cache_bytes`) take
  `monitoring.metrics.prefix` + `_` (`llm_gateway_llm_requests_total`);
  the GenAI histograms keep their semantic-convention names as Prometheus spells them
  (`gen_ai_client_token_usage`, `gen_ai_client_operation_duration_seconds`,
  `gen_ai_server_time_to_first_token_seconds`); the gateway's own metrics live under
  `<prefix or "llm_gateway">_` (`llm_gateway_retries_total`, ...).
- Labels are bounded: `provider` is a configured deployment name (or `none`), `model` a configured
  model, a model some deployment really served (at most `DYNAMIC_MODELS` of those), `none` or
  `other`; `status` an HTTP status; `error_type` the closed error vocabulary.
- Histogram values wait in a list until folded (`proxy.telemetry.local_metrics`); the observer calls `fold()`
  every `FOLD_EVERY` requests, so that list stays short whether or not anything reads the metrics.
- The request path resolves labels once per (provider, model label, operation): `route()` returns a
  `proxy.telemetry.metric_routes.Route` holding that combination's series, so a request costs one tuple
  lookup plus a few increments, not one label lookup per metric (the set of routes is bounded by
  the labels); `Route.finish()` records a request's status, duration and tokens in one call.
- Several uvicorn workers: `prepare_multiprocess()` (called by `serve` before the workers start)
  points prometheus_client at a shared directory, and `/metrics` then aggregates every worker.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from config.models import Config
from proxy.errors import CODES
from proxy.telemetry.local_metrics import LocalCollector, LocalMetric
from proxy.telemetry.metric_routes import Route, SharedRoute, Upstream

DYNAMIC_MODELS = 50
FOLD_EVERY = 1024  # requests between folds of the histograms' pending values (`proxy.telemetry.local_metrics`)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "server_address")
ERROR_TYPES = frozenset(CODES) | {f"upstream_{k}" for k in ("transient", "quota", "credential", "caller")} | {
    "cancelled", "client_disconnected"}
# Prometheus label -> OTel attribute, for OTLP push.
ATTRIBUTES = {"gen_ai_operation_name": "gen_ai.operation.name", "gen_ai_provider_name": "gen_ai.provider.name",
              "gen_ai_request_model": "gen_ai.request.model", "gen_ai_token_type": "gen_ai.token.type",
              "server_address": "server.address", "error_type": "error.type"}


def multiprocess() -> bool:
    """True when prometheus_client was imported with PROMETHEUS_MULTIPROC_DIR set (several workers)."""
    return values.ValueClass is not values.MutexValue


def prepare_multiprocess() -> None:
    """For `serve --workers N`: a fresh shared directory, set before the workers import prometheus_client."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        atexit.register(shutil.rmtree, path, True)


def error_type(code: str | None) -> str:
    return "" if not code else code if code in ERROR_TYPES else "_OTHER"


class GatewayMetrics:
    def __init__(self, config: Config) -> None:
        prefix = config.monitoring.metrics.prefix.strip("_")
        p, ns = (f"{prefix}_" if prefix else ""), (prefix or "llm_gateway")
        self.registry = CollectorRegistry(auto_describe=False)
        self.otel: dict[str, tuple[str, str]] = {}  # family name -> (OTLP name, unit)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._routes: dict[tuple[str | None, str, str], Route] = {}
        self._local: list[LocalMetric] = []
        self.registry.register(LocalCollector(self._local))
        self.until_fold = FOLD_EVERY  # counted down by the observer, once a request
        self.upstreams = {d.name: Upstream(d) for d in config.providers}
        self.models: set[str] = {m for d in config.providers for m in (*d.models, *d.deployment_map)}
        self.model_cap = len(self.models) + DYNAMIC_MODELS
        prov = ("provider", "model")
        self.requests = self._make(Counter, f"{p}llm_requests_total", "Client requests by outcome status.",
                                   (*prov, "status"))
        self.duration = self._make(Histogram, f"{p}llm_request_duration_seconds",
                                   "Client request duration, first byte in to last byte out.", prov,
                                   buckets=REQUEST_BUCKETS, unit="s")
        self.errors = self._make(Counter, f"{p}llm_errors_total", "Failed client requests by error type.",
                                 (*prov, "error_type"))
        self.tokens = self._make(Counter, f"{p}llm_tokens_used_total", "Tokens reported by upstreams.",
                                 (*prov, "token_type"), unit="{token}")
        self.rate_limit_hits = self._make(Counter, f"{p}llm_rate_limit_hits_total",
                                          "429s: policy_* = the gateway's limits, upstream_rate_limited = a provider's.",
                                          (*prov, "error_type"))
        self.health = self._make(Gauge, f"{p}provider_health_status",
                                 "1 = deployment circuit closed (healthy), 0 = open.", ("provider",),
                                 multiprocess_mode="mostrecent")
        self.token_usage = self._make(Histogram, "gen_ai_client_token_usage", "Tokens used per upstream operation.",
                                      (*GENAI, "gen_ai_token_type"), buckets=TOKEN_BUCKETS,
                                      otel="gen_ai.client.token.usage", unit="{token}")
        self.op_duration = self._make(Histogram, "gen_ai_client_operation_duration_seconds",
                                      "Upstream operation (attempt) duration.", (*GENAI, "error_type"),
                                      buckets=DURATION_BUCKETS, otel="gen_ai.client.operation.duration", unit="s")
        self.ttft = self._make(Histogram, "gen_ai_server_time_to_first_token_seconds",
                               "Streams: request start to the first chunk sent to the client.", GENAI[:3],
                               buckets=TTFT_BUCKETS, otel="gen_ai.server.time_to_first_token", unit="s")
        self.retries = self._make(Counter, f"{ns}_retries_total", "Retries, by failed deployment and reason.",
                                  ("provider", "error_type"))
        self.failovers = self._make(Counter, f"{ns}_failovers_total",
                                    "Retries that moved to another deployment.", ("provider", "error_type"))
        self.budget_exhausted = self._make(Counter, f"{ns}_retry_budget_exhausted_total",
                                           "Retries refused by the retry budget.", ())
        self.circuit_changes = self._make(Counter, f"{ns}_circuit_state_changes_total",
                                          "Circuit breaker transitions (status open/closed).", ("provider", "status"))
        self.limiter_degraded = self._make(Gauge, f"{ns}_limiter_degraded",
                                           "1 while the rate limiter runs without Redis (on_redis_error mode).",
                                           ("mode",), multiprocess_mode="max")
        self.redis = self._make(Histogram, f"{ns}_redis_call_duration_seconds", "Redis call latency.",
                                ("status",), buckets=REDIS_BUCKETS, unit="s")
        self.pool_saturated = self._make(Counter, f"{ns}_pool_saturated_total",
                                         "Attempts refused because the upstream connection pool was full.", ("provider",))
        self.disconnects = self._make(Counter, f"{ns}_client_disconnects_total",
                                      "Clients that went away before the response ended.", prov)
        self.overhead = self._make(Histogram, f"{ns}_overhead_seconds",
                                   "Gateway overhead per request: total minus upstream time.", (),
                                   buckets=OVERHEAD_BUCKETS, unit="s")
        self.spans_dropped = self._make(Counter, f"{ns}_telemetry_spans_dropped_total",
                                        "Spans dropped because the export queue was full.", ())
        self.export_failures = self._make(Counter, f"{ns}_telemetry_export_failures_total",
                                          "Spans whose OTLP export failed.", ())
        # The response cache's (DESIGN-2 contract names, prefixed like the contract metrics above).
        self.cache_requests = self._make(Counter, f"{p}llm_cache_requests_total",
                                         "Requests by response-cache result (hit, miss, bypass, coalesced).", ("result",))
        self.cache_saved_tokens = self._make(Counter, f"{p}llm_cache_saved_tokens_total",
                                             "Tokens of the answers the cache served (hit or coalesced).", (),
                                             unit="{token}")
        self.cache_saved_cost = self._make(Counter, f"{p}llm_cache_saved_cost_usd_total",
                                           "Cost of those answers at the answering deployment's price.", ())
        self.cache_bytes = self._make(Gauge, f"{p}llm_cache_bytes", "Bytes the embedded response cache holds.", (),
                                      multiprocess_mode="livesum")
        if config.cache.enabled:  # every result shows from the start, at 0
            for result in ("hit", "miss", "bypass", "coalesced"):
                self.child(self.cache_requests, result)
        for dep in config.enabled_providers:
            self.health.labels(dep.name).set(1)
        self.limiter_degraded.labels(config.state.on_redis_error).set(0)

    def _make(self, kind: Any, name: str, doc: str, labels: tuple[str, ...], *, otel: str | None = None,
              unit: str = "", **kwargs: Any) -> Any:
        if multiprocess():  # several workers: prometheus_client's shared-file values
            metric = kind(name, doc, labels, registry=self.registry, **kwargs)
        else:
            metric = LocalMetric(kind, name, doc, labels, kwargs.get("buckets", ()))
            self._local.append(metric)
        family = metric._name  # a counter's family name has no "_total"
        self.otel[family] = (otel or name, unit)
        return metric

    def child(self, metric: Any, *labels: str) -> Any:
        if metric.__class__ is LocalMetric:  # already a plain dict lookup
            return metric.labels(*labels)
        if not labels:  # prometheus_client: a metric without labels is its own series
            return metric
        key = (id(metric), labels)  # prometheus_client's labels() validates on every call
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def fold(self) -> None:
        """Count the histograms' pending values now (they are counted before any read anyway)."""
        self.until_fold = FOLD_EVERY
        for metric in self._local:
            metric.fold()

    def model(self, model: str | None, served: bool) -> str:
        if model is None:
            return "none"
        if model in self.models:
            return model
        if served and len(self.models) < self.model_cap:
            self.models.add(model)
            return model
        return "other"

    def route(self, deployment: str | None, model: str | None, operation: str) -> Route:
        """The series of a request that reached `deployment` (None: no deployment was called)."""
        # a configured (or already seen) model is its own label: no call for the common case
        label = model if model in self.models else self.model(model, deployment is not None)
        key = (deployment, label, operation)
        found = self._routes.get(key)
        if found is None:
            up = self.upstreams.get(deployment) if deployment is not None else None
            cls = SharedRoute if multiprocess() else Route
            found = self._routes[key] = cls(self, deployment or "none", up, label, operation)
        return found

    def genai(self, operation: str, up: Upstream | None, model: str) -> tuple[str, str, str, str]:
        if up is None:
            return (operation, "none", model, "")
        return (operation, up.provider_name, model, up.address)

    def render(self) -> bytes:
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
