"""Rate limiting in one gateway process: the conformance checks on both stores, native headers of
every family, token reconciliation, concurrency caps, the admin API and the `limits` CLI.

The conformance tests (`backend` fixture) run twice: on the embedded store (no `state.redis_url`:
fakeredis running the same Lua) and on a test-owned redis-server. The gateway is real (uvicorn on a
socket), the upstream is the simulated provider, and the clients are the official SDKs; raw httpx
is used where exact request bytes matter (token estimates).

Token buckets are read three ways: through the gateway itself (a probe request whose real usage
equals its estimate, so it settles at exactly its reservation; the bucket before it is
`limit - x-ratelimit-remaining-tokens - probe estimate`), with `Store.usage()` (`tokens_ahead_ms`), and
with `llm-gateway limits get SCOPE --json` (`usage.tokens_in_bucket`). A bucket holding T tokens
drains at tpm/60 tokens per second, so expected values are computed from the elapsed time.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import anthropic
import boto3
import httpx
import openai
import orjson
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from proxy.state import live_limits
from config import parse_config
from proxy.state.store import Store, limits_key
from tests.conftest import (CLIENT_AKID, CLIENT_AWS_SECRET, GATEWAY_KEY, GATEWAY_KEY_SHA, UPSTREAM_AKID,
                            UPSTREAM_ANTHROPIC_KEY, UPSTREAM_AWS_SECRET, UPSTREAM_OLLAMA_KEY, UPSTREAM_OPENAI_KEY)

AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
GO_DURATION = re.compile(r"^(\d+ms|\d+(\.\d+)?s|\d+m\d+(\.\d+)?s)$")
PROBE = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "probe"}], "max_tokens": 8})
PROBE_EST = len(PROBE) // 4 + 8  # the mock answers 8 words: real usage == the estimate
PROMPT = "Tell me about rate limits. " * 16  # ~430 characters: ~110 prompt tokens
ADMIN_KEY = "gw-admin-test-key-123"


def secret_sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def gateway_yaml(upstream: str, redis_url: str = "", *, rpm: int | None = None, tpm: int | None = None,
                 key_limits: dict[str, int] | None = None, max_concurrent: int | None = None,
                 providers: str | None = None, admin_key: str = "", extra_keys: str = "", state: str = "") -> str:
    limits = {k: v for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm)) if v is not None}
    concurrency = f", max_concurrent: {max_concurrent}" if max_concurrent else ""
    # These tests are about figures, not deadlines: the gateway runs in this process beside the SDK
    # and the mock, and on a loaded machine the first call (connect, script load) can outlast 250 ms.
    timeout = ", redis_timeout: 2s" if redis_url and "redis_timeout" not in state else ""
    providers = providers or f"""
  openai: {{type: openai, base_url: "{upstream}/v1", api_key: {UPSTREAM_OPENAI_KEY}}}
  anthropic: {{type: anthropic, base_url: "{upstream}", api_key: {UPSTREAM_ANTHROPIC_KEY}}}
  bedrock: {{type: bedrock, base_url: "{upstream}", region: us-east-1, aws_access_key_id: {UPSTREAM_AKID},
            aws_secret_access_key: {UPSTREAM_AWS_SECRET}}}
  ollama: {{type: ollama, base_url: "{upstream}", api_key: {UPSTREAM_OLLAMA_KEY}}}"""
    return f"""
gateway: {{timeout: 30s, rate_limit: {json.dumps(limits)}}}
state: {{redis_url: "{redis_url}"{', ' + state if state else ''}{timeout}}}
auth:
  admin_key: "{admin_key}"
  keys:
    - {{id: team-test, sha256: {GATEWAY_KEY_SHA}, aws_access_key_id: {CLIENT_AKID},
       aws_secret_access_key: {CLIENT_AWS_SECRET}, rate_limit: {json.dumps(key_limits or {})}{concurrency}}}
{extra_keys}
providers:{providers}
"""


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The conformance axis: the embedded store (no Redis URL) or a test-owned redis-server."""
    if request.param == "embedded":
        return {"name": "embedded", "url": ""}
    info = request.getfixturevalue("redis_server")
    return {"name": "redis", "url": info["url"], "port": info["port"], "info": info}


