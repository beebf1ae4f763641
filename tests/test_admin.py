"""The admin API (`/admin/keys`, `/admin/health`, `/admin/limits`) and the `health` CLI.

- Without `auth.admin_key` every `/admin/*` path is a 404; with one, a missing or wrong key is a 401.
- `/admin/keys` works on the embedded store (single process) exactly as on Redis.
- Admin calls are logged with a fingerprint of the admin key (never the key) and what was done.
- `/admin/health` and `llm-gateway health` show the shared breaker state; with Redis away, the local
  view with `"degraded": true`.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx
import openai
import pytest
import redis

from config import parse_config
from proxy.admin.api import fingerprint
from proxy.app import build_app
from proxy.cli.main import main as cli_main
from proxy.state.health import health_key
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.procs import Procs, procs  # noqa: F401 - `procs` is a fixture
from tests.servers import free_port, serve

ADMIN = "admin-key-for-tests-5c2e"
SECRET = "gateway-secret-for-admin-tests"
MSGS = [{"role": "user", "content": "hi"}]
AUTH = {"authorization": f"Bearer {ADMIN}"}


def config_text(mock: str, *, admin: str = ADMIN, secret: str = SECRET, state: str = "") -> str:
    return f"""
gateway: {{timeout: 20s}}
{state}
auth:
  admin_key: "{admin}"
  secret: "{secret}"
  keys:
    - {{id: static-team, sha256: {GATEWAY_KEY_SHA}}}
providers:
  openai: {{type: openai, base_url: "{mock}/v1", api_key: sk-up}}
  anthropic: {{type: anthropic, base_url: "{mock}", api_key: sk-ant-up}}
  ollama: {{type: ollama, base_url: "{mock}"}}
