"""Bad input, table-driven per family: every failure is a native error of the inbound API, never a
traceback.

One gateway (failover off, so each case is one attempt) serves all four families. Each family has a
normal deployment on the simulated upstream, a "slow" one (first_byte timeout 300 ms, and the request
asks the mock to stall 2 s) and a "dead" one whose base_url is a closed port. Two keys: an open one and
a narrow one with a model allowlist. Requests are raw httpx with correct-looking paths (Bedrock requests
are SigV4-signed with botocore), and a few cases are repeated with the official SDKs to check they raise
the right exception classes.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Iterator
from urllib.parse import quote

import anthropic
import boto3
import botocore.exceptions
import httpx
import ollama
import openai
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials

from config import parse_config
from proxy.app import build_app
from tests.conftest import (
    CLIENT_AKID,
    CLIENT_AWS_SECRET,
    GATEWAY_KEY,
    GATEWAY_KEY_SHA,
    UPSTREAM_AKID,
    UPSTREAM_AWS_SECRET,
    recorded,
)
from tests.servers import free_port, serve

NARROW_KEY = "gw-narrow-key-00000000000000"
NARROW_AKID = "GWNARROW000000000001"
NARROW_SECRET = "gw-narrow-aws-secret"
FAMILIES = ["openai", "anthropic", "bedrock", "ollama"]
# per family: a served model, one the narrow key may use, a model nobody serves, slow, dead
MODELS = {
    "openai": dict(ok="gpt-4o", narrow="gpt-4o-mini", slow="gpt-slow", dead="gpt-dead"),
    "anthropic": dict(ok="claude-x", narrow="claude-x-mini", slow="claude-slow", dead="claude-dead"),
    "bedrock": dict(ok="anthropic.claude-v2", narrow="amazon.titan-lite-v1", slow="slow.model-v1:0",
                    dead="dead.model-v1:0"),
    "ollama": dict(ok="llama3", narrow="llama-mini", slow="llama-slow", dead="llama-dead"),
}


def _target(family: str, base: str) -> str:
    return {"openai": f'type: openai, base_url: "{base}/v1", api_key: sk-o',
            "anthropic": f'type: anthropic, base_url: "{base}", api_key: sk-a',
            "bedrock": f'type: bedrock, base_url: "{base}", region: us-east-1, '
                       f"aws_access_key_id: {UPSTREAM_AKID}, aws_secret_access_key: {UPSTREAM_AWS_SECRET}",
            "ollama": f'type: ollama, base_url: "{base}"'}[family]


def _config(up: str, dead: str) -> str:
    deployments = []
    for family in FAMILIES:
        m = MODELS[family]
        for suffix, base, models, extra in (("", up, [m["ok"], m["narrow"]], ""),
                                            ("-slow", up, [m["slow"]], ", timeouts: {first_byte: 300ms}"),
                                            ("-dead", dead, [m["dead"]], "")):
            deployments.append(f"  {family}{suffix}: {{{_target(family, base)}, models: {json.dumps(models)}{extra}}}")
    narrow = json.dumps([MODELS[f]["narrow"] for f in FAMILIES])
    return f"""
gateway: {{timeout: 20s, max_body_bytes: 1KiB, enable_failover: false}}  # one attempt: failover is tested apart
auth:
  keys:
    - {{id: open, sha256: {GATEWAY_KEY_SHA}, aws_access_key_id: {CLIENT_AKID},
        aws_secret_access_key: {CLIENT_AWS_SECRET}}}
    - {{id: narrow, sha256: {hashlib.sha256(NARROW_KEY.encode()).hexdigest()}, aws_access_key_id: {NARROW_AKID},
        aws_secret_access_key: {NARROW_SECRET}, models: {narrow}}}
