"""Failover end to end: official SDK -> gateway -> simulated upstreams, one mock server per deployment.

The matrix: per family (openai, anthropic, bedrock via boto3, ollama) x streaming and not, each fault
BEFORE the first byte on the preferred deployment ("primary", priority 10) ends in a normal answer from
"backup" with `x-gateway-provider: backup` and `x-gateway-attempts: 2` (Ollama's client shows no
headers: there the mocks' recordings tell). Faults: connection refused (base_url at a closed port),
500, 503, 529 (Anthropic), 429 with Retry-After, a timeout before the first byte (no headers within
`timeouts.first_byte`), a stall before the first byte (streaming: headers sent, then nothing; not
streaming: no headers in time), and an in-band error event before the first content.

After the commit point nothing is retried: a cut or an in-band error mid-stream reaches each SDK as an
error, never as a truncated success, and the backup never sees the request. Final failures are native
with `x-gateway-attempts` and `x-should-retry: false`; OpenAI `insufficient_quota` passes through
verbatim; a client deadline (`x-stainless-timeout`) stops failover in time; a burst against failing
upstreams stays within the retry budget.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Callable, Iterator

import anthropic
import boto3
import botocore.config
import botocore.exceptions
import httpx
import ollama
import openai
import pytest
import urllib3.exceptions

from proxy.mock import MockApp, MockOptions, build_mock_app
from tests.conftest import (
    AUTH_YAML,
    CLIENT_AKID, CLIENT_AWS_SECRET, GATEWAY_KEY, UPSTREAM_AKID, UPSTREAM_ANTHROPIC_KEY,
    UPSTREAM_AWS_SECRET, UPSTREAM_OPENAI_KEY,
)
from tests.servers import free_port, serve

FAMILIES = ("openai", "anthropic", "bedrock", "ollama")
MODELS = {"openai": "gpt-4o", "anthropic": "claude-x", "bedrock": "anthropic.claude-3-sonnet-20240229-v1:0",
          "ollama": "llama3.2:latest"}
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
NO_RETRY = botocore.config.Config(retries={"max_attempts": 1}, read_timeout=30)
# botocore reads `max_attempts` as retries (1 = two attempts) and ignores x-should-retry: for counting
# what one client call cost upstream, allow exactly one attempt.
ONE_ATTEMPT = botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=30)
BEDROCK_HI = [{"role": "user", "content": [{"text": "hi"}]}]
FIRST_BYTE = 0.5  # the primary's `timeouts.first_byte` in the matrix
RESULTS: dict[tuple[str, str, str], str] = {}  # (family, fault, mode) -> outcome, printed at the end


# ---------------------------------------------------------------- upstreams

async def _stall_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A streaming upstream that sends its 200 headers and then nothing (until the caller leaves)."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    ctype = (b"application/vnd.amazon.eventstream" if path.startswith("/model/") else
             b"application/x-ndjson" if path.startswith("/api/") else b"text/event-stream")
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]})
    with contextlib.suppress(asyncio.TimeoutError):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if (await asyncio.wait_for(receive(), deadline - time.monotonic()))["type"] == "http.disconnect":
                return
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class Upstreams:
    """Module-wide simulated upstreams, each one deployment's behaviour."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        signed = {"aws_access_key_id": UPSTREAM_AKID, "aws_secret_access_key": UPSTREAM_AWS_SECRET}
        specs = {
            "ok": MockOptions(chunk_interval_ms=0, **signed),
            "500": MockOptions(fault_status=500, **signed),
            "503": MockOptions(fault_status=503, **signed),
            "529": MockOptions(fault_status=529, **signed),
            "429": MockOptions(fault_status=429, retry_after=1, **signed),
            "timeout": MockOptions(stall_ms=3000, **signed),
            "slow": MockOptions(latency_ms=3000, **signed),
            "inband": MockOptions(stream_error_after=0, chunk_interval_ms=0, **signed),
            "cut": MockOptions(cut_after=3, chunk_interval_ms=10, **signed),
            "midstream_error": MockOptions(stream_error_after=3, chunk_interval_ms=10, **signed),
            "slow503": MockOptions(latency_ms=400, fault_status=503, **signed),
            "busy503": MockOptions(latency_ms=150, fault_status=503, **signed),
            "busy503b": MockOptions(latency_ms=150, fault_status=503, **signed),
        }
        self.apps: dict[str, MockApp] = {}
        self.urls: dict[str, str] = {}
        for name, opts in specs.items():
            self.apps[name] = app = build_mock_app(opts)
            self.urls[name] = stack.enter_context(serve(app, lifespan="off"))
        self.urls["stall"] = stack.enter_context(serve(_stall_app, lifespan="off"))
        self.urls["refused"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def clear(self) -> None:
        for app in self.apps.values():
            app.records.clear()

    def count(self, name: str) -> int:
        return len(self.apps[name].records)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    with contextlib.ExitStack() as stack:
        yield Upstreams(stack)
    if RESULTS:
        print("\nfailover matrix (family, fault, mode -> outcome):")
        for (family, fault, mode), outcome in sorted(RESULTS.items()):
            print(f"  {family:9} {fault:16} {mode:10} {outcome}")


@pytest.fixture
def gateway_for(upstreams: Upstreams, make_gateway: Callable[..., str]) -> Callable[..., str]:
    def factory(family: str, deployments: list[tuple[str, str, dict[str, Any]]], gateway: str = "") -> str:
        upstreams.clear()
        return make_gateway(config_text(family, deployments, gateway))

    return factory


def deployment_yaml(family: str, name: str, base: str, **extra: Any) -> str:
    fields: dict[str, Any] = {"openai": {"type": "openai", "base_url": f"{base}/v1", "api_key": UPSTREAM_OPENAI_KEY},
                              "anthropic": {"type": "anthropic", "base_url": base, "api_key": UPSTREAM_ANTHROPIC_KEY},
                              "bedrock": {"type": "bedrock", "base_url": base, "region": "us-east-1",
                                          "aws_access_key_id": UPSTREAM_AKID,
                                          "aws_secret_access_key": UPSTREAM_AWS_SECRET},
                              "ollama": {"type": "ollama", "base_url": base}}[family]
    return f"  {name}: {json.dumps({**fields, **extra})}\n"


def config_text(family: str, deployments: list[tuple[str, str, dict[str, Any]]], gateway: str = "") -> str:
    providers = "".join(deployment_yaml(family, name, base, **extra) for name, base, extra in deployments)
    return f"""
gateway: {{timeout: 30s{', ' + gateway if gateway else ''}}}
{AUTH_YAML}providers:
{providers}"""


# ---------------------------------------------------------------- one call per family, with each SDK

def call(family: str, gw: str, stream: bool, *, max_retries: int = 0,
         timeout: float = 30.0) -> tuple[str, dict[str, str] | None]:
    """One chat call through the gateway with the family's official SDK: (text, response headers)."""
    model = MODELS[family]
    if family == "openai":
        c = openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=max_retries, timeout=timeout)
        msgs: Any = [{"role": "user", "content": "hello failover"}]
        if stream:
            with c.chat.completions.with_streaming_response.create(model=model, messages=msgs, stream=True) as r:
                text = "".join(ch.choices[0].delta.content or "" for ch in r.parse() if ch.choices)
                return text, dict(r.headers)
        raw = c.chat.completions.with_raw_response.create(model=model, messages=msgs)
        return raw.parse().choices[0].message.content or "", dict(raw.headers)
    if family == "anthropic":
        a = anthropic.Anthropic(base_url=gw, api_key=GATEWAY_KEY, max_retries=max_retries, timeout=timeout)
        msgs = [{"role": "user", "content": "hello failover"}]
        if stream:
            with a.messages.stream(model=model, max_tokens=64, messages=msgs) as s:
                message = s.get_final_message()
                return "".join(b.text for b in message.content if b.type == "text"), dict(s.response.headers)
        raw = a.messages.with_raw_response.create(model=model, max_tokens=64, messages=msgs)
        message = raw.parse()
        return "".join(b.text for b in message.content if b.type == "text"), dict(raw.headers)
    if family == "bedrock":
        b = bedrock_client(gw)
        msgs = [{"role": "user", "content": [{"text": "hello failover"}]}]
        if stream:
            out = b.converse_stream(modelId=model, messages=msgs)
            text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in out["stream"] if "contentBlockDelta" in e)
        else:
            out = b.converse(modelId=model, messages=msgs)
            text = out["output"]["message"]["content"][0]["text"]
        return text, dict(out["ResponseMetadata"]["HTTPHeaders"])
    o = ollama.Client(host=f"{gw}/ollama", headers=AUTH, timeout=timeout)
    msgs = [{"role": "user", "content": "hello failover"}]
    if stream:
        return "".join(p.message.content or "" for p in o.chat(model=model, messages=msgs, stream=True)), None
    return o.chat(model=model, messages=msgs, stream=False).message.content or "", None


