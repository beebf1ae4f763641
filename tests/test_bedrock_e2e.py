"""Bedrock runtime end to end: boto3 -> gateway -> simulated Bedrock (which verifies SigV4).

Covers the five operations with a plain model id and an inference-profile ARN, on `/bedrock` and on
the bare path space; what reaches the upstream (raw path with `%3A`/`%2F`, a fresh SigV4 signature
by the deployment's keys, the body bytes boto3 sent); event streams relayed unchanged; the AWS error
codes for bad client signatures; and the standard AWS credential chain.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
from typing import Any, Callable, Iterator
from unittest import mock
from urllib.parse import urlsplit

import boto3
import botocore.auth
import botocore.config
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from providers.eventstream import FrameReader, event_frame
from tests.conftest import (
    AUTH_YAML,
    CLIENT_AKID, CLIENT_AWS_SECRET, GATEWAY_KEY, UPSTREAM_AKID, UPSTREAM_AWS_SECRET, clear_recorded,
    recorded,
)
from tests.servers import serve

MODEL = "anthropic.claude-3-sonnet-20240229-v1:0"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-sonnet-20240229-v1:0"
ENCODED = {
    MODEL: "anthropic.claude-3-sonnet-20240229-v1%3A0",
    ARN: "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
         "us.anthropic.claude-3-sonnet-20240229-v1%3A0",
}
MESSAGES = [{"role": "user", "content": [{"text": "Hello from the Bedrock suite"}]}]
INVOKE_BODY = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
                          "messages": [{"role": "user", "content": "Hello from invoke"}]}).encode()
NO_RETRY = botocore.config.Config(retries={"max_attempts": 1})
_CREDENTIAL = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/us-east-1/bedrock/aws4_request, "
                         r"SignedHeaders=([a-z0-9;-]+), Signature=[0-9a-f]{64}$")


# ---------------------------------------------------------------- helpers

def client(endpoint: str, akid: str = CLIENT_AKID, secret: str = CLIENT_AWS_SECRET) -> Any:
    return boto3.client("bedrock-runtime", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=akid, aws_secret_access_key=secret, config=NO_RETRY)


def capture(c: Any) -> list[Any]:
    """Every prepared request boto3 puts on the wire (after signing)."""
    sent: list[Any] = []
    c.meta.events.register("before-send.bedrock-runtime.*", lambda request, **_: sent.append(request))
    return sent


def body_bytes(prepared: Any) -> bytes:
    body = prepared.body
    if body is None:
        return b""
    return body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else body.read()


def headers_of(record: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in record["headers"]:
        assert k.lower() not in out, f"duplicate upstream header {k}"
        out[k.lower()] = v
    return out


def assert_upstream_signed(record: dict[str, Any]) -> dict[str, str]:
    h = headers_of(record)
    m = _CREDENTIAL.match(h.get("authorization", ""))
    assert m, h.get("authorization")
    assert m.group(1) == UPSTREAM_AKID
    assert m.group(2) == h["x-amz-date"][:8]
    assert "host" in m.group(3).split(";")
    flat = json.dumps(record["headers"])
    assert CLIENT_AKID not in flat and CLIENT_AWS_SECRET not in flat
    return h


def sign(method: str, url: str, body: bytes, akid: str = CLIENT_AKID, secret: str = CLIENT_AWS_SECRET,
         when: datetime.datetime | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Headers for a raw request signed like boto3 does (service `bedrock`); the host comes from the URL."""
    req = AWSRequest(method=method, url=url, data=body,
                     headers={"content-type": "application/json", **(extra or {})})
    signer = SigV4Auth(Credentials(akid, secret), "bedrock", "us-east-1")
    if when is None:
        signer.add_auth(req)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            signer.add_auth(req)
    return dict(req.headers.items())


def frames(data: bytes) -> list[tuple[dict[str, object], bytes]]:
    reader = FrameReader()
    out = list(reader.feed(data))
    assert not reader._buf, "trailing bytes after the last frame"
    return out


