"""Contract defects, each end to end through real sockets and the official SDKs.

1. A plain (non-stream) answer commits on its first BODY byte: an upstream that sends its 200 head
   and then stalls is a before-first-byte fault. With a healthy second deployment every SDK (openai,
   anthropic, boto3 converse, ollama) gets its answer from it within the `first_byte` timeout; with
   one deployment the client gets a clean native timeout error, never a head and a cut connection.
2. An upstream status the gateway cannot relay (`HTTP/1.1 999 Weird`, from a raw-socket fake) is a
   native 502-class error in the family's shape (`upstream_error`), retried on another deployment
   like a 502, and uvicorn logs no ASGI error.
3. A provider 429 with `Retry-After: 3` on one of two round-robin deployments: nothing more reaches
   it until the 3 s have passed, neither through the replica that saw the 429 nor through another
   one, even when a request that was in flight on it when it was throttled succeeds meanwhile.
   In process (embedded store) and with two gateway processes on a test-owned redis-server.
4. Ollama names: `/api/tags` lists `llama3.2:latest` for a configured `llama3.2` (as Ollama does),
   and `llama3.2` / `llama3.2:latest` route to the same deployment whichever form is configured.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
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
import redis

from proxy.mock import MockApp, MockOptions, build_mock_app
from proxy.state.health import health_key
from tests.conftest import AUTH_YAML, CLIENT_AKID, CLIENT_AWS_SECRET, GATEWAY_KEY
from tests.procs import Proc, Procs, procs  # noqa: F401 - `procs` is a fixture
from tests.servers import serve

FAMILIES = ("openai", "anthropic", "bedrock", "ollama")
MODELS = {"openai": "gpt-4o", "anthropic": "claude-x", "bedrock": "anthropic.claude-3-sonnet-20240229-v1:0",
          "ollama": "llama3.2:latest"}
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
HELLO = "hello contract"
FIRST_BYTE = 0.5
ONE_ATTEMPT = botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=30)


def deployment(family: str, name: str, base: str, **extra: Any) -> str:
    fields: dict[str, Any] = {"openai": {"type": "openai", "base_url": f"{base}/v1", "api_key": "sk-up"},
                              "anthropic": {"type": "anthropic", "base_url": base, "api_key": "sk-ant-up"},
                              "bedrock": {"type": "bedrock", "base_url": base, "region": "us-east-1",
                                          "aws_access_key_id": "AKIAUPSTREAM00000001",
                                          "aws_secret_access_key": "upstream-secret"},
                              "ollama": {"type": "ollama", "base_url": base}}[family]
    return f"  {name}: {json.dumps({**fields, **extra})}\n"


def config(deployments: str, gateway: str = "", state: str = "") -> str:
    return f"""
gateway: {{timeout: 30s{', ' + gateway if gateway else ''}}}
{state}{AUTH_YAML}providers:
{deployments}"""


def chat(family: str, gw: str) -> tuple[str, dict[str, str] | None]:
    """One non-streaming chat call with the family's official SDK, no client retries: (text, headers)."""
    model = MODELS[family]
    if family == "openai":
        raw = openai.OpenAI(base_url=f"{gw}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20) \
            .chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": HELLO}])
        return raw.parse().choices[0].message.content or "", dict(raw.headers)
    if family == "anthropic":
        raw = anthropic.Anthropic(base_url=gw, api_key=GATEWAY_KEY, max_retries=0, timeout=20) \
            .messages.with_raw_response.create(model=model, max_tokens=32, messages=[{"role": "user", "content": HELLO}])
        return "".join(b.text for b in raw.parse().content if b.type == "text"), dict(raw.headers)
    if family == "bedrock":
        out = bedrock(gw).converse(modelId=model, messages=[{"role": "user", "content": [{"text": HELLO}]}])
        return out["output"]["message"]["content"][0]["text"], dict(out["ResponseMetadata"]["HTTPHeaders"])
    o = ollama.Client(host=f"{gw}/ollama", headers=AUTH, timeout=20)
    return o.chat(model=model, messages=[{"role": "user", "content": HELLO}], stream=False).message.content or "", None


