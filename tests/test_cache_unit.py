"""Response cache, unit layer: the key, the controls, the "ended normally" check, the entry format, the
embedded LRU and the in-process single flight. No sockets (the request-path behaviour is in
test_cache_e2e.py and test_cache_distributed.py)."""
from __future__ import annotations

import asyncio
import base64
import time

import orjson
import pytest

from config import parse_config
from providers import build_adapters
from providers.eventstream import event_frame, exception_frame
from proxy.cache.embedded import LocalCache
from proxy.cache.entry import Entry, complete, decode, encode, stored_headers
from proxy.cache.flight import ENTRY, FAILED, LIVE, Flight
from proxy.cache.key import CachePolicy, cache_control
from proxy.cache.store import HIT, MISS, purge_pattern
from proxy.context import Principal, RequestContext
from proxy.errors import GatewayError

CONFIG = """
providers:
  ollama: {base_url: "http://127.0.0.1:1"}
auth:
  keys:
    - {id: alpha, sha256: "%s"}
    - {id: quiet, sha256: "%s", cache: false}
cache: {enabled: true, %s}
""" % ("a" * 64, "b" * 64, "{extra}")
ADAPTERS = build_adapters()
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def policy(extra: str = "") -> CachePolicy:
    return CachePolicy(parse_config(CONFIG.replace("{extra}", extra), "t.yaml", {}))


def ctx(body: object = CHAT, *, family: str = "openai", path: str = "/v1/chat/completions", key: str = "alpha",
        headers: list[tuple[bytes, bytes]] | None = None, method: str = "POST", metadata: dict[str, str] | None = None,
        model: str = "gpt-4o") -> RequestContext:
    raw = headers or []
    c = RequestContext("r1", family, ADAPTERS[family], method, path, "", raw, header_map=dict(reversed(raw)))
    c.json, c.model, c.principal = body, model, Principal(key, metadata=metadata or {})
    return c


# --- the key --------------------------------------------------------------------------------------------
def test_key_ignores_key_order_and_whitespace_at_every_level() -> None:
    p = policy()
    a = p.request(ctx({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "n": 1}))
    b = p.request(ctx(orjson.loads(b'{ "n" : 1, "messages":[{"content":"hi","role":"user"}],"model":"gpt-4o"}')))
    assert a is not None and b is not None and a.digest == b.digest


@pytest.mark.parametrize("change", [
    lambda c: setattr(c, "json", {**CHAT, "stream": True}),  # the stream flag is part of the body
    lambda c: setattr(c, "json", {**CHAT, "temperature": 1}),
    lambda c: setattr(c, "path", "/v1/completions"),
    lambda c: setattr(c, "query", "beta=true"),
    lambda c: setattr(c, "principal", Principal("other")),  # scope key: another key, another entry
    lambda c: c.header_map.__setitem__(b"accept-encoding", b"gzip"),  # type: ignore[union-attr]
    lambda c: c.header_map.__setitem__(b"x-gateway-cache-namespace", b"ns1"),  # type: ignore[union-attr]
], ids=["stream", "body", "path", "query", "key", "accept-encoding", "namespace"])
def test_what_changes_the_answer_changes_the_key(change) -> None:  # type: ignore[no-untyped-def]
    p = policy()
    base = p.request(ctx())
    other = ctx()
    change(other)
    changed = p.request(other)
    assert base is not None and changed is not None and base.digest != changed.digest


@pytest.mark.parametrize("name,same", [(b"anthropic-version", False), (b"anthropic-beta", False),
                                       (b"x-stainless-retry-count", True), (b"user-agent", True)])
def test_anthropic_headers_that_change_the_answer(name: bytes, same: bool) -> None:
    p = policy()
    body = {"model": "claude", "max_tokens": 5, "messages": []}
    a = p.request(ctx(body, family="anthropic", path="/v1/messages", headers=[(name, b"one")]))
    b = p.request(ctx(body, family="anthropic", path="/v1/messages", headers=[(name, b"two")]))
    assert a is not None and b is not None and (a.digest == b.digest) is same


