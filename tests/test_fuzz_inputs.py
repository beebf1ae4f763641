"""Generated bad input (hypothesis) against a real gateway: paths, methods, headers, bodies and keys of
every family. Whatever arrives, the answer is never a 500 and never carries traceback text.

One in-process gateway (uvicorn on a socket, `tests/servers.py`) in front of the simulated upstream; one
keep-alive httpx client. At least 2,000 requests in total (counted, and checked by the last test).
"""
from __future__ import annotations

import json
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import parse_config
from proxy.app import build_app
from proxy.mock import MockOptions, build_mock_app
from tests.conftest import CLIENT_AKID, GATEWAY_KEY, UPSTREAM_AKID, UPSTREAM_AWS_SECRET, standard_config
from tests.servers import serve

# The gateway (another thread) uses `random` for routing and jitter while hypothesis draws: not a strategy's doing.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
SENT = {"count": 0}
MIN_REQUESTS = 2000
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
PREFIXES = ["/v1/", "/openai/v1/", "/anthropic/v1/", "/bedrock/model/", "/model/", "/ollama/api/", "/api/", "/",
            "/v1/messages/", "/v1/models/", "/admin/", "/healthz/", ""]
KNOWN = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
         "/anthropic/v1/messages", "/v1/messages", "/v1/messages/count_tokens", "/ollama/api/chat",
         "/api/generate", "/api/embed", "/api/tags", "/api/show", "/bedrock/model/anthropic.claude-v2/converse",
         "/bedrock/model/anthropic.claude-v2/invoke", "/model/anthropic.claude-v2/converse-stream",
         "/bedrock/model/anthropic.claude-v2/count-tokens"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "FOO"]
AUTHS: list[dict[str, str]] = [{}, {"authorization": f"Bearer {GATEWAY_KEY}"}, {"x-api-key": GATEWAY_KEY},
                               {"authorization": f"Bearer {GATEWAY_KEY}", "anthropic-version": "2023-06-01"}]


class SturdyMock:
    """The simulated upstream, but a body it cannot digest (e.g. `"input": null` on embeddings makes the
    mock raise) is a 400 like a real provider's, not a 500 relayed verbatim: the target here is the gateway."""

    def __init__(self) -> None:
        self.app = build_mock_app(MockOptions(chunk_interval_ms=0, aws_access_key_id=UPSTREAM_AKID,
                                              aws_secret_access_key=UPSTREAM_AWS_SECRET))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001
            if started or scope["type"] != "http":
                raise
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "bad body", "type": "invalid_request_error"}}'})


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with serve(SturdyMock(), lifespan="off") as upstream:
        config = standard_config(upstream).replace("gateway: {timeout: 30s}",
                                                   "gateway: {timeout: 10s, max_body_bytes: 64KiB}")
        with serve(build_app(parse_config(config, "fuzz.yaml", {}))) as base:
            with httpx.Client(base_url=base, timeout=15) as c:
                yield c


def check(client: httpx.Client, method: str, url: str, headers: Any = None, content: bytes | None = None) -> None:
    try:
        request = client.build_request(method, url, headers=headers, content=content)
    except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError, ValueError):
        return  # the client itself refuses to put it on the wire
    try:
        response = client.send(request)
    except httpx.LocalProtocolError:
        return
    SENT["count"] += 1
    text = response.content.decode("latin-1")
    assert response.status_code != 500, (method, url, headers, content[:200] if content else None, text[:500])
    assert response.headers.get("x-gateway-error") != "gateway_internal", (method, url, text[:500])
    assert "Traceback" not in text and 'File "' not in text, (method, url, text[:500])


# ------------------------------------------------------------------------------------- strategies

segment = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12).map(lambda s: quote(s, safe="")),
    st.sampled_from([".", "..", "%2e%2e", "%2E", "%252e%252e", "%2F", "%5C", "%00", "@", "~", "%", "%zz", "%%", ";",
                     "v1", "chat", "completions", "messages", "model", "api", "anthropic.claude-v2", "arn%3Aaws%3Ax",
                     "converse", "invoke", "a%2F..%2Fb", "%C0%AE%C0%AE", "%u002e", "\u00e9", "a" * 300]),
)
path = st.one_of(
    st.builds(lambda p, segs: p + "/".join(segs), st.sampled_from(PREFIXES), st.lists(segment, max_size=6)),
    st.sampled_from(KNOWN),
    st.builds(lambda k, q: k + "?" + q, st.sampled_from(KNOWN), st.text(max_size=20).map(lambda s: quote(s, safe="=&"))),
)
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=False),
              st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)
field_names = st.sampled_from(["model", "messages", "stream", "max_tokens", "prompt", "input", "stream_options",
                               "system", "inferenceConfig", "options", "tools", "base_url", "api_key", "n", "stop"])
