"""A client that goes away mid-stream makes the gateway close the upstream stream at once, and the
upstream connection goes back to the pool (no leak that would starve later requests).

The upstream here is our own pure-ASGI fake that streams OpenAI SSE chunks every 50 ms for up to 30 s
and records, per request, when it started and when it noticed the downstream (the gateway) went
away. Under uvicorn `send` silently does nothing once the peer is gone, so the fake runs a concurrent
`receive()` watcher for `http.disconnect`, which uvicorn delivers as soon as the socket closes.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, Iterator

import httpx
import orjson
import pytest

from config import parse_config
from proxy.app import GatewayApp, build_app
from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.servers import serve

CHUNK_INTERVAL = 0.05
STREAM_SECONDS = 30.0
POOL_SIZE = 50
HEADERS = {"Authorization": f"Bearer {GATEWAY_KEY}"}


class StreamingUpstream:
    """An OpenAI-compatible upstream whose streams last 30 s unless the peer disconnects.

    `x-fake-stall-after: N` sends the headers and N chunks, then sleeps 30 s. `x-fake-id` names the
    request in `self.records` (id -> {"started", "disconnected", "ended"}: monotonic seconds, and
    "requests": how many times the gateway sent that request).
    """

    def __init__(self) -> None:
        self.records: dict[str, dict[str, float | None]] = {}
        self.lock = threading.Lock()

    def record(self, rid: str, **values: float) -> None:
        with self.lock:
            rec = self.records.setdefault(rid, {"started": None, "disconnected": None, "ended": None, "requests": 0})
            rec.update(values)
            if "started" in values:
                rec["requests"] += 1

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        request = orjson.loads(body) if body else {}
        model = request.get("model", "gpt-test")
        if not request.get("stream"):
            payload = orjson.dumps({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        rid = headers.get("x-fake-id", f"anon-{id(scope)}")
        self.record(rid, started=time.monotonic())
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.record(rid, disconnected=time.monotonic())
                    gone.set()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            deadline = time.monotonic() + STREAM_SECONDS
            n = 0
            stall_after = int(headers.get("x-fake-stall-after", "0"))
            while time.monotonic() < deadline and not gone.is_set():
                chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                         "choices": [{"index": 0, "delta": {"content": f"tok{n} "}, "finish_reason": None}]}
                await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                            "more_body": True})
                n += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(gone.wait(), STREAM_SECONDS if n == stall_after else CHUNK_INTERVAL)
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            self.record(rid, ended=time.monotonic())
            watcher.cancel()


def _config(upstream: str, transport: str) -> str:
    return f"""
gateway: {{timeout: 60s, upstream_transport: {transport}, upstream_max_connections: {POOL_SIZE}}}
auth:
  keys:
    - {{id: team-test, sha256: {GATEWAY_KEY_SHA}}}
providers:
  openai:
    type: openai
    base_url: "{upstream}/v1"
    api_key: sk-fake-upstream
    timeouts: {{connect: 5s, first_byte: 10s, idle: 60s}}
"""


def _busy_upstream_connections(app: GatewayApp) -> tuple[int, int]:
    """(connections still busy, connections held) in the gateway's own upstream pool, either transport."""
    wire = app.runtime.wire
    if hasattr(wire, "stats"):  # proxy.upstream.wire
        return wire.stats()
    pool = getattr(wire, "_pool", None)  # httpx / httpcore
    if pool is not None:
        busy = [c for c in pool.connections if not (c.is_idle() or c.is_closed())]
        return len(busy), len(pool.connections)
    session = getattr(wire, "_session", None)  # aiohttp
    connector = session.connector if session is not None else None
    acquired = len(getattr(connector, "_acquired", ()))
    idle = sum(len(v) for v in getattr(connector, "_conns", {}).values())
    return acquired, acquired + idle


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[StreamingUpstream, str]]:
    fake = StreamingUpstream()
    with serve(fake, lifespan="off") as base:
        yield fake, base


@pytest.fixture(scope="module", params=["httptools", "aiohttp"])
def gateway_app(request: pytest.FixtureRequest, upstream: tuple[StreamingUpstream, str]) -> Iterator[tuple[GatewayApp, str]]:
    """The gateway with a small upstream pool (a leak starves it fast), on each wire transport."""
    app = build_app(parse_config(_config(upstream[1], request.param), "test.yaml", {}))
    with serve(app) as base:
        yield app, base