@pytest.mark.parametrize("name,same", [(b"accept", False), (b"x-amzn-bedrock-trace", False),
                                       (b"x-amzn-bedrock-guardrailidentifier", False), (b"x-amz-date", True)])
def test_bedrock_headers_that_change_the_answer(name: bytes, same: bool) -> None:
    p = policy()
    path = "/model/anthropic.claude-v2%3A1/invoke"
    a = p.request(ctx({"prompt": "x"}, family="bedrock", path=path, headers=[(name, b"one")]))
    b = p.request(ctx({"prompt": "x"}, family="bedrock", path=path, headers=[(name, b"two")]))
    assert a is not None and b is not None and (a.digest == b.digest) is same


def test_scopes_team_and_global() -> None:
    team = policy("scope: team")
    a = team.request(ctx(key="alpha", metadata={"team": "research"}))
    b = team.request(ctx(key="beta", metadata={"team": "research"}))
    lone = team.request(ctx(key="gamma"))  # no team: its own key's scope
    assert a and b and lone and a.digest == b.digest and a.scope == "t.research" and lone.scope == "k.gamma"
    g = policy("scope: global")
    x, y = g.request(ctx(key="alpha")), g.request(ctx(key="beta"))
    assert x and y and x.digest == y.digest and x.entry_key.startswith("llmgw:{llmgw}:cache:e:g:-:")
    odd = policy().request(ctx(key="a:b*c"))
    assert odd and odd.scope.startswith("k~")  # never a glob or separator character inside a key name


@pytest.mark.parametrize("case", [
    dict(method="GET"),
    dict(path="/v1/models"),
    dict(family="anthropic", path="/v1/messages/count_tokens", body={"model": "m", "messages": []}),
    dict(family="bedrock", path="/model/m/count-tokens", body={"input": {}}),
    dict(family="ollama", path="/api/show", body={"model": "m"}),
    dict(path="/v1/responses", body={"model": "m", "input": "x", "previous_response_id": "resp_1"}),
    dict(path="/v1/responses", body={"model": "m", "input": "x", "background": True}),
    dict(path="/v1/responses", body={"model": "m", "input": "x", "store": True}),
    dict(body=None),
    dict(key="quiet"),  # auth.keys[].cache: false
    dict(metadata={"cache": "false"}),  # a managed key's switch
    dict(headers=[(b"cache-control", b"no-store")]),
], ids=["get", "model-list", "count-tokens", "bedrock-count", "ollama-show", "previous-response", "background",
        "store", "no-body", "key-off", "managed-key-off", "no-store"])
def test_bypassed(case: dict) -> None:  # type: ignore[type-arg]
    body = case.pop("body", CHAT)
    assert policy().request(ctx(body, **case)) is None


def test_models_filter_reads_ollama_latest() -> None:
    p = policy("models: [llama3.2]")
    assert p.request(ctx({"model": "llama3.2:latest"}, family="ollama", path="/api/chat", model="llama3.2:latest"))
    assert p.request(ctx({"model": "qwen"}, family="ollama", path="/api/chat", model="qwen")) is None


# --- controls ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values,expected", [
    ([b"no-cache"], (True, False, -1)),
    ([b"No-Store"], (False, False, -1)),
    ([b"max-age=5"], (True, True, 5000)),
    ([b'max-age="7"'], (True, True, 7000)),
    ([b"max-age=5, max-age=3"], (True, True, 3000)),
    ([b"max-age=9", b"no-cache"], (True, False, 9000)),  # several field lines
    ([b"max-age=-1"], (True, True, -1)),  # malformed: ignored
    ([b"max-age=abc, private"], (True, True, -1)),
    ([b"max-age=\xb2"], (True, True, -1)),  # a non-ASCII digit is no number
    ([b"max-age=" + b"9" * 500], (True, True, 10 * 365 * 86400 * 1000)),  # capped, never parsed whole
    ([b",,;=,"], (True, True, -1)),
])
def test_cache_control(values: list[bytes], expected: tuple[bool, bool, int]) -> None:
    assert cache_control(values) == expected


