"""The typed per-request context that middlewares share.

Contract: exactly one `RequestContext` per client request, created by the outermost middleware and
reached through `get_context(scope)` (stored at `scope["state"]["gateway"]`). Middlewares talk to
each other only through it; nothing per-request is ever kept on a middleware instance.

Every field has one owner, the layer that writes it (others only read):
- errors (outermost): the identity fields, `response_status`, `response_streaming`;
- auth: `principal`; inspect (through the adapter): `body`, `json`, `model`, `stream`, `operation`,
  `model_list`, `strip_usage`, `estimated_tokens`, and `query` (credential parameters removed, after
  auth has verified a SigV4 signature over the query as sent);
- router: `candidates`;
- ratelimit: `admitted` (the deployment its reservation holds), `reservation`, `admit_deployment`,
  `response_headers`;
- failover: `deployment` (the current attempt's, starting at `admitted` or the first candidate),
  `deadline`, `may_retry`, `hold_stream`, `failed_over`, `throttle_retried`;
- forwarder: `attempt` (one `Attempt` per upstream attempt), `attempts`, `tried`,
  `upstream_seconds`, `client_disconnected`; the relay: `status`, `committed`, `usage`, the
  attempt's `relayed`, `outcome` and `ttfc`, and a `log_bodies` key's `response_body`;
- telemetry: `trace`, `trace_id`, `trace_events`, `client_traceparent`, `series`;
- cache (`middlewares/cache.py`): `cache_status`, and `replay` for a request answered from the cache
  (the router then picks no deployment and the failover layer calls it instead of any attempt); for
  such a request it also sets `estimated_tokens` to 0 (no tokens reserved), and its replay, standing
  in for the relay, sets `status` and `committed`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from proxy.errors import GatewayError

if TYPE_CHECKING:
    from config.models import Deployment
    from providers.base import Adapter

STATE_KEY = "gateway"


@dataclass(slots=True)
class Usage:
    """What a response reported, read without changing it (the adapters' taps). None = not reported.

    Token counts, and for the attempt span the model that answered (`gen_ai.response.model`: a
    provider may name a dated version of the requested model) and why generation stopped
    (`gen_ai.response.finish_reasons`, in the provider's own words, one per choice)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None  # cache reads (+ writes where the provider counts them apart)
    response_model: str | None = None
    finish_reasons: tuple[str, ...] | None = None

    def finished(self, reason: object) -> None:
        """Add `reason` if it is a non-empty string (a stream may report its choices one by one)."""
        if reason.__class__ is str and reason:
            self.finish_reasons = (*self.finish_reasons, reason) if self.finish_reasons else (reason,)

    @property
    def known(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None

    @property
    def total(self) -> int:
        return (self.input_tokens or 0) + (self.output_tokens or 0)


@dataclass(slots=True)
class Principal:
    """Who is calling: a static or managed key, or anonymous in `auth.mode: none`."""

    key_id: str
    models: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    log_bodies: bool = False  # its access-log lines carry the request and response bodies

    def allows(self, family: str, model: str | None) -> bool:
        if self.families and family not in self.families:
            return False
        if not self.models or model is None or model in self.models:
            return True
        # Ollama: a name without a tag means ":latest", in an allowlist as in routing
        return family == "ollama" and _tagged(model) in map(_tagged, self.models)


def _tagged(name: str) -> str:
    """An Ollama name with its tag ("llama3.2" is "llama3.2:latest"; a ":" before the last "/" is a port)."""
    return name if ":" in name.rpartition("/")[2] else name + ":latest"


@dataclass(slots=True)
class Attempt:
    """One upstream attempt. The forwarder makes it and closes it; the relay fills in how it went.

    While `open`, its time counts as upstream time (the overhead header is stamped mid-attempt on a
    stream's head). `relayed`: the response has been sent in full, so a client leaving now cancels
    nothing. `outcome`: the adapter's class of an upstream error relayed as is (`transient`, ...).
    `error`: the gateway error code the attempt ended with (None: it succeeded)."""

    number: int
    deployment: "Deployment"
    started: float  # time.perf_counter() when the request went upstream
    ttfb: float | None = None  # seconds to the upstream's response head
    ttfc: float | None = None  # seconds to the first chunk of a stream sent to the client
    open: bool = True
    relayed: bool = False
    outcome: str | None = None
    error: str | None = None


@dataclass(slots=True)
class RequestContext:
    request_id: str
    family: str
    adapter: "Adapter"
    method: str
    path: str  # family-relative raw path, percent-encoding kept ("/v1/chat/completions", "/model/x%3A1/invoke")
    query: str
    headers: list[tuple[bytes, bytes]]  # as received, lower-case names
    started: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    body: bytes = b""
    # a `log_bodies` key's response as relayed (bounded), and its content-encoding: for the access log
    response_body: bytearray | None = None
    response_encoding: str = ""
    json: Any = None
    model: str | None = None
    stream: bool = False
    operation: str = "other"
    model_list: bool = False  # answered by the gateway from the deployments' models
    strip_usage: bool = False  # OpenAI include_usage was injected: hide the extra chunk
    estimated_tokens: int = 0
    reservation: Any = None
    deployment: "Deployment | None" = None
    admitted: "Deployment | None" = None
    candidates: list["Deployment"] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)
    attempts: int = 0
    committed: bool = False
    status: int | None = None
    error_code: str | None = None
    usage: Usage = field(default_factory=Usage)
    attempt: Attempt | None = None  # the current (or last) upstream attempt
    upstream_seconds: float = 0.0  # all attempts' upstream time so far
    client_disconnected: bool = False
    # What the client has been sent, recorded by the error layer's one `send` wrapper (others read it).
    response_status: int = 0  # 0 = no response start yet
    response_streaming: bool = False
    # Added to the response start by that wrapper (the rate limiter's headers): no wrapper per layer.
    response_headers: list[tuple[bytes, bytes]] | None = None
    deadline: float | None = None  # perf_counter: gateway.timeout, or the client's own when lower
    may_retry: bool = False  # the forwarder raises retryable failures instead of relaying them
    hold_stream: bool = False  # hold a stream's first events until they show it is healthy
    failed_over: bool = False
    throttle_retried: bool = False  # a provider 429 was already retried on the same deployment
    # Set by the rate limiter: reserve one of these deployments for a further attempt (None = none).
    admit_deployment: "Callable[[list[Deployment]], Awaitable[Deployment | None]] | None" = None
    # Telemetry (`proxy.telemetry.observability`): the trace position (a `proxy.telemetry.tracing.SpanStart` tuple), its W3C
    # trace id for the access log, and the metrics series of the last attempt (`proxy.telemetry.metric_routes.Route`).
    trace: Any = None
    trace_id: str | None = None
    trace_events: list[Any] | None = None  # span events, made into the request span when it ends
    client_traceparent: bool = False  # the client sent one: attempts replace it upstream
    series: Any = None
    body_read: bool = False
    cache_status: str | None = None  # hit | miss | bypass | coalesced (None: the cache is off)
    # Answers this request from the cache: `await replay(ctx, send)` (holds no reference to the context).
    replay: "Callable[[RequestContext, Any], Awaitable[None]] | None" = None
    header_map: dict[bytes, bytes] | None = None  # first value per name, built on the first lookup

    @property
    def upstream_ttfb(self) -> float | None:
        """The last attempt's time to the upstream's response head."""
        return self.attempt.ttfb if self.attempt is not None else None

    def header(self, name: bytes) -> str | None:
        """The first value of a (lower-case) header, as received."""
        found = self.header_map
        if found is None:  # several layers look headers up: one dict beats a scan per lookup
            found = self.header_map = dict(reversed(self.headers))
        value = found.get(name)
        return None if value is None else value.decode("latin-1")


def get_context(scope: dict[str, Any]) -> RequestContext:
    return scope["state"][STATE_KEY]


def set_context(scope: dict[str, Any], ctx: RequestContext) -> None:
    state = scope.get("state")
    if state is None:
        scope["state"] = state = {}
    state[STATE_KEY] = ctx


async def read_body(ctx: RequestContext, receive: Any, limit: int) -> None:
    """Read the whole request body once, bounded by `limit` (413 past it)."""
    if ctx.body_read:
        return
    declared = ctx.header(b"content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise GatewayError("caller_payload_too_large", f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            ctx.client_disconnected = True
            raise GatewayError("caller_invalid_request", "client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError("caller_payload_too_large", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    ctx.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    ctx.body_read = True