def _body(stream: bool = True) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def _wait_for(fake: StreamingUpstream, rids: list[str], field: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with fake.lock:
            if all(fake.records.get(r, {}).get(field) is not None for r in rids):
                return
        time.sleep(0.01)


async def _open_read_close(client: httpx.AsyncClient, base: str, rid: str, chunks: int) -> float:
    """Open a stream, read `chunks` SSE events, close abruptly; returns when the client closed.

    The time is taken once the block has closed the connection: with 200 streams and the gateway
    in this process, the client's own close can wait on the GIL, and that wait is not the gateway's."""
    headers = {**HEADERS, "x-fake-id": rid}
    async with client.stream("POST", f"{base}/v1/chat/completions", json=_body(), headers=headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        seen = 0
        async for raw in resp.aiter_raw():
            seen += raw.count(b"data: ")
            if seen >= chunks:
                break
        # Leaving the block before the body ended closes the connection (never reused by httpx).
    return time.monotonic()


def _one_drop(base: str, rid: str, chunks: int) -> float:
    async def run() -> float:
        async with httpx.AsyncClient(timeout=10) as client:
            return await _open_read_close(client, base, rid, chunks)

    return asyncio.run(run())


def test_client_drop_mid_stream_closes_upstream_within_1s(upstream, gateway_app) -> None:
    fake, _ = upstream
    app, base = gateway_app
    rid = f"drop-a-{app.config.gateway.upstream_transport}"
    closed_at = _one_drop(base, rid, chunks=2)
    _wait_for(fake, [rid], "disconnected", timeout=3)
    rec = fake.records[rid]
    assert rec["disconnected"] is not None, "the upstream never saw the gateway go away"
    assert rec["disconnected"] - closed_at < 1.0
    _wait_for(fake, [rid], "ended", timeout=2)
    assert fake.records[rid]["ended"] - rec["started"] < 5.0  # not the full 30 s stream
    assert fake.records[rid]["requests"] == 1


@pytest.mark.parametrize("stall_after", [1, 3], ids=["stall-before-commit", "stall-mid-stream"])
def test_client_drop_during_upstream_stall_closes_upstream_within_1s(upstream, gateway_app, stall_after) -> None:
    """The upstream sends headers and `stall_after` chunks, then goes silent for 30 s. With one chunk the
    gateway may still be holding the stream (nothing sent to the client yet); with three the client
    has bytes. Either way the client hangs up during the stall, and the upstream must hear of it."""
    fake, _ = upstream
    app, base = gateway_app
    rid = f"stall-{stall_after}-{app.config.gateway.upstream_transport}"
    port = int(base.rsplit(":", 1)[1])
    body = orjson.dumps(_body())
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {GATEWAY_KEY}\r\nContent-Type: application/json\r\n"
               f"x-fake-id: {rid}\r\nx-fake-stall-after: {stall_after}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def run() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        received = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the upstream has sent its chunks and is stalled
            with contextlib.suppress(asyncio.TimeoutError):
                received += await asyncio.wait_for(reader.read(65536), 0.05)
            if fake.records.get(rid, {}).get("started") is not None \
                    and time.monotonic() - fake.records[rid]["started"] > stall_after * CHUNK_INTERVAL + 0.3:
                break
        writer.transport.abort()  # abrupt: no graceful HTTP end
        return time.monotonic(), received

    closed_at, received = asyncio.run(run())
    if stall_after > 1:
        assert received.startswith(b"HTTP/1.1 200") and received.count(b"data: ") >= 1, received
    _wait_for(fake, [rid], "disconnected", timeout=3)
    rec = fake.records[rid]
    assert rec["disconnected"] is not None, "the upstream never saw the gateway go away during the stall"
    assert rec["disconnected"] - closed_at < 1.0
    time.sleep(0.2)
    assert fake.records[rid]["requests"] == 1, "a client that left must not be retried on another attempt"


def test_200_dropped_streams_do_not_leak_upstream_connections(upstream, gateway_app) -> None:
    fake, _ = upstream
    app, base = gateway_app
    n = 200
    rids = [f"mass-{app.config.gateway.upstream_transport}-{i}" for i in range(n)]
    limits = httpx.Limits(max_connections=n + 50, max_keepalive_connections=n + 50)

    async def drops() -> list[float]:
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(*(_open_read_close(client, base, rid, chunks=1) for rid in rids))

    started = time.monotonic()
    closed = asyncio.run(drops())
    assert len(closed) == n
    _wait_for(fake, rids, "ended", timeout=5)
    ended = {r: fake.records[r]["ended"] for r in rids}
    missing = [r for r, t in ended.items() if t is None]
    assert not missing, f"{len(missing)} upstream streams still running after the clients left"
    assert max(ended.values()) - started < 10.0
    late = [r for r, c in zip(rids, closed) if fake.records[r]["disconnected"] - c > 1.0]
    assert not late, f"{len(late)} upstream streams noticed the drop more than 1 s late"
    assert all(fake.records[r]["requests"] == 1 for r in rids)

    async def normal() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(*(
                client.post(f"{base}/v1/chat/completions", json=_body(stream=False), headers=HEADERS)
                for _ in range(n)))

    responses = asyncio.run(normal())
    bad = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not bad, f"{len(bad)} of {n} requests failed after the drops, e.g. {bad[:3]}"
    assert all(r.json()["choices"][0]["message"]["content"] == "pong" for r in responses)

    # The pool holds no connection that is still busy with a dropped stream.
    busy, held = _busy_upstream_connections(app)
    assert busy == 0, f"{busy} upstream connections still busy"
    assert held <= POOL_SIZE
