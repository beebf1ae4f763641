"""Typed configuration: the shape of `gateway.yaml` once loaded and validated.

Contract: every class is a plain dataclass with defaults matching the documented contract; nothing
here reads files or the environment (see `config.loader`). `Secret` values mask themselves in
repr/str-formatting helpers so config dumps never show them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("openai", "anthropic", "bedrock", "ollama")
DEPLOYMENT_TYPES = {
    "openai": "openai",
    "azure_openai": "openai",
    "openai_compatible": "openai",
    "anthropic": "anthropic",
    "bedrock": "bedrock",
    "ollama": "ollama",
}
ROUTING_STRATEGIES = ("round_robin", "weighted", "cost_based", "latency_based", "least_busy", "health_based")
REDIS_ERROR_MODES = ("local", "open", "closed")


class Secret(str):
    """A string that never shows itself in repr(); use `mask()` for display."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"

    def mask(self) -> str:
        return "***" if self else ""


@dataclass(slots=True)
class RateLimit:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def is_empty(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None


@dataclass(slots=True)
class Timeouts:
    connect: float = 5.0
    first_byte: float = 120.0
    idle: float = 300.0


@dataclass(slots=True)
class Cost:
    input_per_1k: float = 0.0
    output_per_1k: float = 0.0


@dataclass(slots=True)
class Deployment:
    """One upstream deployment (an entry of `providers:`)."""

    name: str
    type: str
    family: str
    enabled: bool = True
    base_url: str = ""
    api_key: Secret = Secret("")
    models: list[str] = field(default_factory=list)
    rate_limit: RateLimit = field(default_factory=RateLimit)
    cost: Cost = field(default_factory=Cost)
    weight: float = 1.0
    priority: int = 0
    timeouts: Timeouts = field(default_factory=Timeouts)
    region: str = ""
    aws_access_key_id: str = ""
    aws_secret_access_key: Secret = Secret("")
    aws_session_token: Secret = Secret("")
    api_version: str = ""
    deployment_map: dict[str, str] = field(default_factory=dict)
    disabled_reason: str = ""

    def serves(self, model: str | None) -> bool:
        if not self.models or model is None or model in self.models:
            return True
        if self.family != "ollama":
            return False
        # Ollama: a name without a tag means ":latest" ("llama3.2" is "llama3.2:latest"); a ":" before
        # the last "/" is a registry port, not a tag.
        def latest(name: str) -> str:
            return name if ":" in name.rpartition("/")[2] else name + ":latest"

        wanted = latest(model)
        return any(latest(m) == wanted for m in self.models)


@dataclass(slots=True)
class GatewaySettings:
    routing_strategy: str = "health_based"
    routing_overrides: dict[str, str] = field(default_factory=dict)  # model -> strategy
    enable_failover: bool = True
    max_retries: int = 3
    failure_threshold: int = 5  # consecutive transient failures that open a deployment's circuit
    upstream_transport: str = "httptools"  # httptools | aiohttp: the wire under the httpx API (see README)
    upstream_max_connections: int = 1000  # upstream connection pool size (per process)
    circuit_base_ejection: float = 30.0  # first ejection of an open circuit (s); the n-th lasts n x this, <= 300 s
    timeout: float = 60.0
    max_body_bytes: int = 32 * 1024 * 1024
    rate_limit: RateLimit = field(default_factory=RateLimit)
    default_output_tokens: int = 1024  # token reservation when a request names no max_tokens
    model_output_tokens: dict[str, str] = field(default_factory=dict)  # per-model override of that


@dataclass(slots=True)
class StateSettings:
    redis_url: Secret = Secret("")
    on_redis_error: str = "local"
    replicas: int = 1
    redis_timeout: float = 0.25


@dataclass(slots=True)
class StaticKey:
    id: str
    sha256: str
    aws_access_key_id: str = ""
    aws_secret_access_key: Secret = Secret("")
    models: list[str] = field(default_factory=list)
    families: list[str] = field(default_factory=list)  # allowed inbound API families (empty = all)
    rate_limit: RateLimit = field(default_factory=RateLimit)
    max_concurrent: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    log_bodies: bool = False  # this key's request and response bodies go into its access-log lines
    cache: bool = True  # false: the response cache never serves nor stores this key's requests


@dataclass(slots=True)
class AuthSettings:
    mode: str = "keys"
    admin_key: Secret = Secret("")
    secret: Secret = Secret("")
    keys: list[StaticKey] = field(default_factory=list)


@dataclass(slots=True)
class OtelSettings:
    endpoint: str = ""
    protocol: str = "grpc"


@dataclass(slots=True)
class MetricsSettings:
    enabled: bool = True
    prefix: str = ""


@dataclass(slots=True)
class TracingSettings:
    enabled: bool = False
    sample_rate: float = 1.0


@dataclass(slots=True)
class MonitoringSettings:
    otel: OtelSettings = field(default_factory=OtelSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    access_log: bool = True
    overhead_header: bool = True


@dataclass(slots=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    certfile: str = ""
    keyfile: str = ""
    # Edge limits, enforced per connection by proxy/server before a request reaches the app; 0 turns one off.
    max_connections: int = 16384  # open client connections per process; the next one gets a 503 and is closed
    header_timeout: float = 20.0  # seconds for a whole request head (request line and headers), else 408
    max_header_bytes: int = 65536  # URL plus header names and values, else 431 (414 for a URL alone over it)
    max_headers: int = 100  # header fields per request, else 431
    body_timeout: float = 20.0  # seconds a request body may go without a byte (and the min rate's grace), else 408
    body_min_rate: int = 500  # bytes/s a body must average once body_timeout has passed, else 408


CACHE_SCOPES = ("key", "team", "global")


@dataclass(slots=True)
class CacheSettings:
    """`cache:` the response cache (README "Response cache")."""

    enabled: bool = False
    ttl: float = 3600.0  # seconds an entry lives, unless the request's x-gateway-cache-ttl says otherwise
    scope: str = "key"  # key | team | global: who may read an entry another caller wrote
    models: list[str] = field(default_factory=list)  # empty = every model
    max_entry_bytes: int = 4 * 1024 * 1024  # larger answers are not stored
    max_bytes: int = 256 * 1024 * 1024  # the embedded store's LRU bound
    coalesce: bool = True  # identical requests in flight wait for the first one, across replicas
    coalesce_wait: float = 30.0  # a waiting duplicate goes upstream itself after this


@dataclass(slots=True)
class Config:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    state: StateSettings = field(default_factory=StateSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    providers: list[Deployment] = field(default_factory=list)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    app: dict[str, object] = field(default_factory=dict)
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def enabled_providers(self) -> list[Deployment]:
        return [d for d in self.providers if d.enabled]