def bedrock_client(gw: str, config: botocore.config.Config = NO_RETRY) -> Any:
    return boto3.client("bedrock-runtime", endpoint_url=f"{gw}/bedrock", region_name="us-east-1",
                        aws_access_key_id=CLIENT_AKID, aws_secret_access_key=CLIENT_AWS_SECRET, config=config)


def expected_text(family: str) -> str:
    return f"This is a simulated response from {MODELS[family]}"


# ---------------------------------------------------------------- the matrix: faults before the first byte

FAULTS = ("refused", "500", "503", "529", "429", "timeout", "stall", "inband")
CASES = [pytest.param(family, fault, stream, id=f"{family}-{fault}-{'stream' if stream else 'plain'}")
         for family in FAMILIES for fault in FAULTS for stream in (False, True)
         if not (fault == "529" and family != "anthropic") and not (fault == "inband" and not stream)]


def primary_for(fault: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """The primary's mock (by name) and extra deployment settings for one fault."""
    if fault in ("timeout", "stall"):
        name = {"timeout": "timeout", "stall": "stall" if stream else "slow"}[fault]
        return name, {"timeouts": {"first_byte": f"{FIRST_BYTE}s"}}
    return fault, {}


@pytest.mark.parametrize("family,fault,stream", CASES)
def test_fault_before_first_byte_fails_over(upstreams: Upstreams, gateway_for: Callable[..., str],
                                            family: str, fault: str, stream: bool) -> None:
    mock, extra = primary_for(fault, stream)
    gw = gateway_for(family, [("primary", upstreams.urls[mock], {"priority": 10, **extra}),
                              ("backup", upstreams.urls["ok"], {})])
    started = time.perf_counter()
    text, headers = call(family, gw, stream)
    elapsed = time.perf_counter() - started
    assert text.startswith(expected_text(family)), text
    if headers is not None:
        assert headers.get("x-gateway-provider") == "backup"
        assert headers.get("x-gateway-attempts") == "2"
    assert upstreams.count("ok") == 1, "the backup answered exactly once"
    if mock in upstreams.apps:
        assert upstreams.count(mock) == 1, "the primary was tried exactly once"
    if fault in ("timeout", "stall"):
        assert FIRST_BYTE * 0.8 <= elapsed < FIRST_BYTE + 2.0, elapsed
    RESULTS[(family, fault, "stream" if stream else "plain")] = (
        f"backup answered, attempts={headers['x-gateway-attempts'] if headers else '2 (recordings)'}")


# ---------------------------------------------------------------- after the commit point: never retried

def consume_expecting_error(family: str, gw: str) -> str:
    """Stream through the SDK; return the error's class name. A clean end fails the test."""
    model = MODELS[family]
    try:
        if family == "openai":
            c = openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=2)
            for _ in c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True):
                pass
        elif family == "anthropic":
            a = anthropic.Anthropic(base_url=gw, api_key=GATEWAY_KEY, max_retries=2)
            with a.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as s:
                s.get_final_message()
        elif family == "bedrock":
            out = bedrock_client(gw).converse_stream(modelId=model, messages=BEDROCK_HI)
            for _ in out["stream"]:
                pass
        else:
            for _ in ollama.Client(host=f"{gw}/ollama", headers=AUTH).chat(
                    model=model, messages=[{"role": "user", "content": "hi"}], stream=True):
                pass
    except (openai.APIError, anthropic.APIError, anthropic.APIConnectionError, botocore.exceptions.EventStreamError,
            botocore.exceptions.ResponseStreamingError, urllib3.exceptions.ProtocolError, ollama.ResponseError,
            httpx.HTTPError) as exc:
        return type(exc).__name__
    pytest.fail(f"{family}: the stream ended as a success although the upstream failed mid-stream")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mock", ["cut", "midstream_error"])