def aws_error(resp: httpx.Response) -> str:
    assert resp.status_code == 403, (resp.status_code, resp.text)
    assert resp.json()["message"]
    return resp.headers["x-amzn-errortype"]


@pytest.fixture(params=["/bedrock", ""], ids=["prefixed", "bare"])
def endpoint(request: pytest.FixtureRequest, gateway: str) -> str:
    return gateway + request.param


# ---------------------------------------------------------------- the five operations

@pytest.mark.parametrize("model", [MODEL, ARN], ids=["model-id", "profile-arn"])
def test_invoke_model(endpoint: str, mock_upstream: str, model: str) -> None:
    br = client(endpoint)
    sent = capture(br)
    out = br.invoke_model(modelId=model, body=INVOKE_BODY, contentType="application/json", accept="application/json")
    reply = json.loads(out["body"].read())
    assert reply["type"] == "message"
    assert reply["content"][0]["text"].startswith(f"This is a simulated response from {model}")
    meta = out["ResponseMetadata"]["HTTPHeaders"]
    assert int(meta["x-amzn-bedrock-input-token-count"]) == len(INVOKE_BODY) // 4
    assert meta["x-gateway-provider"] == "bedrock"
    [rec] = recorded(mock_upstream)
    assert rec["method"] == "POST"
    assert rec["raw_path"] == f"/model/{ENCODED[model]}/invoke"
    assert urlsplit(sent[0].url).path.endswith(rec["raw_path"])
    h = assert_upstream_signed(rec)
    assert h["content-type"] == "application/json" and h["accept"] == "application/json"
    assert rec["body_sha256"] == hashlib.sha256(INVOKE_BODY).hexdigest() == hashlib.sha256(body_bytes(sent[0])).hexdigest()


@pytest.mark.parametrize("model", [MODEL, ARN], ids=["model-id", "profile-arn"])
def test_converse(endpoint: str, mock_upstream: str, model: str) -> None:
    br = client(endpoint)
    sent = capture(br)
    out = br.converse(modelId=model, messages=MESSAGES, inferenceConfig={"maxTokens": 64})
    assert out["output"]["message"]["content"][0]["text"].startswith(f"This is a simulated response from {model}")
    sent_body = body_bytes(sent[0])
    assert out["usage"]["inputTokens"] == len(sent_body) // 4
    assert out["usage"]["totalTokens"] == out["usage"]["inputTokens"] + out["usage"]["outputTokens"]
    [rec] = recorded(mock_upstream)
    assert rec["raw_path"] == f"/model/{ENCODED[model]}/converse"
    assert_upstream_signed(rec)
    assert rec["body_sha256"] == hashlib.sha256(sent_body).hexdigest()
    assert base64.b64decode(rec["body_b64"]) == sent_body


