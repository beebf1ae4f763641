"""Response cache end to end (embedded store, one process): the official SDKs -> gateway -> the simulated
provider, which records every request it gets, so "a hit" means the upstream saw nothing new.

Covers every family's generation and embedding calls (a hit parses exactly like the miss before it),
what is never stored (errors, cut streams, in-band stream errors, state-dependent calls, answers over
max_entry_bytes), the request controls and their native 400s, key isolation, the limiter on a hit,
metrics / access log / admin API, and in-process coalescing (streams followed live, leader failure,
coalesce_wait). Replicas and Redis: test_cache_distributed.py.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import socket
import threading
import time
from typing import Any, Callable

import anthropic
import boto3
import botocore.config
import httpx
import ollama
import openai
import pytest

from tests.conftest import (
    AUTH_YAML, CLIENT_AKID, CLIENT_AWS_SECRET, GATEWAY_KEY, clear_recorded, recorded, standard_config,
)

SECOND_KEY = "gw-test-second-key-0123456789"
ADMIN = "admin-test-key-0123456789"
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}
MSGS = [{"role": "user", "content": "hello cache"}]
BR_MODEL = "anthropic.claude-3-sonnet-20240229-v1:0"
INVOKE_BODY = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
                          "messages": [{"role": "user", "content": "Hello from invoke"}]}).encode()
TWO_KEYS = AUTH_YAML + f"""    - id: team-two
      sha256: {hashlib.sha256(SECOND_KEY.encode()).hexdigest()}
  admin_key: {ADMIN}
