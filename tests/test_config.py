"""Config loader and `llm-gateway check-config`, table-driven.

The seed example loads unchanged; `${VAR}` / `${VAR:-default}` expansion (nested defaults too);
durations and sizes; and every error names `file:line: dotted.field: message` precisely.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, load_config, parse_config, resolve_path
from config.loader import parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "config" / "examples" / "seed.yaml"
SHARED_SEED = Path("/work/shared/seed/config.yaml")
SEED_ENV = {"OPENAI_API_KEY": "sk-seed-openai-4242", "ANTHROPIC_API_KEY": "sk-ant-seed-1717"}
OLLAMA = "providers:\n  ollama: {}\n"


# --- the seed example ---------------------------------------------------------------------------

def test_seed_example_is_a_byte_identical_copy_of_the_shared_seed() -> None:
    if not SHARED_SEED.exists():
        pytest.skip("the shared seed is not present on this machine")
    assert SEED.read_bytes() == SHARED_SEED.read_bytes()


def test_seed_loads_unchanged_with_provider_keys() -> None:
    cfg = load_config(SEED, env=SEED_ENV)
    assert cfg.warnings == []
    assert [(d.name, d.type, d.family, d.enabled) for d in cfg.providers] == [
        ("openai", "openai", "openai", True),
        ("anthropic", "anthropic", "anthropic", True),
        ("bedrock", "bedrock", "bedrock", True),
    ]
    openai, anthropic, bedrock = cfg.providers
    assert openai.models == ["gpt-4", "gpt-3.5-turbo"]
    assert anthropic.models == ["claude-3-opus", "claude-3-sonnet"]
    assert bedrock.models == ["anthropic.claude-v2"]
    assert (openai.rate_limit.requests_per_minute, openai.rate_limit.tokens_per_minute) == (60, 90000)
    assert (anthropic.rate_limit.requests_per_minute, anthropic.rate_limit.tokens_per_minute) == (50, None)
    assert (bedrock.rate_limit.requests_per_minute, bedrock.rate_limit.tokens_per_minute) == (100, None)
    assert openai.api_key == "sk-seed-openai-4242" and anthropic.api_key == "sk-ant-seed-1717"
    assert openai.base_url == "https://api.openai.com/v1"
    assert anthropic.base_url == "https://api.anthropic.com"
    assert bedrock.region == "us-east-1"
    assert bedrock.base_url == "https://bedrock-runtime.us-east-1.amazonaws.com"
    g = cfg.gateway
    assert (g.routing_strategy, g.enable_failover, g.max_retries, g.timeout) == ("health_based", True, 3, 60.0)
    assert cfg.monitoring.otel.endpoint == "localhost:4317"
    assert (cfg.monitoring.metrics.enabled, cfg.monitoring.metrics.prefix) == (True, "llm_gateway")
    assert (cfg.monitoring.tracing.enabled, cfg.monitoring.tracing.sample_rate) == (True, 1.0)
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8080)
    assert cfg.app == {"name": "llm-gateway", "version": "1.0.0"}
    assert cfg.source == SEED


def test_seed_without_provider_keys_disables_those_providers_with_warnings() -> None:
    cfg = load_config(SEED, env={})
    assert cfg.warnings == [
        "provider 'openai' disabled: unset variable OPENAI_API_KEY",
        "provider 'anthropic' disabled: unset variable ANTHROPIC_API_KEY",
    ]
    assert [d.name for d in cfg.enabled_providers] == ["bedrock"]
    assert [(d.name, d.disabled_reason) for d in cfg.providers if not d.enabled] == [
        ("openai", "unset variable OPENAI_API_KEY"), ("anthropic", "unset variable ANTHROPIC_API_KEY")]


# --- ${VAR} expansion ---------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "env", "expected"), [
    ("${H}", {"H": "h1"}, "h1"),
    ("${H}", {"H": ""}, ""),                                  # set but empty stays empty
    ("${H:-dflt}", {}, "dflt"),
    ("${H:-dflt}", {"H": ""}, "dflt"),                        # :- also covers empty
    ("${H:-dflt}", {"H": "real"}, "real"),
    ("${H:-}", {}, ""),
    ("a-${X:-1}-${Y:-2}-b", {"Y": "z"}, "a-1-z-b"),
    ("${A:-${B:-inner}}", {}, "inner"),                       # nested defaults
    ("${A:-${B:-inner}}", {"B": "b"}, "b"),
    ("${A:-${B:-inner}}", {"A": "a"}, "a"),
    ("${A:-x${B:-y}z}", {}, "xyz"),
    ("${A:-${B:-${C:-deep}}}", {"C": "c"}, "c"),
    ("${A:-${B}}", {"A": "a"}, "a"),                          # an unused default is never expanded
    ("cost $5 ${not closed", {}, "cost $5 ${not closed"),     # not references: kept as written
])
def test_variable_expansion(value: str, env: dict[str, str], expected: str) -> None:
    cfg = parse_config(f'server:\n  host: "{value}"\n{OLLAMA}', "t.yaml", env)
    assert cfg.server.host == expected


def test_expanded_unquoted_values_are_typed_like_yaml() -> None:
    text = ("gateway:\n  timeout: ${T:-2m}\n  max_retries: ${R:-5}\n  enable_failover: ${F:-false}\n"
            "  max_body_bytes: ${S:-1KiB}\nserver:\n  port: ${PORT:-9090}\n" + OLLAMA)
    cfg = parse_config(text, "t.yaml", {"R": "7"})
    g = cfg.gateway
    assert (g.timeout, g.max_retries, g.enable_failover, g.max_body_bytes) == (120.0, 7, False, 1024)
    assert cfg.server.port == 9090


def test_unset_variable_in_a_nested_default_disables_only_that_provider() -> None:
    text = 'providers:\n  openai:\n    api_key: "${A:-${OPENAI_KEY_FILE_VAR}}"\n  ollama: {}\n'
    cfg = parse_config(text, "t.yaml", {})
    assert cfg.warnings == ["provider 'openai' disabled: unset variable OPENAI_KEY_FILE_VAR"]
    assert [d.name for d in cfg.enabled_providers] == ["ollama"]


def test_secrets_come_from_the_environment_passed_in() -> None:
    cfg = parse_config('providers:\n  openai:\n    api_key: "${K}"\n', "t.yaml", {"K": "sk-abc"})
    assert cfg.providers[0].api_key == "sk-abc" and cfg.providers[0].enabled
    assert "sk-abc" not in repr(cfg.providers[0])


# --- durations and sizes ------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "seconds"), [
    ("500ms", 0.5), ("60s", 60.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("90", 90.0), (90, 90.0),
    (0.25, 0.25), ("2 m", 120.0),
])
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize(("raw", "size"), [
    ("32MiB", 32 * 1024 * 1024), ("1KiB", 1024), ("10kb", 10_000), ("2MB", 2_000_000), ("1GiB", 1024 ** 3),
    ("100", 100), (1048576, 1048576), ("5b", 5),
])
def test_sizes(raw: object, size: int) -> None:
    assert parse_size(raw) == size


def test_durations_and_sizes_in_a_config() -> None:
    text = ("gateway:\n  timeout: 500ms\n  max_body_bytes: 32MiB\nstate:\n  redis_timeout: 250ms\n"
            "providers:\n  ollama:\n    timeouts: {connect: 2m, first_byte: 60s, idle: 500ms}\n")
    cfg = parse_config(text, "t.yaml", {})
    assert cfg.gateway.timeout == 0.5 and cfg.gateway.max_body_bytes == 33554432
    assert cfg.state.redis_timeout == 0.25
    t = cfg.providers[0].timeouts
    assert (t.connect, t.first_byte, t.idle) == (120.0, 60.0, 0.5)


def test_defaults_match_the_contract() -> None:
    cfg = parse_config(OLLAMA, "t.yaml", {})
    t = cfg.providers[0].timeouts
    assert (t.connect, t.first_byte, t.idle) == (5.0, 120.0, 300.0)
    assert (cfg.gateway.timeout, cfg.gateway.max_body_bytes) == (60.0, 32 * 1024 * 1024)
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8080)
    assert cfg.providers[0].base_url == "http://localhost:11434"


# --- errors: file:line: field: message ----------------------------------------------------------

SHA_A = "a" * 64
# (name, yaml, exact message; a message ending in "..." is matched as a prefix)
ERRORS = [
    ("unknown field",
     "server:\n  port: 8080\n  bogus: 1\n" + OLLAMA,
     "bad.yaml:3: server.bogus: unknown field (expected one of: body_min_rate, body_timeout, certfile, header_timeout, host, keyfile, max_connections, max_header_bytes, max_headers, port, workers)"),
    ("unknown gateway field",
     "gateway:\n  timeout: 60s\n  bogus: 1\n" + OLLAMA,
     "bad.yaml:3: gateway.bogus: unknown field (expected one of: ..."),
    ("unknown nested field",
     "monitoring:\n  metrics:\n    enabled: true\n    prefx: x\n" + OLLAMA,
     "bad.yaml:4: monitoring.metrics.prefx: unknown field (expected one of: enabled, prefix)"),
    ("unknown provider field",
     "providers:\n  ollama:\n    base_url: http://x:1\n    colour: red\n",
     "bad.yaml:4: providers.ollama.colour: unknown field (expected one of: ..."),
    ("unknown section, line of its key",
     "gatway:\n  timeout: 1s\n" + OLLAMA,
     "bad.yaml:1: gatway: unknown section (expected one of: app, providers, gateway, state, auth, monitoring, "
     "server, cache)"),
    ("bool",
     "gateway:\n  enable_failover: maybe\n" + OLLAMA,
     "bad.yaml:2: gateway.enable_failover: expected true or false, got 'maybe'"),
    ("number",
     "gateway:\n  max_retries: three\n" + OLLAMA,
     "bad.yaml:2: gateway.max_retries: expected a number, got 'three'"),
    ("whole number",
     "server:\n  port: 80.5\n" + OLLAMA,
     "bad.yaml:2: server.port: expected a whole number, got 80.5"),
    ("negative",
     "gateway:\n  max_retries: -1\n" + OLLAMA,
     "bad.yaml:2: gateway.max_retries: must not be negative"),
    ("list",
     "providers:\n  ollama:\n    models: llama3\n",
     "bad.yaml:3: providers.ollama.models: expected a list"),
    ("mapping",
     "gateway:\n  rate_limit: 5\n" + OLLAMA,
     "bad.yaml:2: gateway.rate_limit: expected a mapping"),
    ("section not a mapping",
     "gateway: 5\n" + OLLAMA,
     "bad.yaml:1: gateway: expected a mapping"),
    ("provider not a mapping",
     "providers:\n  ollama: 5\n",
     "bad.yaml:2: providers.ollama: expected a mapping"),
    ("provider a list",
     "providers:\n  ollama: [a, b]\n",
     "bad.yaml:2: providers.ollama: expected a mapping"),
    ("providers not a mapping",
     "providers:\n  - ollama\n",
     "bad.yaml:1: providers: expected a mapping of deployment name to settings"),
    ("string",
     "server:\n  host: [a]\n" + OLLAMA,
     "bad.yaml:2: server.host: expected a string"),
    ("duplicate key",
     "gateway:\n  timeout: 1s\n  timeout: 2s\n" + OLLAMA,
     "bad.yaml:3: gateway.timeout: duplicate key"),
    ("duplicate provider",
     "providers:\n  ollama: {}\n  ollama: {}\n",
     "bad.yaml:3: providers.ollama: duplicate key"),
    ("invalid YAML",
     "gateway:\n  timeout: [60s\n" + OLLAMA,
     "bad.yaml:3: invalid YAML: ..."),
    ("invalid YAML indentation",
     "gateway:\n  timeout: 60s\n providers: x\n",
     "bad.yaml:3: invalid YAML: ..."),
    ("top level",
     "- a\n- b\n",
     "bad.yaml:1: the top level must be a mapping"),
    ("duration",
     "gateway:\n  timeout: soon\n" + OLLAMA,
     "bad.yaml:2: gateway.timeout: invalid duration 'soon' (use e.g. 500ms, 60s, 2m)"),
    ("nested duration",
     "providers:\n  ollama:\n    timeouts: {connect: 5x}\n",
     "bad.yaml:3: providers.ollama.timeouts.connect: invalid duration '5x' (use e.g. 500ms, 60s, 2m)"),
    ("size",
     "gateway:\n  max_body_bytes: 32 parsecs\n" + OLLAMA,
     "bad.yaml:2: gateway.max_body_bytes: invalid size '32 parsecs' (use e.g. 32MiB)"),
    ("base_url scheme",
     "providers:\n  ollama:\n    base_url: ftp://x\n",
     "bad.yaml:3: providers.ollama.base_url: not an http(s) URL without query or credentials: 'ftp://x'"),
    ("base_url credentials",
     "providers:\n  ollama:\n    base_url: http://user:pw@x\n",
     "bad.yaml:3: providers.ollama.base_url: not an http(s) URL without query or credentials: 'http://user:pw@x'"),
    ("base_url query",
     "providers:\n  ollama:\n    base_url: http://x/?a=1\n",
     "bad.yaml:3: providers.ollama.base_url: not an http(s) URL without query or credentials: 'http://x/?a=1'"),
    ("base_url missing",
     "providers:\n  az:\n    type: openai_compatible\n    api_key: k\n",
     "bad.yaml:2: providers.az.base_url: deployments of type openai_compatible need a base_url"),
    ("region",
     "providers:\n  bedrock:\n    region: moon-1\n",
     "bad.yaml:3: providers.bedrock.region: invalid AWS region 'moon-1'"),
    ("type",
     "providers:\n  x:\n    type: foo\n",
     "bad.yaml:3: providers.x.type: unknown type 'foo' (one of: openai, azure_openai, openai_compatible, "
     "anthropic, bedrock, ollama)"),
    ("provider name",
     "providers:\n  'a b': {type: ollama}\n",
     "bad.yaml:2: providers.a b: provider names use letters, digits, '.', '_' and '-'"),
    ("sha256",
     "auth:\n  keys:\n    - id: a\n      sha256: abc\n" + OLLAMA,
     "bad.yaml:4: auth.keys[0].sha256: must be the 64-hex-digit sha256 of the key"),
    ("duplicate key id",
     f"auth:\n  keys:\n    - {{id: a, sha256: {SHA_A}}}\n    - {{id: a, sha256: {SHA_A}}}\n" + OLLAMA,
     "bad.yaml:4: auth.keys[1].id: missing, malformed or duplicate key id 'a'"),
    ("half a SigV4 identity",
     f"auth:\n  keys:\n    - id: a\n      sha256: {SHA_A}\n      aws_access_key_id: X\n" + OLLAMA,
     "bad.yaml:3: auth.keys[0]: aws_access_key_id and aws_secret_access_key go together"),
    ("key not a mapping",
     "auth:\n  keys: [5]\n" + OLLAMA,
     "bad.yaml:2: auth.keys[0]: expected a mapping"),
    ("routing strategy",
     "gateway:\n  routing_strategy: fastest\n" + OLLAMA,
     "bad.yaml:2: gateway.routing_strategy: 'fastest' is not one of: round_robin, weighted, cost_based, "
     "latency_based, least_busy, health_based"),
    ("redis error mode",
     "state:\n  on_redis_error: ignore\n" + OLLAMA,
     "bad.yaml:2: state.on_redis_error: 'ignore' is not one of: local, open, closed"),
    ("auth mode",
     "auth:\n  mode: open\n" + OLLAMA,
     "bad.yaml:2: auth.mode: 'open' is not one of: keys, none"),
    ("otel protocol",
     "monitoring:\n  otel: {protocol: http}\n" + OLLAMA,
     "bad.yaml:2: monitoring.otel.protocol: 'http' is not one of: grpc, http/protobuf"),
    ("sample rate",
     "monitoring:\n  tracing:\n    sample_rate: 2\n" + OLLAMA,
     "bad.yaml:3: monitoring.tracing.sample_rate: must be between 0 and 1"),
    ("replicas",
     "state:\n  replicas: 0\n" + OLLAMA,
     "bad.yaml:2: state.replicas: must be at least 1"),
    ("unset variable outside providers",
     "state:\n  redis_url: ${REDIS_URL}\n" + OLLAMA,
     "bad.yaml:2: state.redis_url: variable REDIS_URL is not set"),
    ("unset variable in a nested default outside providers",
     "auth:\n  admin_key: \"${ADMIN:-${ADMIN_FALLBACK}}\"\n" + OLLAMA,
     "bad.yaml:2: auth.admin_key: variable ADMIN_FALLBACK is not set"),
]


@pytest.mark.parametrize(("text", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_file_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.yaml", {})
    message = str(info.value)
    if expected.endswith("..."):
        assert message.startswith(expected[:-3]), message
    else:
        assert message == expected
    location = expected.split(": ", 1)[0]
    assert info.value.source == "bad.yaml"
    assert info.value.line == int(location.rsplit(":", 1)[1])


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: cannot read config: No such file or directory"


# --- the default path ---------------------------------------------------------------------------

def test_config_path_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_GATEWAY_CONFIG", raising=False)
    assert resolve_path(None) == Path("config/gateway.yaml")
    monkeypatch.setenv("LLM_GATEWAY_CONFIG", "/etc/gw/from-env.yaml")
    assert resolve_path(None) == Path("/etc/gw/from-env.yaml")
    assert resolve_path("cli.yaml") == Path("cli.yaml")  # --config wins over the environment
    monkeypatch.setenv("LLM_GATEWAY_CONFIG", "")
    assert resolve_path(None) == Path("config/gateway.yaml")


def test_load_config_reads_the_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "gateway.yaml").write_text("server: {port: 1111}\n" + OLLAMA)
    (tmp_path / "env.yaml").write_text("server: {port: 2222}\n" + OLLAMA)
    (tmp_path / "cli.yaml").write_text("server: {port: 3333}\n" + OLLAMA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLM_GATEWAY_CONFIG", raising=False)
    assert load_config(env={}).server.port == 1111
    monkeypatch.setenv("LLM_GATEWAY_CONFIG", str(tmp_path / "env.yaml"))
    assert load_config(env={}).server.port == 2222
    assert load_config("cli.yaml", env={}).server.port == 3333


# --- llm-gateway check-config -------------------------------------------------------------------

# The installed console script, as users run it. (`python -m` would put the cwd first on sys.path,
# where a ./config/ folder shadows the editable-installed `config` package; -P prevents that.)
_SCRIPT = Path(sys.executable).with_name("llm-gateway")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-P", "-m", "proxy.cli"]


def _check_config(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "LLM_GATEWAY_CONFIG", "REDIS_URL")}
    return subprocess.run([*CLI, "check-config", *args], capture_output=True,
                          text=True, timeout=30, env={**base, **(env or {})}, cwd=cwd or ROOT)


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(f"""
state:
  redis_url: "${{REDIS_URL:-redis://:redis-pass-77@localhost:6379/0}}"