providers:
""" + "\n".join(deployments) + "\n"


@pytest.fixture(scope="module")
def gw(mock_upstream: str) -> Iterator[str]:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with serve(build_app(parse_config(_config(mock_upstream, dead), "bad-input.yaml", {}))) as base:
        yield base


# --- request builders --------------------------------------------------------------------------------

def _body(family: str, model: str, extra: dict[str, Any] | None = None) -> bytes:
    if family == "openai":
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    elif family == "anthropic":
        body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    elif family == "bedrock":
        body = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return json.dumps({**body, **(extra or {})}).encode()


def _path(family: str, model: str) -> str:
    return {"openai": "/v1/chat/completions", "anthropic": "/anthropic/v1/messages",
            "bedrock": f"/bedrock/model/{quote(model, safe='')}/converse", "ollama": "/ollama/api/chat"}[family]


def call(gw: str, family: str, *, model: str | None = None, key: str = "open", body: bytes | None = None,
         path: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    """One request in the family's own wire format. key: open | narrow | none | wrong."""
    model = model or MODELS[family]["ok"]
    body = _body(family, model) if body is None else body
    url = gw + (path or _path(family, model))
    hdrs = {"content-type": "application/json", **(headers or {})}
    if family == "anthropic":
        hdrs["anthropic-version"] = "2023-06-01"
    if family == "bedrock":
        if key != "none":
            akid, secret = {"open": (CLIENT_AKID, CLIENT_AWS_SECRET), "narrow": (NARROW_AKID, NARROW_SECRET),
                            "wrong": ("GWUNKNOWN00000000009", "whatever")}[key]
            request = AWSRequest(method="POST", url=url, data=body, headers=hdrs)
            SigV4Auth(Credentials(akid, secret), "bedrock", "us-east-1").add_auth(request)
            hdrs = dict(request.headers.items())
    elif key != "none":
        secret = {"open": GATEWAY_KEY, "narrow": NARROW_KEY, "wrong": "gw-not-a-key"}[key]
        if family == "anthropic":
            hdrs["x-api-key"] = secret
        else:
            hdrs["authorization"] = f"Bearer {secret}"
    return httpx.post(url, content=body, headers=hdrs, timeout=10)


# --- the table ------------------------------------------------------------------------------------------
# case -> family -> (status, error kind): OpenAI error.type, Anthropic error.type, Bedrock x-amzn-ErrorType,
# Ollama None (its errors are a bare {"error": "..."}).

def _same(status: int, openai_type: str, anthropic_type: str, bedrock: tuple[int, str]) -> dict[str, tuple[int, Any]]:
    return {"openai": (status, openai_type), "anthropic": (status, anthropic_type), "bedrock": bedrock,
            "ollama": (status, None)}


TABLE: dict[str, dict[str, tuple[int, Any]]] = {
    "malformed_json": _same(400, "invalid_request_error", "invalid_request_error", (400, "ValidationException")),
    "unknown_model": _same(404, "invalid_request_error", "not_found_error", (404, "ResourceNotFoundException")),
    "body_too_large": _same(413, "invalid_request_error", "request_too_large", (413, "ValidationException")),
    "missing_key": _same(401, "invalid_request_error", "authentication_error",
                         (403, "MissingAuthenticationTokenException")),
    "wrong_key": _same(401, "invalid_request_error", "authentication_error", (403, "UnrecognizedClientException")),
    "model_not_allowed": _same(403, "permission_error", "permission_error", (403, "AccessDeniedException")),
    "dot_dot_segment": _same(400, "invalid_request_error", "invalid_request_error", (400, "ValidationException")),
    "api_base_field": _same(400, "invalid_request_error", "invalid_request_error", (400, "ValidationException")),
    "base_url_field": _same(400, "invalid_request_error", "invalid_request_error", (400, "ValidationException")),
    # Bedrock answers upstream failures with the AWS codes botocore understands (see WIRE.md 4.1).
    "upstream_unreachable": _same(502, "server_error", "api_error", (503, "ServiceUnavailableException")),
    "upstream_timeout": _same(504, "server_error", "timeout_error", (408, "ModelTimeoutException")),
}
REACHES_UPSTREAM = {"upstream_timeout"}  # every other case must be refused before any upstream call


def _dot_dot_path(family: str) -> str:
    return {"openai": "/v1/%2e%2e/chat/completions", "anthropic": "/anthropic/v1/%2E%2E/messages",
            "bedrock": "/bedrock/model/%2e%2e/converse", "ollama": "/ollama/api/%2e%2e/chat"}[family]


