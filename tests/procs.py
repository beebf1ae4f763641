"""Real processes for the distributed tests: gateway replicas, the simulated provider, redis-server.

- `Procs(directory)` starts processes on free 127.0.0.1 ports and stops every one of them in
  `close()` (terminate, then kill). Each process writes stdout and stderr to `<directory>/<name>.log`;
  `report()` returns the tail of every log, so a failing test can show what the processes said.
- `Procs.gateways(config_text, n)` writes the YAML to `<directory>/gateway.yaml` and runs
  `python -m proxy.cli serve --config F --port P` n times, in parallel, then waits for `/healthz`.
- `Procs.mock()` runs `python -m proxy.cli mock-provider --port P --no-record --chunk-interval-ms 0`
  and waits for `/__mock/health`.
- `restart_redis(info)` restarts the `redis_server` fixture's server on the same port with the same
  arguments (the fixture kills whatever `info["proc"]` is at teardown).
- The `procs` fixture yields a `Procs` in the test's tmp_path; at teardown it stops everything and
  prints the log tails, which pytest shows only when the test failed.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    args: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])


class Procs:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def spawn(self, name: str, args: list[str], port: int) -> Proc:
        log_path = self.directory / f"{name}.log"
        log = log_path.open("ab")
        try:
            popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=_env())
        finally:
            log.close()  # the child holds its own descriptor
        proc = Proc(name, popen, port, log_path, args)
        self.procs.append(proc)
        return proc

    def wait_http(self, proc: Proc, path: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            try:
                if httpx.get(proc.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not ready after {timeout}s:\n{proc.tail()}")
            time.sleep(0.05)

    def mock(self, *extra: str) -> Proc:
        port = free_port()
        proc = self.spawn("mock", [sys.executable, "-m", "proxy.cli", "mock-provider", "--port", str(port),
                                   "--no-record", "--chunk-interval-ms", "0", *extra], port)
        self.wait_http(proc, "/__mock/health")
        return proc

    def gateways(self, config_text: str, n: int, name: str = "gateway") -> list[Proc]:
        config = self.directory / f"{name}.yaml"
        config.write_text(config_text)
        started = []
        for i in range(n):
            port = free_port()
            started.append(self.spawn(f"{name}-{i}", [sys.executable, "-m", "proxy.cli", "serve", "--config",
                                                      str(config), "--host", "127.0.0.1", "--port", str(port)], port))
        for proc in started:
            self.wait_http(proc, "/healthz")
        return started

    def report(self, lines: int = 40) -> str:
        parts = []
        for proc in self.procs:
            state = "running" if proc.alive() else f"exited {proc.popen.returncode}"
            parts.append(f"----- {proc.name} (port {proc.port}, pid {proc.pid}, {state}): {proc.log_path}\n{proc.tail(lines)}")
        return "\n".join(parts)

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("LLM_GATEWAY_CONFIG", None)
    env.pop("REDIS_URL", None)
    return env


def wait_redis(port: int, timeout: float = 10.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
    finally:
        client.close()


def restart_redis(info: dict[str, Any]) -> None:
    """Start the `redis_server` fixture's server again, same port and arguments (after a kill)."""
    old = info["proc"]
    if old.poll() is None:
        old.kill()
    old.wait()
    info["proc"] = subprocess.Popen(info["args"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_redis(info["port"])


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    group = Procs(tmp_path / "procs")
    try:
        yield group
    finally:
        group.close()
        print(group.report())  # shown by pytest only when the test failed