@pytest.mark.parametrize("name,value", [
    (b"x-gateway-cache-ttl", b"-1"), (b"x-gateway-cache-ttl", b"0"), (b"x-gateway-cache-ttl", b"1.5"),
    (b"x-gateway-cache-ttl", b"9" * 5000), (b"x-gateway-cache-ttl", b"31536001"), (b"x-gateway-cache-ttl", b""),
    (b"x-gateway-cache-namespace", b"a b"), (b"x-gateway-cache-namespace", b"x" * 10240),
    (b"x-gateway-cache-namespace", b"a:b"), (b"x-gateway-cache-namespace", b"*"),
])
def test_malformed_gateway_controls_are_caller_errors(name: bytes, value: bytes) -> None:
    with pytest.raises(GatewayError) as err:
        policy().request(ctx(headers=[(name, value)]))
    assert err.value.code == "caller_invalid_request" and err.value.status == 400


def test_controls_reach_the_request() -> None:
    req = policy("ttl: 2m").request(ctx(headers=[(b"x-gateway-cache-ttl", b"30"), (b"cache-control", b"max-age=4"),
                                                 (b"x-gateway-cache-namespace", b"team.a-1")]))
    assert req and (req.ttl_ms, req.max_age_ms, req.read, req.namespace) == (30000, 4000, True, "n.team.a-1")
    assert policy("ttl: 2m").request(ctx()).ttl_ms == 120000  # type: ignore[union-attr]


# --- "ended normally" ---------------------------------------------------------------------------------
SSE = [(b"content-type", b"text/event-stream")]
NDJSON = [(b"content-type", b"application/x-ndjson")]
AWS = [(b"content-type", b"application/vnd.amazon.eventstream")]


def chunk(obj: dict) -> bytes:  # type: ignore[type-arg]
    return event_frame("chunk", orjson.dumps({"bytes": base64.b64encode(orjson.dumps(obj)).decode()}))


@pytest.mark.parametrize("family,path,headers,body,ok", [
    ("openai", "/v1/chat/completions", SSE, b'data: {"choices":[]}\n\ndata: [DONE]\n\n', True),
    ("openai", "/v1/chat/completions", SSE, b'data: {"choices":[]}\n\n', False),  # cut before [DONE]
    ("openai", "/v1/chat/completions", SSE, b'data: {"error":{"message":"x"}}\n\ndata: [DONE]\n\n', False),
    ("openai", "/v1/responses", SSE, b"event: response.created\ndata: {}\n\nevent: response.completed\ndata: {}\n\n", True),
    ("openai", "/v1/responses", SSE, b"event: response.created\ndata: {}\n\nevent: response.failed\ndata: {}\n\n", False),
    ("openai", "/v1/responses", SSE, b"event: error\ndata: {}\n\nevent: response.completed\ndata: {}\n\n", False),
    ("anthropic", "/v1/messages", SSE, b"event: message_start\ndata: {}\n\nevent: message_stop\ndata: {}\n\n", True),
    ("anthropic", "/v1/messages", SSE, b"event: message_stop\ndata: {}\n\nevent: ping\ndata: {}\n\n", True),
    ("anthropic", "/v1/messages", SSE, b"event: message_start\ndata: {}\n\nevent: error\ndata: {}\n\n", False),
    ("anthropic", "/v1/messages", SSE, b"event: message_start\ndata: {}\n\n", False),
    ("ollama", "/api/chat", NDJSON, b'{"done":false}\n{"done":true}\n', True),
    ("ollama", "/api/chat", NDJSON, b'{"done":false}\n', False),
    ("ollama", "/api/chat", NDJSON, b'{"done":false}\n{"error":"boom"}\n', False),
    ("ollama", "/api/chat", NDJSON, b'{"done":false}\n{"done":tr', False),
    ("bedrock", "/model/m/converse-stream", AWS, event_frame("messageStart", b"{}") + event_frame("messageStop", b"{}")
     + event_frame("metadata", b"{}"), True),
    ("bedrock", "/model/m/converse-stream", AWS, event_frame("messageStart", b"{}"), False),
    ("bedrock", "/model/m/converse-stream", AWS, event_frame("messageStop", b"{}")
     + exception_frame("throttlingException", b"{}"), False),
    ("bedrock", "/model/m/converse-stream", AWS, (event_frame("messageStop", b"{}") * 2)[:-3], False),  # torn frame
    ("bedrock", "/model/m/invoke-with-response-stream", AWS,
     chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 1}}), True),
    ("bedrock", "/model/m/invoke-with-response-stream", AWS, chunk({"type": "content_block_delta"}), False),
    ("openai", "/v1/chat/completions", [(b"content-type", b"application/json"), (b"content-length", b"2")], b"{}", True),
    ("openai", "/v1/chat/completions", [(b"content-type", b"application/json"), (b"content-length", b"9")], b"{}", False),
    ("openai", "/v1/chat/completions", [(b"content-type", b"application/json")], b"", False),
    ("openai", "/v1/chat/completions", [*SSE, (b"content-encoding", b"br")], b"data: [DONE]\n\n", False),
])
def test_complete(family: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, ok: bool) -> None:
    assert complete(family, path, headers, body) is ok


