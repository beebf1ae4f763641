"""OpenAI family end to end: the official `openai` SDK (and raw httpx) -> real gateway -> simulated upstream.

The simulated upstream is wrapped in a small ASGI recorder (`Tape`) that keeps the exact response bytes it
sent, so the tests can compare them with what the client received; the mock itself records what it
received (`/__mock/requests`). The gateway is wrapped in `Contexts`, which keeps each finished request's
`RequestContext`, so usage metering is checked on the gateway's own record.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GATEWAY_KEY, UPSTREAM_OPENAI_KEY, clear_recorded, recorded
from tests.recording import Contexts, Tape, gw, gw_module, sha, upstream  # noqa: F401 - fixtures
from tests.servers import serve

AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}
MSGS = [{"role": "user", "content": "hello there"}]
PREFIXES = ["/v1", "/openai/v1"]


def only_request(upstream: Tape) -> dict[str, Any]:
    recs = recorded(upstream.base)
    assert len(recs) == 1, [r["raw_path"] for r in recs]
    return recs[0]


def body_of(rec: dict[str, Any]) -> bytes:
    return base64.b64decode(rec["body_b64"])


def assert_upstream_credentials(rec: dict[str, Any]) -> None:
    headers = rec["headers"]
    auth = [v for k, v in headers if k == "authorization"]
    assert auth == [f"Bearer {UPSTREAM_OPENAI_KEY}"]
    assert not any(GATEWAY_KEY in v for _, v in headers), "the gateway key leaked upstream"
    assert not any(k.startswith("x-gateway-") for k, _ in headers)


def header(entry: SimpleNamespace, name: str) -> str:
    return next(v.decode() for k, v in entry.headers if k == name.encode())


def assert_gateway_headers(headers: Any) -> None:
    assert re.fullmatch(r"gw-[0-9a-f]{32}", headers["x-gateway-request-id"])
    assert headers["x-gateway-provider"] == "openai"
    assert headers["x-gateway-attempts"] == "1"


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


# --- chat completions -------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", PREFIXES)
def test_chat_completion_non_stream(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = openai.OpenAI(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=50)
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("This is a simulated response from gpt-4o-mini")
    assert raw.http_request.url.path == f"{prefix}/chat/completions"

    rec = only_request(upstream)
    assert (rec["method"], rec["raw_path"], rec["query"]) == ("POST", "/v1/chat/completions", "")
    assert rec["body_sha256"] == sha(raw.http_request.content), "request body must reach upstream byte for byte"
    assert_upstream_credentials(rec)

    [answer] = upstream.responses
    assert raw.status_code == answer.status == 200
    assert raw.content == bytes(answer.body), "response body must reach the client byte for byte"
    assert raw.headers["x-request-id"] == header(answer, "x-request-id")  # upstream request id passes
    assert raw.headers["content-length"] == header(answer, "content-length")
    assert_gateway_headers(raw.headers)
    # the gateway's server writes its own Date/Server: the upstream's must not be added a second time
    assert len(raw.http_response.headers.get_list("date")) == 1
    assert len(raw.http_response.headers.get_list("server")) <= 1

    ctx = gw.contexts.last(1)
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert ctx.model == "gpt-4o-mini" and ctx.stream is False


@pytest.mark.parametrize("prefix", PREFIXES)
def test_chat_stream_without_include_usage_gets_it_injected_and_hidden(
        gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = openai.OpenAI(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, stream=True)
    chunks = list(raw.parse())
    assert chunks, "no chunk reached the client"
    assert all(c.choices for c in chunks), "the injected usage chunk (choices: []) must not reach the client"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("This is a simulated response from gpt-4o")
    assert chunks[-1].choices[0].finish_reason == "stop"

    rec = only_request(upstream)
    sent = raw.http_request.content
    assert json.loads(body_of(rec)) == {**json.loads(sent), "stream_options": {"include_usage": True}}
    assert_upstream_credentials(rec)

    [answer] = upstream.responses
    usage_events = [e for e in sse_events(bytes(answer.body)) if b'"choices":[]' in e]
    assert len(usage_events) == 1, "upstream did send the usage chunk"
    usage = json.loads(usage_events[0][len(b"data: "):])["usage"]
    ctx = gw.contexts.last(1)
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert ctx.strip_usage is True


def test_chat_stream_bytes_are_upstream_bytes_minus_the_usage_chunk(gw: SimpleNamespace, upstream: Tape) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": MSGS, "stream": True}).encode()
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", content=body,
                      headers={**AUTH, "content-type": "application/json"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers
        assert_gateway_headers(response.headers)
        got = b"".join(response.iter_raw())
    [answer] = upstream.responses
    kept = [e for e in bytes(answer.body).split(b"\n\n") if b'"choices":[]' not in e]
    assert got == b"\n\n".join(kept)
    assert got.endswith(b"data: [DONE]\n\n")
    rec = only_request(upstream)
    # the one documented rewrite is a minimal splice: every byte the client sent is still there, in order
    assert body_of(rec) == b'{"stream_options":{"include_usage":true},' + body[1:]


@pytest.mark.parametrize("options", [{"include_usage": False}, {}])
def test_chat_stream_with_other_stream_options_still_gets_usage(
        gw: SimpleNamespace, upstream: Tape, options: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=GATEWAY_KEY, max_retries=0)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True,
                                                 stream_options=options))  # type: ignore[arg-type]
    assert chunks and all(c.choices for c in chunks)
    rec = only_request(upstream)
    assert json.loads(body_of(rec))["stream_options"] == {"include_usage": True}
    assert gw.contexts.last(1).usage.output_tokens is not None


def test_chat_stream_with_include_usage_is_forwarded_untouched(gw: SimpleNamespace, upstream: Tape) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=GATEWAY_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    usage_chunks = [c for c in chunks if not c.choices]
    assert len(usage_chunks) == 1 and usage_chunks[0].usage is not None
    rec = only_request(upstream)
    assert rec["body_sha256"] == sha(raw.http_request.content)
    ctx = gw.contexts.last(1)
    assert ctx.strip_usage is False
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (
        usage_chunks[0].usage.prompt_tokens, usage_chunks[0].usage.completion_tokens)

    # and with httpx: the bytes are exactly upstream's, usage chunk included
    clear_recorded(upstream.base)
    upstream.responses.clear()
    body = b'{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": []}'
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", content=body,
                      headers={**AUTH, "content-type": "application/json"}) as response:
        got = b"".join(response.iter_raw())
    assert only_request(upstream)["body_sha256"] == sha(body)
    assert got == bytes(upstream.responses[0].body)
    assert b'"choices":[]' in got


# --- completions, embeddings, responses ---------------------------------------------------------------

@pytest.mark.parametrize("prefix", PREFIXES)
def test_completions(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = openai.OpenAI(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    raw = client.completions.with_raw_response.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=9)
    completion = raw.parse()
    assert completion.choices[0].text.startswith("This is a simulated response from gpt-3.5-turbo-instruct")
    rec = only_request(upstream)
    assert rec["raw_path"] == "/v1/completions"
    assert rec["body_sha256"] == sha(raw.http_request.content)
    assert raw.content == bytes(upstream.responses[0].body)
    assert gw.contexts.last(1).usage.output_tokens == completion.usage.completion_tokens

    streamed = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True))
    assert streamed and all(c.choices for c in streamed)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    second = recorded(upstream.base)[1]
    assert json.loads(body_of(second))["stream_options"] == {"include_usage": True}
    assert gw.contexts.last(2).usage.output_tokens == completion.usage.completion_tokens


@pytest.mark.parametrize("prefix", PREFIXES)
def test_embeddings(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = openai.OpenAI(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["alpha", "beta"],
                                                     dimensions=8)
    result = raw.parse()
    assert [len(d.embedding) for d in result.data] == [8, 8]
    assert result.data[0].embedding != result.data[1].embedding
    rec = only_request(upstream)
    assert rec["raw_path"] == "/v1/embeddings"
    assert rec["body_sha256"] == sha(raw.http_request.content)
    assert_upstream_credentials(rec)
    assert raw.content == bytes(upstream.responses[0].body)
    ctx = gw.contexts.last(1)
    assert ctx.operation == "embeddings"
    assert ctx.usage.input_tokens == result.usage.prompt_tokens


@pytest.mark.parametrize("prefix", PREFIXES)
def test_responses_non_stream_and_stream(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = openai.OpenAI(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Tell me something")
    response = raw.parse()
    assert response.output_text.startswith("This is a simulated response from gpt-4o")
    rec = only_request(upstream)
    assert rec["raw_path"] == "/v1/responses"
    assert rec["body_sha256"] == sha(raw.http_request.content)
    assert raw.content == bytes(upstream.responses[0].body)
    ctx = gw.contexts.last(1)
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (
        response.usage.input_tokens, response.usage.output_tokens)

    raw_stream = client.responses.with_raw_response.create(model="gpt-4o", input="Tell me something", stream=True)
    events = list(raw_stream.parse())
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == response.output_text
    second = recorded(upstream.base)[1]
    assert second["body_sha256"] == sha(raw_stream.http_request.content), "responses bodies are never rewritten"
    final = events[-1].response.usage
    ctx = gw.contexts.last(2)
    assert ctx.stream is True
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (final.input_tokens, final.output_tokens)


# --- model lists ---------------------------------------------------------------------------------------

def test_models_list_is_the_union_of_configured_and_asked(mock_upstream: str, make_gateway: Any) -> None:
    clear_recorded(mock_upstream)
    gateway = make_gateway(f"""
