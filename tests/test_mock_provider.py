"""The mock provider checked with the official SDKs pointed straight at it (no gateway in between)."""
from __future__ import annotations

import base64
import hashlib
import json

import anthropic
import boto3
import botocore.exceptions
import httpx
import httpx2
import ollama
import openai
import pytest
import urllib3
from botocore.config import Config

from proxy.mock import MockOptions, build_mock_app
from tests.servers import serve

KEY = "sk-mock-test"
AKID, SECRET = "AKIAMOCKTEST", "mock-secret-key"
MODEL_ID = "anthropic.claude-3-sonnet-20240229-v1:0"
PROFILE_ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-sonnet-20240229-v1:0"
WORDS = 8  # chunks=8 -> "This is a simulated response from <model>." padded to 8 words


@pytest.fixture(scope="module")
def base():
    opts = MockOptions(chunks=8, chunk_interval_ms=0, api_key=KEY, aws_access_key_id=AKID,
                       aws_secret_access_key=SECRET)
    with serve(build_mock_app(opts)) as url:
        yield url


@pytest.fixture
def records(base):
    httpx.delete(base + "/__mock/requests")
    return lambda: httpx.get(base + "/__mock/requests").json()


def _oai(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, **kw)


def _ant(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0)


def _bedrock(base: str, secret: str = SECRET):
    return boto3.client("bedrock-runtime", endpoint_url=base, region_name="us-east-1",
                        aws_access_key_id=AKID, aws_secret_access_key=secret,
                        config=Config(retries={"max_attempts": 0, "mode": "standard"}))


def _ollama(base: str, **headers) -> ollama.Client:
    return ollama.Client(host=base, headers={"authorization": f"Bearer {KEY}", **headers})


def test_openai_chat_and_stream_usage(base, records):
    client = _oai(base)
    r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "gpt-4o" and r.choices[0].message.content.startswith("This is a simulated response from gpt-4o.")
    assert r.usage.completion_tokens == len(r.choices[0].message.content.split()) == WORDS
    body = base64.b64decode(records()[-1]["body_b64"])
    assert r.usage.prompt_tokens == len(body) // 4
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == WORDS
    assert all(c.usage is None for c in chunks[:-1])
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 8
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16 and emb.usage.prompt_tokens >= 1
    assert [m.id for m in client.models.list()][0] == "gpt-4o"
    resp = client.responses.create(model="gpt-4o", input="hi")
    assert resp.output_text.startswith("This is a simulated") and resp.usage.output_tokens == WORDS
    with client.responses.stream(model="gpt-4o", input="hi") as s:
        final = s.get_final_response()
    assert final.output_text == resp.output_text and final.usage.total_tokens == final.usage.input_tokens + WORDS
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()


def test_anthropic_messages_and_stream(base, records):
    client = _ant(base)
    msg = client.messages.create(model="claude-3-5-haiku-20241022", max_tokens=50,
                                  messages=[{"role": "user", "content": "hi"}])
    assert msg.model == "claude-3-5-haiku-20241022" and msg.usage.output_tokens == WORDS
    assert msg.content[0].text.startswith("This is a simulated response from claude-3-5-haiku-20241022.")
    assert msg.usage.input_tokens == len(base64.b64decode(records()[-1]["body_b64"])) // 4
    with client.messages.stream(model="claude-x", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as s:
        streamed = s.get_final_message()
    assert streamed.usage.output_tokens == WORDS and streamed.usage.input_tokens > 0
    assert streamed.content[0].text.startswith("This is a simulated response from claude-x.")
    assert client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "hi"}]).input_tokens > 0
    assert [m.id for m in client.models.list()][0] == "claude-sonnet-4-5"


