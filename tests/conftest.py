"""Shared fixtures: real simulated upstreams, real gateways on real sockets, real Redis.

- `mock_upstream`: the product's simulated provider (all four protocols) on a free port; tests
  read what it received through `recorded(base)`.
- `make_gateway(yaml_text, **env)`: builds the gateway from config text and serves it with uvicorn
  on a free port; yields the base URL. `GATEWAY_KEY` is the key the default test config accepts.
- `redis_server`: a test-owned `redis-server` on a free port (so tests may kill, pause or flush
  it). With REQUIRE_REDIS=1 (CI) a missing binary fails instead of skipping.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from typing import Any, Callable, Iterator

import httpx
import pytest

from config import parse_config
from proxy.app import build_app
from proxy.mock import MockOptions, build_mock_app
from proxy.telemetry.tracing import SpanRecord
from tests.servers import free_port, serve

GATEWAY_KEY = "gw-test-0123456789abcdef"
GATEWAY_KEY_SHA = hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()
CLIENT_AKID = "GWTEST00000000000001"
CLIENT_AWS_SECRET = "gw-test-client-aws-secret"
UPSTREAM_OPENAI_KEY = "sk-upstream-openai-7f3a"
UPSTREAM_ANTHROPIC_KEY = "sk-ant-upstream-91bc"
UPSTREAM_OLLAMA_KEY = "ollama-upstream-55d2"
UPSTREAM_AKID = "AKIAUPSTREAM00000001"
UPSTREAM_AWS_SECRET = "upstream-aws-secret-abcd"


# The static test key, with a SigV4 identity for boto3 clients, as a YAML `auth:` section.
AUTH_YAML = f"""auth:
  keys:
    - id: team-test
      sha256: {GATEWAY_KEY_SHA}
      aws_access_key_id: {CLIENT_AKID}
      aws_secret_access_key: {CLIENT_AWS_SECRET}
"""


def span_record(name: str, attributes: dict[str, Any] | None = None, static: dict[str, Any] | None = None,
                **fields: Any) -> SpanRecord:
    """An ended span record as the observer queues it: a root SERVER span unless `fields` say otherwise."""
    from opentelemetry.trace import SpanKind

    base: dict[str, Any] = {"kind": SpanKind.SERVER, "trace_id": 0x4BF92F3577B34DA6A3CE929D0E0E4736,
                            "span_id": 0x00F067AA0BA902B7, "parent_id": 0, "remote": False, "trace_state": "",
                            "start": 1_700_000_000_000_000_000, "end": 1_700_000_000_000_001_000}
    return SpanRecord(name=name, static=static, attributes=attributes, **{**base, **fields})


def standard_config(upstream: str, extra: str = "") -> str:
    """All four families on one simulated upstream, one static key with a SigV4 identity."""
    return f"""