auth: {{keys: [{{id: t, sha256: {hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()}}}]}}
providers:
  openai: {{type: openai, base_url: "{mock_upstream}/v1", api_key: sk-listed, models: [gpt-4o, my-finetune]}}
  compat: {{type: openai_compatible, base_url: "{mock_upstream}/v1", api_key: sk-asked}}
""")
    for prefix in PREFIXES:
        client = openai.OpenAI(base_url=gateway + prefix, api_key=GATEWAY_KEY, max_retries=0)
        ids = [m.id for m in client.models.list()]
        # the listed deployment contributes its list; the other one is asked and merged, without duplicates
        assert ids == ["gpt-4o", "my-finetune", "gpt-4o-mini", "gpt-4.1", "text-embedding-3-small"]
    asks = recorded(mock_upstream)
    assert [(r["method"], r["raw_path"]) for r in asks] == [("GET", "/v1/models")] * 2
    for rec in asks:
        assert [v for k, v in rec["headers"] if k == "authorization"] == ["Bearer sk-asked"]
        assert not any(GATEWAY_KEY in v for _, v in rec["headers"])

    # and the lists route: a listed model goes to the listing deployment, another one to the open one
    clear_recorded(mock_upstream)
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=GATEWAY_KEY, max_retries=0)
    first = client.chat.completions.with_raw_response.create(model="my-finetune", messages=MSGS)
    second = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=MSGS)
    assert (first.headers["x-gateway-provider"], second.headers["x-gateway-provider"]) == ("openai", "compat")
    keys = [[v for k, v in r["headers"] if k == "authorization"] for r in recorded(mock_upstream)]
    assert keys == [["Bearer sk-listed"], ["Bearer sk-asked"]]


def test_models_list_with_only_listed_deployments_never_asks_upstream(mock_upstream: str, make_gateway: Any) -> None:
    clear_recorded(mock_upstream)
    gateway = make_gateway(f"""
