"""`llm-gateway demo`: the gateway, simulated providers for all four families and embedded state in
one process, on loopback, with nothing to configure.

Contract: starts the simulated provider on a free 127.0.0.1 port, loads `config/examples/demo.yaml`
against it (one demo key, no Redis), serves the gateway on `host:port`, prints a copy-paste curl
command and Python SDK snippet per family, and serves until Ctrl-C. The banner says how to install the
SDKs the snippets use (the `sdk` extra) and names those missing from this interpreter.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import socket
from pathlib import Path

import uvicorn

import config as config_package
from config import parse_config

DEMO_KEY = "gw-demo-key"
DEMO_AKID = "GWDEMO00000000000001"
DEMO_AWS_SECRET = "gw-demo-aws-secret"
_CONFIG = Path(config_package.__file__).resolve().parent / "examples" / "demo.yaml"
SDKS = ("openai", "anthropic", "boto3", "ollama")  # the `sdk` extra of pyproject.toml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sdk_note() -> str:
    missing = [name for name in SDKS if importlib.util.find_spec(name) is None]
    note = "The Python snippets use the official SDKs: pip install 'llm-edge-gateway[sdk]' (in a checkout: pip install -e '.[sdk]')"
    return note + (f"\n  not installed here: {', '.join(missing)}" if missing else "")


def snippets(base: str) -> str:
    k = DEMO_KEY
    return f"""
LLM gateway demo on {base}  (simulated providers, embedded state; Ctrl-C to stop)
Gateway key: {k}
{sdk_note()}

# OpenAI
curl -s {base}/v1/chat/completions -H "Authorization: Bearer {k}" -H "Content-Type: application/json" \\
  -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'
python -c 'from openai import OpenAI; c = OpenAI(base_url="{base}/v1", api_key="{k}"); print(c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'

# Anthropic
curl -s {base}/v1/messages -H "x-api-key: {k}" -H "anthropic-version: 2023-06-01" -H "Content-Type: application/json" \\
  -d '{{"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{{"role": "user", "content": "Hello"}}]}}'
python -c 'from anthropic import Anthropic; c = Anthropic(base_url="{base}", api_key="{k}"); print(c.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{{"role": "user", "content": "Hello"}}]).content[0].text)'

# AWS Bedrock (curl and boto3 sign with SigV4 using the gateway-issued identity)
curl -s {base}/bedrock/model/anthropic.claude-v2/converse --aws-sigv4 "aws:amz:us-east-1:bedrock" --user "{DEMO_AKID}:{DEMO_AWS_SECRET}" -H "Content-Type: application/json" \\
  -d '{{"messages": [{{"role": "user", "content": [{{"text": "Hello"}}]}}]}}'
python -c 'import boto3; model="anthropic.claude-3-sonnet-20240229-v1:0"; c = boto3.client("bedrock-runtime", endpoint_url="{base}/bedrock", region_name="us-east-1", aws_access_key_id="{DEMO_AKID}", aws_secret_access_key="{DEMO_AWS_SECRET}"); print(c.converse(modelId=model, messages=[{{"role": "user", "content": [{{"text": "Hello"}}]}}])["output"]["message"]["content"][0]["text"])'

# Ollama
curl -s {base}/ollama/api/chat -H "Authorization: Bearer {k}" -H "Content-Type: application/json" -d '{{"model": "llama3.2", "messages": [{{"role": "user", "content": "Hello"}}], "stream": false}}'
python -c 'import ollama; c = ollama.Client(host="{base}/ollama", headers={{"Authorization": "Bearer {k}"}}); print(c.chat(model="llama3.2", messages=[{{"role": "user", "content": "Hello"}}]).message.content)'
"""


def demo_config(upstream: str):  # -> Config
    env = {"DEMO_UPSTREAM": upstream, "DEMO_KEY_SHA256": hashlib.sha256(DEMO_KEY.encode()).hexdigest()}
    return parse_config(_CONFIG.read_text(encoding="utf-8"), str(_CONFIG), env)


async def _serve(host: str, port: int) -> None:
    from proxy.app import build_app
    from proxy.cli.serve import uvicorn_options
    from proxy.mock import MockOptions, build_mock_app

    mock_port = _free_port()
    opts = {k: v for k, v in uvicorn_options().items() if k != "loop"}
    mock = uvicorn.Server(uvicorn.Config(build_mock_app(MockOptions(record=False)), host="127.0.0.1",
                                         port=mock_port, **{**opts, "lifespan": "off"}))
    gateway = uvicorn.Server(uvicorn.Config(build_app(demo_config(f"http://127.0.0.1:{mock_port}")),
                                            host=host, port=port, **opts))
    mock_task = asyncio.create_task(mock.serve())
    while not mock.started:
        await asyncio.sleep(0.02)
        if mock_task.done():
            raise SystemExit("the simulated provider failed to start")
    gateway_task = asyncio.create_task(gateway.serve())
    while not gateway.started:
        await asyncio.sleep(0.02)
        if gateway_task.done():
            mock.should_exit = True
            raise SystemExit(f"the gateway could not listen on {host}:{port}")
    print(snippets(f"http://{host}:{port}"), flush=True)
    await gateway_task
    mock.should_exit = True
    await mock_task


def run_demo(host: str = "127.0.0.1", port: int = 8080) -> int:
    try:
        asyncio.run(_serve(host, port))
    except KeyboardInterrupt:
        pass
    return 0