def run_case(gw: str, case: str, family: str, marker: str) -> httpx.Response:
    m = MODELS[family]
    tag = {"x-test-case": marker}
    if case == "malformed_json":
        return call(gw, family, body=b'{"model": "' + m["ok"].encode() + b'", "messages": [', headers=tag)
    if case == "unknown_model":
        return call(gw, family, model="no-such-model-1" if family != "bedrock" else "acme.no-such-model-v1:0",
                    headers=tag)
    if case == "body_too_large":
        return call(gw, family, body=_body(family, m["ok"], {"padding": "x" * 2048}), headers=tag)
    if case == "missing_key":
        return call(gw, family, key="none", headers=tag)
    if case == "wrong_key":
        return call(gw, family, key="wrong", headers=tag)
    if case == "model_not_allowed":
        return call(gw, family, key="narrow", model=m["ok"], headers=tag)
    if case == "dot_dot_segment":
        return call(gw, family, path=_dot_dot_path(family), headers=tag)
    if case in ("api_base_field", "base_url_field"):
        field = case.removesuffix("_field")
        return call(gw, family, body=_body(family, m["ok"], {field: "http://169.254.169.254/"}), headers=tag)
    if case == "upstream_unreachable":
        return call(gw, family, model=m["dead"], headers=tag)
    if case == "upstream_timeout":
        return call(gw, family, model=m["slow"], headers={**tag, "x-mock-stall-ms": "2000"})
    raise AssertionError(case)


def assert_native_error(response: httpx.Response, family: str, status: int, kind: Any) -> None:
    text = response.text
    assert response.status_code == status, (family, response.status_code, text)
    assert "Traceback" not in text and "File \"" not in text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()  # valid JSON, always
    assert response.headers.get("x-gateway-request-id")
    if family == "openai":
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] == kind and isinstance(body["error"]["message"], str)
        assert body["error"]["message"] and body["error"]["param"] is None
    elif family == "anthropic":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] == kind and body["error"]["message"]
        assert body["request_id"] == response.headers["request-id"] == response.headers["x-gateway-request-id"]
    elif family == "bedrock":
        assert response.headers["x-amzn-errortype"] == kind
        assert set(body) == {"message"} and body["message"], body
    else:
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    if family != "bedrock":
        assert "Exception" not in text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(TABLE))
def test_bad_input_gets_a_native_error(gw: str, mock_upstream: str, case: str, family: str) -> None:
    marker = uuid.uuid4().hex
    response = run_case(gw, case, family, marker)
    status, kind = TABLE[case][family]
    assert_native_error(response, family, status, kind)
    if case == "upstream_timeout":
        assert response.elapsed.total_seconds() < 1.5, "the first-byte timeout (300 ms) was not applied"
    if case in ("upstream_timeout", "upstream_unreachable"):
        assert response.headers["x-gateway-attempts"] == "1"
        assert response.headers["x-gateway-provider"] == f"{family}-{'slow' if case == 'upstream_timeout' else 'dead'}"
    reached = [r for r in recorded(mock_upstream) if ["x-test-case", marker] in r["headers"]]
    assert len(reached) == (1 if case in REACHES_UPSTREAM else 0), case


def test_openai_specific_codes(gw: str) -> None:
    assert call(gw, "openai", key="wrong").json()["error"]["code"] == "invalid_api_key"
    assert call(gw, "openai", model="nope-1").json()["error"]["code"] == "model_not_found"
    assert call(gw, "openai", key="narrow").json()["error"]["code"] == "model_not_allowed"


def test_body_too_large_without_content_length(gw: str) -> None:
    """A chunked body (no Content-Length) is counted while it is read."""
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "gpt-4o", "messages": [], "padding": "'
        for _ in range(8):
            yield b"x" * 256
        yield b'"}'

    response = httpx.post(f"{gw}/v1/chat/completions", content=chunks(),
                          headers={"authorization": f"Bearer {GATEWAY_KEY}", "content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_native_error(response, "openai", 413, "invalid_request_error")


@pytest.mark.parametrize("path", [
    "/", "/nope", "/v2/chat/completions", "/openai", "/openai/v1", "/openai/v2/chat/completions",
    "/anthropic/v2/messages", "/anthropic/messages", "/bedrock/foo/bar", "/bedrock/guardrail/x/version/1/apply",
    "/ollama/v1/chat/completions", "/ollama/chat", "/apis/chat", "/models/x/invoke",
])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_path_is_a_plain_404(gw: str, path: str, method: str) -> None:
    response = httpx.request(method, gw + path, headers={"authorization": f"Bearer {GATEWAY_KEY}"},
                             content=b"{}" if method == "POST" else None)
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}
    assert body["error"]["type"] == "not_found_error" and body["error"]["message"]
    assert "Traceback" not in response.text and "Exception" not in response.text


@pytest.mark.parametrize("segment", ["%2e%2e", "%2E%2e", ".%2e", "%2e", "%252e%252e"])
def test_encoded_dot_segments_are_refused(gw: str, segment: str) -> None:
    response = call(gw, "openai", path=f"/v1/{segment}/chat/completions")
    assert_native_error(response, "openai", 400, "invalid_request_error")


@pytest.mark.parametrize("family", ["openai", "anthropic", "ollama"])
@pytest.mark.parametrize("header", ["api-base", "base-url", "azure-endpoint"])
def test_upstream_picking_headers_are_refused(gw: str, family: str, header: str) -> None:
    response = call(gw, family, headers={header: "http://169.254.169.254/"})
    assert_native_error(response, family, 400, TABLE["api_base_field"][family][1])


def test_nested_upstream_looking_fields_are_left_alone(gw: str, mock_upstream: str) -> None:
    body = _body("openai", "gpt-4o", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"base_url": {"type": "string"}}}}}]})
    response = call(gw, "openai", body=body)
    assert response.status_code == 200, response.text


