"""The first hour with the gateway ("Hardened at the edge"): what a new user runs, and what it says.

1. The SDKs the demo's snippets use come with the `sdk` extra (and still with `test`); the demo banner
   says how to install them and names those missing.
2. `serve` and `mock-provider` say at start where they listen, with what, and every reason visible in
   the config why no request could succeed; the Redis URL shows everything but its password.
3. A port in use is one `error:` line suggesting `--port`, exit 1 (`serve`, `mock-provider`, `demo`).
4. The CLI's audit lines on stderr are JSON lines, not Python bytes reprs.
5. `check-config` reports every error of a file in one run, and prints the config only when valid.
6. `demo` and `mock-provider` refuse `--config` (they read no gateway config) instead of ignoring it.
7. `limits set` and `PUT /admin/limits/{scope}` refuse scopes that name nothing, unless forced.
8. The compose stack has demo admin key and server secret, so the CLI inside a replica manages keys.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
import redis
import yaml

from config import ConfigError, parse_config
from proxy.app import build_app
from proxy.state.store import limits_key
from tests.conftest import GATEWAY_KEY_SHA
from tests.servers import free_port, serve

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("llm-gateway")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-P", "-m", "proxy.cli"]
SDKS = {"openai", "anthropic", "boto3", "ollama"}
ADMIN = "admin-key-first-hour-77"
SECRET = "server-secret-first-hour-42"
ZERO_SHA = "0" * 64


def _env(**extra: str) -> dict[str, str]:
    drop = {"LLM_GATEWAY_CONFIG", "REDIS_URL", "GATEWAY_SECRET", "GATEWAY_ADMIN_KEY", "GATEWAY_KEY_SHA256",
            "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1", **extra}


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=cwd)


def first_lines(args: list[str], until: str, env: dict[str, str] | None = None, timeout: float = 30) -> str:
    """Start a long-running command, collect its stderr until a line contains `until`, then stop it."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env or _env(), cwd=ROOT)
    seen: list[str] = []
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr] + [lines.put("")], daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            if not line or until in line:
                break
        return "".join(seen)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- 1. the sdk extra -------------------------------------------------------------------------------

def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_sdk_extra_installs_the_four_official_sdks_and_test_keeps_them() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert _names(extras["sdk"]) == SDKS
    assert set(extras["sdk"]) <= set(extras["test"])  # the same pins
    assert not SDKS & _names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_demo_banner_says_how_to_install_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.cli import demo

    text = demo.snippets("http://127.0.0.1:8080")
    assert "pip install 'llm-edge-gateway[sdk]'" in text and "pip install -e '.[sdk]'" in text
    assert "not installed here" not in text  # this interpreter has them all
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("openai", "boto3") else real(name, *a))
    assert "not installed here: openai, boto3" in demo.snippets("http://127.0.0.1:8080")


# --- 2. what serve and mock-provider say at start ----------------------------------------------------

SERVE_YAML = f"""
state:
  redis_url: "redis://ops:hunter2-redis-pw@127.0.0.1:{{redis_port}}/0"
auth:
  keys:
    - {{id: placeholder, sha256: "{ZERO_SHA}"}}
providers:
  openai: {{type: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-up, models: [gpt-4o-mini]}}
  anthropic: {{type: anthropic, api_key: "${{ANTHROPIC_API_KEY}}"}}
  ollama: {{type: ollama, base_url: "http://127.0.0.1:9"}}
"""


