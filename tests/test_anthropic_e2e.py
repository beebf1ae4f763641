"""Anthropic family end to end: the official `anthropic` SDK 2.x (Authorization: Bearer) and an old 1.x SDK
(x-api-key) -> real gateway -> simulated upstream.

The upstream must see the deployment key as `x-api-key`, never an `authorization` header nor the gateway key,
and `anthropic-version` / `anthropic-beta` exactly as the client sent them.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import (
    GATEWAY_KEY,
    GATEWAY_KEY_SHA,
    UPSTREAM_ANTHROPIC_KEY,
    clear_recorded,
    recorded,
)
from tests.recording import Contexts, Tape, gw, gw_module, sha, upstream  # noqa: F401 - fixtures

MSGS = [{"role": "user", "content": "Hello, Claude"}]
OLD_VENV = Path("/tmp/anthropic-old-venv")


def only_request(base: str) -> dict[str, Any]:
    recs = recorded(base)
    assert len(recs) == 1, [r["raw_path"] for r in recs]
    return recs[0]


def values(rec: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in rec["headers"] if k == name]


def assert_upstream_credentials(rec: dict[str, Any]) -> None:
    assert values(rec, "x-api-key") == [UPSTREAM_ANTHROPIC_KEY]
    assert values(rec, "authorization") == []
    assert not any(GATEWAY_KEY in v for _, v in rec["headers"]), "the gateway key leaked upstream"


BASES = ["", "/anthropic"]


@pytest.mark.parametrize("prefix", BASES)
def test_messages_create(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = anthropic.Anthropic(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    raw = client.messages.with_raw_response.create(model="claude-x", max_tokens=64, messages=MSGS,
                                                   extra_headers={"anthropic-beta": "a,b"})
    message = raw.parse()
    assert message.content[0].text.startswith("This is a simulated response from claude-x")
    sent = raw.http_request.headers
    assert sent["authorization"] == f"Bearer {GATEWAY_KEY}" and "x-api-key" not in sent  # SDK 2.x style
    assert raw.http_request.url.path == f"{prefix}/v1/messages"

    rec = only_request(upstream.base)
    assert (rec["method"], rec["raw_path"], rec["query"]) == ("POST", "/v1/messages", "")
    assert_upstream_credentials(rec)
    assert values(rec, "anthropic-version") == [sent["anthropic-version"]]
    assert values(rec, "anthropic-beta") == ["a,b"]
    assert rec["body_sha256"] == sha(raw.http_request.content)

    answer = upstream.responses[0]
    assert raw.status_code == answer.status == 200
    assert raw.read() == bytes(answer.body)
    assert raw.headers["request-id"] == dict(answer.headers)[b"request-id"].decode()  # upstream id passes
    assert raw.headers["x-gateway-provider"] == "anthropic"
    assert raw.headers["x-gateway-attempts"] == "1"
    assert raw.headers["x-gateway-request-id"].startswith("gw-")

    ctx = gw.contexts.last(1)
    assert ctx.family == "anthropic" and ctx.model == "claude-x"
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (message.usage.input_tokens,
                                                                 message.usage.output_tokens)


@pytest.mark.parametrize("prefix", BASES)
def test_messages_stream_get_final_message(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = anthropic.Anthropic(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    with client.messages.stream(model="claude-x", max_tokens=64, messages=MSGS,
                                extra_headers={"anthropic-beta": "fine-grained-tool-streaming-2025-05-14"}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    text = final.content[0].text
    assert text.startswith("This is a simulated response from claude-x") and "".join(pieces) == text
    assert final.stop_reason == "end_turn"

    rec = only_request(upstream.base)
    assert rec["raw_path"] == "/v1/messages"
    assert json.loads(base64.b64decode(rec["body_b64"])) == {
        "model": "claude-x", "max_tokens": 64, "messages": MSGS, "stream": True}
    assert values(rec, "anthropic-beta") == ["fine-grained-tool-streaming-2025-05-14"]
    assert_upstream_credentials(rec)
    ctx = gw.contexts.last(1)
    assert ctx.stream is True
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (final.usage.input_tokens, final.usage.output_tokens)


def test_stream_bytes_and_event_lines_are_untouched(gw: SimpleNamespace, upstream: Tape) -> None:
    body = b'{"model":"claude-x","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
    headers = {"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    with httpx.stream("POST", f"{gw.url}/v1/messages?beta=true", content=body, headers=headers) as response:
        assert response.status_code == 200
        got = b"".join(response.iter_raw())
    assert got == bytes(upstream.responses[0].body)
    assert got.startswith(b"event: message_start\ndata: ")
    rec = only_request(upstream.base)
    assert rec["body_sha256"] == sha(body) and rec["query"] == "beta=true"
    assert values(rec, "anthropic-version") == ["2023-06-01"]
    assert_upstream_credentials(rec)  # the client's x-api-key was replaced, not duplicated


@pytest.mark.parametrize("prefix", BASES)
def test_count_tokens(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = anthropic.Anthropic(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    raw = client.messages.with_raw_response.count_tokens(model="claude-x", messages=MSGS)
    counted = raw.parse()
    sent = raw.http_request.content
    assert counted.input_tokens == max(1, len(sent) // 4)  # the simulated upstream's own rule
    rec = only_request(upstream.base)
    assert rec["raw_path"] == "/v1/messages/count_tokens"
    assert rec["body_sha256"] == sha(sent)
    assert_upstream_credentials(rec)
    assert raw.read() == bytes(upstream.responses[0].body)
    assert gw.contexts.last(1).operation == "count_tokens"


@pytest.mark.parametrize("prefix", BASES)
def test_models_list_asks_an_unlisted_deployment(gw: SimpleNamespace, upstream: Tape, prefix: str) -> None:
    client = anthropic.Anthropic(base_url=gw.url + prefix, api_key=GATEWAY_KEY, max_retries=0)
    page = client.models.list()
    assert [m.id for m in page.data] == ["claude-sonnet-4-5", "claude-3-5-haiku-20241022", "claude-3-sonnet-20240229"]
    assert page.has_more is False
    rec = only_request(upstream.base)
    assert (rec["method"], rec["raw_path"]) == ("GET", "/v1/models")
    assert_upstream_credentials(rec)
    assert values(rec, "anthropic-version")  # forwarded as the SDK sent it


def test_models_list_from_config_and_bare_models_without_version_is_openai(
        mock_upstream: str, make_gateway: Any) -> None:
    clear_recorded(mock_upstream)
    gateway = make_gateway(f"""
