"""Managed gateway keys: format, storage (nothing usable in Redis), the CLI, the lifecycle across three
replicas on one Redis, per-key policy through the official SDKs, and SigV4 with managed identities.

The replica test runs real processes (`tests/procs.py`); the SDK tests run one in-process gateway on a
module-owned redis-server so that the CLI (in process, `proxy.cli.main`) and the gateway share keys.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import anthropic
import boto3
import botocore.config
import httpx
import openai
import pytest
import redis
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from config import parse_config
from proxy.app import build_app
from proxy.cli.main import main as cli_main
from proxy.state.keys import AKID_FORMAT, KEY_FORMAT, KeyStore, ManagedKeys, key_digest, parse_spec, sigv4_secret
from proxy.mock import MockOptions, build_mock_app
from proxy.state.store import Store
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.procs import ROOT, Procs, procs  # noqa: F401 - `procs` is a fixture
from tests.servers import free_port, serve

SECRET = "test-gateway-secret-6f1d0c"
ADMIN = "test-admin-key-91aa"
MSGS = [{"role": "user", "content": "hi"}]
NO_RETRY = botocore.config.Config(retries={"max_attempts": 1})


def config_text(mock: str, redis_url: str = "", secret: str = SECRET, extra: str = "") -> str:
    state = f'state: {{redis_url: "{redis_url}", redis_timeout: 1s}}' if redis_url else ""
    return f"""
gateway: {{timeout: 30s}}
{state}
auth:
  admin_key: {ADMIN}
  secret: "{secret}"
  keys:
    - {{id: static-team, sha256: {GATEWAY_KEY_SHA}}}
