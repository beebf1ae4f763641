"""Hardened at the edge: what a request can make the gateway do before and while it is authenticated.

- SigV4: the access key id is resolved (and a malformed Authorization header refused) before the body is
  read, so an unknown identity cannot make the gateway buffer a body: it is answered while the body is
  still on its way. A known identity's body is still read in full and its signature checked.
- Credential query parameters (`api_key`, `api-key`, `key`, `access_token`, `token`, any case, also
  percent-encoded names) never reach an upstream, and a gateway key in the query is never accepted; the
  other parameters pass byte for byte.
- A JSON body with a repeated top-level key is a native 400 (`caller_invalid_request`), in every family
  and however the repeated name is spelled; nested data and look-alikes inside strings are left alone.
- `/admin/*`, `/healthz`, `/readyz` and `/metrics` are matched on the raw path: a path that only decodes
  to one of them (`/admin%2fkeys`, `/%61dmin/keys`) is a 404, never the admin API.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import anthropic
import boto3
import botocore.config
import httpx
import openai
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from starlette.applications import Starlette
from starlette.routing import Mount

from config import parse_config
from proxy.app import build_app
from tests.conftest import (
    CLIENT_AKID, CLIENT_AWS_SECRET, GATEWAY_KEY, clear_recorded, recorded, standard_config,
)
from tests.servers import serve

MODEL_SEG = "anthropic.claude-3-sonnet-20240229-v1%3A0"
CONVERSE = f"/bedrock/model/{MODEL_SEG}/converse"
MIB = 1024 * 1024


# ---------------------------------------------------------------- helpers

def _signed(url: str, body: bytes, akid: str, secret: str) -> dict[str, str]:
    """Headers of a request signed the way boto3 signs bedrock-runtime calls (host from the URL)."""
    req = AWSRequest(method="POST", url=url, data=body, headers={"content-type": "application/json"})
    SigV4Auth(Credentials(akid, secret), "bedrock", "us-east-1").add_auth(req)
    return dict(req.headers.items())


def _open(base: str) -> socket.socket:
    parts = urlsplit(base)
    return socket.create_connection((parts.hostname, parts.port), timeout=5)


def _head(path: str, host: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) read from `sock`; socket.timeout if none comes in time."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def _family_error(family: str, resp: httpx.Response) -> None:
    """A 400 `caller_invalid_request` in the family's own shape."""
    assert resp.status_code == 400, (resp.status_code, resp.text)
    assert resp.headers["x-gateway-error"] == "caller_invalid_request"
    data = resp.json()
    if family == "openai":
        assert data["error"]["type"] == "invalid_request_error"
    elif family == "anthropic":
        assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    elif family == "bedrock":
        assert resp.headers["x-amzn-errortype"] == "ValidationException" and data["message"]
    else:
        assert isinstance(data["error"], str)


# ---------------------------------------------------------------- 1. SigV4 identity before the body