# --- the official SDKs raise the right exception classes ----------------------------------------------

def test_openai_sdk_exceptions(gw: str) -> None:
    client = openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=msgs)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=msgs)
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{gw}/openai/v1", api_key=NARROW_KEY, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=msgs)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gpt-4o", messages=msgs, extra_body={"api_base": "http://evil/"})
    assert "api_base" in bad.value.message
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x" * 4096}])
    assert too_large.value.status_code == 413
    with pytest.raises(openai.InternalServerError) as timeout:
        client.chat.completions.create(model="gpt-slow", messages=msgs, extra_headers={"x-mock-stall-ms": "2000"})
    assert timeout.value.status_code == 504


def test_anthropic_sdk_exceptions(gw: str) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.AuthenticationError) as auth:
        anthropic.Anthropic(base_url=gw, api_key="wrong", max_retries=0).messages.create(
            model="claude-x", max_tokens=8, messages=msgs)
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    client = anthropic.Anthropic(base_url=f"{gw}/anthropic", api_key=GATEWAY_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-nope", max_tokens=8, messages=msgs)
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=gw, api_key=NARROW_KEY, max_retries=0).messages.create(
            model="claude-x", max_tokens=8, messages=msgs)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-x", max_tokens=8, messages=msgs, extra_body={"base_url": "http://evil"})


def test_boto3_and_ollama_exceptions(gw: str) -> None:
    def bedrock(akid: str, secret: str) -> Any:
        return boto3.client("bedrock-runtime", endpoint_url=f"{gw}/bedrock", region_name="us-east-1",
                            aws_access_key_id=akid, aws_secret_access_key=secret,
                            config=BotoConfig(retries={"max_attempts": 1}))

    msgs = [{"role": "user", "content": [{"text": "hi"}]}]
    client = bedrock(CLIENT_AKID, CLIENT_AWS_SECRET)
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.converse(modelId="acme.unknown-v1:0", messages=msgs)
    with pytest.raises(botocore.exceptions.ClientError) as unknown:
        bedrock("GWUNKNOWN00000000009", "x").converse(modelId=MODELS["bedrock"]["ok"], messages=msgs)
    assert unknown.value.response["Error"]["Code"] == "UnrecognizedClientException"
    with pytest.raises(botocore.exceptions.ClientError) as bad_sig:
        bedrock(CLIENT_AKID, "not-the-secret").converse(modelId=MODELS["bedrock"]["ok"], messages=msgs)
    assert bad_sig.value.response["Error"]["Code"] == "InvalidSignatureException"
    narrow = bedrock(NARROW_AKID, NARROW_SECRET)
    with pytest.raises(narrow.exceptions.AccessDeniedException):
        narrow.converse(modelId=MODELS["bedrock"]["ok"], messages=msgs)

    ol = ollama.Client(host=f"{gw}/ollama", headers={"Authorization": f"Bearer {GATEWAY_KEY}"})
    with pytest.raises(ollama.ResponseError) as missing:
        ol.chat(model="no-such-llama", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert missing.value.status_code == 404
    wrong = ollama.Client(host=f"{gw}/ollama", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(ollama.ResponseError) as denied:
        wrong.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert denied.value.status_code == 401
