"""The metric series one request updates, resolved once per (deployment, model label, operation).

Contract:
- `Upstream(dep)`: a deployment's label values (GenAI provider name, server address and port),
  computed once.
- `Route`: the series of one (provider, model label, operation), made on first use (an unused one
  is never exported as a zero) and kept: `finish()` records a request's status, duration and
  non-zero token counts in one call, adding to this process's counters in place
  (`proxy.telemetry.local_metrics`); `attempt(error_type)`, `error(code)`, `ttft()` and `disconnects()`
  give the other per-route series. `SharedRoute` does the same through prometheus_client's
  multiprocess metrics (several workers), which only take `inc()`.
- `proxy.telemetry.metrics.GatewayMetrics.route()` makes and keeps them; nothing here is global.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from config.models import Deployment

if TYPE_CHECKING:
    from proxy.telemetry.metrics import GatewayMetrics

PROVIDER_NAMES = {"openai": "openai", "azure_openai": "azure.ai.openai", "openai_compatible": "openai",
                  "anthropic": "anthropic", "bedrock": "aws.bedrock", "ollama": "ollama"}


class Upstream:
    """Per-deployment label values, computed once."""

    __slots__ = ("name", "provider_name", "address", "port")

    def __init__(self, dep: Deployment) -> None:
        url = urlsplit(dep.base_url or "")
        self.name = dep.name
        self.provider_name = PROVIDER_NAMES.get(dep.type, dep.type)
        self.address = url.hostname or (f"bedrock-runtime.{dep.region or 'us-east-1'}.amazonaws.com"
                                        if dep.family == "bedrock" else "")
        self.port = url.port or (80 if url.scheme == "http" else 443)


class Route:
    """The series one (provider, model label, operation) updates per request and per attempt.

    Each series is made on first use (an unused one is never exported as a zero), then kept: by
    status, by fixed name (`duration`, `ttft`, `disconnects`, token type `input`/`output`), by error type."""

    __slots__ = ("metrics", "provider", "model", "genai", "series", "errors", "attempts")

    def __init__(self, m: "GatewayMetrics", provider: str, up: Upstream | None, model: str, operation: str) -> None:
        self.metrics, self.provider, self.model = m, provider, model
        self.genai = m.genai(operation, up, model)
        self.series: dict[int | str, Any] = {}
        self.errors: dict[str, Any] = {}
        self.attempts: dict[str, Any] = {}

    def _make(self, table: dict[Any, Any], key: Any, metric: Any, *labels: str) -> Any:
        found = table[key] = self.metrics.child(metric, *labels)
        return found

    def status(self, status: int) -> Any:
        found = self.series.get(status)
        return found if found is not None else \
            self._make(self.series, status, self.metrics.requests, self.provider, self.model, str(status))

    def duration(self) -> Any:
        found = self.series.get("duration")
        return found if found is not None else \
            self._make(self.series, "duration", self.metrics.duration, self.provider, self.model)

    def tokens(self, kind: str) -> tuple[Any, Any]:
        """(`llm_tokens_used_total`, `gen_ai.client.token.usage`) for token type `input` or `output`."""
        found = self.series.get(kind)
        if found is None:
            m = self.metrics
            found = self.series[kind] = (m.child(m.tokens, self.provider, self.model, kind),
                                         m.child(m.token_usage, *self.genai, kind))
        return found

    def finish(self, status: int, seconds: float, input_tokens: int | None, output_tokens: int | None) -> None:
        """A request's count by status, its duration and its non-zero token counts: one call, not one a series.

        Counters are this process's `LocalMetric` values, added to in place (no call a counter)."""
        series = self.series
        (series.get(status) or self.status(status)).value += 1
        (series.get("duration") or self.duration()).observe(seconds)
        if input_tokens:
            counter, histogram = series.get("input") or self.tokens("input")
            counter.value += input_tokens
            histogram.observe(input_tokens)
        if output_tokens:
            counter, histogram = series.get("output") or self.tokens("output")
            counter.value += output_tokens
            histogram.observe(output_tokens)

    def error(self, code: str) -> Any:
        found = self.errors.get(code)
        return found if found is not None else \
            self._make(self.errors, code, self.metrics.errors, self.provider, self.model, code)

    def attempt(self, code: str) -> Any:
        """`gen_ai.client.operation.duration` for one `error_type` ("" = success)."""
        found = self.attempts.get(code)
        return found if found is not None else \
            self._make(self.attempts, code, self.metrics.op_duration, *self.genai, code)

    def ttft(self) -> Any:
        found = self.series.get("ttft")
        return found if found is not None else self._make(self.series, "ttft", self.metrics.ttft, *self.genai[:3])

    def disconnects(self) -> Any:
        found = self.series.get("disconnects")
        return found if found is not None else \
            self._make(self.series, "disconnects", self.metrics.disconnects, self.provider, self.model)


class SharedRoute(Route):
    """A `Route` over prometheus_client's multiprocess metrics (several workers): their `inc()`."""

    __slots__ = ()

    def finish(self, status: int, seconds: float, input_tokens: int | None, output_tokens: int | None) -> None:
        series = self.series
        (series.get(status) or self.status(status)).inc()
        (series.get("duration") or self.duration()).observe(seconds)
        for kind, count in (("input", input_tokens), ("output", output_tokens)):
            if count:
                counter, histogram = series.get(kind) or self.tokens(kind)
                counter.inc(count)
                histogram.observe(count)
