"""Optional TLS serving (`server.certfile` / `server.keyfile`): `llm-gateway serve` as a subprocess with a
throwaway certificate from trustme. boto3's bearer-token mode (`AWS_BEARER_TOKEN_BEDROCK` = a gateway key)
refuses plain HTTP, so this is what makes Bedrock API keys usable with the gateway.
"""
from __future__ import annotations

import ssl
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import boto3
import botocore.config
import httpx
import pytest
from botocore.exceptions import ClientError

from proxy.mock import MockOptions, build_mock_app
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.procs import Procs, procs  # noqa: F401 - `procs` is a fixture
from tests.servers import free_port, serve

trustme = pytest.importorskip("trustme")
ADMIN = "tls-admin-key-0b7e"
NO_RETRY = botocore.config.Config(retries={"max_attempts": 1})
MESSAGES = [{"role": "user", "content": [{"text": "hello over TLS"}]}]
MODEL = "anthropic.claude-3-sonnet-20240229-v1:0"


@pytest.fixture
def tls(tmp_path: Path, procs: Procs) -> Iterator[dict[str, Any]]:  # noqa: F811
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(files["cert"]), append=i > 0)
    mock = build_mock_app(MockOptions(chunk_interval_ms=0, aws_access_key_id="AKIAUPSTREAM00000001",
                                      aws_secret_access_key="tls-upstream-secret"))
    with serve(mock, lifespan="off") as upstream:
        config = tmp_path / "tls.yaml"
        config.write_text(f"""
auth:
  admin_key: {ADMIN}
  secret: tls-gateway-secret
  keys:
    - {{id: static-team, sha256: {GATEWAY_KEY_SHA}}}
providers:
  bedrock: {{type: bedrock, base_url: "{upstream}", region: us-east-1, aws_access_key_id: AKIAUPSTREAM00000001,
             aws_secret_access_key: tls-upstream-secret}}
  openai: {{type: openai, base_url: "{upstream}/v1", api_key: sk-up}}
server: {{certfile: "{files['cert']}", keyfile: "{files['key']}"}}
""")
        port = free_port()
        proc = procs.spawn("gateway-tls", [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config),
                                           "--host", "127.0.0.1", "--port", str(port)], port)
        base = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(base + "/healthz", verify=str(files["ca"]), timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError("TLS gateway did not start:\n" + proc.tail())
            time.sleep(0.05)
        yield {"base": base, "ca": str(files["ca"]), "upstream": upstream, "mock": mock, "port": port}


def _bedrock(endpoint: str, ca: str | bool) -> Any:
    return boto3.client("bedrock-runtime", endpoint_url=endpoint, region_name="us-east-1", verify=ca, config=NO_RETRY)


def test_boto3_bearer_token_over_tls(tls: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    created = httpx.post(tls["base"] + "/admin/keys", verify=tls["ca"], headers={"authorization": f"Bearer {ADMIN}"},
                         json={"name": "bedrock-api-key", "families": ["bedrock"]})
    assert created.status_code == 200, created.text
    managed = created.json()["key"]
    for key in (GATEWAY_KEY, managed):
        monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", key)
        client = _bedrock(tls["base"] + "/bedrock", tls["ca"])
        sent: list[Any] = []
        client.meta.events.register("before-send.bedrock-runtime.*", lambda request, **_: sent.append(request))
        tls["mock"].records.clear()
        answer = client.converse(modelId=MODEL, messages=MESSAGES)
        assert answer["output"]["message"]["content"][0]["text"]
        assert sent and sent[-1].headers["Authorization"] == f"Bearer {key}".encode()
        events = list(client.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
        assert any("contentBlockDelta" in e for e in events)
        # upstream: SigV4 by the deployment's own keys, never the client's bearer token
        for method, raw, _query, headers, _body, _when in tls["mock"].records:
            auth = dict(headers)[b"authorization"].decode()
            assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIAUPSTREAM00000001/") and key not in auth
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "gwk_" + "a" * 12 + "_" + "Z" * 43)
    with pytest.raises(ClientError) as unknown:
        _bedrock(tls["base"] + "/bedrock", tls["ca"]).converse(modelId=MODEL, messages=MESSAGES)
    assert unknown.value.response["Error"]["Code"] == "UnrecognizedClientException"
    # SigV4 over https: the signature covers the https Host and path as well
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK")
    signed = boto3.client("bedrock-runtime", endpoint_url=tls["base"] + "/bedrock", region_name="us-east-1",
                          verify=tls["ca"], config=NO_RETRY, aws_access_key_id=created.json()["aws_access_key_id"],
                          aws_secret_access_key=created.json()["aws_secret_access_key"])
    assert signed.converse(modelId=MODEL, messages=MESSAGES)["output"]["message"]["content"]


def test_bearer_needs_https_and_a_trusted_certificate(tls: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", GATEWAY_KEY)
    with pytest.raises(Exception, match="(?i)https"):  # botocore refuses bearer auth over plain HTTP
        _bedrock(f"http://127.0.0.1:{tls['port']}/bedrock", False).converse(modelId=MODEL, messages=MESSAGES)
    with pytest.raises(Exception, match="(?i)ssl|certificate"):
        _bedrock(tls["base"] + "/bedrock", True).converse(modelId=MODEL, messages=MESSAGES)
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls["base"] + "/healthz")  # the system trust store does not know the throwaway CA


def test_other_families_and_plain_http_on_the_tls_port(tls: dict[str, Any]) -> None:
    r = httpx.post(tls["base"] + "/v1/chat/completions", verify=tls["ca"],
                   headers={"authorization": f"Bearer {GATEWAY_KEY}"},
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"]
    context = ssl.create_default_context(cafile=tls["ca"])
    assert context.check_hostname
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no HTTP answer
        httpx.get(f"http://127.0.0.1:{tls['port']}/healthz", timeout=3)