auth: {{keys: [{{id: t, sha256: {GATEWAY_KEY_SHA}}}]}}
providers:
  claude: {{type: anthropic, base_url: "{mock_upstream}", api_key: k1, models: [claude-opus-4-1, claude-x]}}
  claude2: {{type: anthropic, base_url: "{mock_upstream}", api_key: k2, models: [claude-x, claude-haiku-4-5]}}
  openai: {{type: openai, base_url: "{mock_upstream}/v1", api_key: k3, models: [gpt-4o]}}
""")
    for prefix in BASES:
        client = anthropic.Anthropic(base_url=gateway + prefix, api_key=GATEWAY_KEY, max_retries=0)
        page = client.models.list()
        assert [m.id for m in page.data] == ["claude-opus-4-1", "claude-x", "claude-haiku-4-5"]
        assert (page.first_id, page.last_id) == ("claude-opus-4-1", "claude-haiku-4-5")
    # the same bare path without anthropic-version belongs to OpenAI
    response = httpx.get(f"{gateway}/v1/models", headers={"authorization": f"Bearer {GATEWAY_KEY}"})
    assert response.json()["object"] == "list" and [m["id"] for m in response.json()["data"]] == ["gpt-4o"]
    assert recorded(mock_upstream) == []


# --- an old SDK (1.x) that sends x-api-key ------------------------------------------------------------

_OLD_SDK_SCRIPT = textwrap.dedent("""
    import json, sys
    import anthropic
    key, bases = sys.argv[1], sys.argv[2:]
    out = {"version": anthropic.__version__, "runs": []}
    for base in bases:
        client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
        raw = client.messages.with_raw_response.create(
            model="claude-x", max_tokens=32, messages=[{"role": "user", "content": "hi"}])
        msg = raw.parse()
        sent = raw.http_request.headers
        with client.messages.stream(model="claude-x", max_tokens=32,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            final = stream.get_final_message()
        out["runs"].append({
            "sent_x_api_key": sent.get("x-api-key") == key, "sent_authorization": "authorization" in sent,
            "anthropic_version": sent.get("anthropic-version"),
            "text": msg.content[0].text, "usage": [msg.usage.input_tokens, msg.usage.output_tokens],
            "stream_text": final.content[0].text, "stream_usage": [final.usage.input_tokens, final.usage.output_tokens],
            "provider": raw.headers.get("x-gateway-provider"),
        })
    print(json.dumps(out))
""")
_NETWORK_HINTS = ("connection", "network", "resolve", "temporary failure", "timed out", "no matching distribution",
                  "could not find a version", "proxy", "ssl")


@pytest.fixture(scope="session")
def old_anthropic_python() -> str:
    """A throwaway venv with `anthropic<2`, built once and reused across runs (and guarded by a lock)."""
    python = OLD_VENV / "bin" / "python"
    ready = OLD_VENV / ".ready"
    with open(f"{OLD_VENV}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            if not python.exists():
                subprocess.run([sys.executable, "-m", "venv", "--clear", str(OLD_VENV)], check=True,
                               capture_output=True, timeout=120)
            proc = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "anthropic<2"],
                capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip()[-600:]
                in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
                if not in_ci and any(h in tail.lower() for h in _NETWORK_HINTS):
                    pytest.skip(f"cannot install anthropic<2 from the package registry: {tail}")
                pytest.fail(f"pip install 'anthropic<2' failed: {tail}")
            ready.write_text("ok\n")
    return str(python)


def test_old_sdk_with_x_api_key(old_anthropic_python: str, gw: SimpleNamespace, upstream: Tape) -> None:
    proc = subprocess.run([old_anthropic_python, "-c", _OLD_SDK_SCRIPT, GATEWAY_KEY, gw.url, f"{gw.url}/anthropic"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"].split(".")[0] in ("0", "1"), result["version"]
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["sent_x_api_key"] is True and run["sent_authorization"] is False
        assert run["text"].startswith("This is a simulated response from claude-x")
        assert run["stream_text"] == run["text"]
        assert run["provider"] == "anthropic"
        assert run["usage"][1] == run["stream_usage"][1] > 0
    recs = recorded(upstream.base)
    assert [r["raw_path"] for r in recs] == ["/v1/messages"] * 4
    for rec, version in zip(recs, [r["anthropic_version"] for r in result["runs"] for _ in (0, 1)]):
        assert_upstream_credentials(rec)
        assert values(rec, "anthropic-version") == [version]