@pytest.mark.parametrize("model_id", [MODEL_ID, PROFILE_ARN])
def test_bedrock_sigv4_all_operations(base, records, model_id):
    client = _bedrock(base)
    msgs = [{"role": "user", "content": [{"text": "hi"}]}]
    r = client.converse(modelId=model_id, messages=msgs)
    assert r["output"]["message"]["content"][0]["text"].startswith(f"This is a simulated response from {model_id}.")
    assert r["usage"]["outputTokens"] == WORDS and r["stopReason"] == "end_turn"
    events = list(client.converse_stream(modelId=model_id, messages=msgs)["stream"])
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == r["output"]["message"]["content"][0]["text"]
    assert events[-1]["metadata"]["usage"]["outputTokens"] == WORDS
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hi"}]})
    inv = client.invoke_model(modelId=model_id, body=body)
    payload = json.loads(inv["body"].read())
    hdrs = inv["ResponseMetadata"]["HTTPHeaders"]
    assert payload["usage"]["output_tokens"] == WORDS == int(hdrs["x-amzn-bedrock-output-token-count"])
    assert int(hdrs["x-amzn-bedrock-input-token-count"]) == len(body) // 4
    stream = client.invoke_model_with_response_stream(modelId=model_id, body=body)["body"]
    decoded = [json.loads(e["chunk"]["bytes"]) for e in stream]
    assert decoded[0]["type"] == "message_start" and decoded[-1]["type"] == "message_stop"
    assert decoded[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"] == WORDS
    counted = client.count_tokens(modelId=model_id, input={"invokeModel": {"body": body.encode()}})
    assert counted["inputTokens"] == len(body) // 4
    paths = [r["raw_path"] for r in records()]
    assert len(paths) == 5 and all(p.startswith("/model/") for p in paths)
    if model_id == PROFILE_ARN:
        assert all("%2F" in p and "%3A" in p for p in paths)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        _bedrock(base, secret="wrong").converse(modelId=model_id, messages=msgs)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"


def test_ollama_chat_generate_embed_list(base):
    client = _ollama(base)
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat(model="llama3.2", messages=msgs)
    assert r.message.content.startswith("This is a simulated response from llama3.2.") and r.eval_count == WORDS
    assert r.done and r.total_duration > 0 and r.prompt_eval_count > 0
    parts = list(client.chat(model="llama3.2", messages=msgs, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].eval_count == WORDS
    g = client.generate(model="llama3.2", prompt="hi")
    assert g.response == r.message.content and g.done_reason == "stop" and g.eval_count == WORDS
    e = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 16
    assert [m.model for m in client.list().models][0] == "llama3.2:latest"
    head = httpx.head(base + "/api/tags", headers={"authorization": f"Bearer {KEY}"})
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=base).chat(model="llama3.2", messages=msgs)
    assert info.value.status_code == 401


def test_faults_status_and_retry_after(base):
    hdr = {"x-mock-fault-status": "503", "x-mock-retry-after": "2"}
    with pytest.raises(openai.InternalServerError) as oe:
        _oai(base).chat.completions.create(model="m", messages=[], extra_headers=hdr)
    assert oe.value.status_code == 503 and oe.value.response.headers["retry-after"] == "2"
    with pytest.raises(anthropic.APIStatusError) as ae:
        _ant(base).messages.create(model="m", max_tokens=5, messages=[],
                                   extra_headers={"x-mock-fault-status": "529"})
    assert ae.value.status_code == 529 and ae.value.body["error"]["type"] == "overloaded_error"
    client = _bedrock(base)
    client.meta.events.register("before-sign.*.*", lambda request, **_: request.headers.add_header(
        "x-mock-fault-status", "429"))
    with pytest.raises(botocore.exceptions.ClientError) as be:
        client.converse(modelId=MODEL_ID, messages=[{"role": "user", "content": [{"text": "x"}]}])
    assert be.value.response["Error"]["Code"] == "ThrottlingException"
    with pytest.raises(ollama.ResponseError) as ol:
        _ollama(base, **{"x-mock-fault-status": "500"}).chat(model="m", messages=[])
    assert ol.value.status_code == 500
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(base + "/v1/nope", json={}, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_stream_errors_surface_in_sdks(base):
    err = {"x-mock-stream-error-after": "2"}
    with pytest.raises(openai.APIError, match="simulated mid-stream error"):
        list(_oai(base).chat.completions.create(model="m", messages=[], stream=True, extra_headers=err))
    with pytest.raises(anthropic.APIStatusError) as ae:
        with _ant(base).messages.stream(model="m", max_tokens=5, messages=[],
                                        extra_headers={"x-mock-stream-error-after": "0"}) as s:
            s.get_final_message()
    assert ae.value.body["error"]["type"] == "overloaded_error"
    client = _bedrock(base)
    client.meta.events.register("before-sign.*.*", lambda request, **_: request.headers.add_header(
        "x-mock-stream-error-after", "1"))
    with pytest.raises(botocore.exceptions.EventStreamError) as be:
        list(client.converse_stream(modelId=MODEL_ID, messages=[{"role": "user", "content": [{"text": "x"}]}])["stream"])
    assert be.value.response["Error"]["Code"] == "modelStreamErrorException"
    with pytest.raises(ollama.ResponseError, match="simulated"):
        list(_ollama(base, **err).chat(model="m", messages=[], stream=True))


def test_cut_after_breaks_sdk_streams(base):
    cut = {"x-mock-cut-after": "3"}
    with pytest.raises(openai.APIConnectionError):
        list(_oai(base).chat.completions.create(model="m", messages=[], stream=True, extra_headers=cut))
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        with _ant(base).messages.stream(model="m", max_tokens=5, messages=[], extra_headers=cut) as s:
            s.get_final_message()
    client = _bedrock(base)
    client.meta.events.register("before-sign.*.*", lambda request, **_: request.headers.add_header(
        "x-mock-cut-after", "2"))
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []})
    with pytest.raises((urllib3.exceptions.ProtocolError, botocore.exceptions.ResponseStreamingError)):
        list(client.invoke_model_with_response_stream(modelId=MODEL_ID, body=body)["body"])
    with pytest.raises(httpx.HTTPError):
        list(_ollama(base, **cut).chat(model="m", messages=[], stream=True))


def test_recording_and_options(records, base):
    _oai(base).chat.completions.create(model="rec", messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"x-mock-chunks": "3"})
    recs = records()
    assert len(recs) == 1 and recs[0]["method"] == "POST" and recs[0]["raw_path"] == "/v1/chat/completions"
    body = base64.b64decode(recs[0]["body_b64"])
    assert json.loads(body)["model"] == "rec" and recs[0]["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ["x-mock-chunks", "3"] in recs[0]["headers"]
    assert httpx.delete(base + "/__mock/requests").status_code == 200 and records() == []
    with serve(build_mock_app(MockOptions(protocols={"anthropic"}, record=False, chunk_interval_ms=0))) as only:
        r = httpx.get(only + "/v1/models")
        assert r.json()["data"][0]["type"] == "model"
        assert httpx.post(only + "/v1/chat/completions", json={}).status_code == 404
        assert httpx.get(only + "/__mock/requests").json() == []
