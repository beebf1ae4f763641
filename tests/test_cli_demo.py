"""`llm-gateway demo` as a user runs it: start it, copy the printed snippets, run them, press Ctrl-C.

For each family the demo prints a curl command and a Python SDK one-liner with the literal key and a
served model. The test runs every printed Python one-liner with this interpreter (and every curl
command when curl is installed), then sends SIGINT and expects a clean exit within 10 s.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import orjson
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("OpenAI", "Anthropic", "AWS Bedrock", "Ollama")


def _env() -> dict[str, str]:
    drop = {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
            "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "OLLAMA_HOST", "LLM_GATEWAY_CONFIG"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    return env


class Demo:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "demo", "--port", str(port)], cwd=ROOT, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.out, True), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.err, False), daemon=True).start()

    def _drain(self, stream, sink: list[str], watch: bool) -> None:  # keeps the pipes from filling up
        for line in stream:
            sink.append(line)
            if watch and line.startswith("python -c 'import ollama"):
                self.ready.set()

    def text(self) -> str:
        return "".join(self.out)


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    d = Demo(free_port())
    try:
        if not d.ready.wait(30):
            pytest.fail(f"the demo printed no snippets; stdout={d.text()!r} stderr={''.join(d.err)!r}")
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def _sections(text: str) -> dict[str, dict[str, list[str]]]:
    """Family heading -> {"curl": [commands], "python": [code]}, continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("# "):
            name = next((f for f in FAMILIES if line[2:].startswith(f)), None)
            current = sections.setdefault(name, {"curl": [], "python": []}) if name else None
            continue
        if current is None:
            continue
        if line.startswith("curl "):
            command = line
            while command.endswith("\\"):
                command = command[:-1] + next(lines).strip()
            current["curl"].append(command)
        elif line.startswith("python -c "):
            argv = shlex.split(line)
            assert argv[:2] == ["python", "-c"] and len(argv) == 3, line
            current["python"].append(argv[2])
    return sections


def test_demo_prints_runnable_snippets_and_stops_on_ctrl_c(demo: Demo) -> None:
    base = f"http://127.0.0.1:{demo.port}"
    text = demo.text()
    assert f"LLM gateway demo on {base}" in text
    assert "Gateway key: gw-demo-key" in text
    sections = _sections(text)
    assert sorted(sections) == sorted(FAMILIES), text
    for family, snippet in sections.items():
        assert snippet["curl"], f"{family}: no curl command"
        assert snippet["python"], f"{family}: no Python snippet"
        code = snippet["python"][0]
        assert base in code and base in snippet["curl"][0]
        assert re.search(r'\bmodel="[^"]+"', code), f"{family}: no model=\"...\" in {code}"
    for family in ("OpenAI", "Anthropic"):
        assert 'api_key="gw-demo-key"' in sections[family]["python"][0]
        assert "gw-demo-key" in sections[family]["curl"][0]
    assert "Bearer gw-demo-key" in sections["Ollama"]["python"][0]
    assert "Bearer gw-demo-key" in sections["Ollama"]["curl"][0]
    assert 'aws_access_key_id="GWDEMO00000000000001"' in sections["AWS Bedrock"]["python"][0]

    # Run every printed Python one-liner, concurrently, with this interpreter.
    runs = {family: subprocess.Popen([sys.executable, "-c", s["python"][0]], cwd=ROOT, env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for family, s in sections.items()}
    for family, proc in runs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{family} snippet failed: {err}"
        assert out.strip().startswith("This is a simulated response"), f"{family}: {out!r}"

    # And every printed curl command, when curl is here (Bedrock's needs --aws-sigv4, curl >= 7.75).
    curl = shutil.which("curl")
    if curl:
        version = tuple(int(x) for x in re.findall(r"\d+", subprocess.run(
            [curl, "--version"], capture_output=True, text=True).stdout.split()[1])[:2])
        for family, s in sections.items():
            if "--aws-sigv4" in s["curl"][0] and version < (7, 75):
                continue
            result = subprocess.run(shlex.split(s["curl"][0]), capture_output=True, timeout=30, env=_env())
            assert result.returncode == 0, f"{family} curl failed: {result.stderr!r}"
            body = orjson.loads(result.stdout)
            assert "error" not in body, f"{family}: {body}"
            assert b"This is a simulated response" in result.stdout, f"{family}: {result.stdout!r}"

    started = time.monotonic()
    demo.proc.send_signal(signal.SIGINT)
    code = demo.proc.wait(timeout=10)
    assert time.monotonic() - started < 10
    assert code == 0, "".join(demo.err)
    assert "Traceback" not in "".join(demo.err)


def test_cli_help_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "--help"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "check-config", "demo", "mock-provider"):
        assert re.search(rf"^\s+{re.escape(command)}\s", result.stdout, re.M), result.stdout
    script = Path(sys.executable).with_name("llm-gateway")
    if script.exists():
        installed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30, env=_env())
        assert installed.returncode == 0 and installed.stdout == result.stdout


def test_serve_reads_x_forwarded_for_only_from_named_load_balancers(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.cli.serve import uvicorn_options

    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert uvicorn_options()["proxy_headers"] is False
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.0/8")
    assert uvicorn_options()["proxy_headers"] is True
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    # httptools under the edge limits of proxy/server (header and body timeouts, header caps)
    assert uvicorn_options()["server_header"] is False and issubclass(uvicorn_options()["http"], HttpToolsProtocol)