gateway: {{timeout: 30s}}
{AUTH_YAML}providers:
  openai: {{type: openai, base_url: "{upstream}/v1", api_key: {UPSTREAM_OPENAI_KEY}}}
  anthropic: {{type: anthropic, base_url: "{upstream}", api_key: {UPSTREAM_ANTHROPIC_KEY}}}
  bedrock:
    type: bedrock
    base_url: "{upstream}"
    region: us-east-1
    aws_access_key_id: {UPSTREAM_AKID}
    aws_secret_access_key: {UPSTREAM_AWS_SECRET}
  ollama: {{type: ollama, base_url: "{upstream}", api_key: {UPSTREAM_OLLAMA_KEY}}}
{extra}
"""


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[str]:
    app = build_mock_app(MockOptions(chunk_interval_ms=0, aws_access_key_id=UPSTREAM_AKID,
                                      aws_secret_access_key=UPSTREAM_AWS_SECRET))
    with serve(app, lifespan="off") as base:
        yield base


def recorded(base: str) -> list[dict[str, Any]]:
    return httpx.get(f"{base}/__mock/requests").json()


def clear_recorded(base: str) -> None:
    httpx.delete(f"{base}/__mock/requests")


@pytest.fixture
def make_gateway() -> Iterator[Callable[..., Any]]:
    stack = contextlib.ExitStack()

    def factory(config_text: str, env: dict[str, str] | None = None) -> str:
        cfg = parse_config(config_text, "test.yaml", env or {})
        return stack.enter_context(serve(build_app(cfg)))

    with stack:
        yield factory


@pytest.fixture
def gateway(mock_upstream: str, make_gateway: Callable[..., str]) -> str:
    clear_recorded(mock_upstream)
    return make_gateway(standard_config(mock_upstream))


@pytest.fixture
def redis_server(tmp_path: Any) -> Iterator[dict[str, Any]]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server not installed")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    info = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "proc": proc, "args": args}
    deadline = time.monotonic() + 10
    import redis

    while True:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    try:
        yield info
    finally:
        info["proc"].kill()
        info["proc"].wait()


# --- Test layers: every test file's markers, from one table ------------------------------------------
# Kinds (one per file; a file that mixes kinds takes its heaviest):
#   unit         no server process, no socket: pure functions, in-process ASGI on stub apps, the CLI's
#                offline commands (check-config), ruff
#   e2e          real sockets in one process: uvicorn serving the gateway, simulated upstreams, the
#                official SDKs (or one `llm-gateway serve`/`demo` subprocess, no Redis)
#   distributed  several gateway processes (replicas, `--workers N`) and/or a test-owned redis-server
# plus `slow`: the file holds a test that typically takes more than 5 s (setup and teardown included,
# from `pytest --durations=0`, or from the sleeps it must wait out).
# A test file missing here fails collection: add it with its kind. Files whose own `pytestmark` names
# a kind keep theirs and need no entry (test_layers.py: unit; test_overhead_header.py: e2e).
LAYERS = ("unit", "e2e", "distributed", "slow")
TEST_FILE_MARKERS: dict[str, tuple[str, ...]] = {
    "test_admin.py": ("distributed", "slow"),
    "test_anthropic_e2e.py": ("e2e", "slow"),  # the old-SDK test builds a venv with `anthropic<2` once
    "test_bad_input.py": ("e2e",),
    "test_bedrock_e2e.py": ("e2e",),
    "test_breaker.py": ("distributed", "slow"),
    "test_cache_distributed.py": ("distributed", "slow"),
    "test_cache_e2e.py": ("e2e", "slow"),
    "test_cache_unit.py": ("unit",),
    "test_cancel.py": ("unit",),
    "test_cli_demo.py": ("e2e", "slow"),
    "test_compose.py": ("e2e",),
    "test_config.py": ("unit",),
    "test_contract_defects.py": ("distributed", "slow"),
    "test_cross_deployment.py": ("e2e",),
    "test_disconnects.py": ("e2e", "slow"),
    "test_edge_limits.py": ("e2e", "slow"),
    "test_edge_requests.py": ("e2e",),
    "test_eventstream.py": ("unit",),
    "test_failover.py": ("e2e",),
    "test_first_hour.py": ("distributed", "slow"),
    "test_fuzz_inputs.py": ("e2e", "slow"),
    "test_hardening.py": ("e2e",),
    "test_hop_by_hop.py": ("e2e",),
    "test_keys.py": ("distributed", "slow"),
    "test_leak_audit.py": ("distributed", "slow"),
    "test_lint.py": ("unit",),
    "test_mock_provider.py": ("e2e",),
    "test_no_cycles.py": ("e2e",),
    "test_observability.py": ("distributed", "slow"),  # `serve --workers 2` for the multiprocess counts
    "test_ollama_e2e.py": ("e2e",),
    "test_openai_e2e.py": ("e2e",),
    "test_plugin_mount.py": ("e2e",),
    "test_ratelimit.py": ("distributed", "slow"),
    "test_ratelimit_batch.py": ("distributed",),
    "test_ratelimit_distributed.py": ("distributed", "slow"),
    "test_ratelimit_hotpath.py": ("distributed",),
    "test_redis_wire.py": ("distributed",),
    "test_smoke_e2e.py": ("e2e",),
    "test_strategies.py": ("e2e",),  # table-driven unit tests plus two through a real gateway
    "test_streaming_unbuffered.py": ("e2e",),
    "test_telemetry_logs.py": ("unit",),
    "test_telemetry_spans.py": ("unit",),
    "test_tls.py": ("e2e", "slow"),
    "test_types.py": ("unit",),  # mypy in a subprocess (no server, no socket); also its own pytestmark
    "test_usage_tap.py": ("unit",),
    "test_wire.py": ("e2e",),  # scripted TCP servers on 127.0.0.1
    "test_wire_failures.py": ("e2e",),
}


def _own_layers(module: Any) -> set[str]:
    """The kinds a test module names in its own `pytestmark`."""
    marks = getattr(module, "pytestmark", [])
    return {m.name for m in (marks if isinstance(marks, list) else [marks])} & set(LAYERS)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unlisted: set[str] = set()
    for item in items:
        module = getattr(item, "module", None)
        name = item.path.name
        if module is None or not name.startswith("test_") or _own_layers(module):
            continue
        kinds = TEST_FILE_MARKERS.get(name)
        if kinds is None:
            unlisted.add(name)
            continue
        for kind in kinds:
            item.add_marker(kind)
    if unlisted:
        pytest.exit(f"test file(s) not classified: {', '.join(sorted(unlisted))}. Add each to TEST_FILE_MARKERS in "
                    f"tests/conftest.py with its markers (unit, e2e or distributed, plus slow when a test "
                    f"typically takes more than 5 s), or give the module its own `pytestmark`.",
                    returncode=pytest.ExitCode.USAGE_ERROR)