"""


@pytest.fixture(scope="module")
def gw(mock_upstream: str) -> Iterator[str]:
    with serve(build_app(parse_config(config_text(mock_upstream), "admin.yaml", {}))) as base:
        yield base


@pytest.mark.parametrize("path", ["/admin", "/admin/keys", "/admin/keys/abc", "/admin/health", "/admin/limits"])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_admin_is_404_without_an_admin_key(mock_upstream: str, path: str, method: str) -> None:
    with serve(build_app(parse_config(config_text(mock_upstream, admin=""), "noadmin.yaml", {}))) as base:
        r = httpx.request(method, base + path, headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = httpx.request(method, base + path, headers={"authorization": "Bearer"})
        assert r.status_code == 404


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer wrong"}, {"authorization": ADMIN}, {"authorization": f"Basic {ADMIN}"},
    {"x-api-key": ADMIN}, {"authorization": f"Bearer {ADMIN}x"}, {"authorization": f"Bearer {ADMIN[:-1]}"},
    {"authorization": "Bearer " + "A" * 100_000},
])
def test_admin_needs_the_admin_key(gw: str, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/x"),
                         ("GET", "/admin/health"), ("PUT", "/admin/limits/global")):
        r = httpx.request(method, gw + path, headers=headers, json={"name": "x"})
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(gw + "/admin/keys", headers={"authorization": f"bearer {ADMIN}"}).status_code == 200


def test_keys_on_the_embedded_store(gw: str) -> None:
    r = httpx.post(gw + "/admin/keys", headers=AUTH,
                   json={"name": "svc-a", "models": ["gpt-4o"], "rpm": 100, "tpm": 10000, "max_concurrent": 4})
    assert r.status_code == 200, r.text
    created = r.json()
    assert set(created) == {"id", "key", "aws_access_key_id", "aws_secret_access_key"}
    assert created["key"].startswith(f"gwk_{created['id']}_")
    client = openai.OpenAI(base_url=gw + "/v1", api_key=created["key"], max_retries=0)
    assert client.chat.completions.create(model="gpt-4o", messages=MSGS).choices  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # type: ignore[arg-type]

    listed = httpx.get(gw + "/admin/keys", headers=AUTH)
    assert listed.status_code == 200
    row = next(k for k in listed.json()["keys"] if k["id"] == created["id"])
    assert row["name"] == "svc-a" and row["models"] == ["gpt-4o"] and row["rpm"] == 100 and row["max_concurrent"] == 4
    assert created["key"] not in listed.text and created["aws_secret_access_key"] not in listed.text
    assert "digest" not in listed.text
    one = httpx.get(f"{gw}/admin/keys/{created['id']}", headers=AUTH)
    assert one.status_code == 200 and one.json()["id"] == created["id"] and created["key"] not in one.text

    gone = httpx.delete(f"{gw}/admin/keys/{created['id']}", headers=AUTH)
    assert gone.status_code == 200 and gone.json() == {"id": created["id"], "revoked": True}
    time.sleep(0.6)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)  # type: ignore[arg-type]
    assert httpx.delete(f"{gw}/admin/keys/{created['id']}", headers=AUTH).status_code == 404
    assert httpx.get(f"{gw}/admin/keys/{created['id']}", headers=AUTH).status_code == 404
    assert created["id"] not in httpx.get(gw + "/admin/keys", headers=AUTH).text


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b'{"models": ["x"]}', b'{"name": ""}', b'{"name": "x", "rpm": -5}',
    b'{"name": "x", "rpm": 1.5}', b'{"name": "x", "families": ["azure"]}', b'{"name": "x", "base_url": "http://e"}',
    b'{"name": "x", "metadata": {"a": {"b": 1}}}', b'{"name": "\\u0000"}', b"\xff\xfe",
])
def test_bad_key_bodies_are_400(gw: str, body: bytes) -> None:
    r = httpx.post(gw + "/admin/keys", headers=AUTH, content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and "Traceback" not in r.text


def test_unknown_admin_paths_and_methods(gw: str) -> None:
    assert httpx.get(gw + "/admin/nope", headers=AUTH).status_code == 404
    assert httpx.put(gw + "/admin/keys", headers=AUTH).status_code == 405
    assert httpx.delete(gw + "/admin/keys/..%2f..%2fetc", headers=AUTH).status_code == 404
    assert httpx.post(gw + "/admin/keys", headers=AUTH, content=b"x" * 70000).status_code == 413


def test_create_without_secret_is_refused(mock_upstream: str) -> None:
    with serve(build_app(parse_config(config_text(mock_upstream, secret=""), "nosecret.yaml", {}))) as base:
        r = httpx.post(base + "/admin/keys", headers=AUTH, json={"name": "x"})
        assert r.status_code == 409 and "auth.secret" in r.json()["error"]["message"]
        assert httpx.get(base + "/admin/keys", headers=AUTH).json() == {"keys": []}


def test_admin_health_embedded(gw: str) -> None:
    body = httpx.get(gw + "/admin/health", headers=AUTH)
    assert body.status_code == 200, body.text
    report = body.json()
    assert report["degraded"] is False and set(report["deployments"]) == {"openai", "anthropic", "ollama"}
    assert set(report["deployments"]["openai"]) == {"state", "open_until", "ejections", "consecutive_failures",
                                                    "ttfb_ewma_ms", "inflight"}
    assert report["deployments"]["openai"]["state"] == "closed"


def test_admin_health_degraded_when_redis_is_away(mock_upstream: str) -> None:
    state = f'state: {{redis_url: "redis://127.0.0.1:{free_port()}/0", redis_timeout: 200ms}}'
    with serve(build_app(parse_config(config_text(mock_upstream, state=state), "down.yaml", {}))) as base:
        r = httpx.get(base + "/admin/health", headers=AUTH)
        assert r.status_code == 200 and r.json()["degraded"] is True
        assert r.json()["deployments"]["openai"]["state"] == "closed"
        keys = httpx.get(base + "/admin/keys", headers=AUTH)
        assert keys.status_code == 503 and "Traceback" not in keys.text
        # static keys and traffic are not affected
        ok = httpx.post(base + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS},
                        headers={"authorization": f"Bearer {GATEWAY_KEY}"})
        assert ok.status_code == 200


def test_health_cli_and_admin_health_on_redis(redis_server: dict[str, Any], mock_upstream: str, tmp_path: Any,
                                              capsys: Any) -> None:
    state = f'state: {{redis_url: "{redis_server["url"]}"}}'
    text = config_text(mock_upstream, state=state)
    path = tmp_path / "g.yaml"
    path.write_text(text)
    r = redis.Redis(port=redis_server["port"])
    now_ms = int(time.time() * 1000)
    r.hset(health_key("openai"), mapping={"open_until": now_ms + 60_000, "ejections": 2, "fails": 0})
    r.hset(health_key("anthropic"), mapping={"open_until": now_ms - 1_000, "ejections": 1, "fails": 1})
    r.hset(f"llmgw:{{llmgw}}:stats:ollama", mapping={"ttfb_ewma": "0.125", "inflight": 3})

    capsys.readouterr()
    assert cli_main(["health", "--config", str(path)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == ["DEPLOYMENT", "STATE", "OPEN_UNTIL", "EJECTIONS", "CONSECUTIVE_FAILURES",
                                "TTFB_EWMA_MS", "INFLIGHT"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["openai"][1] == "open" and rows["openai"][3] == "2"
    assert rows["anthropic"][1] == "half-open" and rows["anthropic"][4] == "1"
    assert rows["ollama"][1] == "closed" and rows["ollama"][5] == "125.0" and rows["ollama"][6] == "3"

    assert cli_main(["health", "--json", "--redis-url", redis_server["url"], "--config", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deployments"]["openai"]["state"] == "open" and report["degraded"] is False
    with serve(build_app(parse_config(text, str(path), {}))) as base:
        via_api = httpx.get(base + "/admin/health", headers=AUTH).json()
    assert via_api["deployments"]["openai"]["state"] == "open"
    assert via_api["deployments"]["anthropic"]["state"] == "half-open"
    assert via_api["deployments"]["ollama"]["inflight"] == 3

    assert cli_main(["health", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--config", str(path)]) == 1
    assert "Redis unavailable" in capsys.readouterr().err


def test_admin_calls_are_logged_with_a_fingerprint(procs: Procs) -> None:  # noqa: F811
    mock = procs.mock()
    (gw,) = procs.gateways(config_text(mock.url), 1)
    created = httpx.post(gw.url + "/admin/keys", headers=AUTH, json={"name": "logged"}).json()
    httpx.delete(f"{gw.url}/admin/keys/{created['id']}", headers=AUTH)
    httpx.put(gw.url + "/admin/limits/global", headers=AUTH, json={"requests_per_minute": 1000})
    httpx.get(gw.url + "/admin/keys", headers={"authorization": "Bearer not-the-admin-key"})
    time.sleep(0.3)
    lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
    admin = [line for line in lines if line.get("event", "").startswith(("admin_", "key_", "limit_"))]
    events = {line["event"] for line in admin}
    assert {"key_created", "key_revoked", "limit_changed", "admin_request", "admin_denied"} <= events, events
    mark = fingerprint(ADMIN)
    assert all(line.get("admin_fingerprint") == mark for line in admin if line["event"] != "admin_denied")
    assert any(line["event"] == "key_revoked" and line["key_id"] == created["id"] for line in admin)
    text = gw.log_path.read_text()
    for secret in (ADMIN, SECRET, created["key"], created["aws_secret_access_key"], "not-the-admin-key"):
        assert secret not in text
