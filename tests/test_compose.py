"""The reference deployment (compose.yaml), checked without a Docker engine.

- compose.yaml parses; it has redis, three gateway replicas, the nginx load balancer on :8080, the
  simulated providers, otel-collector, jaeger, prometheus and grafana.
- Every host path it mounts exists and lives under config/.
- nginx balances over exactly the gateway replicas (and `nginx -t` accepts the file, when nginx is
  installed); Prometheus scrapes each of them; the collector
  YAML wires its pipelines to receivers and exporters it defines, traces to Jaeger.
- The gateway config the replicas share loads; the Grafana dashboard JSON parses, and every metric
  its panels query is one the gateway really exports: a gateway built from that very config serves
  traffic (success, stream, failover) and its `/metrics` is scraped and parsed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from config import parse_config
from proxy.app import build_app
from proxy.mock import MockOptions, build_mock_app
from tests.servers import serve

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
GATEWAYS = [name for name in SERVICES if name.startswith("gateway-")]
DASHBOARD = ROOT / "config/compose/grafana/dashboards/llm-gateway.json"
DEMO_KEY = "sk-gateway-compose-demo"


def mounts() -> list[tuple[str, str, str]]:
    found = []
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"])
            found.append((name, source, target))
    return found


def test_services_of_the_reference_deployment() -> None:
    assert {"redis", "lb", "mock-provider", "otel-collector", "jaeger", "prometheus", "grafana"} <= set(SERVICES)
    assert len(GATEWAYS) == 3
    for name in GATEWAYS:
        gw = SERVICES[name]
        assert gw["command"][:1] == ["serve"] and "/app/config/compose/gateway.yaml" in gw["command"]
        assert gw["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "8080:8080" in SERVICES["lb"]["ports"] and SERVICES["lb"]["image"].startswith("nginx")
    assert SERVICES["mock-provider"]["command"][0] == "mock-provider"


def test_every_mounted_file_exists_under_config() -> None:
    assert mounts()
    for service, source, _ in mounts():
        assert source.startswith("./config/"), (service, source)
        assert (ROOT / source).exists(), (service, source)
    default_sha = re.search(r"GATEWAY_KEY_SHA256:-([0-9a-f]{64})", (ROOT / "compose.yaml").read_text())
    assert default_sha and default_sha.group(1) == hashlib.sha256(DEMO_KEY.encode()).hexdigest()


def test_nginx_balances_over_the_replicas() -> None:
    conf = (ROOT / "config/compose/nginx.conf").read_text()
    assert sorted(re.findall(r"server\s+(gateway-\d):8080", conf)) == sorted(GATEWAYS)
    assert "listen 8080" in conf and "proxy_buffering off" in conf
    assert conf.count("{") == conf.count("}")


def test_nginx_config_is_valid(tmp_path: Path) -> None:
    if shutil.which("nginx") is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is required in CI (.ci/run installs it)")
        pytest.skip("nginx not installed")
    conf = (ROOT / "config/compose/nginx.conf").read_text()
    (tmp_path / "nginx.conf").write_text(re.sub(r"gateway-\d:8080", "127.0.0.1:8080", conf))  # no compose DNS here
    out = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c",
                          str(tmp_path / "nginx.conf"), "-g", f"pid {tmp_path}/nginx.pid;"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_prometheus_scrapes_every_replica() -> None:
    prom = yaml.safe_load((ROOT / "config/compose/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    targets = [t for sc in jobs["gateway"]["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == sorted(f"{name}:8080" for name in GATEWAYS)
    assert jobs["gateway"].get("metrics_path", "/metrics") == "/metrics"


def test_collector_pipelines_are_wired() -> None:
    col = yaml.safe_load((ROOT / "config/compose/otel-collector.yaml").read_text())
    pipelines = col["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for pipeline in pipelines.values():
        assert set(pipeline["receivers"]) <= set(col["receivers"])
        assert set(pipeline.get("processors", [])) <= set(col["processors"])
        assert set(pipeline["exporters"]) <= set(col["exporters"])
    assert col["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    jaeger = [e for e in pipelines["traces"]["exporters"] if col["exporters"][e].get("endpoint", "").startswith("jaeger:")]
    assert jaeger


def test_grafana_provisioning_parses() -> None:
    base = ROOT / "config/compose/grafana/provisioning"
    sources = yaml.safe_load((base / "datasources/datasources.yaml").read_text())["datasources"]
    assert {s["type"] for s in sources} >= {"prometheus", "jaeger"}
    providers = yaml.safe_load((base / "dashboards/dashboards.yaml").read_text())["providers"]
    grafana_mounts = {target: source for svc, source, target in mounts() if svc == "grafana"}
    assert providers[0]["options"]["path"] in grafana_mounts


def dashboard_metrics() -> dict[str, str]:
    """metric name -> panel title, for every metric named in a panel query."""
    dash = json.loads(DASHBOARD.read_text())
    found: dict[str, str] = {}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", target["expr"])  # label names are not metrics
            for name in re.findall(r"\b((?:llm_gateway_|gen_ai_)[a-z_]+)\b", expr):
                found[name] = panel["title"]
    return found


@pytest.fixture(scope="module")
def scraped() -> set[str]:
    """Every sample name a gateway built from the compose config exports after some traffic."""
    text = (ROOT / "config/compose/gateway.yaml").read_text()
    env = {"GATEWAY_KEY_SHA256": hashlib.sha256(DEMO_KEY.encode()).hexdigest(), "REDIS_URL": ""}
    with serve(build_mock_app(MockOptions(chunk_interval_ms=0)), lifespan="off") as good, \
            serve(build_mock_app(MockOptions(chunk_interval_ms=0, fault_status=503)), lifespan="off") as bad:
        cfg = parse_config(text.replace("http://mock-flaky:9000", bad).replace("http://mock-provider:9000", good),
                           "config/compose/gateway.yaml", env)
        assert cfg.monitoring.metrics.prefix == "llm_gateway" and cfg.monitoring.tracing.enabled
        assert cfg.monitoring.otel.endpoint == "http://otel-collector:4317"
        cfg.monitoring.otel.endpoint = ""  # no collector here: no exporter
        with serve(build_app(cfg)) as base:
            headers = {"authorization": f"Bearer {DEMO_KEY}"}
            chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(base + "/v1/chat/completions", json=chat, headers=headers, timeout=30).status_code == 200
            streamed = httpx.post(base + "/v1/chat/completions", json={**chat, "stream": True}, headers=headers, timeout=30)
            assert streamed.status_code == 200
            body = {"model": "claude-sonnet-4", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(base + "/anthropic/v1/messages", json=body, headers=headers, timeout=30).status_code == 200
            text = httpx.get(base + "/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):  # a labelled metric with no series yet has no samples
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_panels_query_metrics_the_gateway_exports(scraped: set[str]) -> None:
    used = dashboard_metrics()
    assert len(used) >= 10
    missing = {name: title for name, title in used.items() if name not in scraped}
    assert not missing, f"dashboard queries metrics the gateway does not export: {missing}"
    titles = " ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for topic in ("requests", "errors", "latency", "first token", "tokens", "rate-limit", "health", "overhead"):
        assert topic in titles, topic
    for contract in ("llm_requests_total", "llm_errors_total", "llm_request_duration_seconds_bucket",
                     "llm_tokens_used_total", "llm_rate_limit_hits_total", "provider_health_status"):
        assert f"llm_gateway_{contract}" in used, contract
    assert "gen_ai_server_time_to_first_token_seconds_bucket" in used
