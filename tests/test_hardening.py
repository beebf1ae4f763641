"""Hardening: every bad input below is tried against a real gateway, and none of it reaches an upstream
it should not, picks an upstream, splits a header, bypasses auth, or turns into a 500.

- Upstream URLs come only from config: top-level body fields and headers that try to pick one are a
  native 400 in every family (nested data is left alone).
- Dot segments (plain, encoded, double-encoded, behind `%2F`) are a 400; templated parts (Bedrock model
  ids, Azure deployment names; regions and deployment names in config) are validated.
- Redirects are relayed, never followed; Host, absolute-form targets, metadata-IP spellings, `@`, `%2F`
  and `..` never change the upstream: a recording transport sees only the configured hosts.
- Header values with CR, LF, NUL, other controls or non-ASCII bytes are a 400 on both HTTP parsers
  (httptools and h11), and nothing reaches the upstream.
- Malformed Host values never bypass auth; key fuzzing (SQL, template, format strings, 100 KB, binary,
  SigV4 garbage) always gets the family's native auth error.
- Account-identifying upstream response headers are dropped; config dumps and reprs mask secrets.
"""
from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest

from config import ConfigError, parse_config
from proxy.app import build_app
from proxy.cli.main import effective_config
from tests.conftest import CLIENT_AKID, GATEWAY_KEY, standard_config
from tests.procs import Procs, procs  # noqa: F401 - `procs` is a fixture
from tests.servers import serve

FAMILIES = ("openai", "anthropic", "bedrock", "ollama")
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/anthropic/v1/messages",
         "bedrock": "/bedrock/model/anthropic.claude-v2/converse", "ollama": "/ollama/api/chat"}