providers:
  openai: {{type: openai, base_url: "{mock}/v1", api_key: sk-up-openai}}
  anthropic: {{type: anthropic, base_url: "{mock}", api_key: sk-up-anthropic}}
  bedrock: {{type: bedrock, base_url: "{mock}", region: us-east-1, aws_access_key_id: AKIAUPSTREAM00000001,
             aws_secret_access_key: upstream-secret}}
  ollama: {{type: ollama, base_url: "{mock}"}}
{extra}
"""


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        import os

        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc, port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def cli(*args: str, capsys: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ unit

def test_key_format_and_derivation() -> None:
    async def go() -> dict[str, str]:
        store = Store(parse_config(config_text("http://127.0.0.1:1"), "t.yaml", {}))
        try:
            return await KeyStore(store, SECRET).create(parse_spec({"name": "fmt"}))
        finally:
            await store.aclose()

    created = asyncio.run(go())
    assert set(created) == {"id", "key", "aws_access_key_id", "aws_secret_access_key"}
    match = KEY_FORMAT.fullmatch(created["key"])
    assert match and match.group(1) == created["id"] and len(created["id"]) == 12
    assert len(created["key"]) == 4 + 12 + 1 + 43  # gwk_<id>_<32 random bytes, urlsafe base64>
    assert AKID_FORMAT.fullmatch(created["aws_access_key_id"]) and len(created["aws_access_key_id"]) == 20
    assert created["aws_access_key_id"].startswith("GWK" + created["id"].upper())
    # the SigV4 secret is derived, not stored: HMAC(auth.secret, "sigv4:" + akid)
    mac = hmac.new(SECRET.encode(), b"sigv4:" + created["aws_access_key_id"].encode(), hashlib.sha256).digest()
    assert created["aws_secret_access_key"] == base64.b64encode(mac).decode()[:40]
    assert sigv4_secret(SECRET, created["aws_access_key_id"]) == created["aws_secret_access_key"]
    assert key_digest(SECRET, created["key"]) == hmac.new(SECRET.encode(), created["key"].encode(), hashlib.sha256).hexdigest()
    assert key_digest("other", created["key"]) != key_digest(SECRET, created["key"])


@pytest.mark.parametrize("bad", [
    {}, {"name": ""}, {"name": "x" * 65}, {"name": "a\nb"}, {"name": "ok", "rpm": -1}, {"name": "ok", "rpm": "5"},
    {"name": "ok", "rpm": True}, {"name": "ok", "families": ["azure"]}, {"name": "ok", "models": "a b"},
    {"name": "ok", "models": [1]}, {"name": "ok", "metadata": {"k": "v\r\n"}}, {"name": "ok", "metadata": []},
    {"name": "ok", "api_key": "x"}, {"name": "ok", "log_bodies": "yes"}, {"name": "ok", "log_bodies": 1}, [], "name",
])
def test_bad_key_specs_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_spec(bad)


def test_cache_expires_within_half_a_second() -> None:
    """Lookups (found or not) are cached for at most 0.5 s, keyed by digest: Redis is asked again after it."""
    calls: list[float] = []

    class FakeStore:
        timeout = 0.25

        async def call(self, op: Any, deadline: float | None = None) -> Any:
            calls.append(time.monotonic())
            return {}

    backend = ManagedKeys(lambda: FakeStore(), SECRET)  # type: ignore[arg-type,return-value]
    key = "gwk_abcdefghijkl_" + "A" * 43

    async def go() -> None:
        end = time.monotonic() + 1.3
        while time.monotonic() < end:
            assert await backend.by_key(key) is None
            await asyncio.sleep(0.02)

    asyncio.run(go())
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(calls) >= 3 and all(0.49 <= g <= 0.75 for g in gaps), gaps
    before = len(calls)
    assert asyncio.run(backend.by_key("gwk_short")) is None and len(calls) == before  # malformed: no Redis call


# ------------------------------------------------------------------------- a gateway on Redis

@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("keys")
    proc, port = start_redis(directory)
    url = f"redis://127.0.0.1:{port}/0"
    mock = build_mock_app(MockOptions(chunk_interval_ms=0))
    try:
        with serve(mock, lifespan="off") as upstream:
            text = config_text(upstream, url)
            path = directory / "gateway.yaml"
            path.write_text(text)
            with serve(build_app(parse_config(text, str(path), {}))) as gw:
                yield {"gw": gw, "redis": url, "port": port, "config": str(path), "proc": proc}
    finally:
        proc.kill()
        proc.wait()


def create(setup: dict[str, Any], capsys: Any, *extra: str) -> dict[str, str]:
    code, out, err = cli("keys", "create", "--config", setup["config"], "--json", *extra, capsys=capsys)
    assert code == 0, err
    return json.loads(out)


def test_cli_create_list_revoke_and_what_redis_holds(setup: dict[str, Any], capsys: Any) -> None:
    code, out, err = cli("keys", "create", "--config", setup["config"], "--name", "plain", "--models", "gpt-4o,gpt-4",
                         "--rpm", "7", "--metadata", "team=search", "--metadata", "tag=a", capsys=capsys)
    assert code == 0, err
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert list(lines) == ["id", "key", "aws_access_key_id", "aws_secret_access_key"]
    assert lines["key"] not in err and lines["aws_secret_access_key"] not in err
    code, listed, _ = cli("keys", "list", "--config", setup["config"], capsys=capsys)
    assert code == 0 and lines["id"] in listed and "plain" in listed and "ID" in listed.splitlines()[0]
    assert lines["key"] not in listed and lines["aws_secret_access_key"] not in listed
    code, as_json, _ = cli("keys", "list", "--config", setup["config"], "--json", capsys=capsys)
    row = next(r for r in json.loads(as_json)["keys"] if r["id"] == lines["id"])
    assert row["models"] == ["gpt-4o", "gpt-4"] and row["rpm"] == 7 and row["metadata"] == {"team": "search", "tag": "a"}
    assert "digest" not in row and "key" not in row
    # A dump of Redis reveals no usable secret: neither the key, nor its secret part, nor the AWS secret,
    # nor auth.secret; the digest there is an HMAC with auth.secret, not a plain sha256.
    client = redis.Redis(port=setup["port"])
    dump = b"".join(k + b"".join(a + b for a, b in client.hgetall(k).items()) if client.type(k) == b"hash"
                    else k + (client.dump(k) or b"") for k in client.keys("*"))
    for secret in (lines["key"], lines["key"][17:], lines["aws_secret_access_key"], SECRET):
        assert secret.encode() not in dump
    assert hashlib.sha256(lines["key"].encode()).hexdigest().encode() not in dump
    assert all(k.startswith(b"llmgw:{llmgw}:") for k in client.keys("*"))
    record = client.hgetall(f"llmgw:{{llmgw}}:apikey:{lines['id']}")
    assert record[b"digest"] == key_digest(SECRET, lines["key"]).encode()
    assert client.ttl(f"llmgw:{{llmgw}}:apikey:{lines['id']}") == -1  # ops own it: no TTL
    # use, revoke, refused
    auth = {"authorization": f"Bearer {lines['key']}"}
    assert httpx.post(setup["gw"] + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS}, headers=auth).status_code == 200
    code, out, _ = cli("keys", "revoke", lines["id"], "--config", setup["config"], capsys=capsys)
    assert code == 0 and lines["id"] in out
    time.sleep(0.6)
    assert httpx.post(setup["gw"] + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS}, headers=auth).status_code == 401
    code, _, err = cli("keys", "revoke", lines["id"], "--config", setup["config"], capsys=capsys)
    assert code == 1 and "no key" in err
    code, _, err = cli("keys", "revoke", "../../etc", "--config", setup["config"], capsys=capsys)
    assert code == 1


def test_cli_refuses_without_secret_or_redis(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "nosecret.yaml"
    path.write_text(config_text("http://127.0.0.1:1", "redis://127.0.0.1:1/0", secret=""))
    code, out, err = cli("keys", "create", "--name", "x", "--config", str(path), capsys=capsys)
    assert code == 1 and out == "" and "auth.secret" in err and "GATEWAY_SECRET" in err
    path.write_text(config_text("http://127.0.0.1:1"))
    code, out, err = cli("keys", "create", "--name", "x", "--config", str(path), capsys=capsys)
    assert code == 1 and out == "" and "no Redis" in err
    code, out, err = cli("keys", "create", "--name", "bad name\n", "--config", str(path), capsys=capsys)
    assert code == 1 and out == ""


def test_static_keys_still_work(setup: dict[str, Any]) -> None:
    r = httpx.post(setup["gw"] + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS},
                   headers={"authorization": f"Bearer {GATEWAY_KEY}"})
    assert r.status_code == 200


def test_allowlist_of_models_and_families_through_the_sdks(setup: dict[str, Any], capsys: Any) -> None:
    k = create(setup, capsys, "--name", "narrow", "--models", "gpt-4o,claude-x", "--families", "openai")
    client = openai.OpenAI(base_url=setup["gw"] + "/v1", api_key=k["key"], max_retries=0)
    assert client.chat.completions.create(model="gpt-4o", messages=MSGS).choices[0].message.content  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # type: ignore[arg-type]
    assert denied.value.code == "model_not_allowed"
    assert all(m.id in ("gpt-4o", "claude-x") for m in client.models.list())
    ant = anthropic.Anthropic(base_url=setup["gw"], api_key=k["key"], max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):  # allowed model, but not this family
        ant.messages.create(model="claude-x", max_tokens=8, messages=MSGS)  # type: ignore[arg-type]
    both = create(setup, capsys, "--name", "both", "--families", "openai,anthropic")
    assert anthropic.Anthropic(base_url=setup["gw"], api_key=both["key"], max_retries=0).messages.create(
        model="claude-x", max_tokens=8, messages=MSGS).content  # type: ignore[arg-type]
    with pytest.raises(ClientError) as bedrock_denied:
        boto3.client("bedrock-runtime", endpoint_url=setup["gw"] + "/bedrock", region_name="us-east-1",
                     aws_access_key_id=both["aws_access_key_id"], aws_secret_access_key=both["aws_secret_access_key"],
                     config=NO_RETRY).converse(modelId="anthropic.claude-v2", messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert bedrock_denied.value.response["Error"]["Code"] == "AccessDeniedException"


def test_rpm_and_concurrency_limits_through_the_sdks(setup: dict[str, Any], capsys: Any) -> None:
    k = create(setup, capsys, "--name", "slow-lane", "--rpm", "2")
    client = openai.OpenAI(base_url=setup["gw"] + "/v1", api_key=k["key"], max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="gpt-4o", messages=MSGS)  # type: ignore[arg-type]
    assert limited.value.response.headers.get("retry-after")
    ant = anthropic.Anthropic(base_url=setup["gw"], api_key=k["key"], max_retries=0)
    with pytest.raises(anthropic.RateLimitError):  # the key scope spans families
        ant.messages.create(model="claude-x", max_tokens=8, messages=MSGS)  # type: ignore[arg-type]

    one = create(setup, capsys, "--name", "one-at-a-time", "--max-concurrent", "1")
    results: list[int] = []

    def slow() -> None:
        r = httpx.post(setup["gw"] + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS}, timeout=10,
                       headers={"authorization": f"Bearer {one['key']}", "x-mock-stall-ms": "1500"})
        results.append(r.status_code)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=setup["gw"] + "/v1", api_key=one["key"], max_retries=0).chat.completions.create(
            model="gpt-4o", messages=MSGS)  # type: ignore[arg-type]
    thread.join()
    assert results == [200]


def test_metadata_reaches_the_principal(setup: dict[str, Any], capsys: Any) -> None:
    k = create(setup, capsys, "--name", "meta", "--metadata", "team=search", "--metadata", "tags=a",
               "--metadata", "tags=b", "--tpm", "1000", "--max-concurrent", "3", "--models", "gpt-4o",
               "--families", "openai,ollama")

    async def go() -> Any:
        store = Store(parse_config(config_text("http://127.0.0.1:1", setup["redis"]), "t.yaml", {}))
        try:
            backend = ManagedKeys(lambda: store, SECRET)
            return await backend.by_key(k["key"]), await backend.by_access_key(k["aws_access_key_id"]), \
                await backend.by_key(k["key"][:-1] + ("A" if k["key"][-1] != "A" else "B"))
        finally:
            await store.aclose()

    principal, (sig_principal, secret), wrong = asyncio.run(go())
    assert principal.key_id == k["id"] and principal.metadata == {"name": "meta", "team": "search", "tags": "a,b"}
    assert principal.models == ("gpt-4o",) and principal.families == ("openai", "ollama")
    assert principal.tpm == 1000 and principal.rpm is None and principal.max_concurrent == 3
    assert principal.log_bodies is False
    assert sig_principal.key_id == k["id"] and secret == k["aws_secret_access_key"]
    assert wrong is None


def test_log_bodies_is_kept_with_a_managed_key(setup: dict[str, Any], capsys: Any) -> None:
    k = create(setup, capsys, "--name", "audited", "--log-bodies")

    async def go() -> Any:
        store = Store(parse_config(config_text("http://127.0.0.1:1", setup["redis"]), "t.yaml", {}))
        try:
            return await ManagedKeys(lambda: store, SECRET).by_key(k["key"])
        finally:
            await store.aclose()

    assert asyncio.run(go()).log_bodies is True
    assert parse_spec({"name": "x", "log_bodies": True}).log_bodies and not parse_spec({"name": "x"}).log_bodies


def test_managed_sigv4_through_boto3(setup: dict[str, Any], capsys: Any) -> None:
    k = create(setup, capsys, "--name", "boto")
    endpoint = setup["gw"] + "/bedrock"
    messages = [{"role": "user", "content": [{"text": "hi"}]}]

    def bedrock(akid: str, secret: str) -> Any:
        return boto3.client("bedrock-runtime", endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id=akid, aws_secret_access_key=secret, config=NO_RETRY)

    ok = bedrock(k["aws_access_key_id"], k["aws_secret_access_key"])
    assert ok.converse(modelId="anthropic.claude-v2", messages=messages)["output"]["message"]["content"]
    events = list(ok.converse_stream(modelId="anthropic.claude-v2", messages=messages)["stream"])
    assert any("metadata" in e for e in events)

    def code(client: Any) -> str:
        with pytest.raises(ClientError) as err:
            client.converse(modelId="anthropic.claude-v2", messages=messages)
        return err.value.response["Error"]["Code"]

    secret = k["aws_secret_access_key"]
    wrong = secret[:-1] + ("x" if secret[-1] != "x" else "y")  # a secret ending in "x" made this one right (1 in 64)
    assert code(bedrock(k["aws_access_key_id"], wrong)) == "InvalidSignatureException"
    assert code(bedrock(k["aws_access_key_id"][:-1] + ("A" if k["aws_access_key_id"][-1] != "A" else "B"),
                        k["aws_secret_access_key"])) == "UnrecognizedClientException"
    assert code(bedrock("GWK" + "A" * 17, "whatever")) == "UnrecognizedClientException"

    url = endpoint + "/model/anthropic.claude-v2/converse"
    body = json.dumps({"messages": messages}).encode()

    def signed(data: bytes, when: datetime.datetime | None = None) -> dict[str, str]:
        request = AWSRequest(method="POST", url=url, data=data, headers={"content-type": "application/json"})
        signer = SigV4Auth(Credentials(k["aws_access_key_id"], k["aws_secret_access_key"]), "bedrock", "us-east-1")
        if when is None:
            signer.add_auth(request)
        else:  # botocore signs "now": freeze its clock to sign an old request
            from unittest import mock

            with mock.patch("botocore.auth.get_current_datetime", return_value=when):
                signer.add_auth(request)
        return dict(request.headers.items())

    assert httpx.post(url, content=body, headers=signed(body)).status_code == 200
    other = httpx.post(url, content=body.replace(b"hi", b"yo"), headers=signed(body))
    assert other.status_code == 403 and other.headers["x-amzn-errortype"] == "InvalidSignatureException"
    old = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(minutes=20)
    expired = httpx.post(url, content=body, headers=signed(body, old))
    assert expired.status_code == 403 and expired.headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert "expired" in expired.json()["message"].lower()
    # revoked: the access key id is unknown from then on
    assert cli("keys", "revoke", k["id"], "--config", setup["config"], capsys=capsys)[0] == 0
    time.sleep(0.6)
    assert code(ok) == "UnrecognizedClientException"


def test_without_secret_managed_keys_are_ignored(setup: dict[str, Any], capsys: Any) -> None:
    k = create(setup, capsys, "--name", "ignored")
    text = Path(setup["config"]).read_text().replace(f'secret: "{SECRET}"', 'secret: ""')
    path = Path(setup["config"]).with_name("nosecret.yaml")
    path.write_text(text)
    with serve(build_app(parse_config(text, str(path), {}))) as gw:
        r = httpx.post(gw + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS},
                       headers={"authorization": f"Bearer {k['key']}"})
        assert r.status_code == 401
        assert httpx.post(gw + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS},
                          headers={"authorization": f"Bearer {GATEWAY_KEY}"}).status_code == 200
    # and the startup says so
    probe = subprocess.run([sys.executable, "-c", "import sys; from proxy.app import build_app; build_app(sys.argv[1])",
                            str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert probe.returncode == 0 and "managed_keys_disabled" in probe.stdout + probe.stderr


def test_redis_down_keeps_recent_keys_and_503s_unknown_ones(tmp_path: Path, capsys: Any) -> None:
    proc, port = start_redis(tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with serve(build_mock_app(MockOptions(chunk_interval_ms=0)), lifespan="off") as upstream:
            text = config_text(upstream, url)
            path = tmp_path / "g.yaml"
            path.write_text(text)
            code, out, err = cli("keys", "create", "--name", "r", "--json", "--config", str(path), capsys=capsys)
            assert code == 0, err
            k = json.loads(out)
            with serve(build_app(parse_config(text, str(path), {}))) as gw:
                def chat(key: str) -> httpx.Response:
                    return httpx.post(gw + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS},
                                      headers={"authorization": f"Bearer {key}"}, timeout=10)

                assert chat(k["key"]).status_code == 200
                proc.kill()
                proc.wait()
                time.sleep(0.6)
                assert chat(k["key"]).status_code == 200  # seen moments ago: kept while Redis is away
                unknown = chat("gwk_" + "a" * 12 + "_" + "B" * 43)
                assert unknown.status_code == 503, unknown.text
                assert unknown.json()["error"]["type"] and "Traceback" not in unknown.text
                assert chat(GATEWAY_KEY).status_code == 200  # static keys never need Redis
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------- three replicas

def test_lifecycle_across_three_replicas(redis_server: dict[str, Any], procs: Procs, tmp_path: Path) -> None:  # noqa: F811
    mock = procs.mock()
    text = config_text(mock.url, redis_server["url"])
    gateways = procs.gateways(text, 3)
    config = tmp_path / "cli.yaml"
    config.write_text(text)
    run = subprocess.run([sys.executable, "-m", "proxy.cli", "keys", "create", "--name", "fleet", "--json",
                          "--metadata", "team=fleet-team", "--config", str(config)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    k = json.loads(run.stdout)
    assert k["key"] not in run.stderr

    def status(gw: Any) -> int:
        return httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS},
                          headers={"authorization": f"Bearer {k['key']}"}, timeout=10).status_code

    for gw in gateways:  # usable everywhere at once (nothing to propagate: every replica reads Redis)
        assert status(gw) == 200
        assert openai.OpenAI(base_url=gw.url + "/v1", api_key=k["key"], max_retries=0).chat.completions.create(
            model="gpt-4o", messages=MSGS).choices  # type: ignore[arg-type]
    listed = httpx.get(gateways[1].url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert k["id"] in [r["id"] for r in listed["keys"]]

    for gw in gateways:  # every replica has the key in its cache right now
        assert status(gw) == 200
    start = time.monotonic()
    revoked = httpx.delete(f"{gateways[0].url}/admin/keys/{k['id']}", headers={"authorization": f"Bearer {ADMIN}"})
    assert revoked.status_code == 200 and revoked.json() == {"id": k["id"], "revoked": True}
    refused_after: dict[str, float] = {}
    while len(refused_after) < len(gateways) and time.monotonic() - start < 3:
        for gw in gateways:
            if gw.name not in refused_after and status(gw) == 401:
                refused_after[gw.name] = time.monotonic() - start
        time.sleep(0.02)
    assert len(refused_after) == 3, refused_after
    assert max(refused_after.values()) < 1.0, refused_after
    time.sleep(0.6)
    assert all(status(gw) == 401 for gw in gateways)  # and it stays refused
    # the key's metadata is on the access log line (and the key itself is nowhere in it)
    for gw in gateways:
        lines = [json.loads(line) for line in gw.log_path.read_text().splitlines() if line.startswith("{")]
        access = [line for line in lines if line.get("event") == "request" and line.get("key_id") == k["id"]]
        assert access and all(line.get("key_metadata", {}).get("team") == "fleet-team" for line in access), access[:1]
        assert k["key"] not in gw.log_path.read_text()