def test_compressed_stream_is_judged_inflated() -> None:
    import gzip

    body = gzip.compress(b'data: {"choices":[]}\n\ndata: [DONE]\n\n')
    assert complete("openai", "/v1/chat/completions", [*SSE, (b"content-encoding", b"gzip")], body)
    assert not complete("openai", "/v1/chat/completions", [*SSE, (b"content-encoding", b"gzip")], body[:-8])


# --- the entry ------------------------------------------------------------------------------------------
def test_entry_round_trip_and_garbage() -> None:
    e = Entry(200, ((b"content-type", b"text/event-stream"), (b"x-request-id", b"\xe9")), b"\x00data\xff", True,
              10, 20, "openai", 1700000000.5)
    assert decode(encode(e)) == e
    for junk in (b"", b"\x00\x00\x00\x05{}", b"\x00\x00\x00\x02[]abc", b"\xff" * 10):
        with pytest.raises(ValueError):
            decode(junk)


def test_stored_headers_drop_framing_and_our_own() -> None:
    kept = stored_headers([(b"content-type", b"a"), (b"content-length", b"3"), (b"x-gateway-request-id", b"r"),
                           (b"x-ratelimit-remaining-requests", b"9"), (b"age", b"3"), (b"x-request-id", b"up")],
                          (b"ratelimit", b"x-ratelimit-"))
    assert kept == ((b"content-type", b"a"), (b"x-request-id", b"up"))


# --- the embedded store ------------------------------------------------------------------------------------
def request(key: str, ttl_ms: int = 60000, read: bool = True, max_age_ms: int = -1) -> object:
    from proxy.cache.key import CacheRequest

    return CacheRequest(key, f"llmgw:{{llmgw}}:cache:e:k.a:-:{key}", "k.a", "-", read, max_age_ms, ttl_ms)


def entry(size: int) -> Entry:
    return Entry(200, (), b"x" * size, False, created=time.time())


def test_lru_bound_and_eviction_order() -> None:
    sizes: list[int] = []
    cache = LocalCache(3000)
    cache.observer.cache_bytes = sizes.append  # type: ignore[method-assign]
    for name in ("a", "b", "c"):
        cache.put(request(name), entry(700))  # type: ignore[arg-type]
    assert cache.get(request("a")).kind == HIT  # type: ignore[arg-type]  # a is now the most recent
    cache.put(request("d"), entry(700))  # type: ignore[arg-type]  # evicts b, the least recently used
    assert [cache.get(request(n)).kind for n in "abcd"] == [HIT, MISS, HIT, HIT]  # type: ignore[arg-type]
    assert cache.bytes <= 3000 and sizes[-1] == cache.bytes
    cache.put(request("huge"), entry(5000))  # type: ignore[arg-type]  # larger than the bound: not stored
    assert cache.get(request("huge")).kind == MISS  # type: ignore[arg-type]


