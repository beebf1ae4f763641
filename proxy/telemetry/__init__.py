"""Telemetry: the observer hooks, Prometheus metrics, OTLP traces and metrics, and the logs.

Lives here: `observer` (the no-op hook protocol the kernel calls), `observability` (the real
observer), `metrics`, `metric_routes`, `local_metrics`, `span_shapes`, `tracing`, `spanwire` (the
span encoder), `otlp` and `export` (OTLP exporters and their lifecycle), `logs` (structlog set-up
and the access line).

May import: `config`, the kernel's types (`proxy.context`, `proxy.errors`) and `providers.base`.
Never state, the kernel's runtime or middlewares: traffic never depends on telemetry, and
telemetry observes traffic only through the hooks and the request context.
"""
