"""Streams are relayed as they arrive, never buffered; compressed bodies pass through compressed.

A fake upstream (our own ASGI app on a real socket) paces each stream: five chunks 200 ms apart, noting
when it hands each one to its server. The client notes when each one arrives through the gateway. The
clocks are the same (`time.perf_counter`, one process), so the comparison is direct. These are the only
tests in the suite where elapsed time is the assertion.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import uuid
import zlib
from typing import Any, Iterator

import httpx
import openai
import pytest

from config import parse_config
from proxy.app import build_app
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.servers import serve
from tests.recording import Contexts

CHUNKS = 5
GAP = 0.2  # seconds between upstream chunks
LATE = 0.15  # a chunk must reach the client within this of leaving the upstream
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}
COMPLETION = {"id": "chatcmpl-gz", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "compressed hello"},
                           "logprobs": None, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def _openai_chunks() -> list[bytes]:
    out = []
    for i in range(CHUNKS):
        chunk = {"id": "chatcmpl-p", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                 "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    out[-1] += b"data: [DONE]\n\n"
    return out


def _sse(name: str, obj: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()


def _anthropic_chunks() -> list[bytes]:
    start = {"type": "message_start", "message": {
        "id": "msg_p", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}}
    out = [_sse("message_start", start) + _sse("content_block_start", {
        "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    for i in range(1, CHUNKS):
        out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": f"w{i} "}}))
    out[-1] += (_sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                + _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                              "stop_sequence": None},
                                         "usage": {"output_tokens": CHUNKS - 1}})
                + _sse("message_stop", {"type": "message_stop"}))
    return out


def _ollama_chunks() -> list[bytes]:
    out = [json.dumps({"model": "llama3", "created_at": "2024-01-01T00:00:00Z",
                       "message": {"role": "assistant", "content": f"w{i} "}, "done": False}).encode() + b"\n"
           for i in range(CHUNKS - 1)]
    out.append(json.dumps({"model": "llama3", "created_at": "2024-01-01T00:00:00Z",
                           "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                           "prompt_eval_count": 9, "eval_count": CHUNKS - 1}).encode() + b"\n")
    return out


STREAMS = {"/v1/chat/completions": (b"text/event-stream", _openai_chunks),
           "/v1/messages": (b"text/event-stream", _anthropic_chunks),
           "/api/chat": (b"application/x-ndjson", _ollama_chunks)}


class PacedUpstream:
    """Streams paced chunks for the three streaming paths; `x-mode: gzip|deflate` answers a compressed JSON
    completion instead (only when the request accepts that encoding, as a real server does)."""

    def __init__(self) -> None:
        self.sent: dict[str, list[float]] = {}  # x-probe -> send time of each chunk
        self.accept_encoding: dict[str, str | None] = {}
        self.bodies: dict[str, bytes] = {}  # x-probe -> the exact response body bytes sent
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        probe, mode = headers.get("x-probe", ""), headers.get("x-mode", "")
        with self.lock:
            self.accept_encoding[probe] = headers.get("accept-encoding")
        if mode in ("gzip", "deflate"):
            await self._compressed(send, probe, mode, headers.get("accept-encoding") or "")
            return
        ctype, make = STREAMS[scope["path"]]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype), (b"cache-control", b"no-cache")]})
        times: list[float] = []
        with self.lock:
            self.sent[probe] = times
        for i, chunk in enumerate(make()):
            if i:
                await asyncio.sleep(GAP)
            times.append(time.perf_counter())
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _compressed(self, send: Any, probe: str, mode: str, accept: str) -> None:
        plain = json.dumps(COMPLETION, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json")]
        body = plain
        if mode in [p.split(";")[0].strip() for p in accept.split(",")]:
            body = gzip.compress(plain, mtime=0) if mode == "gzip" else zlib.compress(plain)
            headers.append((b"content-encoding", mode.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        with self.lock:
            self.bodies[probe] = body
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # in two pieces, so the gateway's inflating usage reader sees a split deflate stream
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        await send({"type": "http.response.body", "body": body[len(body) // 2:], "more_body": False})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[PacedUpstream, str]]:
    app = PacedUpstream()
    with serve(app, lifespan="off") as base:
        yield app, base


def _config(base: str, failover: bool) -> str:
    return f"""