auth:
  admin_key: admin-secret-value-1
  secret: managed-secret-value-2
  keys:
    - id: a
      sha256: {SHA_A}
      aws_access_key_id: GWA00000000000000001
      aws_secret_access_key: client-aws-secret-value-3
providers:
  openai:
    api_key: "${{OPENAI_API_KEY}}"
  bedrock:
    aws_access_key_id: AKIAEXAMPLE000000001
    aws_secret_access_key: upstream-aws-secret-value-4
    aws_session_token: session-token-value-5
""")
    result = _check_config("--config", str(path), env={"OPENAI_API_KEY": "sk-very-secret-openai-key"})
    assert result.returncode == 0, result.stderr
    for secret in ("sk-very-secret-openai-key", "redis-pass-77", "admin-secret-value-1", "managed-secret-value-2",
                   "client-aws-secret-value-3", "upstream-aws-secret-value-4", "session-token-value-5"):
        assert secret not in result.stdout
        assert secret not in result.stderr
    assert "***" in result.stdout
    import yaml

    dumped = yaml.safe_load(result.stdout)
    assert dumped["providers"]["openai"]["api_key"] == "***"
    assert dumped["providers"]["openai"]["enabled"] is True
    assert dumped["state"]["redis_url"] == "redis://:***@localhost:6379/0"  # only the password is masked
    assert dumped["auth"]["admin_key"] == "***"
    assert dumped["auth"]["keys"][0]["aws_secret_access_key"] == "***"
    assert dumped["providers"]["bedrock"]["aws_access_key_id"] == "AKIAEXAMPLE000000001"  # an id, not a secret


def test_check_config_on_the_seed() -> None:
    ok = _check_config("--config", str(SEED), env=SEED_ENV)
    assert ok.returncode == 0, ok.stderr
    assert "sk-seed-openai-4242" not in ok.stdout and "***" in ok.stdout
    # Without the keys, bedrock is still enabled: warnings name the variables, exit 0.
    partial = _check_config("--config", str(SEED))
    assert partial.returncode == 0, partial.stderr
    assert "warning: provider 'openai' disabled: unset variable OPENAI_API_KEY" in partial.stderr
    assert "warning: provider 'anthropic' disabled: unset variable ANTHROPIC_API_KEY" in partial.stderr


def test_check_config_on_a_broken_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("gateway:\n  timeout: 60s\nproviders:\n  x:\n    type: foo\n")
    result = _check_config("--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (f"error: {path}:5: providers.x.type: unknown type 'foo' (one of: openai, azure_openai, "
                             "openai_compatible, anthropic, bedrock, ollama)\n")


def test_check_config_with_no_provider_enabled(tmp_path: Path) -> None:
    path = tmp_path / "none.yaml"
    path.write_text('providers:\n  openai:\n    api_key: "${OPENAI_API_KEY}"\n')
    result = _check_config("--config", str(path))
    assert result.returncode == 1
    assert "warning: provider 'openai' disabled: unset variable OPENAI_API_KEY" in result.stderr
    assert "error: " in result.stderr and "no provider is enabled" in result.stderr


def test_check_config_uses_the_environment_then_the_default_path(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "gateway.yaml").write_text("server: {port: 1111}\n" + OLLAMA)
    (tmp_path / "env.yaml").write_text("server: {port: 2222}\n" + OLLAMA)
    default = _check_config(cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert "port: 1111" in default.stdout
    from_env = _check_config(cwd=tmp_path, env={"LLM_GATEWAY_CONFIG": str(tmp_path / "env.yaml")})
    assert from_env.returncode == 0, from_env.stderr
    assert "port: 2222" in from_env.stdout
    missing = _check_config(cwd=tmp_path / "config", env={})
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: config/gateway.yaml: cannot read config")


def test_server_edge_limits_take_units() -> None:
    cfg = parse_config("server: {header_timeout: 5s, body_timeout: 2, max_header_bytes: 32KiB, max_headers: 50}\n"
                       + OLLAMA, "t.yaml", {})
    s = cfg.server
    assert (s.header_timeout, s.body_timeout, s.max_header_bytes, s.max_headers) == (5.0, 2.0, 32768, 50)
    assert (s.max_connections, s.body_min_rate) == (16384, 500), "the defaults"