"""


def config(upstream: str, cache: str = "{enabled: true}", extra: str = "") -> str:
    return standard_config(upstream, f"cache: {cache}\n{extra}").replace(AUTH_YAML, TWO_KEYS)


@pytest.fixture
def gw(mock_upstream: str, make_gateway: Callable[..., str]) -> str:
    clear_recorded(mock_upstream)
    return make_gateway(config(mock_upstream))


def upstream_calls(mock_upstream: str) -> int:
    return len(recorded(mock_upstream))


# --- one call per family and operation: (parsed answer, response headers) ------------------------------
def oa(url: str, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def oa_chat(url: str) -> tuple[Any, Any]:
    raw = oa(url).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=20)
    return raw.parse().model_dump(), raw.headers


def oa_chat_stream(url: str) -> tuple[Any, Any]:
    raw = oa(url).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, stream=True)
    return [c.model_dump() for c in raw.parse()], raw.headers


def oa_responses(url: str) -> tuple[Any, Any]:
    raw = oa(url).responses.with_raw_response.create(model="gpt-4o-mini", input="hello cache")
    return raw.parse().model_dump(), raw.headers


def oa_responses_stream(url: str) -> tuple[Any, Any]:
    raw = oa(url).responses.with_raw_response.create(model="gpt-4o-mini", input="hello cache", stream=True)
    return [e.model_dump() for e in raw.parse()], raw.headers


def oa_embeddings(url: str) -> tuple[Any, Any]:
    raw = oa(url).embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
    return raw.parse().model_dump(), raw.headers


def an(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=GATEWAY_KEY, max_retries=0)


def an_messages(url: str) -> tuple[Any, Any]:
    raw = an(url).messages.with_raw_response.create(model="claude-3-5-sonnet-20241022", max_tokens=50, messages=MSGS)
    return raw.parse().model_dump(), raw.headers


def an_stream(url: str) -> tuple[Any, Any]:
    raw = an(url).messages.with_raw_response.create(model="claude-3-5-sonnet-20241022", max_tokens=50,
                                                    messages=MSGS, stream=True)
    return [e.model_dump() for e in raw.parse()], raw.headers


def br(url: str) -> Any:
    return boto3.client("bedrock-runtime", endpoint_url=url + "/bedrock", region_name="us-east-1",
                        aws_access_key_id=CLIENT_AKID, aws_secret_access_key=CLIENT_AWS_SECRET,
                        config=botocore.config.Config(retries={"max_attempts": 1}))


def _aws(out: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    return {k: v for k, v in out.items() if k != "ResponseMetadata"}, out["ResponseMetadata"]["HTTPHeaders"]


def br_invoke(url: str) -> tuple[Any, Any]:
    parsed, headers = _aws(br(url).invoke_model(modelId=BR_MODEL, body=INVOKE_BODY, contentType="application/json",
                                                accept="application/json"))
    parsed["body"] = json.loads(parsed["body"].read())
    return parsed, headers


def br_converse(url: str) -> tuple[Any, Any]:
    return _aws(br(url).converse(modelId=BR_MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}],
                                 inferenceConfig={"maxTokens": 64}))


def br_invoke_stream(url: str) -> tuple[Any, Any]:
    parsed, headers = _aws(br(url).invoke_model_with_response_stream(modelId=BR_MODEL, body=INVOKE_BODY,
                                                                     contentType="application/json"))
    parsed["body"] = [json.loads(e["chunk"]["bytes"]) for e in parsed["body"]]
    return parsed, headers


def br_converse_stream(url: str) -> tuple[Any, Any]:
    parsed, headers = _aws(br(url).converse_stream(modelId=BR_MODEL,
                                                   messages=[{"role": "user", "content": [{"text": "hi"}]}]))
    parsed["stream"] = list(parsed["stream"])
    return parsed, headers


def ol(url: str, seen: list[Any]) -> ollama.Client:
    return ollama.Client(host=url + "/ollama", headers=AUTH, event_hooks={"response": [seen.append]})


def ol_call(method: str, stream: bool) -> Callable[[str], tuple[Any, Any]]:
    def call(url: str) -> tuple[Any, Any]:
        seen: list[Any] = []
        client = ol(url, seen)
        if method == "chat":
            out = client.chat(model="llama3.2:latest", messages=MSGS, stream=stream)
        elif method == "generate":
            out = client.generate(model="llama3.2:latest", prompt="why", stream=stream)
        else:
            out = client.embed(model="nomic-embed-text:latest", input=["a", "b"])
        parsed = [p.model_dump() for p in out] if stream else out.model_dump()
        return parsed, seen[-1].headers

    return call


CALLS: dict[str, Callable[[str], tuple[Any, Any]]] = {
    "openai-chat": oa_chat, "openai-chat-stream": oa_chat_stream, "openai-responses": oa_responses,
    "openai-responses-stream": oa_responses_stream, "openai-embeddings": oa_embeddings,
    "anthropic-messages": an_messages, "anthropic-stream": an_stream,
    "bedrock-invoke": br_invoke, "bedrock-converse": br_converse, "bedrock-invoke-stream": br_invoke_stream,
    "bedrock-converse-stream": br_converse_stream,
    "ollama-chat": ol_call("chat", False), "ollama-chat-stream": ol_call("chat", True),
    "ollama-generate-stream": ol_call("generate", True), "ollama-embed": ol_call("embed", False),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_second_identical_call_is_a_hit_that_parses_like_the_miss(gw: str, mock_upstream: str, name: str) -> None:
    first, h1 = CALLS[name](gw)
    second, h2 = CALLS[name](gw)
    assert (h1["x-gateway-cache"], h2["x-gateway-cache"]) == ("miss", "hit")
    assert second == first
    assert upstream_calls(mock_upstream) == 1
    assert int(h2["age"]) >= 0 and "age" not in h1
    assert h2["x-gateway-request-id"] != h1["x-gateway-request-id"] and h2["x-gateway-attempts"] == "0"
    assert "x-gateway-provider" not in h2  # no deployment answered


def test_hit_bytes_are_the_bytes_first_received(gw: str, mock_upstream: str) -> None:
    body = {"model": "gpt-4o-mini", "messages": MSGS, "stream": True}
    miss = httpx.post(gw + "/v1/chat/completions", json=body, headers=AUTH)
    # the same request spelled differently: keys reordered, other whitespace
    spelled = b'{ "stream" : true , "messages" : [ {"content": "hello cache", "role": "user"} ], "model": "gpt-4o-mini" }'
    hit = httpx.post(gw + "/v1/chat/completions", content=spelled, headers={**AUTH, "content-type": "application/json"})
    assert (miss.headers["x-gateway-cache"], hit.headers["x-gateway-cache"]) == ("miss", "hit")
    assert hit.content == miss.content and hit.headers["content-type"] == miss.headers["content-type"]
    plain = httpx.post(gw + "/v1/chat/completions", json={**body, "stream": False}, headers=AUTH)
    assert plain.headers["x-gateway-cache"] == "miss"  # the stream flag is part of the key
    assert upstream_calls(mock_upstream) == 2


def test_a_second_key_never_reads_the_first_keys_entry(gw: str, mock_upstream: str) -> None:
    call = oa(gw).chat.completions.with_raw_response
    assert call.create(model="gpt-4o-mini", messages=MSGS).headers["x-gateway-cache"] == "miss"
    other = oa(gw, SECOND_KEY).chat.completions.with_raw_response
    assert other.create(model="gpt-4o-mini", messages=MSGS).headers["x-gateway-cache"] == "miss"
    assert other.create(model="gpt-4o-mini", messages=MSGS).headers["x-gateway-cache"] == "hit"
    assert upstream_calls(mock_upstream) == 2


def test_scope_global_shares_entries_between_keys(mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    clear_recorded(mock_upstream)
    url = make_gateway(config(mock_upstream, "{enabled: true, scope: global}"))
    assert oa(url).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS) \
        .headers["x-gateway-cache"] == "miss"
    assert oa(url, SECOND_KEY).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS) \
        .headers["x-gateway-cache"] == "hit"
    assert upstream_calls(mock_upstream) == 1


# --- never stored -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", [
    {"x-mock-fault-status": "400"},  # an error status (not retried)
    {"x-mock-cut-after": "2"},  # a stream cut mid-way: the client gets an error frame
    {"x-mock-stream-error-after": "2"},  # an in-band error after HTTP 200
], ids=["error-status", "cut-stream", "in-band-error"])
@pytest.mark.parametrize("family", ["openai", "anthropic", "ollama", "bedrock"])
def test_failed_answers_are_never_stored(gw: str, mock_upstream: str, fault: dict[str, str], family: str) -> None:
    path, body, headers = {
        "openai": ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSGS, "stream": True}, AUTH),
        "anthropic": ("/v1/messages", {"model": "claude-3", "max_tokens": 9, "messages": MSGS, "stream": True}, AUTH),
        "ollama": ("/api/chat", {"model": "llama3.2:latest", "messages": MSGS}, AUTH),
        "bedrock": (f"/model/{BR_MODEL}/converse-stream", {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
                    {"authorization": f"Bearer {GATEWAY_KEY}"}),
    }[family]
    with httpx.Client(timeout=10) as client:
        try:
            broken = client.post(gw + path, json=body, headers={**headers, **fault})
            assert broken.headers["x-gateway-cache"] == "miss"
        except httpx.HTTPError:
            pass  # the cut stream may end the connection
        good = client.post(gw + path, json=body, headers=headers)
        again = client.post(gw + path, json=body, headers=headers)
    assert good.status_code == 200 and good.headers["x-gateway-cache"] == "miss"  # nothing was stored before
    assert again.headers["x-gateway-cache"] == "hit" and again.content == good.content
    assert upstream_calls(mock_upstream) == 2


@pytest.mark.parametrize("extra", [{"previous_response_id": "resp_1"}, {"background": True}, {"store": True}],
                         ids=["previous_response_id", "background", "store"])
def test_state_dependent_responses_calls_bypass(gw: str, mock_upstream: str, extra: dict[str, Any]) -> None:
    body = {"model": "gpt-4o-mini", "input": "hi", **extra}
    for _ in range(2):
        r = httpx.post(gw + "/v1/responses", json=body, headers=AUTH)
        assert r.headers["x-gateway-cache"] == "bypass"
    assert upstream_calls(mock_upstream) == 2


def test_answer_over_max_entry_bytes_is_not_stored(mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    clear_recorded(mock_upstream)
    url = make_gateway(config(mock_upstream, "{enabled: true, max_entry_bytes: 300}"))
    for _ in range(2):
        r = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSGS}, headers=AUTH)
        assert r.status_code == 200 and len(r.content) > 300 and r.headers["x-gateway-cache"] == "miss"
    assert upstream_calls(mock_upstream) == 2


# --- controls --------------------------------------------------------------------------------------------
def post(url: str, headers: dict[str, str] | None = None, content: str = "x") -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={**AUTH, **(headers or {})},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]})


def test_request_controls(gw: str, mock_upstream: str) -> None:
    label = lambda r: r.headers["x-gateway-cache"]  # noqa: E731
    assert label(post(gw, {"cache-control": "no-store"})) == "bypass"
    assert label(post(gw)) == "miss"  # no-store wrote nothing
    assert label(post(gw, {"cache-control": "no-cache"})) == "miss"  # not read, but written
    assert label(post(gw)) == "hit"
    assert label(post(gw, {"cache-control": "max-age=0"})) == "miss"  # older than 0 s
    assert label(post(gw, {"cache-control": "max-age=3600, nonsense, max-age=oops"})) == "hit"
    assert label(post(gw, {"x-gateway-cache-namespace": "tenant-1"})) == "miss"  # another partition
    assert label(post(gw, {"x-gateway-cache-namespace": "tenant-1"})) == "hit"
    assert upstream_calls(mock_upstream) == 5
    assert label(post(gw, {"x-gateway-cache-ttl": "1"}, content="short")) == "miss"
    assert label(post(gw, content="short")) == "hit"
    time.sleep(1.2)  # the entry's own TTL
    assert label(post(gw, content="short")) == "miss"


@pytest.mark.parametrize("name,value", [("x-gateway-cache-ttl", "-5"), ("x-gateway-cache-ttl", "99999999999"),
                                        ("x-gateway-cache-ttl", "soon"), ("x-gateway-cache-namespace", "n" * 10240),
                                        ("x-gateway-cache-namespace", "two words")])
def test_bad_controls_are_native_400s(gw: str, mock_upstream: str, name: str, value: str) -> None:
    r = post(gw, {name: value})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-gateway-error"] == "caller_invalid_request" and name in r.json()["error"]["message"]
    a = httpx.post(gw + "/v1/messages", headers={**AUTH, name: value},
                   json={"model": "claude-3", "max_tokens": 5, "messages": MSGS})
    assert a.status_code == 400 and a.json()["type"] == "error"
    b = httpx.post(gw + f"/model/{BR_MODEL}/converse", headers={**AUTH, name: value}, json={"messages": []})
    assert b.status_code == 400 and b.headers["x-amzn-errortype"] == "ValidationException"
    o = httpx.post(gw + "/api/chat", headers={**AUTH, name: value}, json={"model": "llama3.2", "messages": MSGS})
    assert o.status_code == 400 and "error" in o.json()
    assert upstream_calls(mock_upstream) == 0


def test_namespace_with_cr_lf_is_a_400_never_a_500(gw: str, mock_upstream: str) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": MSGS}).encode()
    host, port = gw.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"authorization: Bearer " + GATEWAY_KEY.encode() + b"\r\n"
                  b"x-gateway-cache-namespace: a\rb\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 400"), head[:200]
    assert upstream_calls(mock_upstream) == 0


# --- limits, metrics, log, admin ----------------------------------------------------------------------
def test_a_hit_counts_one_request_no_tokens_and_nothing_against_a_deployment(
        mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    clear_recorded(mock_upstream)
    text = config(mock_upstream).replace(f"sha256: {hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()}",
                                         f"sha256: {hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()}\n"
                                         "      rate_limit: {requests_per_minute: 4, tokens_per_minute: 100000}")
    text = text.replace('api_key: sk-upstream-openai-7f3a}',
                        'api_key: sk-upstream-openai-7f3a, rate_limit: {requests_per_minute: 1}}')
    url = make_gateway(text)
    first = post(url)
    hits = [post(url) for _ in range(3)]  # the deployment's one request a minute is spent: hits need none
    assert first.headers["x-gateway-cache"] == "miss" and [h.headers["x-gateway-cache"] for h in hits] == ["hit"] * 3
    assert [int(h.headers["x-ratelimit-remaining-requests"]) for h in hits] == [2, 1, 0]
    tokens = [int(h.headers["x-ratelimit-remaining-tokens"]) for h in hits]
    assert tokens == sorted(tokens)  # a hit takes no tokens (the bucket only refills)
    refused = post(url)
    assert refused.status_code == 429 and refused.headers["x-gateway-cache"] == "hit"  # one request each
    assert upstream_calls(mock_upstream) == 1


def test_metrics_log_and_admin(mock_upstream: str, make_gateway: Callable[..., str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import structlog

    import middlewares.telemetry
    from proxy.telemetry.logs import AccessLogger, render_access

    out = io.BytesIO()  # the access log, where the gateway built below writes it
    monkeypatch.setattr(middlewares.telemetry, "access_logger",
                        lambda: AccessLogger(structlog.BytesLogger(out), [render_access], {}))
    clear_recorded(mock_upstream)
    priced = 'api_key: sk-upstream-openai-7f3a, cost: {input_per_1k: 1.0, output_per_1k: 2.0}}'
    gw = make_gateway(config(mock_upstream).replace("api_key: sk-upstream-openai-7f3a}", priced))
    post(gw)
    usage = post(gw).json()["usage"]
    httpx.post(gw + "/v1/messages/count_tokens", headers=AUTH, json={"model": "claude-3", "messages": MSGS})
    metrics = httpx.get(gw + "/metrics").text
    for line in ('llm_cache_requests_total{result="hit"} 1.0', 'llm_cache_requests_total{result="miss"} 1.0',
                 'llm_cache_requests_total{result="bypass"} 1.0', 'llm_cache_requests_total{result="coalesced"} 0.0'):
        assert line in metrics
    saved = next(line for line in metrics.splitlines() if line.startswith("llm_cache_saved_tokens_total "))
    assert float(saved.split()[1]) == usage["prompt_tokens"] + usage["completion_tokens"]
    cost = next(line for line in metrics.splitlines() if line.startswith("llm_cache_saved_cost_usd_total "))
    assert float(cost.split()[1]) == pytest.approx(usage["prompt_tokens"] / 1000 + usage["completion_tokens"] * 2 / 1000)
    assert float(next(line for line in metrics.splitlines() if line.startswith("llm_cache_bytes ")).split()[1]) > 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["cache"] for line in lines] == ["miss", "hit", "bypass"]
    admin = {"authorization": f"Bearer {ADMIN}"}
    stats = httpx.get(gw + "/admin/cache", headers=admin).json()
    assert stats["backend"] == "embedded" and stats["entries"] == 1 and stats["requests"]["hit"] == 1
    assert httpx.delete(gw + "/admin/cache?key_id=team-two", headers=admin).json()["purged"] == 0
    assert httpx.delete(gw + "/admin/cache?key_id=team-test", headers=admin).json() == \
        {"purged": 1, "target": "key:team-test"}
    assert post(gw).headers["x-gateway-cache"] == "miss"
    assert httpx.delete(gw + "/admin/cache?all=true", headers=admin).json()["purged"] == 1
    for bad in ("", "?all=yes", "?key_id=a&all=true", "?namespace=a%20b"):
        assert httpx.delete(gw + "/admin/cache" + bad, headers=admin).status_code == 400
    assert httpx.get(gw + "/admin/cache").status_code == 401


def test_key_with_the_cache_off_bypasses(mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    clear_recorded(mock_upstream)
    text = config(mock_upstream).replace("    - id: team-two\n", "    - id: team-two\n      cache: false\n")
    url = make_gateway(text)
    for _ in range(2):
        r = oa(url, SECOND_KEY).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS)
        assert r.headers["x-gateway-cache"] == "bypass"
    assert upstream_calls(mock_upstream) == 2


# --- coalescing in one process ---------------------------------------------------------------------------
def concurrently(n: int, call: Callable[[int], Any]) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


def wait_recorded(mock_upstream: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while upstream_calls(mock_upstream) < count:
        assert time.monotonic() < deadline, "the upstream never got the request"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_identical_requests_in_flight_reach_the_upstream_once(gw: str, mock_upstream: str, stream: bool) -> None:
    slow = {"x-mock-latency-ms": "400", "x-mock-chunk-interval-ms": "30"}
    body = {"model": "gpt-4o-mini", "messages": MSGS, "stream": stream}

    def call(i: int) -> httpx.Response:
        return httpx.post(gw + "/v1/chat/completions", json=body, headers={**AUTH, **slow}, timeout=30)

    answers = concurrently(20, call)
    assert upstream_calls(mock_upstream) == 1
    assert all(r.status_code == 200 for r in answers)
    assert len({r.content for r in answers}) == 1
    labels = sorted(r.headers["x-gateway-cache"] for r in answers)
    assert labels.count("miss") == 1 and set(labels) <= {"miss", "coalesced", "hit"}


def test_a_streaming_follower_gets_chunks_as_they_arrive(gw: str, mock_upstream: str) -> None:
    body = {"model": "gpt-4o-mini", "messages": MSGS, "stream": True}
    slow = {**AUTH, "x-mock-chunk-interval-ms": "150", "x-mock-chunks": "6"}
    got_first = threading.Event()

    def leader() -> bytes:
        with httpx.stream("POST", gw + "/v1/chat/completions", json=body, headers=slow, timeout=30) as r:
            return b"".join(r.iter_raw())

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lead = pool.submit(leader)
        wait_recorded(mock_upstream, 1)
        with httpx.stream("POST", gw + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
            assert r.headers["x-gateway-cache"] == "coalesced"
            parts = []
            for part in r.iter_raw():
                parts.append(part)
                if not lead.done():
                    got_first.set()  # a chunk reached the follower while the leader was still streaming
        assert b"".join(parts) == lead.result()
    assert got_first.is_set() and upstream_calls(mock_upstream) == 1


def test_when_the_leader_fails_a_waiting_duplicate_goes_upstream(gw: str, mock_upstream: str) -> None:
    body = {"model": "gpt-4o-mini", "messages": MSGS}
    failing = {**AUTH, "x-mock-latency-ms": "400", "x-mock-fault-status": "400"}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        lead = pool.submit(httpx.post, gw + "/v1/chat/completions", json=body, headers=failing, timeout=30)
        wait_recorded(mock_upstream, 1)
        followers = [pool.submit(httpx.post, gw + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
                     for _ in range(5)]
        assert lead.result().status_code == 400
        answers = [f.result() for f in followers]
    assert all(r.status_code == 200 for r in answers) and len({r.content for r in answers}) == 1
    assert sorted(r.headers["x-gateway-cache"] for r in answers).count("miss") == 1  # one became the leader
    assert upstream_calls(mock_upstream) == 2


def test_past_coalesce_wait_a_duplicate_goes_upstream_itself(mock_upstream: str,
                                                            make_gateway: Callable[..., str]) -> None:
    clear_recorded(mock_upstream)
    url = make_gateway(config(mock_upstream, "{enabled: true, coalesce_wait: 200ms}"))
    body = {"model": "gpt-4o-mini", "messages": MSGS}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        lead = pool.submit(httpx.post, url + "/v1/chat/completions", json=body,
                           headers={**AUTH, "x-mock-latency-ms": "2000"}, timeout=30)
        wait_recorded(mock_upstream, 1)
        follower = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
        assert follower.headers["x-gateway-cache"] == "miss" and follower.status_code == 200
        assert lead.result().status_code == 200
    assert upstream_calls(mock_upstream) == 2


def test_the_request_span_says_what_the_cache_did(mock_upstream: str) -> None:
    import asyncio

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from config import parse_config
    from proxy.app import build_app
    from proxy.telemetry.observability import GatewayObserver
    from tests.test_no_cycles import MONITORING, _call

    cfg = parse_config(standard_config(mock_upstream, MONITORING + "cache: {enabled: true}\n"), "test.yaml", {})
    spans = InMemorySpanExporter()
    app = build_app(cfg, observer=GatewayObserver(cfg, span_exporter=spans, metric_reader=InMemoryMetricReader()))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "traced"}]}

    async def scenario() -> None:
        for headers in ([], [], [(b"cache-control", b"no-store")]):
            await _call(app, "/v1/chat/completions", body, headers)
        await app.aclose()  # flushes the spans

    asyncio.run(scenario())
    servers = [s for s in spans.get_finished_spans() if s.attributes and "gateway.request_id" in s.attributes]
    assert [s.attributes["gateway.cache"] for s in servers] == ["miss", "hit", "bypass"]  # type: ignore[index]


def test_cached_requests_leave_no_cyclic_garbage(mock_upstream: str) -> None:
    """As tests/test_no_cycles.py, with the cache on: misses, hits, streams, bypasses, coalesced requests
    (a flight and its followers) and a refused control leave nothing for the garbage collector."""
    import asyncio
    import gc

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from config import parse_config
    from proxy.app import build_app
    from proxy.telemetry.observability import GatewayObserver
    from tests.test_no_cycles import MONITORING, _call

    cfg = parse_config(standard_config(mock_upstream, MONITORING + "cache: {enabled: true}\n"), "test.yaml", {})
    app = build_app(cfg, observer=GatewayObserver(cfg, span_exporter=InMemorySpanExporter(),
                                                  metric_reader=InMemoryMetricReader()))
    path = "/v1/chat/completions"

    def chat(content: str, stream: bool = False) -> dict[str, Any]:
        return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "stream": stream}

    async def round_(i: int) -> list[int]:
        out = [await _call(app, path, chat(f"miss {i}"), []), await _call(app, path, chat("same"), []),
               await _call(app, path, chat("same", True), []),
               await _call(app, path, chat("x"), [(b"cache-control", b"no-store")]),
               await _call(app, path, chat("x"), [(b"x-gateway-cache-ttl", b"-1")])]
        slow = [(b"x-mock-latency-ms", b"30")]
        out += await asyncio.gather(*[_call(app, path, chat(f"together {i}", i % 2 == 1), slow) for _ in range(3)])
        return out

    async def scenario() -> tuple[list[int], list[str]]:
        await round_(-1)  # warm-up
        await asyncio.sleep(0.1)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            statuses = [s for i in range(6) for s in await round_(i)]
            gc.collect()
            kinds = sorted({type(o).__name__ for o in gc.garbage})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        await app.aclose()
        return statuses, kinds

    statuses, kinds = asyncio.run(scenario())
    assert statuses == [200, 200, 200, 200, 400, 200, 200, 200] * 6
    assert kinds == [], f"objects left in reference cycles: {kinds}"


def test_a_waiting_duplicate_whose_client_leaves_stops_waiting(mock_upstream: str,
                                                               make_gateway: Callable[..., str]) -> None:
    """It would go upstream itself once coalesce_wait passed; gone, it never does."""
    clear_recorded(mock_upstream)
    url = make_gateway(config(mock_upstream, "{enabled: true, coalesce_wait: 300ms}"))
    body = json.dumps({"model": "gpt-4o-mini", "messages": MSGS}).encode()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lead = pool.submit(httpx.post, url + "/v1/chat/completions", content=body, timeout=30,
                           headers={**AUTH, "content-type": "application/json", "x-mock-latency-ms": "1500",
                                    "accept-encoding": "identity"})  # part of the key: as the raw duplicate
        wait_recorded(mock_upstream, 1)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"accept-encoding: identity\r\n"
                      b"authorization: Bearer " + GATEWAY_KEY.encode() + b"\r\ncontent-length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.1)  # it is waiting for the leader now; then its client goes away
        assert lead.result().status_code == 200
    time.sleep(0.5)  # past coalesce_wait
    assert upstream_calls(mock_upstream) == 1