def test_failure_after_commit_is_an_sdk_error_and_never_retried(
        upstreams: Upstreams, gateway_for: Callable[..., str], family: str, mock: str) -> None:
    gw = gateway_for(family, [("primary", upstreams.urls[mock], {"priority": 10}),
                              ("backup", upstreams.urls["ok"], {})])
    error = consume_expecting_error(family, gw)
    expected = {"openai": {"APIError", "APIConnectionError"},
                "anthropic": {"APIStatusError", "APIConnectionError"},
                "bedrock": {"EventStreamError", "ResponseStreamingError", "ProtocolError"},
                "ollama": {"ResponseError", "RemoteProtocolError", "ReadError"}}[family]
    assert error in expected, error
    time.sleep(0.05)
    assert upstreams.count(mock) == 1, "one upstream request: nothing is retried after the commit point"
    assert upstreams.count("ok") == 0, "no failover after the commit point"
    RESULTS[(family, mock + " after commit", "stream")] = f"SDK raised {error}; 1 upstream request"


# ---------------------------------------------------------------- final failures

def failing_call(family: str, gw: str) -> tuple[int, dict[str, str], Any]:
    """A non-streaming call that must fail: (status, headers, native error body or SDK error)."""
    model = MODELS[family]
    if family == "openai":
        with pytest.raises(openai.APIStatusError) as info:
            openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=2).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}])
        return info.value.status_code, dict(info.value.response.headers), info.value.body
    if family == "anthropic":
        with pytest.raises(anthropic.APIStatusError) as info:
            anthropic.Anthropic(base_url=gw, api_key=GATEWAY_KEY, max_retries=2).messages.create(
                model=model, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        return info.value.status_code, dict(info.value.response.headers), info.value.body
    if family == "bedrock":
        with pytest.raises(botocore.exceptions.ClientError) as info:
            bedrock_client(gw, ONE_ATTEMPT).converse(modelId=model, messages=BEDROCK_HI)
        meta = info.value.response["ResponseMetadata"]
        return meta["HTTPStatusCode"], dict(meta["HTTPHeaders"]), info.value.response["Error"]
    with pytest.raises(ollama.ResponseError):
        ollama.Client(host=f"{gw}/ollama", headers=AUTH).chat(model=model, messages=[{"role": "user", "content": "hi"}],
                                                              stream=False)
    r = httpx.post(f"{gw}/ollama/api/chat", headers=AUTH, timeout=30,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False})
    return r.status_code, dict(r.headers), r.json()


