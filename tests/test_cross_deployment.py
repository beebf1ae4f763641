"""Cross-deployment serving: one inbound API family answered by another kind of upstream.

- An Anthropic client (official SDK) whose Anthropic deployment is overloaded (529) fails over to a
  Bedrock deployment (`deployments: {claude-x: <bedrock model id>}`) and still gets a valid Anthropic
  answer, plain and streamed (`messages.stream(...).get_final_message()`). The simulated Bedrock
  verifies the SigV4 signature and records an InvokeModel / InvokeModelWithResponseStream call whose
  body carries `anthropic_version: bedrock-2023-05-31` and no `model`. Bedrock errors, before and
  after the first byte, reach the Anthropic client in Anthropic's own shape.
- An OpenAI client served by an Azure OpenAI deployment (`type: azure_openai`): a small fake Azure
  checks the deployment path, `api-version`, the `api-key` header and the absence of Authorization.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Any, Callable, Iterator

import anthropic
import openai
import pytest

from proxy.mock import MockApp, MockOptions, build_mock_app
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA, UPSTREAM_AKID, UPSTREAM_ANTHROPIC_KEY, UPSTREAM_AWS_SECRET
from tests.servers import serve

BEDROCK_MODEL = "anthropic.claude-3-sonnet-20240229-v1:0"
ENCODED_MODEL = "anthropic.claude-3-sonnet-20240229-v1%3A0"
MSGS = [{"role": "user", "content": "Hello across deployments"}]
AZURE_KEY = "azure-deployment-key-3c1f"
AZURE_VERSION = "2024-06-01"
_SIGV4 = re.compile(rf"^AWS4-HMAC-SHA256 Credential={UPSTREAM_AKID}/\d{{8}}/us-east-1/bedrock/aws4_request, "
                    r"SignedHeaders=[a-z0-9;-]+, Signature=[0-9a-f]{64}$")


# ---------------------------------------------------------------- Anthropic -> Bedrock

class Upstreams:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.anthropic: MockApp = build_mock_app(MockOptions(fault_status=529, api_key=UPSTREAM_ANTHROPIC_KEY))
        self.bedrock: MockApp = build_mock_app(MockOptions(chunk_interval_ms=0, aws_access_key_id=UPSTREAM_AKID,
                                                           aws_secret_access_key=UPSTREAM_AWS_SECRET))
        self.anthropic_url = stack.enter_context(serve(self.anthropic, lifespan="off"))
        self.bedrock_url = stack.enter_context(serve(self.bedrock, lifespan="off"))

    def set_bedrock(self, **options: Any) -> None:
        self.bedrock.options = MockOptions(chunk_interval_ms=0, aws_access_key_id=UPSTREAM_AKID,
                                           aws_secret_access_key=UPSTREAM_AWS_SECRET, **options)

    def bedrock_calls(self) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        out = []
        for method, raw, _query, headers, body, _when in self.bedrock.records:
            assert method == "POST"
            out.append((raw.decode(), {k.decode().lower(): v.decode() for k, v in headers}, json.loads(body)))
        return out


@pytest.fixture(scope="module")
def shared_upstreams() -> Iterator[Upstreams]:
    with contextlib.ExitStack() as stack:
        yield Upstreams(stack)


@pytest.fixture
def upstreams(shared_upstreams: Upstreams) -> Upstreams:
    shared_upstreams.set_bedrock()
    shared_upstreams.anthropic.records.clear()
    shared_upstreams.bedrock.records.clear()
    return shared_upstreams


def config_text(up: Upstreams, with_anthropic: bool = True) -> str:
    anthropic_dep = (f'  claude-direct: {{type: anthropic, base_url: "{up.anthropic_url}", '
                     f'api_key: {UPSTREAM_ANTHROPIC_KEY}}}\n') if with_anthropic else ""
    return f"""
gateway: {{timeout: 30s}}
auth:
  keys:
    - {{id: team-test, sha256: {GATEWAY_KEY_SHA}}}
providers:
{anthropic_dep}  claude-bedrock:
    type: bedrock
    base_url: "{up.bedrock_url}"
    region: us-east-1
    aws_access_key_id: {UPSTREAM_AKID}
    aws_secret_access_key: {UPSTREAM_AWS_SECRET}
    deployments: {{claude-x: "{BEDROCK_MODEL}"}}