def _refused_before_the_body(gateway: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """Declare a 32 MiB body, send 1 KiB of it, and read the answer (socket.timeout: none came in 3 s)."""
    with _open(gateway) as sock:
        sock.sendall(_head(CONVERSE, urlsplit(gateway).netloc, headers, 32 * MIB) + b"{" + b" " * 1023)
        try:
            return _read_response(sock, timeout=3.0)
        except socket.timeout:
            pytest.fail("the gateway waited for the 32 MiB body before refusing the credential")


def test_sigv4_identity_is_resolved_before_the_body(gateway: str, mock_upstream: str) -> None:
    url = gateway + CONVERSE
    # an unknown access key id: refused while the body is still on its way
    status, headers, body = _refused_before_the_body(gateway, _signed(url, b"{}", "GWUNKNOWN00000000000", "x"))
    assert status == 403, body
    assert headers["x-amzn-errortype"] == "UnrecognizedClientException" and json.loads(body)["message"]
    # a malformed Authorization header (of a known key): refused the same way
    garbled = {**_signed(url, b"{}", CLIENT_AKID, CLIENT_AWS_SECRET),
               "Authorization": f"AWS4-HMAC-SHA256 Credential={CLIENT_AKID}, Signature=00"}
    status, headers, body = _refused_before_the_body(gateway, garbled)
    assert status == 403, body
    assert headers["x-amzn-errortype"] == "InvalidSignatureException" and json.loads(body)["message"]
    # a known identity: its body is read in full (nothing is answered halfway), then the signature is checked
    big = json.dumps({"messages": [{"role": "user", "content": [{"text": "x" * (2 * MIB)}]}]}).encode()
    signed = _signed(url, big, CLIENT_AKID, CLIENT_AWS_SECRET)
    with _open(gateway) as sock:
        sock.sendall(_head(CONVERSE, urlsplit(gateway).netloc, signed, len(big)) + big[:4096])
        with pytest.raises(socket.timeout):
            _read_response(sock, timeout=0.5)
        sock.settimeout(10)
        sock.sendall(big[4096:])
        status, _, answer = _read_response(sock, timeout=10)
    assert status == 200, answer
    assert json.loads(answer)["output"]["message"]["role"] == "assistant"
    (record,) = recorded(mock_upstream)
    assert record["body_sha256"] == hashlib.sha256(big).hexdigest()


# ---------------------------------------------------------------- 2. credentials in the query string

CREDENTIAL_PARAMS = [("api_key", GATEWAY_KEY), ("API-KEY", GATEWAY_KEY), ("Key", GATEWAY_KEY),
                     ("access_token", "tok-1"), ("TOKEN", "tok-2"), ("%61pi%5Fkey", GATEWAY_KEY),
                     ("api%2Dkey", GATEWAY_KEY), ("%6B%65%79", GATEWAY_KEY)]
KEPT = "after=a%20b&limit=5&&flag&x=%2F%3D&api_key_id=7&tokens=3&ke%79s=4"


def _query(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v}" for k, v in params)


FAMILY_CALLS = {
    "openai": ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    "anthropic": ("/anthropic/v1/messages",
                  {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    "bedrock": (CONVERSE, {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
    "ollama": ("/ollama/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "hi"}],
                                    "stream": False}),
}
BEARER = {"authorization": f"Bearer {GATEWAY_KEY}", "anthropic-version": "2023-06-01"}


@pytest.mark.parametrize("family", list(FAMILY_CALLS))
def test_credential_query_parameters_never_reach_upstream(gateway: str, mock_upstream: str, family: str) -> None:
    path, body = FAMILY_CALLS[family]
    mixed = f"{CREDENTIAL_PARAMS[0][0]}={GATEWAY_KEY}&{KEPT.split('&', 1)[0]}&" \
            f"{_query(CREDENTIAL_PARAMS[1:])}&{KEPT.split('&', 1)[1]}"
    resp = httpx.post(f"{gateway}{path}?{mixed}", json=body, headers=BEARER)
    assert resp.status_code == 200, resp.text
    (record,) = recorded(mock_upstream)
    assert record["query"] == KEPT  # the rest byte for byte, order and oddities kept
    assert GATEWAY_KEY not in json.dumps(record)
    clear_recorded(mock_upstream)
    resp = httpx.post(f"{gateway}{path}?api_key={GATEWAY_KEY}", json=body, headers=BEARER)
    assert resp.status_code == 200
    (record,) = recorded(mock_upstream)
    assert record["query"] == ""
    clear_recorded(mock_upstream)
    # a gateway key in the query alone is never a credential
    for name in ("api_key", "api-key", "key", "access_token", "token"):
        resp = httpx.post(f"{gateway}{path}?{name}={GATEWAY_KEY}", json=body,
                          headers={"anthropic-version": "2023-06-01"})
        assert resp.status_code in (401, 403), resp.text
        assert resp.headers["x-gateway-error"] == "caller_missing_credentials"
    assert recorded(mock_upstream) == []


def test_sdks_extra_query_credentials_are_stripped(gateway: str, mock_upstream: str) -> None:
    """The official SDKs with `extra_query`, and boto3 with a signed query: still only the safe params."""
    oa = openai.OpenAI(base_url=f"{gateway}/v1", api_key=GATEWAY_KEY, max_retries=0)
    oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                               extra_query={"api_key": GATEWAY_KEY, "trace": "on"})
    an = anthropic.Anthropic(base_url=gateway, api_key=GATEWAY_KEY, max_retries=0)
    an.messages.create(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                       extra_query={"Access_Token": GATEWAY_KEY, "trace": "on"})
    br = boto3.client("bedrock-runtime", endpoint_url=f"{gateway}/bedrock", region_name="us-east-1",
                      aws_access_key_id=CLIENT_AKID, aws_secret_access_key=CLIENT_AWS_SECRET,
                      config=botocore.config.Config(retries={"max_attempts": 1}))

    def add_query(request: Any, **_: Any) -> None:  # signed by boto3, so the gateway verifies it as sent
        request.url += f"?trace=on&key={GATEWAY_KEY}"

    br.meta.events.register("before-sign.bedrock-runtime.Converse", add_query)
    out = br.converse(modelId="anthropic.claude-3-sonnet-20240229-v1:0",
                      messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert out["output"]["message"]["role"] == "assistant"  # the mock verified the gateway's own signature
    queries = [r["query"] for r in recorded(mock_upstream)]
    assert queries == ["trace=on"] * 3


# ---------------------------------------------------------------- 3. duplicate top-level keys

# Per family: bodies repeating a top-level key (spelled plainly, escaped, with whitespace before the colon,
# or with an escaped ':' that would balance the colon count), and one that repeats none at the top level
# (look-alikes in strings, escaped quotes before colons, a repeat nested in data) and must pass unchanged.
REPEATS = {
    "openai": (['{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "model": "gpt-x"}',
                '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"model":"gpt-x\\u003a"}'],
               '{"model": "gpt-4o", "messages": [{"role": "user", "content": "say \\"model\\": \\"x\\" \\u003a"}]}'),
    "anthropic": (['{"model":"claude-x","max_tokens":8,"messages":[{"role":"user","content":"hi"}],'
                   '"mod\\u0065l":"claude-evil"}'],
                  '{"model":"claude-x","max_tokens":8,"messages":[{"role":"user","content":"hi"}],'
                  '"metadata":{"user_id":"a","user_id":"b"}}'),
    "bedrock": (['{"messages":[{"role":"user","content":[{"text":"hi"}]}],\n "messages" :[]}'],
                '{"messages": [{"role": "user", "content": [{"text": "\\\\ \\"messages\\":"}]}],\n'
                ' "inferenceConfig" : {"maxTokens": 8}}'),
    "ollama": (['{"model":"llama3","stream":false,"messages":[{"role":"user","content":"a \\":"}],"model"\t:"x"}'],
               '{"model":"llama3","stream":false,"messages":[{"role":"user","content":"model: \\"model\\""}],'
               '"options":{"model":1}}'),
}


@pytest.mark.parametrize("family", list(REPEATS))
def test_repeated_top_level_keys_are_refused(gateway: str, mock_upstream: str, family: str) -> None:
    path = FAMILY_CALLS[family][0]
    headers = {**BEARER, "content-type": "application/json"}
    refused, fine = REPEATS[family]
    for raw in refused:
        _family_error(family, httpx.post(gateway + path, content=raw.encode(), headers=headers))
    assert recorded(mock_upstream) == []
    resp = httpx.post(gateway + path, content=fine.encode(), headers=headers)
    assert resp.status_code == 200, resp.text
    (record,) = recorded(mock_upstream)
    assert base64.b64decode(record["body_b64"]) == fine.encode()  # forwarded unchanged


def _repeat_model(request: Any) -> None:
    """An HTTP client hook: the SDK's JSON body, with a second top-level "model" appended."""
    body = request.read()[:-1] + b',"model":"gpt-4o-mini"}'
    request.stream = type(request.stream)(body)  # the ByteStream of httpx, or of the SDK's own fork
    request.headers["content-length"] = str(len(body))


def test_sdks_see_the_repeated_key_refusal(gateway: str, mock_upstream: str) -> None:
    hooked = httpx.Client(event_hooks={"request": [_repeat_model]})
    oa = openai.OpenAI(base_url=f"{gateway}/v1", api_key=GATEWAY_KEY, max_retries=0, http_client=hooked)
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "repeats the top-level key 'model'" in str(info.value)
    an = anthropic.Anthropic(base_url=gateway, api_key=GATEWAY_KEY, max_retries=0,
                             http_client=anthropic.DefaultHttpxClient(event_hooks={"request": [_repeat_model]}))
    with pytest.raises(anthropic.BadRequestError):
        an.messages.create(model="claude-x", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert recorded(mock_upstream) == []


# ---------------------------------------------------------------- 4. gateway routes on the raw path

ADMIN = "admin-key-edge-tests-91f0"


@pytest.fixture
def admin_gateway(mock_upstream: str, make_gateway: Callable[..., str]) -> str:
    clear_recorded(mock_upstream)
    text = standard_config(mock_upstream).replace(
        "auth:\n", f"auth:\n  admin_key: \"{ADMIN}\"\n  secret: edge-secret-0123456789\n", 1)
    return make_gateway(text)


# each decodes (once) to a gateway route
ENCODED_ROUTES = ["/admin%2fkeys", "/admin%2Fkeys", "/%61dmin/keys", "/%61dmin%2Fkeys", "/admin/%6beys",
                  "/%68ealthz", "/%72eadyz", "/metric%73", "/%6Detrics"]


def test_gateway_routes_match_the_raw_path(admin_gateway: str) -> None:
    auth = {"authorization": f"Bearer {ADMIN}"}
    for path in ENCODED_ROUTES:
        resp = httpx.get(admin_gateway + path, headers=auth)
        assert resp.status_code == 404, (path, resp.status_code, resp.text)
        assert "keys" not in resp.json() and "status" not in resp.json(), path
        resp = httpx.post(admin_gateway + path, headers=auth, json={"name": "sneaky"})
        assert resp.status_code == 404, (path, resp.status_code, resp.text)
        assert "key" not in resp.json(), path
    assert httpx.get(admin_gateway + "/admin/keys", headers=auth).json() == {"keys": []}  # nothing was created
    # the plain routes still answer
    assert httpx.get(admin_gateway + "/healthz").json() == {"status": "ok"}
    assert httpx.get(admin_gateway + "/healthz?probe=1").json() == {"status": "ok"}
    assert httpx.get(admin_gateway + "/readyz").json()["status"] == "ready"
    assert httpx.get(admin_gateway + "/metrics").status_code == 200
    created = httpx.put(admin_gateway + "/admin/limits/model:meta%2Fllama-3?force=true", headers=auth,
                        json={"requests_per_minute": 5})
    assert created.status_code == 200 and created.json()["scope"] == "model:meta/llama-3", created.text


def test_raw_path_routing_under_a_mount(mock_upstream: str) -> None:
    gw = build_app(parse_config(standard_config(mock_upstream).replace(
        "auth:\n", f"auth:\n  admin_key: \"{ADMIN}\"\n", 1), "test.yaml", {}))
    host = Starlette(routes=[Mount("/llm", app=gw)])
    asyncio.run(_mounted(gw, host, {"authorization": f"Bearer {ADMIN}"}))


async def _mounted(gw: Any, host: Starlette, auth: dict[str, str]) -> None:
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=host), base_url="http://host") as client:
            assert (await client.get("/llm/healthz")).json() == {"status": "ok"}
            assert (await client.get("/llm/admin/health", headers=auth)).status_code == 200
            assert (await client.get("/llm/%68ealthz")).status_code == 404
            assert (await client.get("/llm/admin%2fhealth", headers=auth)).status_code == 404
    finally:
        await gw.aclose()
