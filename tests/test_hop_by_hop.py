"""Hop-by-hop headers never pass the gateway, in either direction (RFC 9110 7.6.1).

A fake upstream (our own ASGI app on a real socket) records the headers it receives and answers with the
headers the request body asks for, so one property test drives both directions: hop-by-hop fields and every
name listed in `Connection` must be dropped, every other custom header must pass with its value.
"""
from __future__ import annotations

import json
import threading
import uuid
from typing import Any, Callable, Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA
from tests.servers import serve

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "proxy-connection"}
# What a client may send without breaking its own framing (no transfer-encoding / content-length, and an
# Upgrade that Connection does not list, so no server treats it as a protocol switch).
REQUEST_HOP = {"keep-alive": "timeout=5, max=100", "proxy-authorization": "Basic Zm9vOmJhcg==",
               "te": "trailers", "trailer": "x-checksum", "upgrade": "h2c", "proxy-connection": "keep-alive"}
RESPONSE_HOP = {"keep-alive": "timeout=5", "proxy-authenticate": 'Basic realm="upstream"', "trailer": "x-checksum",
                "upgrade": "h2c", "proxy-connection": "keep-alive", "te": "trailers"}
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


CLIENT = httpx.Client(timeout=10)  # one pooled client: fifty examples stay fast


class HeaderEcho:
    """Records request headers by `x-probe`; answers with the `respond_headers` the JSON body asks for."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[str, str]]] = {}
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        probe = dict(headers).get("x-probe", "")
        with self.lock:
            self.seen[probe] = headers
        asked = json.loads(body).get("respond_headers", []) if body else []
        payload = json.dumps(COMPLETION).encode()
        out = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in asked]
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[HeaderEcho, str]]:
    app = HeaderEcho()
    with serve(app, lifespan="off") as base:
        yield app, base


@pytest.fixture
def gateway(echo: tuple[HeaderEcho, str], make_gateway: Callable[..., str]) -> str:
    _, base = echo
    return make_gateway(f"""
auth: {{keys: [{{id: t, sha256: {GATEWAY_KEY_SHA}}}]}}
providers:
  openai: {{type: openai, base_url: "{base}/v1", api_key: sk-up-openai}}
  anthropic: {{type: anthropic, base_url: "{base}", api_key: sk-up-anthropic}}
  ollama: {{type: ollama, base_url: "{base}"}}