def bedrock(gw: str) -> Any:
    return boto3.client("bedrock-runtime", endpoint_url=f"{gw}/bedrock", region_name="us-east-1",
                        aws_access_key_id=CLIENT_AKID, aws_secret_access_key=CLIENT_AWS_SECRET, config=ONE_ATTEMPT)


def failing_chat(family: str, gw: str) -> tuple[int, Any]:
    """A non-streaming chat call that must end in a native error: (HTTP status, error body or code)."""
    try:
        chat(family, gw)
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        return exc.status_code, exc.body
    except botocore.exceptions.ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]
    except ollama.ResponseError as exc:
        return exc.status_code, exc.error
    pytest.fail(f"{family}: the call succeeded")


@pytest.fixture(scope="module")
def healthy() -> Iterator[tuple[MockApp, str]]:
    app = build_mock_app(MockOptions(chunk_interval_ms=0))
    with serve(app, lifespan="off") as base:
        yield app, base


# ---------------------------------------------------------------- 1. commit on the first body byte

async def _head_then_stall(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A plain JSON answer whose head goes out at once and whose body never comes (until the caller leaves)."""
    if scope["type"] != "http":
        return
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")]})
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(receive(), 10)  # http.disconnect
    raise ConnectionAbortedError("the stalled answer is cut")


@pytest.fixture(scope="module")
def stalling() -> Iterator[str]:
    with serve(_head_then_stall, lifespan="off") as base:
        yield base


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_answer_stalled_after_its_head_fails_over(family: str, stalling: str, healthy: tuple[MockApp, str],
                                                        make_gateway: Callable[..., str]) -> None:
    app, base = healthy
    app.records.clear()
    timeouts = {"first_byte": f"{FIRST_BYTE}s", "idle": "3s"}
    gw = make_gateway(config(deployment(family, "stalls", stalling, priority=10, timeouts=timeouts)
                             + deployment(family, "backup", base)))
    for _ in range(2):
        started = time.perf_counter()
        text, headers = chat(family, gw)
        elapsed = time.perf_counter() - started
        assert text.startswith(f"This is a simulated response from {MODELS[family]}"), text
        if headers is not None:
            assert headers["x-gateway-provider"] == "backup"
        assert elapsed < FIRST_BYTE + 2.0, f"failed over only after {elapsed:.2f}s"
    assert len(app.records) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_answer_stalled_after_its_head_is_a_native_timeout(family: str, stalling: str,
                                                                 make_gateway: Callable[..., str]) -> None:
    timeouts = {"first_byte": f"{FIRST_BYTE}s", "idle": "3s"}
    gw = make_gateway(config(deployment(family, "stalls", stalling, timeouts=timeouts), gateway="max_retries: 1"))
    status, error = failing_chat(family, gw)
    if family == "openai":
        assert status == 504 and error["code"] == "upstream_timeout", error
    elif family == "anthropic":
        assert status == 504 and error["error"]["type"] == "timeout_error", error
    elif family == "bedrock":
        assert (status, error) == (408, "ModelTimeoutException")
    else:
        assert status == 504 and error, error


# ---------------------------------------------------------------- 2. a status that cannot be relayed

class WeirdStatus:
    """A raw-socket upstream that answers every request `HTTP/1.1 999 Weird` (no HTTP library could)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                self.requests += 1
                conn.sendall(b"HTTP/1.1 999 Weird\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
                             b"Connection: close\r\n\r\n{\"odd\": 1}\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def weird() -> Iterator[WeirdStatus]:
    server = WeirdStatus()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def asgi_errors() -> Iterator[list[logging.LogRecord]]:
    """What uvicorn logs as errors while the test runs (an app that breaks the ASGI contract)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.ERROR)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("family", FAMILIES)
def test_unrelayable_status_is_a_native_upstream_error(family: str, weird: WeirdStatus,
                                                       make_gateway: Callable[..., str],
                                                       asgi_errors: list[logging.LogRecord]) -> None:
    gw = make_gateway(config(deployment(family, "weird", weird.url), gateway="max_retries: 1"))
    status, error = failing_chat(family, gw)
    assert weird.requests == 2, "retried like a 502 (max_retries: 1)"
    if family == "openai":
        assert status == 502 and error["code"] == "upstream_error" and error["type"] == "server_error", error
    elif family == "anthropic":
        assert status == 502 and error["error"]["type"] == "api_error", error
    elif family == "bedrock":
        assert (status, error) == (503, "ServiceUnavailableException")  # the adapter's native upstream_error
    else:
        assert status == 502 and "999" in error, error
    assert not asgi_errors, [r.getMessage() for r in asgi_errors]


@pytest.mark.parametrize("family", FAMILIES)
def test_unrelayable_status_fails_over(family: str, weird: WeirdStatus, healthy: tuple[MockApp, str],
                                       make_gateway: Callable[..., str]) -> None:
    app, base = healthy
    gw = make_gateway(config(deployment(family, "weird", weird.url, priority=10) + deployment(family, "backup", base)))
    text, headers = chat(family, gw)
    assert text.startswith("This is a simulated response"), text
    assert weird.requests == 1
    if headers is not None:
        assert (headers["x-gateway-provider"], headers["x-gateway-attempts"]) == ("backup", "2")


# ---------------------------------------------------------------- 3. Retry-After, on every replica

OK = MockOptions(chunk_interval_ms=0)
SLOW = MockOptions(chunk_interval_ms=0, latency_ms=1000)  # in flight on "a" when it is throttled
THROTTLED = MockOptions(chunk_interval_ms=0, fault_status=429, retry_after=3)
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": HELLO}], "max_tokens": 8}


class RoundRobinPair:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.a: MockApp = build_mock_app(OK)
        self.b: MockApp = build_mock_app(OK)
        self.a_url = stack.enter_context(serve(self.a, lifespan="off"))
        self.b_url = stack.enter_context(serve(self.b, lifespan="off"))

    def config(self, state: str = "") -> str:
        return config(deployment("openai", "a", self.a_url) + deployment("openai", "b", self.b_url),
                      gateway="routing_strategy: round_robin, circuit_base_ejection: 30s", state=state)


@pytest.fixture
def pair() -> Iterator[RoundRobinPair]:
    with contextlib.ExitStack() as stack:
        yield RoundRobinPair(stack)


def post(url: str) -> tuple[int, str | None]:
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=20)
    return r.status_code, r.headers.get("x-gateway-provider")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def throttle_scenario(pair: RoundRobinPair, urls: list[str]) -> None:
    """One request in flight on "a"; then "a" answers 429 + Retry-After: 3 once; then 20 sequential
    requests over the next 2 s (round robin over `urls`) must all be served by "b"; after the 3 s,
    "a" serves again."""
    pair.a.options = SLOW
    in_flight: list[tuple[int, str | None]] = []
    thread = threading.Thread(target=lambda: in_flight.append(post(urls[0])))
    thread.start()  # round robin starts at "a" on a fresh gateway
    wait_for(lambda: len(pair.a.records) == 1, 5, "the slow request to reach a")
    pair.a.options = THROTTLED
    for i in range(4):  # until a replica's rotation reaches "a": its 429 fails over to "b"
        assert post(urls[(i + 1) % len(urls)]) == (200, "b")
        if len(pair.a.records) == 2:
            break
    assert len(pair.a.records) == 2, "a was throttled once"
    throttled_at = time.monotonic()
    served = []
    for i in range(20):  # the in-flight request succeeds on "a" in the middle of these
        served.append(post(urls[i % len(urls)]))
        time.sleep(max(0.0, throttled_at + 0.1 * (i + 1) - time.monotonic()))
    assert time.monotonic() - throttled_at < 2.9, "the window must stay inside the Retry-After"
    thread.join(10)
    assert in_flight == [(200, "a")], in_flight
    assert served == [(200, "b")] * 20, served
    reached = len(pair.a.records)
    assert reached == 2, f"{reached - 2} request(s) reached the throttled deployment before its Retry-After"
    pair.a.options = OK
    time.sleep(max(0.0, throttled_at + 3.3 - time.monotonic()))
    again = [post(urls[i % len(urls)]) for i in range(6)]
    assert (200, "a") in again, again


def test_retry_after_keeps_a_deployment_out_in_process(pair: RoundRobinPair, make_gateway: Callable[..., str]) -> None:
    throttle_scenario(pair, [make_gateway(pair.config())])


def test_retry_after_keeps_a_deployment_out_on_every_replica(pair: RoundRobinPair, procs: Procs,  # noqa: F811
                                                             redis_server: dict[str, Any]) -> None:
    g1, g2 = procs.gateways(pair.config(state=f'state: {{redis_url: "{redis_server["url"]}"}}\n'), 2)
    throttle_scenario(pair, [g1.url, g2.url])
    rds = redis.Redis(port=redis_server["port"], decode_responses=True)
    try:
        state = rds.hgetall(health_key("a"))
        assert int(state["ejections"]) == 1, state
    finally:
        rds.close()


# ---------------------------------------------------------------- 4. Ollama model names

@pytest.fixture
def ollama_pair() -> Iterator[tuple[MockApp, MockApp, str, str]]:
    one, two = build_mock_app(OK), build_mock_app(OK)
    with serve(one, lifespan="off") as one_url, serve(two, lifespan="off") as two_url:
        yield one, two, one_url, two_url


def test_ollama_names_without_a_tag_mean_latest(ollama_pair: tuple[MockApp, MockApp, str, str],
                                                make_gateway: Callable[..., str]) -> None:
    one, two, one_url, two_url = ollama_pair
    gw = make_gateway(config(deployment("ollama", "tagless", one_url, models=["llama3.2"])
                             + deployment("ollama", "tagged", two_url, models=["mistral:latest", "qwen2.5:7b"])))
    client = ollama.Client(host=f"{gw}/ollama", headers=AUTH, timeout=20)
    listed = [m.model for m in client.list().models]
    assert sorted(listed) == ["llama3.2:latest", "mistral:latest", "qwen2.5:7b"], listed
    for model, app in (("llama3.2:latest", one), ("llama3.2", one), ("mistral", two), ("mistral:latest", two)):
        one.records.clear()
        two.records.clear()
        out = client.chat(model=model, messages=[{"role": "user", "content": HELLO}], stream=False)
        assert out.message.content.startswith(f"This is a simulated response from {model}"), out
        assert (len(one.records), len(two.records)) == ((1, 0) if app is one else (0, 1)), model
    with pytest.raises(ollama.ResponseError) as info:  # another tag is another model
        client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": HELLO}], stream=False)
    assert info.value.status_code == 404


def test_an_ollama_allowlist_reads_a_name_without_a_tag_as_latest() -> None:
    """A key allowed `llama3.2` may call `llama3.2:latest` and the reverse; another tag stays out."""
    from proxy.context import Principal

    short, full = Principal("a", models=("llama3.2",)), Principal("b", models=("llama3.2:latest",))
    for p in (short, full):
        assert p.allows("ollama", "llama3.2") and p.allows("ollama", "llama3.2:latest")
        assert not p.allows("ollama", "llama3.2:1b")
    assert not short.allows("openai", "llama3.2:latest"), "only Ollama names have implied tags"