@pytest.mark.parametrize("model", [MODEL, ARN], ids=["model-id", "profile-arn"])
def test_invoke_model_with_response_stream(endpoint: str, mock_upstream: str, model: str) -> None:
    br = client(endpoint)
    sent = capture(br)
    out = br.invoke_model_with_response_stream(modelId=model, body=INVOKE_BODY, contentType="application/json")
    assert out["contentType"] == "application/json"
    events = [json.loads(e["chunk"]["bytes"]) for e in out["body"]]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text.startswith(f"This is a simulated response from {model}")
    metrics = events[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["inputTokenCount"] == len(INVOKE_BODY) // 4
    assert metrics["outputTokenCount"] == len(text.split())
    [rec] = recorded(mock_upstream)
    assert rec["raw_path"] == f"/model/{ENCODED[model]}/invoke-with-response-stream"
    assert_upstream_signed(rec)
    assert rec["body_sha256"] == hashlib.sha256(body_bytes(sent[0])).hexdigest()


@pytest.mark.parametrize("model", [MODEL, ARN], ids=["model-id", "profile-arn"])
def test_converse_stream(endpoint: str, mock_upstream: str, model: str) -> None:
    br = client(endpoint)
    sent = capture(br)
    out = br.converse_stream(modelId=model, messages=MESSAGES)
    text, usage, kinds = "", None, []
    for event in out["stream"]:
        (kind, value), = event.items()
        kinds.append(kind)
        if kind == "contentBlockDelta":
            text += value["delta"]["text"]
        elif kind == "metadata":
            usage = value["usage"]
    assert kinds[0] == "messageStart" and kinds[-1] == "metadata" and "messageStop" in kinds
    assert text.startswith(f"This is a simulated response from {model}")
    sent_body = body_bytes(sent[0])
    assert usage == {"inputTokens": len(sent_body) // 4, "outputTokens": len(text.split()),
                     "totalTokens": len(sent_body) // 4 + len(text.split())}
    [rec] = recorded(mock_upstream)
    assert rec["raw_path"] == f"/model/{ENCODED[model]}/converse-stream"
    assert_upstream_signed(rec)
    assert rec["body_sha256"] == hashlib.sha256(sent_body).hexdigest()


@pytest.mark.parametrize("model", [MODEL, ARN], ids=["model-id", "profile-arn"])
def test_count_tokens(endpoint: str, mock_upstream: str, model: str) -> None:
    br = client(endpoint)
    sent = capture(br)
    out = br.count_tokens(modelId=model, input={"invokeModel": {"body": INVOKE_BODY}})
    assert out["inputTokens"] == len(INVOKE_BODY) // 4
    [rec] = recorded(mock_upstream)
    assert rec["raw_path"] == f"/model/{ENCODED[model]}/count-tokens"
    assert_upstream_signed(rec)
    assert rec["body_sha256"] == hashlib.sha256(body_bytes(sent[0])).hexdigest()


# ---------------------------------------------------------------- event streams reach the client unchanged

def _normalise(kind: object, payload: bytes) -> object:
    """The mock's only per-request values: the message id and the latency figures."""
    obj = json.loads(payload)
    if kind == "chunk":
        inner = json.loads(base64.b64decode(obj["bytes"]))
        if inner.get("type") == "message_start":
            inner["message"]["id"] = "<id>"
        for key in ("invocationLatency", "firstByteLatency"):
            inner.get("amazon-bedrock-invocationMetrics", {}).pop(key, None)
        return inner
    obj.get("metrics", {}).pop("latencyMs", None)
    return obj


@pytest.mark.parametrize("op", ["converse-stream", "invoke-with-response-stream"])
@pytest.mark.parametrize("model", [MODEL, ARN], ids=["model-id", "profile-arn"])
def test_stream_matches_a_direct_upstream_call(gateway: str, mock_upstream: str, op: str, model: str) -> None:
    """Raw httpx through the gateway vs. the same request signed for the mock directly.

    The mock puts a per-request message id and measured latencies in its streams, so the two streams
    are compared frame by frame: identical frame headers, identical payloads once those fields are
    blanked, and identical frame sizes for converse-stream (its only variable field is latencyMs).
    """
    body = json.dumps({"messages": MESSAGES}).encode() if op == "converse-stream" else INVOKE_BODY
    path = f"/model/{ENCODED[model]}/{op}"
    via = httpx.post(f"{gateway}/bedrock{path}", content=body,
                     headers=sign("POST", f"{gateway}/bedrock{path}", body))
    direct = httpx.post(f"{mock_upstream}{path}", content=body,
                        headers=sign("POST", f"{mock_upstream}{path}", body, UPSTREAM_AKID, UPSTREAM_AWS_SECRET))
    assert via.status_code == direct.status_code == 200, via.text
    assert via.headers["content-type"] == direct.headers["content-type"] == "application/vnd.amazon.eventstream"
    got, want = frames(via.content), frames(direct.content)
    assert len(got) == len(want) >= 5
    for (gh, gp), (wh, wp) in zip(got, want):
        assert gh == wh
        assert _normalise(gh[":event-type"], gp) == _normalise(wh[":event-type"], wp)
    recs = recorded(mock_upstream)
    assert [r["body_sha256"] for r in recs] == [hashlib.sha256(body).hexdigest()] * 2
    assert recs[0]["raw_path"] == recs[1]["raw_path"] == path


# A fixed upstream answer with awkward chunk boundaries: the relay must hand these exact bytes on.
_FIXED_FRAMES = [
    event_frame("messageStart", b'{"role":"assistant","p":"abcdefghij"}'),
    *[event_frame("contentBlockDelta", json.dumps({"contentBlockIndex": 0, "delta": {"text": f" w{i}"}}).encode())
      for i in range(20)],
    event_frame("contentBlockStop", b'{"contentBlockIndex":0}'),
    event_frame("messageStop", b'{"stopReason":"end_turn"}'),
    event_frame("metadata", b'{"usage":{"inputTokens":11,"outputTokens":20,"totalTokens":31},'
                            b'"metrics":{"latencyMs":123}}'),
]
FIXED_STREAM = b"".join(_FIXED_FRAMES)


async def _fixed_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/vnd.amazon.eventstream"), (b"x-amzn-requestid", b"fixed-1")]})
    data, i, n = FIXED_STREAM, 0, 0
    sizes = (1, 7, 3, 64, 13, 500)  # odd splits, including through preludes and CRCs
    while i < len(data):
        step = sizes[n % len(sizes)]
        await send({"type": "http.response.body", "body": data[i:i + step], "more_body": True})
        i, n = i + step, n + 1
    await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture
def fixed_upstream() -> Iterator[str]:
    with serve(_fixed_upstream, lifespan="off") as base:
        yield base


def _bedrock_config(upstream: str, creds: bool = True) -> str:
    keys = f"\n    aws_access_key_id: {UPSTREAM_AKID}\n    aws_secret_access_key: {UPSTREAM_AWS_SECRET}" if creds else ""
    return f"""
{AUTH_YAML}providers:
  bedrock:
    type: bedrock
    base_url: "{upstream}"
    region: us-east-1{keys}
"""


def test_event_stream_bytes_pass_through_unchanged(make_gateway: Callable[..., str], fixed_upstream: str) -> None:
    gw = make_gateway(_bedrock_config(fixed_upstream))
    body = json.dumps({"messages": MESSAGES}).encode()
    url = f"{gw}/bedrock/model/{ENCODED[ARN]}/converse-stream"
    with httpx.stream("POST", url, content=body, headers=sign("POST", url, body)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/vnd.amazon.eventstream"
        raw = b"".join(resp.iter_raw())
    assert raw == FIXED_STREAM
    # and boto3 parses the very same stream
    out = client(f"{gw}/bedrock").converse_stream(modelId=ARN, messages=MESSAGES)
    events = list(out["stream"])
    assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e) == \
        "".join(f" w{i}" for i in range(20))
    assert events[-1]["metadata"]["usage"]["totalTokens"] == 31


# ---------------------------------------------------------------- client signatures the gateway refuses

def _converse_url(gateway: str) -> str:
    return f"{gateway}/bedrock/model/{ENCODED[MODEL]}/converse"


_CONVERSE_BODY = json.dumps({"messages": MESSAGES}).encode()


def test_wrong_secret_is_invalid_signature(gateway: str, mock_upstream: str) -> None:
    url = _converse_url(gateway)
    resp = httpx.post(url, content=_CONVERSE_BODY, headers=sign("POST", url, _CONVERSE_BODY, secret="not-the-secret"))
    assert aws_error(resp) == "InvalidSignatureException"
    with pytest.raises(ClientError) as info:
        client(f"{gateway}/bedrock", secret="not-the-secret").converse(modelId=MODEL, messages=MESSAGES)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert recorded(mock_upstream) == []


def test_stale_x_amz_date_is_invalid_signature(gateway: str, mock_upstream: str) -> None:
    url = _converse_url(gateway)
    old = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(minutes=20)
    headers = sign("POST", url, _CONVERSE_BODY, when=old)
    assert headers["X-Amz-Date"] == old.strftime("%Y%m%dT%H%M%SZ")
    assert aws_error(httpx.post(url, content=_CONVERSE_BODY, headers=headers)) == "InvalidSignatureException"
    future = old + datetime.timedelta(minutes=40)
    headers = sign("POST", url, _CONVERSE_BODY, when=future)
    assert aws_error(httpx.post(url, content=_CONVERSE_BODY, headers=headers)) == "InvalidSignatureException"
    assert recorded(mock_upstream) == []


def test_body_changed_after_signing_is_invalid_signature(gateway: str, mock_upstream: str) -> None:
    url = _converse_url(gateway)
    headers = sign("POST", url, _CONVERSE_BODY)
    tampered = _CONVERSE_BODY.replace(b"Hello", b"Howdy")
    assert len(tampered) == len(_CONVERSE_BODY)
    assert aws_error(httpx.post(url, content=tampered, headers=headers)) == "InvalidSignatureException"
    assert recorded(mock_upstream) == []


def test_path_changed_after_signing_is_invalid_signature(gateway: str, mock_upstream: str) -> None:
    url = _converse_url(gateway)
    headers = sign("POST", url, _CONVERSE_BODY)
    other = url.replace("%3A0/converse", "%3A1/converse")
    assert aws_error(httpx.post(other, content=_CONVERSE_BODY, headers=headers)) == "InvalidSignatureException"
    assert recorded(mock_upstream) == []


def test_unknown_access_key_is_unrecognized_client(gateway: str, mock_upstream: str) -> None:
    url = _converse_url(gateway)
    resp = httpx.post(url, content=_CONVERSE_BODY,
                      headers=sign("POST", url, _CONVERSE_BODY, akid="GWUNKNOWN00000000000", secret="whatever"))
    assert aws_error(resp) == "UnrecognizedClientException"
    with pytest.raises(ClientError) as info:
        client(f"{gateway}/bedrock", akid="GWUNKNOWN00000000000").converse(modelId=MODEL, messages=MESSAGES)
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert recorded(mock_upstream) == []


def test_missing_authorization_is_missing_token(gateway: str, mock_upstream: str) -> None:
    url = _converse_url(gateway)
    resp = httpx.post(url, content=_CONVERSE_BODY, headers={"content-type": "application/json"})
    assert aws_error(resp) == "MissingAuthenticationTokenException"
    assert recorded(mock_upstream) == []


# ---------------------------------------------------------------- the gateway signs every request itself

def test_every_request_is_re_signed_with_upstream_keys(gateway: str, mock_upstream: str) -> None:
    url = _converse_url(gateway)
    ten_minutes_ago = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(minutes=10)
    client_headers = [sign("POST", url, _CONVERSE_BODY, when=ten_minutes_ago) for _ in range(2)]
    assert client_headers[0] == client_headers[1]  # the very same signed request, sent twice
    for h in client_headers:
        resp = httpx.post(url, content=_CONVERSE_BODY, headers=h)
        assert resp.status_code == 200, resp.text  # the mock verified the upstream signature
    recs = recorded(mock_upstream)
    assert len(recs) == 2
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    for rec in recs:
        h = assert_upstream_signed(rec)
        stamp = datetime.datetime.strptime(h["x-amz-date"], "%Y%m%dT%H%M%SZ")
        assert abs((now - stamp).total_seconds()) < 60, "the upstream signature must be fresh, not the client's"
        assert h["authorization"] != client_headers[0]["Authorization"]
        assert rec["body_sha256"] == hashlib.sha256(_CONVERSE_BODY).hexdigest()
    # boto3's own twice-sent call works the same way
    clear_recorded(mock_upstream)
    br = client(f"{gateway}/bedrock")
    for _ in range(2):
        br.converse(modelId=MODEL, messages=MESSAGES)
    assert [r["raw_path"] for r in recorded(mock_upstream)] == [f"/model/{ENCODED[MODEL]}/converse"] * 2


# ---------------------------------------------------------------- standard AWS credential chain

def test_deployment_without_keys_uses_the_aws_credential_chain(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any, mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", UPSTREAM_AKID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", UPSTREAM_AWS_SECRET)
    clear_recorded(mock_upstream)
    gw = make_gateway(_bedrock_config(mock_upstream, creds=False))
    out = client(f"{gw}/bedrock").converse(modelId=MODEL, messages=MESSAGES)
    assert out["output"]["message"]["content"][0]["text"].startswith("This is a simulated response")
    [rec] = recorded(mock_upstream)
    assert_upstream_signed(rec)


# ---------------------------------------------------------------- what else reaches the upstream

def test_bedrock_header_members_pass_through(gateway: str, mock_upstream: str) -> None:
    br = client(f"{gateway}/bedrock")
    br.invoke_model(modelId=ARN, body=INVOKE_BODY, contentType="application/json", accept="application/json",
                    trace="ENABLED", guardrailIdentifier="gr-abc123", guardrailVersion="1",
                    performanceConfigLatency="optimized")
    [rec] = recorded(mock_upstream)
    h = assert_upstream_signed(rec)
    assert h["x-amzn-bedrock-trace"] == "ENABLED"
    assert h["x-amzn-bedrock-guardrailidentifier"] == "gr-abc123"
    assert h["x-amzn-bedrock-guardrailversion"] == "1"
    assert h["x-amzn-bedrock-performanceconfig-latency"] == "optimized"
    assert "x-amz-security-token" not in h


def test_client_session_token_never_reaches_upstream(gateway: str, mock_upstream: str) -> None:
    br = boto3.client("bedrock-runtime", endpoint_url=f"{gateway}/bedrock", region_name="us-east-1",
                      aws_access_key_id=CLIENT_AKID, aws_secret_access_key=CLIENT_AWS_SECRET,
                      aws_session_token="client-session-token-xyz", config=NO_RETRY)
    sent = capture(br)
    br.converse(modelId=MODEL, messages=MESSAGES)
    assert "X-Amz-Security-Token" in sent[0].headers  # boto3 signed it in; the gateway must drop it
    [rec] = recorded(mock_upstream)
    h = assert_upstream_signed(rec)
    assert "x-amz-security-token" not in h
    assert "client-session-token-xyz" not in json.dumps(rec["headers"])


def test_gateway_key_as_bearer_is_signed_upstream(gateway: str, mock_upstream: str) -> None:
    url = _converse_url(gateway)
    resp = httpx.post(url, content=_CONVERSE_BODY,
                      headers={"content-type": "application/json", "authorization": f"Bearer {GATEWAY_KEY}"})
    assert resp.status_code == 200, resp.text
    [rec] = recorded(mock_upstream)
    assert_upstream_signed(rec)
    assert GATEWAY_KEY not in json.dumps(rec["headers"])


@pytest.mark.parametrize("segment", ["%2E%2E", "..%2F..%2Fadmin", "a%2F..%2Fb", "%252E%252E"])
def test_model_ids_that_climb_are_refused(gateway: str, mock_upstream: str, segment: str) -> None:
    url = f"{gateway}/bedrock/model/{segment}/converse"
    resp = httpx.post(url, content=_CONVERSE_BODY, headers=sign("POST", url, _CONVERSE_BODY))
    assert resp.status_code in (400, 404), resp.text
    assert resp.headers["x-amzn-errortype"] in ("ValidationException", "ResourceNotFoundException")
    assert recorded(mock_upstream) == []