gateway: {{enable_failover: {str(failover).lower()}}}
auth: {{keys: [{{id: t, sha256: {GATEWAY_KEY_SHA}}}]}}
providers:
  openai: {{type: openai, base_url: "{base}/v1", api_key: sk-up}}
  anthropic: {{type: anthropic, base_url: "{base}", api_key: sk-up}}
  ollama: {{type: ollama, base_url: "{base}"}}
"""


@pytest.fixture(scope="module")
def gateways(upstream: tuple[PacedUpstream, str]) -> Iterator[dict[str, Any]]:
    """Two gateways on the same upstream: the default one (failover on, which may hold a stream's first
    event until the stream shows it is healthy) and one with failover off (no commit point to wait for)."""
    _, base = upstream
    default = Contexts(build_app(parse_config(_config(base, True), "stream.yaml", {})))
    direct = Contexts(build_app(parse_config(_config(base, False), "stream.yaml", {})))
    with serve(default) as default_url, serve(direct) as direct_url:
        yield {"default": default_url, "direct": direct_url, "contexts": default}


def _events(family: str, buf: bytes) -> tuple[list[bytes], bytes]:
    sep = b"\n" if family == "ollama" else b"\n\n"
    *done, rest = buf.split(sep)
    return [d for d in done if d.strip()], rest


def stream_with_httpx(url: str, path: str, family: str, body: dict[str, Any], probe: str) -> list[float]:
    """Arrival time of each complete event/line, as the client parses them."""
    headers = {**AUTH, "x-probe": probe, "content-type": "application/json", "anthropic-version": "2023-06-01"}
    arrivals: list[float] = []
    buf = b""
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=10) as response:
        assert response.status_code == 200, response.read()
        for piece in response.iter_raw():
            now = time.perf_counter()
            events, buf = _events(family, buf + piece)
            arrivals += [now] * len(events)
    assert buf.strip() == b""
    return arrivals


def _group(family: str, arrivals: list[float]) -> list[float]:
    """Arrival of each upstream chunk: the arrival of its last event/line."""
    counts = {"openai": [1] * (CHUNKS - 1) + [2], "anthropic": [2] + [1] * (CHUNKS - 2) + [4],
              "ollama": [1] * CHUNKS}[family]
    assert len(arrivals) == sum(counts), (family, len(arrivals))
    out, i = [], 0
    for n in counts:
        i += n
        out.append(arrivals[i - 1])
    return out


def assert_unbuffered(sent: list[float], arrived: list[float], *, first_may_wait_for_second: bool = False) -> None:
    assert len(sent) == len(arrived) == CHUNKS
    lags = [round(a - s, 3) for s, a in zip(sent, arrived)]
    assert arrived[0] < sent[-1] - 0.4, f"first chunk arrived after the upstream finished: lags {lags}"
    for i, (s, a) in enumerate(zip(sent, arrived)):
        if i == 0 and first_may_wait_for_second:
            assert a - sent[1] < LATE, f"first chunk held past the second: lags {lags}"
            continue
        assert -0.001 <= a - s < LATE, f"chunk {i} was held back: lags {lags}"


BODIES = {
    "openai": ("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": []}),
    "anthropic": ("/v1/messages", {"model": "claude-x", "max_tokens": 16, "stream": True, "messages": []}),
    "ollama": ("/ollama/api/chat", {"model": "llama3", "messages": []}),  # streams by default
}


@pytest.mark.parametrize("family", ["openai", "anthropic", "ollama"])
def test_each_chunk_is_relayed_as_it_arrives(gateways: dict[str, Any], upstream: tuple[PacedUpstream, str],
                                             family: str) -> None:
    app, _ = upstream
    probe = uuid.uuid4().hex
    path, body = BODIES[family]
    arrivals = stream_with_httpx(gateways["direct"], path, family, body, probe)
    assert_unbuffered(app.sent[probe], _group(family, arrivals))


def test_openai_sdk_stream_is_unbuffered(gateways: dict[str, Any], upstream: tuple[PacedUpstream, str]) -> None:
    app, _ = upstream
    probe = uuid.uuid4().hex
    client = openai.OpenAI(base_url=f"{gateways['direct']}/v1", api_key=GATEWAY_KEY, max_retries=0)
    arrived, text = [], ""
    for chunk in client.chat.completions.create(model="gpt-4o", messages=[], stream=True,
                                                extra_headers={"x-probe": probe}):
        arrived.append(time.perf_counter())
        text += chunk.choices[0].delta.content or ""
    assert text == "".join(f"w{i} " for i in range(CHUNKS))
    assert_unbuffered(app.sent[probe], arrived)


def test_default_gateway_holds_at_most_the_first_event(gateways: dict[str, Any],
                                                       upstream: tuple[PacedUpstream, str]) -> None:
    """With failover on, the gateway may hold a stream's first event until the stream proves healthy
    (its commit point); from then on every chunk flows as it arrives."""
    app, _ = upstream
    probe = uuid.uuid4().hex
    client = openai.OpenAI(base_url=f"{gateways['default']}/openai/v1", api_key=GATEWAY_KEY, max_retries=0)
    arrived = []
    for _ in client.chat.completions.create(model="gpt-4o", messages=[], stream=True,
                                            extra_headers={"x-probe": probe}):
        arrived.append(time.perf_counter())
    assert_unbuffered(app.sent[probe], arrived, first_may_wait_for_second=True)
    for family in ("anthropic", "ollama"):
        probe = uuid.uuid4().hex
        path, body = BODIES[family]
        arrivals = stream_with_httpx(gateways["default"], path, family, body, probe)
        assert_unbuffered(app.sent[probe], _group(family, arrivals), first_may_wait_for_second=True)


# --- compressed bodies --------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_json_passes_through_compressed_and_usage_is_read(
        gateways: dict[str, Any], upstream: tuple[PacedUpstream, str], encoding: str) -> None:
    app, _ = upstream
    contexts = gateways["contexts"]
    contexts.reset()
    probe = uuid.uuid4().hex
    headers = {**AUTH, "x-probe": probe, "x-mode": encoding, "accept-encoding": f"{encoding}, br"}
    with httpx.stream("POST", f"{gateways['default']}/v1/chat/completions", headers=headers,
                      json={"model": "gpt-4o", "messages": []}) as response:
        raw = b"".join(response.iter_raw())
    assert app.accept_encoding[probe] == encoding  # only what the usage reader can inflate is offered
    assert raw == app.bodies[probe], "the compressed bytes must pass unchanged"
    assert response.headers["content-encoding"] == encoding
    assert response.headers["content-length"] == str(len(raw))
    assert "transfer-encoding" not in response.headers
    inflated = gzip.decompress(raw) if encoding == "gzip" else zlib.decompress(raw)
    assert json.loads(inflated) == COMPLETION
    ctx = contexts.last(1)
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (11, 7)

    # httpx (decompressing) and the openai SDK see the exact JSON
    probe = uuid.uuid4().hex
    response = httpx.post(f"{gateways['default']}/v1/chat/completions", json={"model": "gpt-4o", "messages": []},
                          headers={**AUTH, "x-probe": probe, "x-mode": encoding})
    assert response.json() == COMPLETION and response.headers["content-encoding"] == encoding
    client = openai.OpenAI(base_url=f"{gateways['default']}/v1", api_key=GATEWAY_KEY, max_retries=0)
    completion = client.chat.completions.create(model="gpt-4o", messages=[], extra_headers={"x-mode": encoding})
    assert completion.choices[0].message.content == "compressed hello"
    assert completion.usage is not None and completion.usage.completion_tokens == 7


@pytest.mark.parametrize("accept", [None, "br", "identity"])
def test_a_client_that_did_not_accept_compression_never_gets_it(
        gateways: dict[str, Any], upstream: tuple[PacedUpstream, str], accept: str | None) -> None:
    app, _ = upstream
    probe = uuid.uuid4().hex
    with httpx.Client() as client:
        del client.headers["accept-encoding"]  # httpx would otherwise offer gzip itself
        headers = {**AUTH, "x-probe": probe, "x-mode": "gzip"}
        if accept is not None:
            headers["accept-encoding"] = accept
        response = client.post(f"{gateways['default']}/v1/chat/completions", headers=headers,
                               json={"model": "gpt-4o", "messages": []})
    assert "accept-encoding" not in response.request.headers or accept is not None
    assert app.accept_encoding[probe] == "identity"
    assert "content-encoding" not in response.headers
    assert response.content == json.dumps(COMPLETION, separators=(",", ":")).encode()