def test_serve_prints_address_config_state_deployments_and_why_nothing_can_succeed(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(SERVE_YAML.replace("{redis_port}", str(free_port())))
    port = free_port()
    text = first_lines(["serve", "--config", str(path), "--host", "127.0.0.1", "--port", str(port)],
                       until="no request can succeed")
    assert f"listening on http://127.0.0.1:{port} (1 worker)" in text, text
    assert f"config:      {path}" in text
    assert "redis://ops:***@127.0.0.1:" in text and "hunter2-redis-pw" not in text
    assert "deployments: openai (openai: gpt-4o-mini), ollama (ollama: any model)" in text
    assert "warning: provider 'anthropic' disabled: unset variable ANTHROPIC_API_KEY" in text
    assert "auth.keys[0] ('placeholder'): sha256 is all zeros" in text
    assert "warning: no request can succeed" in text and "GATEWAY_SECRET" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(("auth", "expected"), [
    ("auth: {mode: none}", ["auth.mode is none: every request is accepted without a gateway key"]),
    ("auth: {keys: []}", ["no request can succeed: no key is configured (auth.keys is empty) and managed keys are off"]),
    (f"auth: {{keys: [{{id: a, sha256: '{ZERO_SHA}'}}]}}", ["sha256 is all zeros", "no request can succeed"]),
    (f"auth: {{secret: s, keys: [{{id: a, sha256: '{ZERO_SHA}'}}]}}",
     ["sha256 is all zeros", "no request can succeed: the only static keys are placeholders, and managed keys on the "
                             "embedded store can only be made with /admin/keys"]),
    ("auth: {secret: s, admin_key: a}", []),                                  # POST /admin/keys makes one
    ("auth: {secret: s}\nstate: {redis_url: 'redis://r:6379/0'}", []),       # `llm-gateway keys create` makes one
    (f"auth: {{keys: [{{id: a, sha256: {GATEWAY_KEY_SHA}}}, {{id: b, sha256: '{ZERO_SHA}'}}]}}", ["'b'"]),
    (f"auth: {{keys: [{{id: a, sha256: {GATEWAY_KEY_SHA}}}]}}", []),
])
def test_reasons_no_request_can_succeed(auth: str, expected: list[str]) -> None:
    from proxy.cli.main import auth_problems

    problems = auth_problems(parse_config(auth + "\nproviders: {ollama: {}}\n", "t.yaml", {}))
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected):
        assert fragment in problem, problem


def test_mock_provider_says_where_it_listens_and_what_it_simulates() -> None:
    port = free_port()
    text = first_lines(["mock-provider", "--port", str(port), "--protocol", "openai,ollama", "--fault-status", "503",
                        "--fault-rate", "0.1"], until="faults:")
    assert f"simulated openai, ollama on http://127.0.0.1:{port}" in text, text
    assert f"openai http://127.0.0.1:{port}/v1" in text
    assert "faults: status 503 on 0.1 of requests" in text


# --- 3. a port in use ---------------------------------------------------------------------------------

@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("command", ["serve", "mock-provider", "demo"])
def test_a_port_in_use_is_one_line_that_suggests_port(command: str, busy_port: int, tmp_path: Path) -> None:
    args = [command, "--port", str(busy_port)]
    if command == "serve":
        path = tmp_path / "gw.yaml"
        path.write_text(f"auth: {{keys: [{{id: a, sha256: {GATEWAY_KEY_SHA}}}]}}\nproviders: {{ollama: {{}}}}\n")
        args += ["--config", str(path), "--host", "127.0.0.1"]
    result = run(*args, timeout=30)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"error: cannot listen on 127.0.0.1:{busy_port}: the port is already in use; "
                             "choose another one with --port N\n")
    assert result.stdout == ""


# --- 4. audit lines -------------------------------------------------------------------------------------

def test_cli_audit_lines_are_json_lines(redis_server: dict[str, Any]) -> None:
    url = redis_server["url"]
    env = _env(GATEWAY_SECRET=SECRET)
    outputs = [run("keys", "create", "--name", "audit", "--redis-url", url, env=env),
               run("limits", "set", "global", "--rpm", "100", "--redis-url", url, env=env),
               run("limits", "clear", "global", "--redis-url", url, env=env)]
    events = []
    for result in outputs:
        assert result.returncode == 0, result.stderr
        for line in result.stderr.splitlines():
            assert not line.startswith("b'"), line
            if line.startswith("{"):
                events.append(json.loads(line))
    assert [(e["event"], e["logger_name"], e["actor"]) for e in events] == [
        ("key_created", "llm_gateway.keys", "cli"), ("limit_changed", "llm_gateway.limits", "cli"),
        ("limit_cleared", "llm_gateway.limits", "cli")]


# --- 5. check-config ------------------------------------------------------------------------------------

BROKEN = """gateway:
  timeout: soon
  bogus: 1
state:
  replicas: 0
auth:
  mode: maybe
  keys:
    - {id: a, sha256: abc}
providers:
  x: {type: foo}
  ollama: {base_url: "ftp://x"}
server: {port: eighty}
"""


def test_check_config_reports_every_error_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BROKEN)
    result = run("check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert [re.match(rf"error: {re.escape(str(path))}:(\d+): ([\w.\[\]]+): ", line).groups() for line in lines] == [
        ("2", "gateway.timeout"), ("3", "gateway.bogus"), ("5", "state.replicas"), ("7", "auth.mode"),
        ("9", "auth.keys[0].sha256"), ("11", "providers.x.type"), ("12", "providers.ollama.base_url"),
        ("13", "server.port")], result.stderr
    with pytest.raises(ConfigError) as info:
        parse_config(BROKEN, "bad.yaml", {})
    assert (info.value.line, info.value.field, len(info.value.errors)) == (2, "gateway.timeout", 8)