BODIES: dict[str, dict[str, Any]] = {
    "openai": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
    "anthropic": {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    "bedrock": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
    "ollama": {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False},
}
# The official SDKs' auth styles, bedrock as a Bedrock API key (bearer); SigV4 is checked apart.
AUTH = {"openai": {"authorization": f"Bearer {GATEWAY_KEY}"}, "anthropic": {"x-api-key": GATEWAY_KEY,
        "anthropic-version": "2023-06-01"}, "bedrock": {"authorization": f"Bearer {GATEWAY_KEY}"},
        "ollama": {"authorization": f"Bearer {GATEWAY_KEY}"}}


class Recording(httpx.AsyncBaseTransport):
    """The gateway's upstream transport, recording every request it is asked to make."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str, int | None, str, bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.scheme, request.url.host, request.url.port, request.headers.get("host", ""),
                          request.url.raw_path))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Redirector:
    """A fake upstream that answers every request with a 302 to `target`."""

    def __init__(self, target: str) -> None:
        self.target, self.hits = target, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.hits += 1
        await send({"type": "http.response.start", "status": 302, "headers": [
            (b"location", self.target.encode()), (b"content-type", b"application/json"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})


class Canary(Redirector):
    """A server nothing should ever reach."""

    def __init__(self) -> None:
        super().__init__("")


class Headers:
    """A fake upstream answering 200 JSON with account-identifying headers."""

    def __init__(self) -> None:
        self.headers = [(b"set-cookie", b"__cf_bm=account-cookie; path=/"), (b"openai-project", b"proj_secret123"),
                        (b"openai-organization", b"org-fine"), (b"anthropic-organization-id", b"org-uuid-fine"),
                        (b"x-amzn-requestid", b"req-fine"), (b"x-amz-security-token", b"FwoGZXIvYXdzEC-token"),
                        (b"x-amz-cf-id", b"edge-id"), (b"x-amzn-bedrock-input-token-count", b"3"),
                        (b"x-request-id", b"req_fine"), (b"request-id", b"req_ant_fine"),
                        (b"www-authenticate", b'Bearer realm="acct-42"')]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        body = b'{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":1}}'
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *self.headers]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def env(mock_upstream: str) -> Iterator[dict[str, Any]]:
    canary = Canary()
    with serve(canary, lifespan="off") as canary_url:
        gateways = {}
        recorders = {}
        import contextlib

        with contextlib.ExitStack() as stack:
            for http in ("httptools", "h11"):
                app = build_app(parse_config(standard_config(mock_upstream), "hardening.yaml", {}))
                recorder = Recording()
                app.runtime.transport = lambda r=recorder: r  # type: ignore[assignment]
                recorders[http] = recorder
                gateways[http] = stack.enter_context(serve(app, http=http))
            yield {"gw": gateways["httptools"], "gateways": gateways, "recorders": recorders,
                   "mock": mock_upstream, "canary_url": canary_url, "canary": canary}


def mock_hits(mock: str, marker: str) -> list[dict[str, Any]]:
    return [r for r in httpx.get(f"{mock}/__mock/requests").json() if ["x-test-marker", marker] in r["headers"]]


def send(gw: str, family: str, *, body: Any = None, headers: dict[str, str] | None = None, path: str | None = None,
         content: bytes | None = None) -> httpx.Response:
    data = content if content is not None else json.dumps(BODIES[family] if body is None else body).encode()
    return httpx.post(gw + (path or PATHS[family]), content=data, timeout=10,
                      headers={"content-type": "application/json", **AUTH[family], **(headers or {})})


def assert_native(r: httpx.Response, family: str, status: int) -> None:
    assert r.status_code == status, (family, r.status_code, r.text)
    assert "Traceback" not in r.text and 'File "' not in r.text
    body = r.json()
    if family == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
    elif family == "anthropic":
        assert body["type"] == "error" and body["error"]["message"]
    elif family == "bedrock":
        assert r.headers["x-amzn-errortype"] and set(body) == {"message"}
    else:
        assert isinstance(body["error"], str)


# --------------------------------------------------------------------------- upstream pickers

PICKER_FIELDS = ["api_base", "base_url", "azure_endpoint", "api_key", "API_BASE", "baseUrl", "apiKey",
                 "azure-endpoint", "Base-URL"]
PICKER_HEADERS = ["api-base", "api_base", "base-url", "base_url", "azure-endpoint", "azure_endpoint", "API-Base",
                  "Base-Url"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("field", PICKER_FIELDS)
def test_body_fields_cannot_pick_the_upstream(env: dict[str, Any], family: str, field: str) -> None:
    marker = uuid.uuid4().hex
    r = send(env["gw"], family, body={**BODIES[family], field: "http://169.254.169.254/latest/meta-data/"},
             headers={"x-test-marker": marker})
    assert_native(r, family, 400)
    assert not mock_hits(env["mock"], marker)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("header", PICKER_HEADERS)
def test_headers_cannot_pick_the_upstream(env: dict[str, Any], family: str, header: str) -> None:
    marker = uuid.uuid4().hex
    r = send(env["gw"], family, headers={header: "http://169.254.169.254/", "x-test-marker": marker})
    assert_native(r, family, 400)
    assert not mock_hits(env["mock"], marker)


@pytest.mark.parametrize("family", ["openai", "anthropic", "ollama"])
def test_nested_picker_names_are_left_alone(env: dict[str, Any], family: str) -> None:
    nested = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"base_url": {"type": "string"}, "api_key": {"type": "string"}}}}}],
        "metadata": {"api_base": "x"}} if family == "openai" else {"metadata": {"user_id": "u", "note": {"base_url": "x"}}}
    r = send(env["gw"], family, body={**BODIES[family], **nested})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- paths and templates

DOT_SEGMENTS = ["..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2e", "%252e%252e", "%252E%252e", "%25%32%65%25%32%65",
                "a%2F..%2Fb", "a%2f%2e%2e%2fb", "%2F..", "..%5C", "%5C..", "x%00y", "%252f..%252f"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("segment", DOT_SEGMENTS)
def test_dot_segments_are_400(env: dict[str, Any], family: str, segment: str) -> None:
    path = {"openai": f"/v1/{segment}/chat/completions", "anthropic": f"/anthropic/v1/{segment}/messages",
            "bedrock": f"/bedrock/model/{segment}/converse", "ollama": f"/ollama/api/{segment}/chat"}[family]
    marker = uuid.uuid4().hex
    r = raw_request(env["gw"], "POST", path, {**AUTH[family], "content-type": "application/json",
                                             "x-test-marker": marker}, json.dumps(BODIES[family]).encode())
    assert r[0] == 400, (segment, r)
    assert not mock_hits(env["mock"], marker)


@pytest.mark.parametrize("model", ["a b", "x\u00e9", "..", "a/../b", "a/./b", "-lead", "x" * 3000, "a%00b", "a\tb",
                                   "a?b", "a#b", "a\\b", "https://evil.example/x", "a@b"])
def test_bedrock_model_ids_are_validated(env: dict[str, Any], model: str) -> None:
    marker = uuid.uuid4().hex
    r = send(env["gw"], "bedrock", path=f"/bedrock/model/{quote(model, safe='')}/converse",
             headers={"x-test-marker": marker})
    assert r.status_code in (400, 404), (model, r.text)
    assert "Traceback" not in r.text
    assert not mock_hits(env["mock"], marker)


def test_azure_deployment_names_are_validated(mock_upstream: str) -> None:
    config = f"""
auth: {{mode: none}}
providers:
  azure: {{type: azure_openai, base_url: "{mock_upstream}", api_key: az-key, deployments: {{gpt-4o: my-gpt4o}}}}
"""
    app = build_app(parse_config(config, "azure.yaml", {}))
    recorder = Recording()
    app.runtime.transport = lambda: recorder  # type: ignore[assignment]
    with serve(app) as gw:
        for model in ["../x", "a/../../b", "x.\u0430", "\uff47pt", "a b", "a:b", "a@b", "-x", ".", "..", "a" * 65, "a+b"]:
            r = httpx.post(gw + "/v1/chat/completions", json={"model": model, "messages": []})
            assert r.status_code in (400, 404), (model, r.status_code, r.text)
        r = httpx.post(gw + "/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code in (200, 404)  # whatever the mock says about the Azure path: it was reached
    paths = [seen[4].split(b"?")[0] for seen in recorder.seen]
    assert paths == [b"/openai/deployments/my-gpt4o/chat/completions"], paths


@pytest.mark.parametrize("snippet, field", [
    ("region: 'us-east-1/../x'", "region"), ("region: \"us-east-1\\n\"", "region"), ("region: '169.254.169.254'", "region"),
    ("base_url: 'http://a@evil/'", "base_url"), ("base_url: 'file:///etc/passwd'", "base_url"),
    ("base_url: \"http://x/v1\\n\"", "base_url"), ("base_url: 'http://x/?q=1'", "base_url"),
])
def test_config_validates_regions_and_urls(snippet: str, field: str) -> None:
    text = f"providers:\n  bedrock: {{type: bedrock, {snippet}, aws_access_key_id: A, aws_secret_access_key: B}}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml", {})
    assert field in str(err.value)


@pytest.mark.parametrize("kind, name", [("azure_openai", "../x"), ("azure_openai", "a/b"), ("azure_openai", "a b"),
                                        ("bedrock", "../x?y"), ("bedrock", "a b")])
def test_config_validates_deployment_names(kind: str, name: str) -> None:
    text = f"providers:\n  d: {{type: {kind}, base_url: 'http://x', api_key: k, region: us-east-1, deployments: {{m: '{name}'}}}}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bad.yaml", {})
    assert "deployments" in str(err.value)


# --------------------------------------------------------------------------- redirects, hosts, targets

@pytest.mark.parametrize("family", FAMILIES)
def test_redirects_are_relayed_never_followed(family: str) -> None:
    canary = Canary()
    with serve(canary, lifespan="off") as target, serve(Redirector(target + "/stolen"), lifespan="off") as redirector:
        config = standard_config(redirector).replace("gateway: {timeout: 30s}", "gateway: {timeout: 10s, enable_failover: false}")
        with serve(build_app(parse_config(config, "redirect.yaml", {}))) as gw:
            r = httpx.post(gw + PATHS[family], json=BODIES[family], follow_redirects=False,
                           headers={**AUTH[family], "content-type": "application/json"})
    assert r.status_code == 302 and r.headers["location"] == target + "/stolen"
    assert canary.hits == 0


HOSTS = ["169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "[::ffff:169.254.169.254]",
         "[::ffff:a9fe:a9fe]", "metadata.google.internal", "user@169.254.169.254", "127.0.0.1:1@evil.example",
         "evil.example%2F..", "..", "localhost:0", "169.254.169.254:80", "[fd00:ec2::254]", "a" * 300]
TARGETS = ["http://169.254.169.254/v1/chat/completions", "//169.254.169.254/v1/chat/completions",
           "/v1/chat/completions?x=@169.254.169.254", "/v1/chat%2Fcompletions", "/v1/@169.254.169.254/chat/completions",
           "/v1/..%2F..%2F169.254.169.254/chat/completions", "/openai/v1/../../169.254.169.254", "*",
           "/v1/chat/completions#@evil", "http://2852039166/v1/chat/completions"]


def raw_request(base: str, method: str, target: str, headers: dict[str, str], body: bytes = b"",
                host: str | None = None, version: str = "1.1") -> tuple[int, bytes]:
    """One request over a raw socket: (status, whole answer); status 0 when the server just closed."""
    port = int(base.rsplit(":", 1)[1])
    head = f"{method} {target} HTTP/{version}\r\n".encode("latin-1")
    if host is not None:
        head += b"Host: " + host.encode("latin-1") + b"\r\n"
    for k, v in headers.items():
        head += k.encode("latin-1") + b": " + (v.encode("latin-1") if isinstance(v, str) else v) + b"\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    try:
        return int(answer.split(b" ", 2)[1]), answer
    except (IndexError, ValueError):
        return 0, answer


def only_config_hosts(env: dict[str, Any]) -> None:
    expected = httpx.URL(env["mock"])
    for recorder in env["recorders"].values():
        for scheme, host, port, host_header, _ in recorder.seen:
            assert (scheme, host, port) == ("http", expected.host, expected.port), (host, port)
            assert host_header == f"{expected.host}:{expected.port}", host_header


@pytest.mark.parametrize("server", ["httptools", "h11"])
def test_host_and_target_tricks_never_change_the_upstream(env: dict[str, Any], server: str) -> None:
    gw = env["gateways"][server]
    body = json.dumps(BODIES["openai"]).encode()
    statuses = []
    canary = env["canary_url"].split("//")[1]  # a live server the tricks below name: it must see nothing
    hosts = HOSTS + [canary, f"{canary}@169.254.169.254", f"user@{canary}"]
    targets = TARGETS + [f"http://{canary}/v1/chat/completions", f"//{canary}/v1/chat/completions",
                         f"/v1/..%2F..%2F{canary}/chat/completions"]
    for host in hosts:
        for auth in (AUTH["openai"], {}):
            status, answer = raw_request(gw, "POST", "/v1/chat/completions",
                                         {**auth, "content-type": "application/json"}, body, host=host)
            assert status != 500 and b"Traceback" not in answer, (host, answer[:300])
            if not auth:
                assert status in (0, 400, 401), (host, status)  # never past auth
            statuses.append(status)
    for target in targets:
        status, answer = raw_request(gw, "POST", target, {**AUTH["openai"], "content-type": "application/json"},
                                     body, host="127.0.0.1")
        assert status != 500 and b"Traceback" not in answer, (target, answer[:300])
        statuses.append(status)
    assert 200 in statuses  # the tricks were served (from config), not just refused
    only_config_hosts(env)
    assert env["canary"].hits == 0
    assert httpx.get(env["canary_url"] + "/").status_code == 302  # the canary is alive, just never contacted
    env["canary"].hits = 0


@pytest.mark.parametrize("server", ["httptools", "h11"])
@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_missing_or_malformed_host_never_bypasses_auth(env: dict[str, Any], server: str, version: str) -> None:
    gw = env["gateways"][server]
    for family in FAMILIES:
        for host in (None, "", " ", "evil", "127.0.0.1:99999", "\t", "a b", "[::1", "@", "%00"):
            status, answer = raw_request(gw, "POST", PATHS[family], {"content-type": "application/json"},
                                         json.dumps(BODIES[family]).encode(), host=host, version=version)
            assert status in (0, 400, 401, 403), (family, host, status, answer[:200])
            assert b"Traceback" not in answer


# --------------------------------------------------------------------------- header smuggling

# (CRLF itself just ends the header line on the wire; a bare CR or LF inside a value is the smuggling attempt.)
BAD_VALUES = [b"a\x00b", b"a\rb", b"a\nb", b"a\rX-Injected: 1", b"a\x01b", b"a\x1bb",
              b"a\x7fb", b"caf\xe9", "caf\u00e9 \u2603".encode(), b"\xff\xfe", b"a\x0bb", b"a\x0cb"]


@pytest.mark.parametrize("server", ["httptools", "h11"])
@pytest.mark.parametrize("family", FAMILIES)
def test_control_characters_in_headers_never_reach_upstream(env: dict[str, Any], server: str, family: str) -> None:
    gw = env["gateways"][server]
    for value in BAD_VALUES:
        marker = uuid.uuid4().hex
        for name in ("x-custom", "anthropic-beta", "user-agent", "x-request-id", "accept"):
            status, answer = raw_request(gw, "POST", PATHS[family], {**AUTH[family], "content-type": "application/json",
                                         "x-test-marker": marker, name: value}, json.dumps(BODIES[family]).encode(),
                                         host="127.0.0.1")
            assert status == 400, (server, family, name, value, answer[:400])
            assert b"Traceback" not in answer
        assert not mock_hits(env["mock"], marker), (server, family, value)


def test_folded_and_tab_headers_are_harmless(env: dict[str, Any]) -> None:
    for server, gw in env["gateways"].items():
        status, answer = raw_request(gw, "POST", PATHS["openai"], {**AUTH["openai"], "content-type": "application/json",
                                     "x-tab": "a\tb"}, json.dumps(BODIES["openai"]).encode(), host="127.0.0.1")
        assert status == 200, (server, answer[:300])


# --------------------------------------------------------------------------- key fuzzing

KEY_PAYLOADS = [
    "' OR '1'='1", "'; DROP TABLE keys; --", "\" OR 1=1 --", "admin'--", "1; SELECT * FROM users",
    "{{7*7}}", "${7*7}", "#{7*7}", "<%= 7*7 %>", "{{config.__class__.__init__.__globals__}}", "${jndi:ldap://x/a}",
    "%s%s%s%s%n", "%x%x%x", "{0.__class__}", "{}", "%(secret)s", "\\x00", "../../etc/passwd", "*", "?", "[]",
    "null", "undefined", "true", "0", "-1", "NaN", " ", "gwk_", "gwk_aaaaaaaaaaaa_", "gwk_aaaaaaaaaaaa_" + "A" * 43,
    "gwk_AAAAAAAAAAAA_" + "A" * 43, "gwk_aaaaaaaaaaaa_" + "A" * 44, GATEWAY_KEY + "x", GATEWAY_KEY[:-1],
    GATEWAY_KEY.upper(), "x" * 511, "x" * 513, "A" * 100_000, "Bearer " + GATEWAY_KEY, "\u00e9\u00e8",
]
BINARY_KEYS = [bytes(range(0x80, 0x100)), b"\xff" * 1000, b"\x80abc", b"\xc3\x28"]


def _auth_headers(family: str, key: str | bytes, style: str) -> dict[str, Any]:
    value = key.encode("latin-1", "replace") if isinstance(key, str) else key
    if style == "x-api-key":
        return {"x-api-key": value, "anthropic-version": "2023-06-01"}
    return {"authorization": b"Bearer " + value, **({"anthropic-version": "2023-06-01"} if family == "anthropic" else {})}


@pytest.mark.parametrize("family, style", [("openai", "bearer"), ("anthropic", "bearer"), ("anthropic", "x-api-key"),
                                           ("bedrock", "bearer"), ("ollama", "bearer")])
def test_key_fuzzing_is_always_a_native_auth_error(env: dict[str, Any], family: str, style: str) -> None:
    expected = 403 if family == "bedrock" else 401
    for key in [*KEY_PAYLOADS, *BINARY_KEYS]:
        status, answer = raw_request(env["gw"], "POST", PATHS[family], {"content-type": "application/json",
                                     **_auth_headers(family, key, style)}, json.dumps(BODIES[family]).encode(),
                                     host="127.0.0.1")
        assert b"Traceback" not in answer and status != 500, (family, key[:40], answer[:300])
        if len(key) > 60_000:  # past the HTTP parser's header limit: refused before the gateway sees it
            assert status in (expected, 400, 413, 431, 0), (family, status)
            continue
        assert status == expected, (family, style, key[:60], answer[:300])
        head, _, body = answer.partition(b"\r\n\r\n")
        parsed = json.loads(body)
        if family == "bedrock":
            assert b"x-amzn-errortype: UnrecognizedClientException" in head.lower().replace(
                b"unrecognizedclientexception", b"UnrecognizedClientException") or \
                b"MissingAuthenticationTokenException" in head, head
        elif family == "anthropic":
            assert parsed["error"]["type"] == "authentication_error"
        elif family == "openai":
            assert parsed["error"]["code"] == "invalid_api_key"
        else:
            assert isinstance(parsed["error"], str)


SIGV4_GARBAGE = [
    "AWS4-HMAC-SHA256", "AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA256 Credential=", "AWS4-HMAC-SHA256 garbage",
    "AWS4-HMAC-SHA256 Credential=a/b/c/d/e, SignedHeaders=host, Signature=x",
    f"AWS4-HMAC-SHA256 Credential={CLIENT_AKID}/20240101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=00",
    f"AWS4-HMAC-SHA256 Credential={CLIENT_AKID}/20240101/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=00",
    f"AWS4-HMAC-SHA256 Credential={CLIENT_AKID}/x/y/z/aws4_request, SignedHeaders=, Signature=",
    f"AWS4-HMAC-SHA256 Credential={CLIENT_AKID}/x/y/z/aws4_request, SignedHeaders=host;host;host, Signature=%s%n",
    "AWS4-HMAC-SHA256 Credential=GWKAAAAAAAAAAAAAAAAA/20240101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=ab",
    "AWS4-HMAC-SHA256 Credential=' OR 1=1 --/x/y/z/aws4_request, SignedHeaders=host, Signature={{7*7}}",
    "AWS4-HMAC-SHA256 Credential=" + "A" * 5000 + "/x/y/z/aws4_request, SignedHeaders=host, Signature=a",
    "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request, SignedHeaders=host, Signature=a, Extra",
    "AWS4-HMAC-SHA256 ,,,,,", "AWS4-HMAC-SHA256 Credential==/==/=/=/aws4_request, SignedHeaders==, Signature==",
]


@pytest.mark.parametrize("server", ["httptools", "h11"])
def test_sigv4_garbage_is_a_native_403(env: dict[str, Any], server: str) -> None:
    gw = env["gateways"][server]
    for header in SIGV4_GARBAGE:
        for extra in ({}, {"x-amz-date": "20240101T000000Z"}, {"x-amz-date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())},
                      {"x-amz-date": "%s%s"}):
            for host in ("127.0.0.1", "[::1", "a b@c", "[", "x:99999999"):
                status, answer = raw_request(gw, "POST", PATHS["bedrock"], {"content-type": "application/json",
                                             "authorization": header, **extra}, b'{"messages": []}', host=host)
                assert status in (400, 403), (header[:80], extra, host, answer[:300])
                assert b"Traceback" not in answer


# --------------------------------------------------------------------------- response headers, dumps

@pytest.mark.parametrize("family", FAMILIES)
def test_account_identifying_response_headers_are_dropped(family: str) -> None:
    with serve(Headers(), lifespan="off") as upstream:
        with serve(build_app(parse_config(standard_config(upstream), "headers.yaml", {}))) as gw:
            r = send(gw, family)
    assert r.status_code == 200, r.text
    for dropped in ("set-cookie", "openai-project", "x-amz-security-token", "x-amz-cf-id", "www-authenticate"):
        assert dropped not in r.headers, dropped
    for kept in ("openai-organization", "anthropic-organization-id", "x-amzn-requestid", "x-request-id", "request-id",
                 "x-amzn-bedrock-input-token-count"):
        if family == "anthropic" and kept.startswith("x-amzn-bedrock"):
            continue
        assert kept in r.headers, kept
    assert "proj_secret123" not in str(r.headers) and "account-cookie" not in str(r.headers)


def test_config_dumps_and_reprs_mask_secrets() -> None:
    canaries = {"openai": "sk-CANARY-openai-1", "aws": "CANARY-aws-secret-2", "session": "CANARY-session-3",
                "admin": "CANARY-admin-4", "secret": "CANARY-secret-5", "client": "CANARY-client-aws-6",
                "redis": "CANARY-redis-pass-7"}
    text = f"""
state: {{redis_url: "redis://:{canaries['redis']}@127.0.0.1:6379/0"}}
auth:
  admin_key: {canaries['admin']}
  secret: {canaries['secret']}
  keys: [{{id: k, sha256: '{'0' * 64}', aws_access_key_id: GWKEY00000000000001, aws_secret_access_key: {canaries['client']}}}]
providers:
  openai: {{type: openai, api_key: {canaries['openai']}}}
  bedrock: {{type: bedrock, aws_access_key_id: AKIA0000, aws_secret_access_key: {canaries['aws']},
             aws_session_token: {canaries['session']}}}
"""
    cfg = parse_config(text, "c.yaml", {})
    dumps = [effective_config(cfg), repr(cfg), str(cfg), repr(cfg.providers), repr(cfg.auth), repr(cfg.state)]
    for dump in dumps:
        for name, canary in canaries.items():
            assert canary not in dump, (name, dump[:200])
    assert "***" in dumps[0]


def test_served_gateway_does_not_advertise_its_server_software(procs: Procs) -> None:  # noqa: F811
    mock = procs.mock()
    (gw,) = procs.gateways(standard_config(mock.url), 1)
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {GATEWAY_KEY}"},
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert "server" not in r.headers and "date" in r.headers  # Date stays: RFC 9110 asks origin servers for it


def test_a_repeated_header_is_read_as_its_first_value() -> None:
    """Every layer sees the same value of a repeated header (the first), whichever looks first."""
    from proxy.context import RequestContext
    from providers import build_adapters

    headers = [(b"authorization", b"Bearer first"), (b"x-a", b"1"), (b"authorization", b"Bearer second")]
    ctx = RequestContext(request_id="r", family="openai", adapter=build_adapters()["openai"], method="POST",
                         path="/v1/chat/completions", query="", headers=headers)
    assert ctx.header(b"authorization") == "Bearer first" and ctx.header(b"x-b") is None
    assert ctx.header_map == {b"authorization": b"Bearer first", b"x-a": b"1"}