"""


def client(gw: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw, api_key=GATEWAY_KEY, max_retries=0)


def assert_bedrock_invoke(up: Upstreams, operation: str) -> dict[str, Any]:
    calls = up.bedrock_calls()
    assert len(calls) == 1
    path, headers, body = calls[0]
    assert path == f"/model/{ENCODED_MODEL}/{operation}"
    assert _SIGV4.match(headers["authorization"]), headers["authorization"]  # the mock verified it, too
    assert "x-amz-date" in headers
    assert GATEWAY_KEY not in json.dumps(headers), "the gateway key never goes upstream"
    assert body["anthropic_version"] == "bedrock-2023-05-31"
    assert "model" not in body and "stream" not in body
    assert body["messages"] == MSGS and body["max_tokens"] == 64
    return body


def test_anthropic_client_fails_over_to_bedrock(upstreams: Upstreams, make_gateway: Callable[..., str]) -> None:
    gw = make_gateway(config_text(upstreams))
    raw = client(gw).messages.with_raw_response.create(model="claude-x", max_tokens=64, messages=MSGS)
    message = raw.parse()
    assert raw.headers["x-gateway-provider"] == "claude-bedrock"
    assert raw.headers["x-gateway-attempts"] == "2"
    assert raw.headers["content-type"].startswith("application/json")
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith(f"This is a simulated response from {BEDROCK_MODEL}")
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == len(message.content[0].text.split())
    assert len(upstreams.anthropic.records) == 1, "the Anthropic deployment was tried first"
    assert_bedrock_invoke(upstreams, "invoke")


def test_anthropic_stream_fails_over_to_bedrock(upstreams: Upstreams, make_gateway: Callable[..., str]) -> None:
    gw = make_gateway(config_text(upstreams))
    with client(gw).messages.stream(model="claude-x", max_tokens=64, messages=MSGS) as stream:
        assert stream.response.headers["x-gateway-provider"] == "claude-bedrock"
        assert stream.response.headers["x-gateway-attempts"] == "2"
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        texts = list(stream.text_stream)
        message = stream.get_final_message()
    text = "".join(texts)
    assert len(texts) >= 3, "streamed in pieces, not as one blob"
    assert text.startswith(f"This is a simulated response from {BEDROCK_MODEL}")
    assert message.content[0].text == text
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == len(text.split())
    assert len(upstreams.anthropic.records) == 1
    assert_bedrock_invoke(upstreams, "invoke-with-response-stream")


def test_anthropic_beta_header_becomes_the_bedrock_body_field(upstreams: Upstreams,
                                                               make_gateway: Callable[..., str]) -> None:
    gw = make_gateway(config_text(upstreams, with_anthropic=False))
    client(gw).messages.create(model="claude-x", max_tokens=64, messages=MSGS,
                               extra_headers={"anthropic-beta": "beta-one, beta-two"})
    body = assert_bedrock_invoke(upstreams, "invoke")
    assert body["anthropic_beta"] == ["beta-one", "beta-two"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bedrock_error_reaches_the_anthropic_client_in_anthropic_shape(
        upstreams: Upstreams, make_gateway: Callable[..., str], stream: bool) -> None:
    upstreams.set_bedrock(fault_status=400)
    gw = make_gateway(config_text(upstreams, with_anthropic=False))
    with pytest.raises(anthropic.BadRequestError) as info:
        if stream:
            with client(gw).messages.stream(model="claude-x", max_tokens=64, messages=MSGS) as s:
                s.get_final_message()
        else:
            client(gw).messages.create(model="claude-x", max_tokens=64, messages=MSGS)
    err = info.value
    assert err.status_code == 400
    assert err.response.headers["content-type"].startswith("application/json")
    assert "x-amzn-errortype" not in err.response.headers
    assert err.body["type"] == "error"
    assert err.body["error"] == {"type": "invalid_request_error", "message": "simulated 400 fault"}
    assert err.body["request_id"] == err.response.headers["x-gateway-request-id"]
    assert len(upstreams.bedrock.records) == 1


def test_bedrock_throttling_reaches_the_anthropic_client_as_rate_limit_error(
        upstreams: Upstreams, make_gateway: Callable[..., str]) -> None:
    upstreams.set_bedrock(fault_status=429, retry_after=0.2)
    gw = make_gateway(config_text(upstreams, with_anthropic=False))
    with pytest.raises(anthropic.RateLimitError) as info:
        client(gw).messages.create(model="claude-x", max_tokens=64, messages=MSGS)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert info.value.response.headers["retry-after-ms"] == "200"
    assert "x-amz-retry-after" not in info.value.response.headers


def test_bedrock_stream_exception_reaches_the_anthropic_client_as_an_error_event(
        upstreams: Upstreams, make_gateway: Callable[..., str]) -> None:
    upstreams.set_bedrock(stream_error_after=3, stream_error_type="throttlingException")
    gw = make_gateway(config_text(upstreams, with_anthropic=False))
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with client(gw).messages.stream(model="claude-x", max_tokens=64, messages=MSGS) as s:
            for text in s.text_stream:
                texts.append(text)
    assert texts, "the stream had started: the error came in band"
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert len(upstreams.bedrock.records) == 1, "never retried after the first byte"


# ---------------------------------------------------------------- OpenAI -> Azure OpenAI

class FakeAzure:
    """Answers chat completions the way Azure OpenAI does, and records what it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        message = await receive()
        body = message.get("body", b"")
        while message.get("more_body"):
            message = await receive()
            body += message.get("body", b"")
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        request = json.loads(body)
        self.seen.append({"path": scope["raw_path"].decode(), "query": scope["query_string"].decode(),
                          "headers": headers, "body": request})
        problems = []
        if scope["raw_path"] != b"/openai/deployments/my-gpt4o/chat/completions":
            problems.append(f"path {scope['raw_path']!r}")
        if scope["query_string"] != f"api-version={AZURE_VERSION}".encode():
            problems.append(f"query {scope['query_string']!r}")
        if headers.get("api-key") != AZURE_KEY:
            problems.append("api-key")
        if "authorization" in headers:
            problems.append("an Authorization header")
        if problems:
            err = json.dumps({"error": {"code": "BadRequest", "message": "; ".join(problems)}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": err})
            return
        base = {"id": "chatcmpl-azure-1", "created": int(time.time()), "model": "gpt-4o-2024-08-06",
                "system_fingerprint": "fp_azure"}
        words = ["Hello", " from", " Azure", " OpenAI"]
        usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        if not request.get("stream"):
            out = {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": "".join(words)}}]}
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"), (b"apim-request-id", b"azure-req-1")]})
            await send({"type": "http.response.body", "body": json.dumps(out).encode()})
            return
        include_usage = (request.get("stream_options") or {}).get("include_usage")

        def chunk(choices: list[Any], **extra: Any) -> bytes:  # with include_usage, "usage": null until the end
            fields = {"usage": None} if include_usage else {}
            return b"data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": choices,
                                           **fields, **extra}).encode() + b"\n\n"

        frames = [chunk([], prompt_filter_results=[{"prompt_index": 0, "content_filter_results": {}}])]
        frames += [chunk([{"index": 0, "delta": {"content": w}, "finish_reason": None}]) for w in words]
        frames.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if include_usage:
            frames.append(chunk([], usage=usage))
        frames.append(b"data: [DONE]\n\n")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for frame in frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture
def azure() -> Iterator[tuple[FakeAzure, str]]:
    fake = FakeAzure()
    with serve(fake, lifespan="off") as base:
        yield fake, base


def azure_config(base_url: str) -> str:
    return f"""
gateway: {{timeout: 30s}}
auth:
  keys:
    - {{id: team-test, sha256: {GATEWAY_KEY_SHA}}}
providers:
  azure-east:
    type: azure_openai
    base_url: "{base_url}"
    api_key: {AZURE_KEY}
    api_version: "{AZURE_VERSION}"
    deployments: {{gpt-4o: my-gpt4o}}
"""


@pytest.mark.parametrize("suffix", ["", "/openai"], ids=["resource-root", "openai-suffix"])
def test_openai_client_served_by_azure(azure: tuple[FakeAzure, str], make_gateway: Callable[..., str],
                                       suffix: str) -> None:
    fake, base = azure
    gw = make_gateway(azure_config(base + suffix))
    c = openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from Azure OpenAI"
    assert completion.usage is not None and completion.usage.total_tokens == 13
    assert raw.headers["x-gateway-provider"] == "azure-east"
    assert raw.headers["apim-request-id"] == "azure-req-1"
    assert len(fake.seen) == 1
    sent = fake.seen[0]
    assert sent["headers"]["api-key"] == AZURE_KEY and "authorization" not in sent["headers"]
    assert sent["body"]["model"] == "gpt-4o"


def test_openai_stream_served_by_azure(azure: tuple[FakeAzure, str], make_gateway: Callable[..., str]) -> None:
    fake, base = azure
    gw = make_gateway(azure_config(base))
    c = openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=0)
    with c.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True) as response:
        assert response.headers["x-gateway-provider"] == "azure-east"
        chunks = list(response.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Hello from Azure OpenAI"
    # Azure's own first chunk (content-filter results, no choices) reaches the client; only the usage
    # chunk the gateway asked for is removed.
    assert len(chunks) == 6
    assert chunks[0].choices == [] and chunks[0].model_extra.get("prompt_filter_results")
    assert all(ch.usage is None for ch in chunks), "the injected usage chunk is not shown to this client"
    assert len(fake.seen) == 1
    sent = fake.seen[0]
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"] == {"include_usage": True}, "the gateway asks for usage to meter it"
    assert sent["path"] == "/openai/deployments/my-gpt4o/chat/completions"
    assert sent["query"] == f"api-version={AZURE_VERSION}"


def test_azure_model_without_a_deployment_is_a_native_404(azure: tuple[FakeAzure, str],
                                                          make_gateway: Callable[..., str]) -> None:
    fake, base = azure
    gw = make_gateway(azure_config(base).replace("deployments: {gpt-4o: my-gpt4o}",
                                                 "deployments: {gpt-4o: my-gpt4o}\n    models: [gpt-4o]"))
    c = openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert fake.seen == []
