"""The gateway as a plugin: mounted under a prefix in a host Starlette app, and each middleware on its own.

- A host app mounts `build_app(cfg)` at `/llm`. Starlette's `Mount` forwards no lifespan events, so the
  gateway opens its resources lazily on the first request; the host closes them with `aclose()` from its
  own lifespan. The official SDKs work through the prefix, and the host's own routes keep working.
- A middleware wraps any ASGI app: `ErrorMiddleware(stub, cfg, deps=Runtime(cfg))` turns a raised
  `GatewayError` into the native error of the family the path belongs to.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import anthropic
import boto3
import httpx
import ollama
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from config import parse_config
from middlewares.auth import AuthMiddleware
from middlewares.errors import ErrorMiddleware
from proxy.app import build_app
from proxy.context import get_context
from proxy.errors import GatewayError
from proxy.runtime import Runtime
from tests.conftest import (
    CLIENT_AKID, CLIENT_AWS_SECRET, GATEWAY_KEY, clear_recorded, recorded, standard_config,
)
from tests.servers import serve


# --- mounted under /llm -------------------------------------------------------------------------

def test_gateway_mounted_in_a_host_starlette_app(mock_upstream: str) -> None:
    clear_recorded(mock_upstream)
    gw = build_app(parse_config(standard_config(mock_upstream), "test.yaml", {}))
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        await gw.aclose()
        events.append("gateway closed")

    async def host_route(request: Any) -> PlainTextResponse:
        return PlainTextResponse("host says hi")

    host = Starlette(routes=[Route("/host", host_route), Mount("/llm", app=gw)], lifespan=lifespan)
    assert gw.runtime._wire is None  # nothing opened before the first request

    with serve(host) as base:
        assert events == ["startup"]
        assert httpx.get(f"{base}/host").text == "host says hi"
        health = httpx.get(f"{base}/llm/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = httpx.get(f"{base}/llm/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"

        chat = openai.OpenAI(base_url=f"{base}/llm/v1", api_key=GATEWAY_KEY, max_retries=0)
        answer = chat.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content.startswith("This is a simulated response from gpt-4o-mini")
        streamed = chat.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text.startswith("This is a simulated response from gpt-4o-mini")
        assert gw.runtime._wire is not None  # opened lazily, without a lifespan event

        claude = anthropic.Anthropic(base_url=f"{base}/llm", api_key=GATEWAY_KEY, max_retries=0)
        msg = claude.messages.create(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        assert msg.content[0].text.startswith("This is a simulated response from claude-x")

        local = ollama.Client(host=f"{base}/llm/ollama", headers={"Authorization": f"Bearer {GATEWAY_KEY}"})
        reply = local.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=False)
        assert reply.message.content.startswith("This is a simulated response")

        bedrock = boto3.client("bedrock-runtime", endpoint_url=f"{base}/llm/bedrock", region_name="us-east-1",
                               aws_access_key_id=CLIENT_AKID, aws_secret_access_key=CLIENT_AWS_SECRET)
        out = bedrock.converse(modelId="anthropic.claude-3-sonnet-20240229-v1:0",
                               messages=[{"role": "user", "content": [{"text": "hi"}]}])
        assert out["output"]["message"]["content"][0]["text"].startswith("This is a simulated response")

        # Under the prefix, a path no family owns is the gateway's plain 404; the SDK key is required.
        missing = httpx.get(f"{base}/llm/nowhere")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/llm/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

    # The upstream saw family paths without the host's prefix.
    assert [r["raw_path"] for r in recorded(mock_upstream)] == [
        "/v1/chat/completions", "/v1/chat/completions", "/v1/messages", "/api/chat",
        "/model/anthropic.claude-3-sonnet-20240229-v1%3A0/converse"]
    assert events == ["startup", "gateway closed"]
    assert gw.runtime._wire is None


def test_aclose_is_safe_before_first_use_and_twice() -> None:
    gw = build_app(parse_config("providers:\n  ollama: {}\n", "t.yaml", {}))

    async def run() -> None:
        await gw.aclose()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://gw") as client:
            assert (await client.get("/healthz")).status_code == 200
        await gw.aclose()
        await gw.aclose()

    asyncio.run(run())


# --- middlewares on their own -------------------------------------------------------------------

CFG = parse_config(standard_config("http://127.0.0.1:9"), "test.yaml", {})


def _raising(error: BaseException) -> Any:
    async def stub(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise error
    return stub


async def _call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.request(method, path, **kwargs)


FORBIDDEN = GatewayError("caller_forbidden", "model 'gpt-4' is not allowed for this key")


@pytest.mark.parametrize(("path", "headers", "check"), [
    ("/v1/chat/completions", {},
     lambda r: r.json() == {"error": {"message": "model 'gpt-4' is not allowed for this key",
                                      "type": "permission_error", "param": None, "code": "model_not_allowed"}}),
    ("/openai/v1/embeddings", {},
     lambda r: r.json()["error"]["type"] == "permission_error"),
    ("/v1/messages", {"anthropic-version": "2023-06-01"},
     lambda r: (r.json()["type"], r.json()["error"]) == (
         "error", {"type": "permission_error", "message": "model 'gpt-4' is not allowed for this key"})
     and r.headers["request-id"] == r.headers["x-gateway-request-id"]),
    ("/anthropic/v1/messages", {},
     lambda r: r.json()["error"]["type"] == "permission_error"),
    ("/bedrock/model/anthropic.claude-v2/converse", {},
     lambda r: r.json() == {"message": "model 'gpt-4' is not allowed for this key"}
     and r.headers["x-amzn-errortype"] == "AccessDeniedException"),
    ("/model/anthropic.claude-v2/invoke", {},
     lambda r: r.headers["x-amzn-errortype"] == "AccessDeniedException"),
    ("/ollama/api/chat", {},
     lambda r: r.json() == {"error": "model 'gpt-4' is not allowed for this key"}),
    ("/api/generate", {},
     lambda r: r.json() == {"error": "model 'gpt-4' is not allowed for this key"}),
])
def test_error_middleware_alone_renders_a_native_403(path: str, headers: dict[str, str], check: Any) -> None:
    app = ErrorMiddleware(_raising(FORBIDDEN), CFG, deps=Runtime(CFG))
    response = asyncio.run(_call(app, "POST", path, headers={"x-request-id": "req-123", **headers}, json={}))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-gateway-request-id"] == "req-123"
    assert check(response), response.text


def test_error_middleware_alone_under_a_mount_prefix() -> None:
    app = ErrorMiddleware(_raising(FORBIDDEN), CFG, deps=Runtime(CFG))
    host = Starlette(routes=[Mount("/llm", app=app)])
    response = asyncio.run(_call(host, "POST", "/llm/v1/messages", json={}))
    assert response.status_code == 403 and response.json()["type"] == "error"


def test_error_middleware_alone_unknown_path_and_unexpected_exception() -> None:
    app = ErrorMiddleware(_raising(RuntimeError("secret internals /etc/passwd")), CFG, deps=Runtime(CFG))
    missing = asyncio.run(_call(app, "GET", "/nowhere"))
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "unknown path '/nowhere'", "type": "not_found_error"}}
    crashed = asyncio.run(_call(app, "POST", "/v1/chat/completions", json={}))
    assert crashed.status_code == 500
    assert crashed.json()["error"]["type"] == "server_error"
    assert "secret internals" not in crashed.text and "Traceback" not in crashed.text


def test_error_middleware_alone_ends_a_started_stream_with_the_family_error_frame() -> None:
    async def stub(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"event: ping\ndata: {}\n\n", "more_body": True})
        get_context(scope).committed = True
        raise GatewayError("upstream_stream_error", "upstream stream failed (connection lost)")

    app = ErrorMiddleware(stub, CFG, deps=Runtime(CFG))
    response = asyncio.run(_call(app, "POST", "/v1/messages", json={}))
    assert response.status_code == 200
    frames = response.text.split("\n\n")
    assert frames[0] == "event: ping\ndata: {}"
    assert frames[1].startswith("event: error\ndata: ")
    assert orjson.loads(frames[1].split("data: ", 1)[1])["error"]["message"] == \
        "upstream stream failed (connection lost)"


def test_auth_middleware_on_a_stub_behind_the_error_middleware() -> None:
    async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = orjson.dumps({"principal": get_context(scope).principal.key_id})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    runtime = Runtime(CFG)
    app = ErrorMiddleware(AuthMiddleware(echo, CFG, deps=runtime), CFG, deps=runtime)
    ok = asyncio.run(_call(app, "POST", "/v1/chat/completions", json={},
                           headers={"Authorization": f"Bearer {GATEWAY_KEY}"}))
    assert ok.status_code == 200 and ok.json() == {"principal": "team-test"}
    anthropic_key = asyncio.run(_call(app, "POST", "/v1/messages", json={}, headers={"x-api-key": GATEWAY_KEY}))
    assert anthropic_key.json() == {"principal": "team-test"}
    missing = asyncio.run(_call(app, "POST", "/v1/chat/completions", json={}))
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = asyncio.run(_call(app, "POST", "/ollama/api/chat", json={}, headers={"Authorization": "Bearer nope"}))
    assert wrong.status_code == 401 and set(wrong.json()) == {"error"}
    bedrock = asyncio.run(_call(app, "POST", "/bedrock/model/m/converse", json={}))
    assert bedrock.status_code == 403
    assert bedrock.headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