auth: {{keys: [{{id: t, sha256: {hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()}}}]}}
providers:
  a: {{type: openai, base_url: "{mock_upstream}/v1", api_key: sk-a, models: [gpt-4o, gpt-4o-mini]}}
  b: {{type: openai, base_url: "{mock_upstream}/v1", api_key: sk-b, models: [gpt-4o-mini, o3]}}
""")
    page = openai.OpenAI(base_url=f"{gateway}/v1", api_key=GATEWAY_KEY, max_retries=0).models.list()
    assert [(m.id, m.object) for m in page] == [("gpt-4o", "model"), ("gpt-4o-mini", "model"), ("o3", "model")]
    assert recorded(mock_upstream) == []


# --- pass-through of other paths, bodies and query strings ----------------------------------------------

@pytest.mark.parametrize("prefix", PREFIXES)
def test_other_v1_paths_pass_through_with_query(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    response = httpx.get(f"{gw.url}{prefix}/files?purpose=batch&limit=2&after=file%2Fabc", headers=AUTH)
    rec = only_request(upstream)
    assert (rec["method"], rec["raw_path"]) == ("GET", "/v1/files")
    assert rec["query"] == "purpose=batch&limit=2&after=file%2Fabc"
    assert_upstream_credentials(rec)
    [answer] = upstream.responses
    assert response.status_code == answer.status == 404  # the simulated upstream has no files API
    assert response.content == bytes(answer.body)
    assert response.json()["error"]["message"] == "unknown route: GET /v1/files"
    assert_gateway_headers(response.headers)


def test_request_body_and_query_reach_upstream_byte_for_byte(gw: SimpleNamespace, upstream: Tape) -> None:
    body = ('{ "messages" : [ {"content": "h\\u00e9llo \u2603 \\"quoted\\"", "role":"user"} ],\n'
            '  "model":"gpt-4o",  "temperature": 0.50, "metadata": {"api_base": "nested is fine"} }').encode()
    response = httpx.post(f"{gw.url}/v1/chat/completions?trace=on&x=a%2Fb&x=2", content=body,
                          headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 200, response.text
    rec = only_request(upstream)
    assert rec["body_sha256"] == sha(body)
    assert rec["query"] == "trace=on&x=a%2Fb&x=2"
    assert [v for k, v in rec["headers"] if k == "content-length"] == [str(len(body))]
    assert response.content == bytes(upstream.responses[0].body)
    assert response.json()["model"] == "gpt-4o"


def test_request_ids_and_client_gateway_headers(gw: SimpleNamespace, upstream: Tape) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=GATEWAY_KEY, max_retries=0)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS,
        extra_headers={"x-request-id": "abc-123", "x-gateway-provider": "evil", "x-gateway-attempts": "99",
                       "X-Custom-Trace": "keep-me", "traceparent": traceparent})
    assert raw.headers["x-gateway-request-id"] == "abc-123"
    assert raw.headers["x-gateway-provider"] == "openai"
    assert raw.headers["x-gateway-attempts"] == "1"
    rec = only_request(upstream)
    names = [k for k, _ in rec["headers"]]
    assert not any(n.startswith("x-gateway-") for n in names), names
    up = dict(rec["headers"])
    assert up["x-custom-trace"] == "keep-me"
    assert up["traceparent"] == traceparent
    assert up["x-stainless-retry-count"] == "0"
    assert gw.contexts.last(1).request_id == "abc-123"

    # an x-request-id that is not a plain token is not reused
    response = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS},
                          headers={**AUTH, "x-request-id": "bad id with spaces"})
    assert response.status_code == 200
    assert re.fullmatch(r"gw-[0-9a-f]{32}", response.headers["x-gateway-request-id"])


def test_upstream_error_passes_through_verbatim(gw: SimpleNamespace, upstream: Tape) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=GATEWAY_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:  # a caller fault: not retried, not rewritten
        client.chat.completions.create(model="gpt-4o", messages=MSGS, extra_headers={"x-mock-fault-status": "400"})
    response = info.value.response
    [answer] = upstream.responses
    assert response.status_code == answer.status == 400
    assert response.content == bytes(answer.body)
    assert info.value.body == {"message": "simulated 400 fault", "type": "invalid_request_error", "param": None,
                               "code": None}
    assert response.headers["x-request-id"] == header(answer, "x-request-id")
    assert response.headers["x-gateway-provider"] == "openai"
    assert response.headers["x-gateway-attempts"] == "1"


# --- the usage-chunk removal, whatever the upstream's SSE framing ----------------------------------------

def _framed_stream(sep: bytes) -> tuple[bytes, bytes]:
    """An OpenAI-compatible stream framed with `sep`, and the same without its usage event."""
    events = [b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%d"}}]}' % i
              for i in range(3)]
    usage = b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 4, ' \
            b'"completion_tokens": 3, "total_tokens": 7}}'
    full = sep.join([*events, usage, b"data: [DONE]"]) + sep
    return full, sep.join([*events, b"data: [DONE]"]) + sep


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_usage_chunk_is_removed_whatever_the_framing(make_gateway: Any, sep: bytes, piece: int) -> None:
    full, expected = _framed_stream(sep)

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(0, len(full), piece):
            await send({"type": "http.response.body", "body": full[i:i + piece], "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with serve(upstream, lifespan="off") as base:
        gateway = make_gateway(f"""
auth: {{keys: [{{id: t, sha256: {hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()}}}]}}
providers:
  compat: {{type: openai_compatible, base_url: "{base}/v1", api_key: sk-compat}}
""")
        response = httpx.post(f"{gateway}/v1/chat/completions", headers=AUTH,
                              json={"model": "local-model", "stream": True, "messages": []})
        assert response.status_code == 200
        assert response.content == expected
        chunks = list(openai.OpenAI(base_url=f"{gateway}/v1", api_key=GATEWAY_KEY, max_retries=0)
                      .chat.completions.create(model="local-model", messages=MSGS, stream=True))
        assert [c.choices[0].delta.content for c in chunks] == ["0", "1", "2"]