@pytest.mark.parametrize("family", FAMILIES)
def test_all_deployments_failing_is_a_native_final_error(upstreams: Upstreams, gateway_for: Callable[..., str],
                                                         family: str) -> None:
    gw = gateway_for(family, [("primary", upstreams.urls["503"], {"priority": 10}),
                              ("backup", upstreams.urls["500"], {})])
    status, headers, body = failing_call(family, gw)
    tried = upstreams.count("503") + upstreams.count("500")
    if family == "ollama":  # two calls were made (the SDK, then httpx for the headers)
        assert tried % 2 == 0
        tried //= 2
    assert upstreams.count("503") >= 1 and upstreams.count("500") >= 1, "both deployments were tried"
    assert headers["x-gateway-attempts"] == str(tried), (headers, tried)
    assert headers["x-should-retry"] == "false"
    assert status in (500, 503)
    if family == "openai":
        assert body["type"] == "server_error" and "simulated" in body["message"]
    elif family == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] in ("api_error", "overloaded_error")
    elif family == "bedrock":
        assert body["Code"] in ("InternalServerException", "ServiceUnavailableException")
    else:
        assert "simulated" in body["error"]
    RESULTS[(family, "all failing", "plain")] = f"{status} native, attempts={tried}, x-should-retry=false"