body_object = st.dictionaries(st.one_of(field_names, st.text(max_size=8)), json_value, max_size=6)
model_names = st.one_of(st.sampled_from(["gpt-4o", "claude-x", "llama3", "anthropic.claude-v2", "", "..", "a/../b"]),
                        st.text(max_size=40))
header_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=20) \
    .filter(lambda n: not n.startswith("x-mock") and n not in ("content-length", "transfer-encoding", "host",
                                                                 "expect", "connection", "upgrade"))
header_value = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip()),
    st.sampled_from(["chunked", "gzip", "identity", "100-continue", "close", "keep-alive", "application/json",
                     "text/event-stream", "bytes=0-1", "../../", "http://169.254.169.254/", "%s%n", "{{7*7}}"]),
)
keys = st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
                 st.sampled_from(["' OR 1=1 --", "{{7*7}}", "%s%s%n", "${jndi:ldap://x}", "gwk_", "A" * 600,
                                  "gwk_aaaaaaaaaaaa_" + "A" * 43, GATEWAY_KEY[:-1], GATEWAY_KEY + "x"]))


def _auth_value(key: str) -> bytes:
    return key.encode("latin-1", "replace").replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip()


# ------------------------------------------------------------------------------------- the tests

@settings(max_examples=600, **SETTINGS)
@given(method=st.sampled_from(METHODS), target=path, auth=st.sampled_from(AUTHS), body=st.one_of(st.none(), st.binary(max_size=64)))
def test_paths_and_methods(client: httpx.Client, method: str, target: str, auth: dict[str, str], body: bytes | None) -> None:
    check(client, method, target, headers=auth, content=body if method not in ("GET", "HEAD", "TRACE") else None)


@settings(max_examples=600, **SETTINGS)
@given(target=st.sampled_from(KNOWN), auth=st.sampled_from(AUTHS[1:]),
       extra=st.lists(st.tuples(header_name, header_value), max_size=6))
def test_headers(client: httpx.Client, target: str, auth: dict[str, str], extra: list[tuple[str, Any]]) -> None:
    headers = [(k.encode(), v.encode("latin-1", "replace") if isinstance(v, str) else v) for k, v in auth.items()]
    headers += [(k.encode(), v.encode("latin-1", "replace") if isinstance(v, str) else v) for k, v in extra]
    body = json.dumps({"model": "gpt-4o", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()
    check(client, "POST", target, headers=headers, content=body)


@settings(max_examples=600, **SETTINGS)
@given(target=st.sampled_from(KNOWN), auth=st.sampled_from(AUTHS[1:]), obj=body_object, model=model_names,
       stream=st.sampled_from([None, True, False, "yes", 1]),
       raw=st.one_of(st.none(), st.binary(max_size=200), st.sampled_from([b"{", b"[]", b"null", b'{"model": "gpt-4o"',
                                                                          b"\xef\xbb\xbf{}", b'{"a":1}{"b":2}', b"1e999999"])))
def test_bodies(client: httpx.Client, target: str, auth: dict[str, str], obj: dict[str, Any], model: str,
                stream: Any, raw: bytes | None) -> None:
    if raw is None:
        obj = {"model": model, **obj}
        if stream is not None:
            obj["stream"] = stream
        try:
            raw = json.dumps(obj).encode()
        except (ValueError, OverflowError):
            return
    check(client, "POST", target, headers={**auth, "content-type": "application/json"}, content=raw)


@settings(max_examples=600, **SETTINGS)
@given(key=keys, style=st.sampled_from(["bearer", "x-api-key", "sigv4", "raw-authorization"]),
       target=st.sampled_from(KNOWN), junk=st.text(max_size=40))
def test_keys(client: httpx.Client, key: str, style: str, target: str, junk: str) -> None:
    value = _auth_value(key)
    if style == "bearer":
        headers = [(b"authorization", b"Bearer " + value)]
    elif style == "x-api-key":
        headers = [(b"x-api-key", value), (b"anthropic-version", b"2023-06-01")]
    elif style == "sigv4":
        cred = value.decode("latin-1") if value else CLIENT_AKID
        auth = f"AWS4-HMAC-SHA256 Credential={cred}/20240101/us-east-1/bedrock/aws4_request, " \
               f"SignedHeaders=host;x-amz-date, Signature={junk}"
        headers = [(b"authorization", _auth_value(auth)), (b"x-amz-date", _auth_value(junk) or b"20240101T000000Z")]
    else:
        headers = [(b"authorization", value)]
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    check(client, "POST", target, headers=headers + [(b"content-type", b"application/json")], content=body)


def test_enough_requests_were_sent() -> None:
    print(f"FIGURES fuzz: {SENT['count']} requests")
    assert SENT["count"] >= MIN_REQUESTS, SENT