def test_check_config_prints_the_config_only_when_it_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "none.yaml"
    path.write_text('providers:\n  openai:\n    api_key: "${OPENAI_API_KEY}"\n')
    result = run("check-config", "--config", str(path))
    assert result.returncode == 1 and "no provider is enabled" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://redis:6379/0", "redis://redis:6379/0"),
    ("redis://:pw-1@redis:6379/0", "redis://:***@redis:6379/0"),
    ("redis://user:pw-1@redis:6379/0", "redis://user:***@redis:6379/0"),
    ("rediss://user:p%40ss@redis.example.com:6380/2?ssl_cert_reqs=none", "rediss://user:***@redis.example.com:6380/2?ssl_cert_reqs=none"),
    ("redis://redis:6379/0?password=pw-1&db=1", "redis://redis:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
    ("", ""),
])
def test_redis_url_masks_only_the_password(url: str, shown: str) -> None:
    from proxy.cli.main import masked_url

    assert masked_url(url) == shown


def test_check_config_shows_a_redis_url_without_password_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("state: {redis_url: 'redis://redis:6379/0'}\nproviders: {ollama: {}}\n")
    plain = run("check-config", "--config", str(path))
    assert plain.returncode == 0, plain.stderr
    assert yaml.safe_load(plain.stdout)["state"]["redis_url"] == "redis://redis:6379/0"
    path.write_text("state: {redis_url: 'redis://ops:s3cret-77@redis:6379/0'}\nproviders: {ollama: {}}\n")
    masked = run("check-config", "--config", str(path))
    assert yaml.safe_load(masked.stdout)["state"]["redis_url"] == "redis://ops:***@redis:6379/0"
    assert "s3cret-77" not in masked.stdout + masked.stderr


# --- 6. --config where no config is read ----------------------------------------------------------------

@pytest.mark.parametrize("command", ["demo", "mock-provider"])
def test_demo_and_mock_provider_refuse_config_instead_of_ignoring_it(command: str) -> None:
    result = run(command, "--config", "config/gateway.yaml", "--port", str(free_port()), timeout=30)
    assert result.returncode == 2
    assert "--config: " in result.stderr and "reads no" in result.stderr
    assert "--config" not in run(command, "--help").stdout


# --- 7. unknown limit scopes --------------------------------------------------------------------------

SCOPES_YAML = f"""
state: {{redis_url: "${{REDIS_URL:-}}"}}
auth:
  admin_key: {ADMIN}
  secret: {SECRET}
  keys: [{{id: team-a, sha256: {GATEWAY_KEY_SHA}}}]
providers:
  openai: {{type: openai, base_url: "{{upstream}}/v1", api_key: sk-up, models: [gpt-4o-mini]}}
  anthropic: {{type: anthropic, base_url: "{{upstream}}", api_key: "${{ANTHROPIC_API_KEY}}", models: [claude-x]}}
"""


def test_limits_set_refuses_scopes_that_name_nothing(redis_server: dict[str, Any], tmp_path: Path) -> None:
    url = redis_server["url"]
    r = redis.Redis(port=redis_server["port"], decode_responses=True)
    path = tmp_path / "gw.yaml"
    path.write_text(SCOPES_YAML.replace("{upstream}", "http://127.0.0.1:9"))
    env = _env(REDIS_URL=url)
    created = run("keys", "create", "--name", "m", "--json", "--config", str(path), env=env)
    managed = json.loads(created.stdout)["id"]

    def limits(*args: str, config: bool = True) -> subprocess.CompletedProcess:
        return run("limits", "set", *args, "--rpm", "5", *(["--config", str(path)] if config else []), env=env)

    # anthropic is disabled here (no ANTHROPIC_API_KEY) but configured: a replica may have the key
    for scope in ("global", "provider:openai", "provider:anthropic", "model:gpt-4o-mini", "model:claude-x",
                  "key:team-a", f"key:{managed}"):
        result = limits(scope)
        assert result.returncode == 0, (scope, result.stderr)
        assert r.hget(limits_key(scope), "requests_per_minute") == "5"
    for scope, message in (("provider:opneai", "no deployment is named 'opneai' (configured: openai, anthropic)"),
                           ("model:gpt-5", "no deployment serves model 'gpt-5' (served: claude-x, gpt-4o-mini)"),
                           ("key:team-b", "no static or managed key has id 'team-b' (static: team-a;")):
        result = limits(scope)
        assert result.returncode == 1, scope
        assert result.stderr.startswith(f"error: {message}") and "--force" in result.stderr, result.stderr
        assert not r.exists(limits_key(scope))
        forced = limits(scope, "--force")
        assert forced.returncode == 0 and forced.stderr.startswith(f"warning: {message}"), forced.stderr
        assert r.hget(limits_key(scope), "requests_per_minute") == "5"
        assert run("limits", "clear", scope, "--config", str(path), env=env).returncode == 0  # a typo can be cleared
    # With no config file at all, nothing vouches for the gateway on that Redis: a warning, not a refusal.
    bare = run("limits", "set", "provider:elsewhere", "--rpm", "5", "--redis-url", url, env=_env(), cwd=tmp_path)
    assert bare.returncode == 0 and bare.stderr.startswith("warning: no deployment is named 'elsewhere'"), bare.stderr