def test_all_deployments_unreachable_is_a_gateway_error(upstreams: Upstreams,
                                                        gateway_for: Callable[..., str]) -> None:
    gw = gateway_for("openai", [("primary", upstreams.urls["refused"], {"priority": 10}),
                                ("backup", f"http://127.0.0.1:{free_port()}", {})])
    r = httpx.post(f"{gw}/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502
    assert r.headers["x-should-retry"] == "false"
    assert int(r.headers["x-gateway-attempts"]) >= 2
    assert r.json()["error"]["type"] == "server_error"


@pytest.fixture
def quota_upstream() -> Iterator[tuple[str, list[Any], bytes]]:
    body = json.dumps({"error": {"message": "You exceeded your current quota, please check your plan.",
                                 "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}},
                      indent=2).encode()
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        message = await receive()
        while message.get("more_body"):
            message = await receive()
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 429, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"x-request-id", b"req_quota_1"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

    with serve(app, lifespan="off") as base:
        yield base, seen, body


def test_openai_insufficient_quota_passes_through_verbatim(quota_upstream: tuple[str, list[Any], bytes],
                                                           make_gateway: Callable[..., str]) -> None:
    base, seen, body = quota_upstream
    gw = make_gateway(config_text("openai", [("quota", base, {})]))
    r = httpx.post(f"{gw}/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429
    assert r.content == body, "the upstream's own body, byte for byte"
    assert r.headers["x-should-retry"] == "false"
    assert r.headers["x-request-id"] == "req_quota_1"
    assert r.headers["x-gateway-attempts"] == "1"
    assert seen == ["/v1/chat/completions"], "not retried by the gateway"
    seen.clear()
    with pytest.raises(openai.RateLimitError) as info:  # the SDK obeys x-should-retry: false
        openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=2).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "insufficient_quota"
    assert len(seen) == 1, "neither the gateway nor the SDK retried"


# ---------------------------------------------------------------- client deadline

def test_client_deadline_stops_failover_in_time(upstreams: Upstreams, gateway_for: Callable[..., str]) -> None:
    # Every deployment answers 503 after 0.4 s: without a deadline the loop runs >= 4 attempts (> 1.6 s).
    slow = upstreams.urls["slow503"]
    gw = gateway_for("anthropic", [(f"d{i}", slow, {}) for i in range(4)])
    body = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    started = time.perf_counter()
    r = httpx.post(f"{gw}/v1/messages", headers={**AUTH, "x-stainless-timeout": "1"}, json=body, timeout=10)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"the gateway answered after {elapsed:.2f}s, past the client's 1 s deadline"
    assert r.status_code in (503, 504), r.text
    assert r.json()["type"] == "error"
    assert r.headers["x-should-retry"] == "false"
    # The official SDK with a 1 s timeout gets the gateway's answer, not a timeout of its own.
    client = anthropic.Anthropic(base_url=gw, api_key=GATEWAY_KEY, max_retries=0, timeout=1.0)
    with pytest.raises(anthropic.APIStatusError):
        client.messages.create(**body)
    # Without a client deadline the gateway keeps failing over (its own timeout is 30 s).
    upstreams.clear()
    started = time.perf_counter()
    r = httpx.post(f"{gw}/v1/messages", headers=AUTH, json=body, timeout=10)
    assert time.perf_counter() - started >= 1.2
    assert int(r.headers["x-gateway-attempts"]) >= 4 == upstreams.count("slow503")


# ---------------------------------------------------------------- retry budget

def test_retry_budget_bounds_attempts_under_a_burst(upstreams: Upstreams, gateway_for: Callable[..., str]) -> None:
    n = 60
    gw = gateway_for("openai", [("a", upstreams.urls["busy503"], {}), ("b", upstreams.urls["busy503b"], {})])

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as c:
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            return await asyncio.gather(*(c.post(f"{gw}/v1/chat/completions", headers=AUTH, json=body)
                                          for _ in range(n)))

    responses = asyncio.run(burst())
    assert all(r.status_code in (500, 502, 503) for r in responses)
    attempts = upstreams.count("busy503") + upstreams.count("busy503b")
    assert sum(int(r.headers["x-gateway-attempts"]) for r in responses) == attempts
    print(f"\nretry budget: N={n} concurrent requests, upstream attempts={attempts} (bound {1.2 * n + 3:.0f})")
    RESULTS[("openai", "budget burst", f"N={n}")] = f"attempts={attempts} <= {1.2 * n + 3:.0f}"
    assert n <= attempts <= 1.2 * n + 3