def oai(base: str, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def chat(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=16, **extra)


def parse_ietf(headers: Any) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers-11) as {name: {param: value}}."""
    def items(value: str) -> dict[str, dict[str, str]]:
        out = {}
        for item in value.split(","):
            name, *params = item.strip().split(";")
            out[name.strip('"')] = dict(p.split("=", 1) for p in params)
        return out
    return items(headers["ratelimit-policy"]), items(headers["ratelimit"])


def check_openai_headers(headers: Any, *, limit: int, remaining: int) -> None:
    assert int(headers["x-ratelimit-limit-requests"]) == limit
    assert int(headers["x-ratelimit-remaining-requests"]) == remaining
    assert GO_DURATION.match(headers["x-ratelimit-reset-requests"]), headers["x-ratelimit-reset-requests"]
    policy, state = parse_ietf(headers)
    assert policy["requests"] == {"q": str(limit), "w": "60"}
    assert int(state["requests"]["r"]) == remaining and 0 <= int(state["requests"]["t"]) <= 60


def check_429(headers: Any, code: str = "policy_rate_limited") -> float:
    """The common 429 contract; returns retry-after-ms."""
    assert 1 <= int(headers["retry-after"]) <= 60
    ms = int(headers["retry-after-ms"])
    assert 0 < ms <= 60000 and int(headers["retry-after"]) == max(1, math.ceil(ms / 1000))
    assert headers["x-should-retry"] == "true"
    assert headers["x-gateway-error"] == code
    return ms


# --- token bucket readers ----------------------------------------------------------------------
class Charges:
    """What a bucket should hold: tokens charged since `first` (monotonic bounds of the first charge)."""

    def __init__(self, tpm: int) -> None:
        self.tpm, self.total, self.first = tpm, 0.0, None

    def add(self, tokens: float, t_lo: float, t_hi: float) -> None:
        self.total += tokens
        if self.first is None:
            self.first = (t_lo, t_hi)

    def expected(self, t_lo: float, t_hi: float) -> tuple[float, float]:
        """Bounds for a reading taken between t_lo and t_hi (the bucket never drained meanwhile)."""
        rate = self.tpm / 60.0
        assert self.first is not None
        return (self.total - (t_hi - self.first[0]) * rate - 1.5, self.total - max(0.0, t_lo - self.first[1]) * rate + 1.5)


def probe(base: str, key: str = GATEWAY_KEY, headers: dict[str, str] | None = None) -> tuple[httpx.Response, float, float]:
    t_lo = time.monotonic()
    r = httpx.post(f"{base}/v1/chat/completions", content=PROBE, timeout=30,
                   headers={"Authorization": f"Bearer {key}", "content-type": "application/json", **(headers or {})})
    return r, t_lo, time.monotonic()


def read_bucket(base: str, charges: Charges, key: str = GATEWAY_KEY, timeout: float = 2.0) -> float:
    """Poll (reconcile runs after the response, in the background) until the probe-read bucket is
    within the expected bounds; every probe is itself a charge of exactly PROBE_EST."""
    deadline = time.monotonic() + timeout
    while True:
        r, t_lo, t_hi = probe(base, key)
        if r.status_code == 200:
            assert r.json()["usage"]["total_tokens"] == PROBE_EST
            assert int(r.headers["x-ratelimit-limit-tokens"]) == charges.tpm
            bucket = charges.tpm - int(r.headers["x-ratelimit-remaining-tokens"]) - PROBE_EST
            lo, hi = charges.expected(t_lo, t_hi)
            charges.add(PROBE_EST, t_lo, t_hi)
            if lo <= bucket <= hi:
                return bucket
            last = f"the bucket held {bucket} tokens, expected {lo:.1f}..{hi:.1f}"
        else:
            assert r.status_code == 429, r.text
            last = "the probe was refused: the bucket is still full"
        assert time.monotonic() < deadline, f"not settled after {timeout}s: {last}"
        time.sleep(0.1)


def store_for(url: str) -> Store:
    return Store(parse_config(f'state: {{redis_url: "{url}", redis_timeout: 2s}}\n', "store.yaml", {}))


def store_usage(url: str, scope: str) -> dict[str, float]:
    async def run() -> dict[str, float]:
        store = store_for(url)
        try:
            return await live_limits.usage(store, scope)
        finally:
            await store.aclose()
    return asyncio.run(run())


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)


# --- conformance: both stores ------------------------------------------------------------------
def test_admits_up_to_limit_then_native_429(backend: dict[str, Any], mock_upstream: str,
                                            make_gateway: Callable[..., str]) -> None:
    base = make_gateway(gateway_yaml(mock_upstream, backend["url"], rpm=5, tpm=100000))
    client = oai(base)
    for i in range(5):
        raw = chat(client)
        assert raw.status_code == 200
        check_openai_headers(raw.headers, limit=5, remaining=4 - i)
        assert int(raw.headers["x-ratelimit-limit-tokens"]) == 100000
        assert GO_DURATION.match(raw.headers["x-ratelimit-reset-tokens"])
    with pytest.raises(openai.RateLimitError) as info:
        chat(client)
    err = info.value
    headers = err.response.headers
    check_429(headers)
    check_openai_headers(headers, limit=5, remaining=0)
    assert err.code == "rate_limit_exceeded" and err.type == "requests"
    assert "the gateway (global) on requests per min (RPM): Limit 5, Requested 1" in err.message, err.message
    # a refused request is not counted: the window still holds exactly five
    with pytest.raises(openai.RateLimitError):
        chat(client)
    if backend["name"] == "redis":
        assert store_usage(backend["url"], "global")["requests"] == 5


def test_a_token_limit_says_so(backend: dict[str, Any], mock_upstream: str,
                               make_gateway: Callable[..., str]) -> None:
    """A 429 from a tokens limit names the scope and the limit, and OpenAI's `type` is `tokens`
    (Anthropic and Bedrock clients get the same words in their own shapes)."""
    base = make_gateway(gateway_yaml(mock_upstream, backend["url"], key_limits={"tokens_per_minute": 300}))
    client = oai(base)
    big = [{"role": "user", "content": "word " * 200}]  # ~250 estimated tokens with max_tokens
    assert client.chat.completions.with_raw_response.create(model="gpt-4o", messages=big, max_tokens=8).status_code == 200
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o", messages=big, max_tokens=8)
    err = info.value
    assert err.type == "tokens" and err.code == "rate_limit_exceeded"
    assert "key 'team-test' on tokens per min (TPM): Limit 300, Requested " in err.message, err.message
    anth = anthropic.Anthropic(base_url=base, api_key=GATEWAY_KEY, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as a_info:
        anth.messages.create(model="claude-3-5-sonnet-20241022", max_tokens=8,
                             messages=[{"role": "user", "content": "word " * 200}])
    assert "on tokens per min (TPM): Limit 300" in a_info.value.message


def test_tokens_reconciled_to_real_usage(backend: dict[str, Any], mock_upstream: str,
                                         make_gateway: Callable[..., str], tmp_path: Path) -> None:
    """Reserve the estimate (body/4 + max_tokens), settle at the real usage; max_tokens above the
    whole per-minute budget must not wipe the bucket (the reservation was capped at tpm)."""
    text = gateway_yaml(mock_upstream, backend["url"], tpm=1000)
    base = make_gateway(text)
    client = oai(base)
    charges = Charges(1000)

    t_lo = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": PROMPT}], max_tokens=5000)
    charges.add(raw.parse().usage.total_tokens, t_lo, time.monotonic())
    first = read_bucket(base, charges)  # ~120 real tokens; the estimate was ~5100

    t_lo = time.monotonic()
    usage = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=300).usage
    charges.add(usage.total_tokens, t_lo, time.monotonic())
    read_bucket(base, charges)  # reconcile runs after the response: let it land before the next one
    t_lo = time.monotonic()
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=300, stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage][-1]
    charges.add(usage.total_tokens, t_lo, time.monotonic())
    read_bucket(base, charges)
    ant = anthropic.Anthropic(base_url=base, api_key=GATEWAY_KEY, max_retries=0)
    t_lo = time.monotonic()
    with ant.messages.stream(model="claude-x", max_tokens=300, messages=[{"role": "user", "content": PROMPT}]) as s:
        final = s.get_final_message()
    charges.add(final.usage.input_tokens + final.usage.output_tokens, t_lo, time.monotonic())
    bucket = read_bucket(base, charges)
    assert bucket < 3 * 300  # unreconciled, the three max_tokens alone would be 900
    print(f"FIGURES tokens[{backend['name']}]: first={first:.1f} bucket={bucket:.1f} charged={charges.total:.0f}")
    if backend["name"] != "redis":
        return
    # the same bucket through Store.usage() and through the CLI
    t_lo = time.monotonic()
    usage_now = store_usage(backend["url"], "global")
    lo, hi = charges.expected(t_lo, time.monotonic())
    assert lo <= usage_now["tokens_ahead_ms"] * 1000 / 60000 <= hi
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    t_lo = time.monotonic()
    out = cli("limits", "get", "global", "--config", str(config), "--redis-url", backend["url"], "--json")
    lo, hi = charges.expected(t_lo, time.monotonic())
    assert out.returncode == 0, out.stderr
    reading = json.loads(out.stdout)
    assert reading["key"] == "llmgw:{llmgw}:limits:global"
    assert lo - 0.5 <= reading["usage"]["tokens_in_bucket"] <= hi + 0.5


def test_concurrent_token_reservations_overshoot_at_most_one(backend: dict[str, Any], mock_upstream: str,
                                                            make_gateway: Callable[..., str]) -> None:
    """Ten slow requests at once against 1000 tpm: the atomic reservation admits floor(1000/E) of
    them (E = the estimate), never more than one reservation beyond the limit."""
    base = make_gateway(gateway_yaml(mock_upstream, backend["url"], tpm=1000))
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "y" * 200}], "max_tokens": 240})
    estimate = len(body) // 4 + 240

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(
                f"{base}/v1/chat/completions", content=body,
                headers={**AUTH, "content-type": "application/json", "x-mock-stall-ms": "600"}) for _ in range(10)))

    responses = asyncio.run(burst())
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) + len(refused) == 10
    assert 1000 // estimate <= len(admitted) <= 1000 // estimate + 1
    assert len(admitted) * estimate <= 1000 + estimate
    for r in refused:
        check_429(r.headers)
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    print(f"FIGURES overshoot[{backend['name']}]: estimate={estimate} admitted={len(admitted)}")


def test_aborted_streams_are_charged(backend: dict[str, Any], mock_upstream: str,
                                     make_gateway: Callable[..., str]) -> None:
    """A stream cut by the upstream or closed by the client is charged what was counted, else the
    estimate. Each case has its own key (own token scope)."""
    keys = {name: f"gw-abort-{name}-0123456789" for name in ("cut", "anthropic", "close")}
    extra = "\n".join(f"    - {{id: abort-{n}, sha256: {secret_sha(k)}, rate_limit: {{tokens_per_minute: 1000}}}}"
                      for n, k in keys.items())
    base = make_gateway(gateway_yaml(mock_upstream, backend["url"], extra_keys=extra))

    # 1. OpenAI stream cut by the upstream after two chunks: no usage seen, the estimate stands
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 200,
                         "stream": True, "stream_options": {"include_usage": True}})
    estimate = len(body) // 4 + 200
    charges = Charges(1000)
    t_lo = time.monotonic()
    with httpx.stream("POST", f"{base}/v1/chat/completions", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {keys['cut']}", "content-type": "application/json",
                               "x-mock-cut-after": "2"}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert '"error"' in text and "[DONE]" not in text  # ended with the family's error frame
    charges.add(estimate, t_lo, time.monotonic())
    cut = read_bucket(base, charges, keys["cut"])

    # 2. Anthropic stream cut: message_start counted the input tokens (+1 output): that is charged
    ant = anthropic.Anthropic(base_url=base, api_key=keys["anthropic"], max_retries=0)
    charges = Charges(1000)
    t_lo = time.monotonic()
    counted = None
    with pytest.raises(anthropic.APIError):
        with ant.messages.stream(model="claude-x", max_tokens=200, messages=[{"role": "user", "content": PROMPT}],
                                 extra_headers={"x-mock-cut-after": "2"}) as s:
            for event in s:
                if event.type == "message_start":
                    counted = event.message.usage.input_tokens + event.message.usage.output_tokens
    assert counted is not None
    charges.add(counted, t_lo, time.monotonic())
    counted_bucket = read_bucket(base, charges, keys["anthropic"])

    # 3. The client closes an OpenAI stream after the first chunk: the estimate stands
    charges = Charges(1000)
    t_lo = time.monotonic()
    with httpx.stream("POST", f"{base}/v1/chat/completions", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {keys['close']}", "content-type": "application/json",
                               "x-mock-chunk-interval-ms": "300", "x-mock-chunks": "20"}) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    charges.add(estimate, t_lo, time.monotonic())
    closed = read_bucket(base, charges, keys["close"])
    print(f"FIGURES aborted[{backend['name']}]: estimate={estimate} cut={cut:.1f} "
          f"anthropic_counted={counted} bucket={counted_bucket:.1f} closed={closed:.1f}")


def test_deployment_limits_skip_then_429(backend: dict[str, Any], mock_upstream: str,
                                         make_gateway: Callable[..., str]) -> None:
    providers = f"""
  dep-a: {{type: openai, base_url: "{mock_upstream}/v1", api_key: {UPSTREAM_OPENAI_KEY}, models: [gpt-4o],
          rate_limit: {{requests_per_minute: 2}}}}
  dep-b: {{type: openai, base_url: "{mock_upstream}/v1", api_key: {UPSTREAM_OPENAI_KEY}, models: [gpt-4o],
          rate_limit: {{requests_per_minute: 2}}}}"""
    base = make_gateway(gateway_yaml(mock_upstream, backend["url"], providers=providers))
    client = oai(base)
    first_lo = time.monotonic()
    served = [chat(client).headers["x-gateway-provider"]]
    first_hi = time.monotonic()
    time.sleep(1.2)  # so that the earliest slot frees ~58.8 s from now, not 60
    served += [chat(client).headers["x-gateway-provider"] for _ in range(3)]
    assert sorted(served) == ["dep-a", "dep-a", "dep-b", "dep-b"]
    assert served[:2] == ["dep-a", "dep-a"]  # config order until dep-a is exhausted
    t_lo = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        chat(client)
    t_hi = time.monotonic()
    ms = check_429(info.value.response.headers)
    # the earliest entry (dep-a's first request) frees 60 s after it was made
    assert 60000 - (t_hi - first_lo) * 1000 - 20 <= ms <= 60000 - (t_lo - first_hi) * 1000 + 20
    assert int(info.value.response.headers["retry-after"]) < 60  # not a constant: it tracks the entry
    print(f"FIGURES deployments[{backend['name']}]: served={served} retry_after_ms={ms}")


def test_max_concurrent_per_key(backend: dict[str, Any], mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    base = make_gateway(gateway_yaml(mock_upstream, backend["url"], key_limits={"requests_per_minute": 100},
                                     max_concurrent=2))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            async def one(i: int) -> httpx.Response:
                await asyncio.sleep(0.02 * i)  # spread a little; which two win does not matter
                return await client.post(f"{base}/v1/chat/completions", json={"model": "gpt-4o", "max_tokens": 8,
                                         "messages": [{"role": "user", "content": "hi"}]},
                                         headers={**AUTH, "x-mock-stall-ms": "800"})
            return await asyncio.gather(*(one(i) for i in range(5)))

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429, 429]
    for r in (r for r in responses if r.status_code == 429):
        check_429(r.headers, "policy_concurrency_limited")
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    # the slots are released when the requests settle (in the background)
    deadline = time.monotonic() + 2
    while True:
        r, _, _ = probe(base)
        if r.status_code == 200:
            break
        assert r.headers["x-gateway-error"] == "policy_concurrency_limited" and time.monotonic() < deadline
        time.sleep(0.05)


def test_admin_limits_api(backend: dict[str, Any], mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    base = make_gateway(gateway_yaml(mock_upstream, backend["url"], rpm=50, admin_key=ADMIN_KEY))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(f"{base}/admin/limits", headers=admin).json() == {"limits": {}}
    r = httpx.put(f"{base}/admin/limits/global", headers=admin, json={"requests_per_minute": 3, "tokens_per_minute": 9000})
    assert r.status_code == 200 and r.json() == {"scope": "global", "limits": {"requests_per_minute": 3, "tokens_per_minute": 9000}}
    r = httpx.put(f"{base}/admin/limits/key:team-test", headers=admin, json={"tokens_per_minute": 7000})
    assert r.status_code == 200
    listing = httpx.get(f"{base}/admin/limits", headers=admin).json()["limits"]
    assert listing == {"global": {"requests_per_minute": 3, "tokens_per_minute": 9000},
                       "key:team-test": {"tokens_per_minute": 7000}}
    assert httpx.get(f"{base}/admin/limits/global", headers=admin).json()["limits"]["requests_per_minute"] == 3
    client = oai(base)
    raw = chat(client)  # the override applies to the next request
    check_openai_headers(raw.headers, limit=3, remaining=2)
    assert int(raw.headers["x-ratelimit-limit-tokens"]) == 7000  # key: 7000 is the lower share
    # bad input
    assert httpx.put(f"{base}/admin/limits/global", headers=admin, json={"requests_per_minute": -1}).status_code == 400
    assert httpx.put(f"{base}/admin/limits/global", headers=admin, content=b"{nope").status_code == 400
    assert httpx.put(f"{base}/admin/limits/nonsense", headers=admin, json={"requests_per_minute": 1}).status_code == 400
    # clear: back to the configured 50, and the counter was not reset
    r = httpx.delete(f"{base}/admin/limits/global", headers=admin)
    assert r.status_code == 200 and r.json() == {"scope": "global", "cleared": True}
    assert httpx.delete(f"{base}/admin/limits/global", headers=admin).json()["cleared"] is False
    check_openai_headers(chat(client).headers, limit=50, remaining=48)
    # authentication
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": GATEWAY_KEY}, AUTH):
        r = httpx.get(f"{base}/admin/limits", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.put(f"{base}/admin/limits/global", headers={"Authorization": "Bearer wrong"},
                     json={"requests_per_minute": 1}).status_code == 401
    assert httpx.get(f"{base}/admin/limits/global", headers=admin).json()["limits"] == {}


def test_admin_is_404_without_admin_key(mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    base = make_gateway(gateway_yaml(mock_upstream))
    for method in ("GET", "PUT", "DELETE"):
        for headers in ({}, {"Authorization": f"Bearer {ADMIN_KEY}"}, {"Authorization": "Bearer x"}):
            path = "/admin/limits" if method == "GET" else "/admin/limits/global"
            r = httpx.request(method, base + path, headers=headers, json={"requests_per_minute": 1})
            assert r.status_code == 404, (method, headers, r.status_code)


# --- native headers of every family --------------------------------------------------------------
def test_gateway_rate_limit_headers_replace_the_upstream_accounts(mock_upstream: str,
                                                                  make_gateway: Callable[..., str]) -> None:
    """The simulated provider sends its account's rate-limit headers, as api.openai.com and
    api.anthropic.com do. With limits on, the client gets the gateway's alone (one of each name: two
    would be joined by httpx into "29999, 4"); with no limit, the upstream's pass unchanged."""
    from proxy.mock.anthropic import ACCOUNT_HEADERS as ANTHROPIC_ACCOUNT
    from proxy.mock.openai import ACCOUNT_HEADERS as OPENAI_ACCOUNT

    limited = make_gateway(gateway_yaml(mock_upstream, rpm=5, tpm=100000))
    open_ = make_gateway(gateway_yaml(mock_upstream))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    claude = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{limited}/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 200
        for name, _ in OPENAI_ACCOUNT:
            assert len(r.headers.get_list(name.decode())) == 1, name
        check_openai_headers(r.headers, limit=5, remaining=4)
        assert len(r.headers.get_list("ratelimit")) == len(r.headers.get_list("ratelimit-policy")) == 1
        r = http.post(f"{limited}/v1/messages", json=claude,
                      headers={"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"})
        assert r.status_code == 200
        assert r.headers.get_list("anthropic-ratelimit-requests-limit") == ["5"]
        assert r.headers.get_list("anthropic-ratelimit-requests-remaining") == ["3"]
        assert "anthropic-ratelimit-input-tokens-limit" not in r.headers  # another account's figure: dropped
        # an upstream error relayed natively: the same replacement
        r = http.post(f"{limited}/v1/chat/completions", json=body, headers={**AUTH, "x-mock-fault-status": "400"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "simulated 400 fault"
        assert r.headers.get_list("x-ratelimit-limit-requests") == ["5"]
        assert len(r.headers.get_list("x-ratelimit-remaining-tokens")) == 1
        r = http.post(f"{open_}/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 200 and "ratelimit" not in r.headers
        assert [(k.encode(), v.encode()) for k, v in r.headers.items() if k.startswith("x-ratelimit-")] == OPENAI_ACCOUNT
        r = http.post(f"{open_}/v1/messages", json=claude,
                      headers={"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"})
        assert [(k.encode(), v.encode()) for k, v in r.headers.items()
                if k.startswith("anthropic-ratelimit-")] == ANTHROPIC_ACCOUNT


def test_anthropic_native_rate_limit_headers(mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    base = make_gateway(gateway_yaml(mock_upstream, rpm=2, tpm=50000))
    client = anthropic.Anthropic(base_url=base, api_key=GATEWAY_KEY, max_retries=0)
    for i in range(2):
        raw = client.messages.with_raw_response.create(model="claude-x", max_tokens=16,
                                                       messages=[{"role": "user", "content": "hi"}])
        h = raw.headers
        now = dt.datetime.now(dt.timezone.utc)
        assert int(h["anthropic-ratelimit-requests-limit"]) == 2
        assert int(h["anthropic-ratelimit-requests-remaining"]) == 1 - i
        assert int(h["anthropic-ratelimit-tokens-limit"]) == 50000
        assert 0 < int(h["anthropic-ratelimit-tokens-remaining"]) < 50000
        for kind in ("requests", "tokens"):
            value = h[f"anthropic-ratelimit-{kind}-reset"]
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", value), value  # RFC 3339, UTC
            reset = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            assert now - dt.timedelta(seconds=2) <= reset <= now + dt.timedelta(seconds=62)
        policy, state = parse_ietf(h)
        assert policy["requests"]["q"] == "2" and policy["tokens"]["q"] == "50000"
        assert state["requests"]["r"] == str(1 - i)
        assert "x-ratelimit-limit-requests" not in h  # not the OpenAI family's headers
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    h = info.value.response.headers
    check_429(h)
    assert h["anthropic-ratelimit-requests-remaining"] == "0"
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert info.value.response.json()["type"] == "error"


def test_bedrock_throttling_exception(mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    base = make_gateway(gateway_yaml(mock_upstream, rpm=1))
    # total_max_attempts=1: with {"max_attempts": 1} botocore >= 1.44 would retry once, sleeping up to
    # x-amz-retry-after (capped at +5 s); the contract under test is the single throttled answer
    client = boto3.client("bedrock-runtime", endpoint_url=f"{base}/bedrock", region_name="us-east-1",
                          aws_access_key_id=CLIENT_AKID, aws_secret_access_key=CLIENT_AWS_SECRET,
                          config=BotoConfig(retries={"total_max_attempts": 1}))
    model = "anthropic.claude-3-sonnet-20240229-v1:0"
    messages = [{"role": "user", "content": [{"text": "hi"}]}]
    ok = client.converse(modelId=model, messages=messages, inferenceConfig={"maxTokens": 16})
    headers = ok["ResponseMetadata"]["HTTPHeaders"]
    policy, state = parse_ietf(headers)
    assert policy["requests"]["q"] == "1" and state["requests"]["r"] == "0"
    with pytest.raises(ClientError) as info:
        client.converse(modelId=model, messages=messages, inferenceConfig={"maxTokens": 16})
    err = info.value.response
    assert err["Error"]["Code"] == "ThrottlingException"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 429
    h = err["ResponseMetadata"]["HTTPHeaders"]
    assert 0 < int(h["x-amz-retry-after"]) <= 60000
    assert abs(int(h["x-amz-retry-after"]) - int(h["retry-after-ms"])) <= 1
    assert h["x-amzn-errortype"] == "ThrottlingException"
    assert 1 <= int(h["retry-after"]) <= 60
    assert "ratelimit" in h


def test_ollama_native_429(mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    """Ollama has no rate-limit headers of its own: the IETF fields, and a native `{"error": ...}` 429."""
    import ollama

    base = make_gateway(gateway_yaml(mock_upstream, rpm=1))
    client = ollama.Client(host=f"{base}/ollama", headers=AUTH)
    assert client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=False).message.content
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert info.value.status_code == 429 and "Rate limit exceeded" in info.value.error
    r = httpx.post(f"{base}/ollama/api/chat", headers=AUTH, json={"model": "llama3", "stream": False,
                                                               "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429 and list(r.json()) == ["error"]
    check_429(r.headers)
    policy, state = parse_ietf(r.headers)
    assert policy["requests"]["q"] == "1" and state["requests"]["r"] == "0"


def test_headers_report_most_constraining_scope(mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    """global 100 rpm / 2000 tpm, key 4 rpm / 1,000,000 tpm: requests come from the key (lower
    remaining share), tokens from global."""
    base = make_gateway(gateway_yaml(mock_upstream, rpm=100, tpm=2000,
                                     key_limits={"requests_per_minute": 4, "tokens_per_minute": 1000000}))
    client = oai(base)
    raw = chat(client)
    check_openai_headers(raw.headers, limit=4, remaining=3)
    assert int(raw.headers["x-ratelimit-limit-tokens"]) == 2000
    policy, _ = parse_ietf(raw.headers)
    assert policy["tokens"]["q"] == "2000"
    for _ in range(3):
        chat(client)
    with pytest.raises(openai.RateLimitError) as info:
        chat(client)
    h = info.value.response.headers
    assert h["x-ratelimit-limit-requests"] == "4" and h["x-ratelimit-remaining-requests"] == "0"


# --- the limits CLI ----------------------------------------------------------------------------
def test_limits_cli(redis_server: dict[str, Any], mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    import redis

    url = redis_server["url"]
    base = make_gateway(gateway_yaml(mock_upstream, url, rpm=50))
    r = redis.Redis(port=redis_server["port"], decode_responses=True)
    out = cli("limits", "set", "key:team-test", "--rpm", "7", "--tpm", "900", "--redis-url", url, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"scope": "key:team-test", "limits": {"requests_per_minute": 7, "tokens_per_minute": 900}}
    assert r.hgetall(limits_key("key:team-test")) == {"requests_per_minute": "7", "tokens_per_minute": "900"}
    assert limits_key("key:team-test") == "llmgw:{llmgw}:limits:key:team-test"
    raw = chat(oai(base))
    check_openai_headers(raw.headers, limit=7, remaining=6)
    assert int(raw.headers["x-ratelimit-limit-tokens"]) == 900
    # only one field: the other stays
    assert cli("limits", "set", "key:team-test", "--rpm", "8", "--redis-url", url).returncode == 0
    assert r.hgetall(limits_key("key:team-test")) == {"requests_per_minute": "8", "tokens_per_minute": "900"}
    r.hset(limits_key("model:gpt-4o"), mapping={"requests_per_minute": 30})  # plain redis-cli style
    out = cli("limits", "list", "--redis-url", url, "--json")
    assert json.loads(out.stdout) == {"key:team-test": {"requests_per_minute": 8, "tokens_per_minute": 900},
                                      "model:gpt-4o": {"requests_per_minute": 30}}
    table = cli("limits", "list", "--redis-url", url).stdout
    assert "key:team-test" in table and "model:gpt-4o" in table
    out = cli("limits", "get", "key:team-test", "--redis-url", url, "--json")
    assert json.loads(out.stdout)["usage"]["requests_in_window"] == 1
    out = cli("limits", "clear", "key:team-test", "--redis-url", url, "--json")
    assert json.loads(out.stdout) == {"scope": "key:team-test", "cleared": True}
    assert not r.exists(limits_key("key:team-test"))
    # bad input exits 1 with a message, and changes nothing
    for args in (["set", "global"], ["set", "global", "--rpm", "-3"], ["set", "bogus", "--rpm", "3"]):
        out = cli("limits", *args, "--redis-url", url)
        assert out.returncode == 1 and out.stderr.startswith("error:"), (args, out.stderr)
    assert not r.exists(limits_key("global"))
    free = f"redis://127.0.0.1:{_closed_port()}/0"
    out = cli("limits", "get", "global", "--redis-url", free)
    assert out.returncode == 1 and "unavailable" in out.stderr


def _closed_port() -> int:
    from tests.servers import free_port

    return free_port()