def test_admin_put_limits_refuses_scopes_that_name_nothing(mock_upstream: str) -> None:
    cfg = parse_config(SCOPES_YAML.replace("{upstream}", mock_upstream), "scopes.yaml", {})
    admin = {"authorization": f"Bearer {ADMIN}"}
    body = {"requests_per_minute": 50}
    with serve(build_app(cfg)) as base:
        managed = httpx.post(base + "/admin/keys", headers=admin, json={"name": "m"}).json()["id"]
        for scope in ("global", "provider:openai", "provider:anthropic", "model:gpt-4o-mini", "key:team-a", f"key:{managed}"):
            assert httpx.put(f"{base}/admin/limits/{scope}", headers=admin, json=body).status_code == 200, scope
        for scope, message in (("provider:opneai", "no deployment is named 'opneai'"),
                               ("model:gpt-5", "no deployment serves model 'gpt-5'"),
                               ("key:team-b", "no static or managed key has id 'team-b'")):
            refused = httpx.put(f"{base}/admin/limits/{scope}", headers=admin, json=body)
            assert refused.status_code == 400, scope
            error = refused.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["message"].startswith(message) and "?force=true" in error["message"]
            assert httpx.get(f"{base}/admin/limits/{scope}", headers=admin).json()["limits"] == {}
            forced = httpx.put(f"{base}/admin/limits/{scope}?force=true", headers=admin, json=body)
            assert forced.status_code == 200 and forced.json()["limits"] == body


# --- 8. the compose stack's admin key and server secret --------------------------------------------------

def _compose_env() -> dict[str, str]:
    """The gateway replicas' environment as compose interpolates it with nothing set on the host."""
    raw = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["gateway-1"]["environment"]
    return {k: re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(v)) for k, v in raw.items()}


def test_compose_replicas_get_an_admin_key_and_a_server_secret_the_cli_shares(
        redis_server: dict[str, Any], mock_upstream: str) -> None:
    env = _compose_env()
    assert env["GATEWAY_ADMIN_KEY"] and env["GATEWAY_SECRET"]
    assert "demo" in env["GATEWAY_ADMIN_KEY"] and "demo" in env["GATEWAY_SECRET"]  # documented as demo values
    mounted = {t: s for s, t in (v.split(":")[:2] for v in
                                 yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["gateway-1"]["volumes"])}
    assert env["LLM_GATEWAY_CONFIG"] in mounted  # the CLI in a replica reads the replicas' own config
    local = ROOT / mounted[env["LLM_GATEWAY_CONFIG"]]
    text = local.read_text().replace("http://mock-flaky:9000", mock_upstream).replace("http://mock-provider:9000", mock_upstream)
    here = {**env, "REDIS_URL": redis_server["url"]}  # the compose Redis, here
    cfg = parse_config(text, str(local), here)
    assert str(cfg.auth.admin_key) == env["GATEWAY_ADMIN_KEY"] and str(cfg.auth.secret) == env["GATEWAY_SECRET"]
    cfg.monitoring.otel.endpoint = ""  # no collector here

    # `docker compose exec gateway-1 llm-gateway keys create --name my-app`: no --config, no --redis-url
    exec_env = _env(**{**here, "LLM_GATEWAY_CONFIG": str(local)})
    created = run("keys", "create", "--name", "my-app", "--json", env=exec_env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    listed = run("keys", "list", env=exec_env)
    assert listed.returncode == 0 and key["id"] in listed.stdout
    with serve(build_app(cfg)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=key["key"], max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        keys = httpx.get(base + "/admin/keys", headers={"authorization": f"Bearer {env['GATEWAY_ADMIN_KEY']}"})
        assert keys.status_code == 200 and key["id"] in {k["id"] for k in keys.json()["keys"]}
        static = openai.OpenAI(base_url=base + "/v1", api_key="sk-gateway-compose-demo", max_retries=0)
        assert static.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]).choices
    assert hashlib.sha256(b"sk-gateway-compose-demo").hexdigest() == env["GATEWAY_KEY_SHA256"]
