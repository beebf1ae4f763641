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
