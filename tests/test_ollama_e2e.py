"""Ollama native API end to end: the `ollama` client -> gateway -> simulated Ollama.

Covers chat and generate (streamed and not), embed, list (tags) and show under `/ollama` and on the
bare path space; NDJSON streaming when the body has no "stream" field; and the upstream credential:
the deployment's key as `Authorization: Bearer`, or no Authorization at all when it has none.
"""
from __future__ import annotations

import base64
import json
from typing import Any, Callable

import httpx
import ollama
import pytest

from tests.conftest import GATEWAY_KEY, GATEWAY_KEY_SHA, UPSTREAM_OLLAMA_KEY, clear_recorded, recorded

MODEL = "llama3.2:latest"
PROMPT = [{"role": "user", "content": "Hello from the Ollama suite"}]
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}


@pytest.fixture(params=["/ollama", ""], ids=["prefixed", "bare"])
def host(request: pytest.FixtureRequest, gateway: str) -> str:
    return gateway + request.param


def client(host: str) -> ollama.Client:
    return ollama.Client(host=host, headers=AUTH)


def upstream_auth(mock_upstream: str) -> list[str | None]:
    """The Authorization header of every recorded upstream request (None when absent)."""
    out = []
    for rec in recorded(mock_upstream):
        values = [v for k, v in rec["headers"] if k.lower() == "authorization"]
        assert len(values) <= 1
        assert not any(GATEWAY_KEY in v for _, v in rec["headers"]), "the gateway key leaked upstream"
        out.append(values[0] if values else None)
    return out


def assert_upstream_key(mock_upstream: str, paths: list[str]) -> None:
    recs = recorded(mock_upstream)
    assert [r["raw_path"] for r in recs] == paths
    assert upstream_auth(mock_upstream) == [f"Bearer {UPSTREAM_OLLAMA_KEY}"] * len(paths)


def test_chat_non_streaming(host: str, mock_upstream: str) -> None:
    out = client(host).chat(model=MODEL, messages=PROMPT, stream=False)
    assert out.done is True and out.done_reason == "stop"
    assert out.message.role == "assistant"
    assert out.message.content.startswith(f"This is a simulated response from {MODEL}")
    assert out.prompt_eval_count and out.prompt_eval_count > 0
    assert out.eval_count == len(out.message.content.split())
    assert_upstream_key(mock_upstream, ["/api/chat"])
    assert json.loads(base64.b64decode(recorded(mock_upstream)[0]["body_b64"]))["stream"] is False


def test_chat_streaming(host: str, mock_upstream: str) -> None:
    parts = list(client(host).chat(model=MODEL, messages=PROMPT, stream=True))
    assert len(parts) >= 3
    assert all(p.done is False for p in parts[:-1]) and parts[-1].done is True
    text = "".join(p.message.content for p in parts)
    assert text.startswith(f"This is a simulated response from {MODEL}")
    assert parts[-1].eval_count == len(text.split())
    assert_upstream_key(mock_upstream, ["/api/chat"])


def test_generate_non_streaming(host: str, mock_upstream: str) -> None:
    out = client(host).generate(model=MODEL, prompt="Why is the sky blue?", stream=False)
    assert out.done is True
    assert out.response.startswith(f"This is a simulated response from {MODEL}")
    assert out.total_duration and out.total_duration > 0
    assert_upstream_key(mock_upstream, ["/api/generate"])


def test_generate_streaming(host: str, mock_upstream: str) -> None:
    parts = list(client(host).generate(model=MODEL, prompt="Why is the sky blue?", stream=True))
    assert len(parts) >= 3 and parts[-1].done is True
    text = "".join(p.response for p in parts)
    assert text.startswith(f"This is a simulated response from {MODEL}")
    assert parts[-1].prompt_eval_count and parts[-1].eval_count == len(text.split())
    assert_upstream_key(mock_upstream, ["/api/generate"])


def test_embed(host: str, mock_upstream: str) -> None:
    out = client(host).embed(model="nomic-embed-text:latest", input=["first text", "second text"])
    assert len(out.embeddings) == 2 and all(len(v) == 16 for v in out.embeddings)
    assert out.embeddings[0] != out.embeddings[1]
    assert out.prompt_eval_count and out.prompt_eval_count > 0
    assert_upstream_key(mock_upstream, ["/api/embed"])


def test_list(host: str, mock_upstream: str) -> None:
    out = client(host).list()
    names = {m.model for m in out.models}
    assert {"llama3.2:latest", "qwen2.5:7b", "nomic-embed-text:latest"} <= names
    # the deployment lists no models, so the gateway asked it, with the deployment's key
    assert_upstream_key(mock_upstream, ["/api/tags"])
    assert recorded(mock_upstream)[0]["method"] == "GET"


def test_show(host: str, mock_upstream: str) -> None:
    out = client(host).show(MODEL)
    assert out.modelfile == f"FROM {MODEL}\n"
    assert out.details is not None and out.details.format == "gguf"
    assert_upstream_key(mock_upstream, ["/api/show"])


@pytest.mark.parametrize("path", ["/ollama/api/chat", "/api/chat", "/ollama/api/generate"])
def test_missing_stream_field_streams_ndjson(gateway: str, mock_upstream: str, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL}
    if path.endswith("chat"):
        body["messages"] = PROMPT
    else:
        body["prompt"] = "hi"
    with httpx.stream("POST", gateway + path, json=body, headers=AUTH) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = [line for line in resp.iter_lines() if line]
    objs = [json.loads(line) for line in lines]
    assert len(objs) >= 3
    assert [o["done"] for o in objs] == [False] * (len(objs) - 1) + [True]
    assert objs[-1]["eval_count"] == len(objs) - 1
    [rec] = recorded(mock_upstream)
    assert "stream" not in json.loads(base64.b64decode(rec["body_b64"]))


def test_gateway_key_is_required(gateway: str, mock_upstream: str) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=f"{gateway}/ollama").chat(model=MODEL, messages=PROMPT, stream=False)
    assert info.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=f"{gateway}/ollama", headers={"Authorization": "Bearer wrong"}).chat(
            model=MODEL, messages=PROMPT, stream=False)
    assert info.value.status_code == 401
    assert recorded(mock_upstream) == []


def test_deployment_without_api_key_sends_no_authorization(
        mock_upstream: str, make_gateway: Callable[..., str]) -> None:
    clear_recorded(mock_upstream)
    gw = make_gateway(f"""
auth:
  keys:
    - id: team-test
      sha256: {GATEWAY_KEY_SHA}
providers:
  ollama: {{type: ollama, base_url: "{mock_upstream}"}}
""")
    c = client(f"{gw}/ollama")
    assert c.chat(model=MODEL, messages=PROMPT, stream=False).message.content
    assert "".join(p.response for p in c.generate(model=MODEL, prompt="hi", stream=True))
    c.embed(model=MODEL, input="x")
    c.show(MODEL)
    c.list()
    assert [r["raw_path"] for r in recorded(mock_upstream)] == [
        "/api/chat", "/api/generate", "/api/embed", "/api/show", "/api/tags"]
    assert upstream_auth(mock_upstream) == [None] * 5