""")


def exchange(gateway: str, echo: HeaderEcho, path: str, request_headers: list[tuple[str, str]],
             respond_headers: list[tuple[str, str]], extra: dict[str, str] | None = None) -> tuple[
                 list[tuple[str, str]], httpx.Response]:
    probe = uuid.uuid4().hex
    body = json.dumps({"model": "gpt-4o", "messages": [], "stream": False, "respond_headers": respond_headers})
    headers = [("authorization", f"Bearer {GATEWAY_KEY}"), ("content-type", "application/json"),
               ("x-probe", probe), *(extra or {}).items(), *request_headers]
    response = CLIENT.post(gateway + path, content=body.encode(), headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == COMPLETION
    with echo.lock:
        return echo.seen.pop(probe), response


def listed_in_connection(headers: list[tuple[str, str]]) -> set[str]:
    return {t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(",") if t.strip()}


def check(sent: list[tuple[str, str]], received: list[tuple[str, str]]) -> None:
    """What `received` must hold after one hop, given what was `sent` into it."""
    listed = listed_in_connection(sent)
    # a hop may carry its own connection management ("keep-alive"), never what the previous hop listed
    own = [v for k, v in received if k.lower() == "connection"]
    assert all(v.lower() in ("keep-alive", "close") for v in own), own
    names = {k.lower() for k, _ in received} - {"connection"}
    assert not names & (HOP_BY_HOP - {"transfer-encoding"}), names & HOP_BY_HOP
    assert not names & listed, names & listed
    for name, value in sent:
        name = name.lower()
        if name.startswith("x-h") and name not in listed:
            assert [v for k, v in received if k.lower() == name] == [v for k, v in sent if k.lower() == name], name


names = st.from_regex(r"x-h[a-z0-9]{1,8}(-[a-z0-9]{1,5})?", fullmatch=True)
values = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9;=/._-]{0,16}", fullmatch=True)


@st.composite
def header_sets(draw: Any, hop: dict[str, str]) -> list[tuple[str, str]]:
    """Custom headers, some hop-by-hop ones, and Connection lists naming some of the customs (in any case,
    with odd spacing, maybe across two Connection fields, maybe naming absent headers or keep-alive)."""
    custom = draw(st.dictionaries(names, values, min_size=1, max_size=6))
    hops = draw(st.lists(st.sampled_from(sorted(hop)), unique=True, max_size=len(hop)))
    listed = draw(st.lists(st.sampled_from(sorted(custom)), unique=True, max_size=len(custom)))
    listed += draw(st.lists(names, max_size=2))  # listed but absent: harmless
    if draw(st.booleans()):
        listed.append("keep-alive")
    tokens = [t.upper() if draw(st.booleans()) else t for t in listed]
    out = [(n, custom[n]) for n in custom] + [(h, hop[h]) for h in hops]
    if tokens:
        split = draw(st.integers(0, len(tokens)))
        fields = [tokens[:split], tokens[split:]] if draw(st.booleans()) else [tokens]
        out += [("Connection", " ,  ".join(f)) for f in fields if f]
    return draw(st.permutations(out))


# The gateway's own threads use the global `random` (health jitter) while Hypothesis draws; that is not
# randomness inside our strategies.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_hop_by_hop_never_passes_property(gateway: str, echo: tuple[HeaderEcho, str]) -> None:
    app, _ = echo

    @settings(max_examples=50, deadline=None, derandomize=True, database=None)
    @given(request_headers=header_sets(REQUEST_HOP), respond_headers=header_sets(RESPONSE_HOP),
           prefix=st.sampled_from(["/v1", "/openai/v1"]))
    def run(request_headers: list[tuple[str, str]], respond_headers: list[tuple[str, str]], prefix: str) -> None:
        upstream_saw, response = exchange(gateway, app, f"{prefix}/chat/completions", request_headers,
                                          respond_headers)
        check(request_headers, upstream_saw)
        client_saw = list(response.headers.multi_items())
        check(respond_headers, client_saw)
        assert "transfer-encoding" not in response.headers  # the upstream's content-length framing is kept
        # the gateway still did its own job
        assert [v for k, v in upstream_saw if k == "authorization"] == ["Bearer sk-up-openai"]
        assert response.headers["x-gateway-provider"] == "openai"

    run()


@pytest.mark.parametrize("family,path", [("openai", "/v1/chat/completions"), ("anthropic", "/v1/messages"),
                                         ("anthropic", "/anthropic/v1/messages"), ("ollama", "/ollama/api/chat")])
def test_connection_listed_names_are_dropped_both_ways(gateway: str, echo: tuple[HeaderEcho, str],
                                                       family: str, path: str) -> None:
    app, _ = echo
    request_headers = [("Connection", "X-Foo, keep-alive"), ("x-foo", "secret-hop"), ("Keep-Alive", "timeout=5"),
                       ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("TE", "trailers"), ("x-bar", "end-to-end")]
    respond_headers = [("Connection", "x-foo"), ("x-foo", "hop-only"), ("Keep-Alive", "timeout=5"),
                       ("Proxy-Authenticate", "Basic"), ("Trailer", "x-checksum"), ("Upgrade", "h2c"),
                       ("x-bar", "passes")]
    upstream_saw, response = exchange(gateway, app, path, request_headers, respond_headers,
                                      {"anthropic-version": "2023-06-01"})
    seen = dict(upstream_saw)
    assert seen["x-bar"] == "end-to-end"
    for name in ("connection", "x-foo", "keep-alive", "proxy-authorization", "te"):
        assert name not in seen or (name == "connection" and seen[name] == "keep-alive"), name  # own hop only
    assert response.headers["x-bar"] == "passes"
    for name in ("connection", "x-foo", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert name not in response.headers, name
    assert response.headers["x-gateway-provider"] == family