def test_ttl_max_age_and_no_cache() -> None:
    cache = LocalCache(10**6)
    cache.put(request("a", ttl_ms=1), entry(10))  # type: ignore[arg-type]
    time.sleep(0.01)
    assert cache.get(request("a")).kind == MISS and cache.bytes == 0  # type: ignore[arg-type]
    old = entry(10)._replace(created=time.time() - 100)
    cache.put(request("b"), old)  # type: ignore[arg-type]
    assert cache.get(request("b", max_age_ms=50_000)).kind == MISS  # type: ignore[arg-type]
    found = cache.get(request("b", max_age_ms=200_000))  # type: ignore[arg-type]
    assert found.kind == HIT and found.age == 100
    assert cache.get(request("b", read=False)).kind == MISS  # type: ignore[arg-type]


def test_purge_selects_like_the_redis_pattern() -> None:
    from proxy.cache.key import CacheRequest

    cache = LocalCache(10**6)
    for scope, ns in (("k.a", "-"), ("k.a", "n.x"), ("k.b", "n.x"), ("g", "-")):
        cache.put(CacheRequest("d", f"llmgw:{{llmgw}}:cache:e:{scope}:{ns}:d{scope}{ns}", scope, ns, True, -1, 60000),
                  entry(1))
    assert asyncio.run(cache.purge(key_id="a")) == 2
    assert asyncio.run(cache.purge(namespace="x")) == 1
    assert asyncio.run(cache.purge()) == 1 and not cache.entries
    assert purge_pattern("a") == "llmgw:{llmgw}:cache:e:k.a:*"


# --- single flight ---------------------------------------------------------------------------------------
def test_flight_states_and_capture() -> None:
    async def run() -> None:
        sent: list[dict] = []  # type: ignore[type-arg]

        async def send(message: dict) -> None:  # type: ignore[type-arg]
            sent.append(message)

        flight = Flight()
        capture = flight.upstream(send, b"miss", 10)
        event = flight.wait_event()
        await capture({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]})
        assert event.is_set() and flight.state == LIVE and sent[0]["headers"][-1] == (b"x-gateway-cache", b"miss")
        flight.followers = 1
        await capture({"type": "http.response.body", "body": b"0123456789abc", "more_body": True})
        assert flight.overflow and flight.chunks == [b"0123456789abc"]  # kept while followed, never stored
        flight.followers = 0
        await capture({"type": "http.response.body", "body": b"more", "more_body": False})
        assert flight.complete and flight.chunks == [b"0123456789abc"] and not flight.joinable
        flight.finish(True, None, (1, 2), "d")
        assert flight.done and flight.state == FAILED  # nobody followed and nothing stored

        failed = Flight().upstream(send, b"miss", 10)
        await failed({"type": "http.response.start", "status": 500, "headers": []})
        assert failed.state == FAILED and not failed.joinable
        stored = Flight()
        stored.finish(True, entry(1), (0, 0), "")
        assert stored.state == ENTRY and stored.origin == "coalesced"
        stored.finish(False, None, (0, 0), "")  # an answered flight stays answered
        assert stored.state == ENTRY and stored.ok

    asyncio.run(run())


def test_a_full_embedded_cache_costs_collections_nothing() -> None:
    """Stored entries are plain tuples: after one look the collector no longer tracks them."""
    import gc

    cache = LocalCache(10**6)
    for name in "abc":
        cache.put(request(name), Entry(200, ((b"content-type", b"x"),), b"body", False, 1, 2, "d", time.time()))  # type: ignore[arg-type]
    gc.collect()
    assert not any(gc.is_tracked(item) for item in cache.entries.values())
