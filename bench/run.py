#!/usr/bin/env python
"""One benchmark run: direct upstream vs bare pass-throughs vs the full gateway (and LiteLLM if asked).

    .venv/bin/python bench/run.py [--duration 10] [--memory] [--litellm-venv PATH]

Servers run pinned to CPU 0 (`taskset -c 0`), load generators to CPU 1. Everything binds 127.0.0.1.
Targets (non-streaming chat completions, wrk at concurrency 1/16/64, `--duration` s each):
  direct            the upstream itself: nginx answering a static chat completion (else the simulated provider)
  bare-httpx        bench/bare_httpx.py -> upstream (Starlette + one httpx.AsyncClient)
  bare-aiohttp      bench/bare_aiohttp.py -> upstream (Starlette + one aiohttp.ClientSession)
  bare-wire         bench/bare_wire.py -> upstream (Starlette + the gateway's own proxy.upstream.wire transport):
                    not a third-party client, so not a "/ bare" reference; its own column shows what
                    the middleware stack costs on top of the same wire
  gateway[T]        `llm-gateway serve`, full stack (keys auth, access log on), upstream transport T
  litellm           only with --litellm-venv (a venv with `litellm[proxy]`; never a project dependency)
Streaming: time to first chunk and inter-chunk gap of SSE streams (10 ms chunk interval), direct vs
gateway, at concurrency 1 and 16 (a burst and staggered arrivals), from bench/stream_upstream.py, the
streaming counterpart of nginx (`--stream-upstream mock`: from the simulated provider instead, whose
own CPU per stream start then shares the gateway's core). `--memory`: gateway RSS after 10k and 100k
requests (1 in 4 streamed). Prints markdown tables; writes bench/results/<time>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
KEY = "sk-bench-0123456789abcdef"  # the gateway key (and LiteLLM master key)
UPSTREAM_KEY = "sk-upstream-bench"
MODEL = "gpt-4o-mini"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello in one sentence."}]})
STREAM_BODY = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Say hello."}]})
CHAT_JSON = json.dumps({  # what the simulated provider answers, served statically by nginx
    "id": "chatcmpl-bench0001", "object": "chat.completion", "created": 1700000000, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "This is a simulated response from "
                 "gpt-4o-mini. The", "refusal": None, "annotations": []}, "logprobs": None,
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 16, "completion_tokens": 8, "total_tokens": 24,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "system_fingerprint": "fp_mock"}, separators=(",", ":"))
SERVER_CPU, CLIENT_CPU = "0", "1"
CONCURRENCY = (1, 16, 64)
STREAM_CHUNKS, STREAM_INTERVAL_MS = 16, 10


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if shutil.which("taskset") else cmd


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, workdir: Path, *, cpu: str = SERVER_CPU,
                 env: dict[str, str] | None = None, ready_path: str | None = None, ready_timeout: float = 30) -> None:
        self.name, self.port, self.ready_path = name, port, ready_path
        self.log = workdir / f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}.log"
        self.proc = subprocess.Popen(pinned(cpu, cmd), stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True)
        self._wait(ready_timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if self.ready_path is None:
                        return
                    s.sendall(f"GET {self.ready_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f}s; see {self.log}")

    def cpu_seconds(self) -> float:
        """User+system CPU of every process in this server's process group (nginx master + worker, etc.).

        Each thread's nanoseconds on a CPU (`/proc/<pid>/task/<tid>/schedstat`), summed: `stat`'s
        utime + stime count 10 ms ticks, ~5 µs a request over a 3 s round at 700 req/s. A thread that
        exits between two readings drops out of the second (every server here keeps its threads);
        ticks where schedstat is missing."""
        total_ns, ticks = 0, 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.proc.pid:
                    continue
                try:
                    total_ns += sum(int(t.read_text().split()[0]) for t in stat.parent.glob("task/*/schedstat"))
                except (OSError, IndexError, ValueError):
                    ticks += int(fields[11]) + int(fields[12])
        return total_ns / 1e9 + ticks / os.sysconf("SC_CLK_TCK")

    def thread_cpu(self) -> tuple[float, float]:
        """(CPU seconds of this server process's first thread, of its other threads), from schedstat.

        For a gateway: the event loop, and the threads beside it (span export, OTLP metric push)."""
        main = other = 0
        for stat in Path(f"/proc/{self.proc.pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                ns = int(stat.read_text().split()[0])
                if stat.parent.name == str(self.proc.pid):
                    main += ns
                else:
                    other += ns
        return main / 1e9, other / 1e9

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group we created for this server only
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


def start_nginx(workdir: Path) -> Server:
    port = free_port()
    d = workdir / "nginx"
    d.mkdir()
    (d / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      default_type application/json;
      return 200 '{CHAT_JSON}';
    }}
  }}
}}
""")
    return Server("nginx", ["nginx", "-e", str(d / "error.log"), "-p", str(d), "-c", str(d / "nginx.conf")],
                  port, workdir)


def start_mock(workdir: Path, interval_ms: float, cpu: str = SERVER_CPU, name: str = "mock-provider") -> Server:
    port = free_port()
    return Server(name, [str(Path(PY).parent / "llm-gateway"), "mock-provider", "--port", str(port), "--no-record",
                         "--chunk-interval-ms", str(interval_ms), "--chunks", str(STREAM_CHUNKS)],
                  port, workdir, cpu=cpu, ready_path="/__mock/health")


def gateway_config(workdir: Path, upstream: str, port: int, tag: str, transport: str = "httptools",
                   redis_url: str = "") -> Path:
    """The bench gateway; with `redis_url`, limits on every scope (high enough never to refuse)."""
    path = workdir / f"gateway-{tag}.yaml"
    transport = transport if transport in ("httptools", "aiohttp") else "aiohttp"
    lim = "{requests_per_minute: 100000000, tokens_per_minute: 1000000000000}"
    global_limit, key_limit, dep_limit = (f", rate_limit: {lim}", f"\n      rate_limit: {lim}", f", rate_limit: {lim}") \
        if redis_url else ("", "", "")
    path.write_text(f"""
gateway: {{timeout: 60s, upstream_transport: {transport}{global_limit}}}
state: {{redis_url: "{redis_url}"}}
auth:
  mode: keys
  keys:
    - id: bench
      sha256: {hashlib.sha256(KEY.encode()).hexdigest()}{key_limit}
providers:
  openai: {{type: openai, base_url: "{upstream}/v1", api_key: {UPSTREAM_KEY}{dep_limit}}}
monitoring:
  access_log: true
server: {{host: 127.0.0.1, port: {port}, workers: 1}}
""")
    return path


def start_gateway(workdir: Path, upstream: str, transport: str, tag: str, cpu: str = SERVER_CPU,
                  redis_url: str = "") -> Server:
    """`llm-gateway serve` (access log to a file); httpx_aiohttp goes through the in-file launcher."""
    port = free_port()
    cfg = gateway_config(workdir, upstream, port, tag, transport, redis_url)
    if transport == "httpx_aiohttp":
        cmd = [PY, str(Path(__file__).resolve()), "--_serve-gateway", str(cfg), str(port)]
        env = {}
    else:
        cmd = [str(Path(PY).parent / "llm-gateway"), "serve", "--config", str(cfg), "--port", str(port)]
        env = {}
    name = f"gateway[{transport}{'+limits' if redis_url else ''}]-{tag}"
    return Server(name, cmd, port, workdir, cpu=cpu, env=env, ready_path="/healthz")


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A bench-owned redis-server on a free port, on the load generator's core (as if remote)."""
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", CLIENT_CPU, "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            import redis

            client = redis.Redis.from_url(url)
            client.ping()
            # the model scope is live-only: set it the way ops would
            client.hset("llmgw:{llmgw}:limits:model:gpt-4o-mini",
                        mapping={"requests_per_minute": 100000000, "tokens_per_minute": 1000000000000})
            return proc, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _serve_gateway_httpx_aiohttp(config: str, port: int) -> None:
    """Bench-only: the gateway with `httpx_aiohttp.AiohttpTransport` (not selectable in the product)."""
    import httpx
    import httpx_aiohttp
    import uvicorn

    from proxy.app import build_app
    from proxy.cli.serve import uvicorn_options

    os.environ["LLM_GATEWAY_CONFIG"] = config
    app = build_app(config)
    app.runtime.transport = lambda: httpx_aiohttp.AiohttpTransport(
        trust_env=False, limits=httpx.Limits(max_connections=1000, keepalive_expiry=30))
    uvicorn.run(app, host="127.0.0.1", port=port, **uvicorn_options())


def start_litellm(workdir: Path, venv: Path, upstream: str) -> Server | None:
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"note: {exe} not found; LiteLLM skipped", file=sys.stderr)
        return None
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(f"""
model_list:
  - model_name: {MODEL}
    litellm_params: {{model: "openai/{MODEL}", api_base: "{upstream}/v1", api_key: {UPSTREAM_KEY}}}
general_settings: {{master_key: {KEY}}}
litellm_settings: {{drop_params: true, telemetry: false}}
""")
    try:
        return Server("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                                  "--num_workers", "1"], port, workdir,
                      env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"},
                      ready_path="/health/liveliness", ready_timeout=180)
    except RuntimeError as exc:
        print(f"note: LiteLLM did not start, skipped: {exc}", file=sys.stderr)
        return None


# ---------------------------------------------------------------- wrk (non-streaming)

def wrk_script(workdir: Path) -> Path:
    path = workdir / "chat.lua"
    path.write_text(f"""wrk.method = "POST"
wrk.body = [[{BODY}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {KEY}"
""")
    return path


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def run_wrk(server: Server, script: Path, conc: int, duration: float) -> dict[str, Any]:
    url = server.url
    cpu0 = server.cpu_seconds()
    cmd = pinned(CLIENT_CPU, ["wrk", "-t1", f"-c{conc}", f"-d{duration:g}s", "--latency", "--timeout", "10s",
                              "-s", str(script), url + "/v1/chat/completions"])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    cpu = server.cpu_seconds() - cpu0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "requests": int(total.group(1)) if total else 0,
            "p50_ms": _ms(lat.get("50", "")), "p90_ms": _ms(lat.get("90", "")), "p99_ms": _ms(lat.get("99", "")),
            "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0),
            "cpu_us_per_req": cpu / int(total.group(1)) * 1e6 if total and int(total.group(1)) else float("nan"),
            "raw": out}


def sanity(url: str) -> dict[str, Any]:
    """One request before measuring: must be a 200 chat completion. Returns the response head."""
    import httpx

    r = httpx.post(url + "/v1/chat/completions", content=BODY, timeout=10, trust_env=False,
                   headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    ok = r.status_code == 200 and "chat.completion" in r.text
    return {"ok": ok, "status": r.status_code, "headers": [(k.decode(), v.decode()) for k, v in r.headers.raw],
            "body": r.text[:300]}


# ---------------------------------------------------------------- asyncio clients (run pinned to CPU 1)

async def _stream_client(url: str, conc: int, per_worker: int, budget: float, stagger: float = 0.0) -> dict[str, Any]:
    """`stagger` > 0: worker i starts i/conc of that many seconds late, so requests arrive spread
    out (steady traffic) instead of all together (a burst that then repeats in lockstep)."""
    import aiohttp

    ttfc: list[float] = []
    gaps: list[float] = []
    totals: list[float] = []
    errors = 0
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        deltas: list[float] = []
        first = None
        buf = b""
        async with session.post(url + "/v1/chat/completions", data=STREAM_BODY, headers=headers) as r:
            if r.status != 200:
                errors += 1
                await r.read()
                return
            async for chunk in r.content.iter_any():
                now = time.perf_counter()
                first = first or now
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                deltas.extend(now for e in events if b'"delta":{"content"' in e)
        if first is None:
            errors += 1
            return
        ttfc.append((first - t0) * 1000)
        gaps.extend((b - a) * 1000 for a, b in zip(deltas, deltas[1:]))
        totals.append((time.perf_counter() - t0) * 1000)

    async def worker(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal errors
        await asyncio.sleep(stagger * i / conc)
        for _ in range(per_worker):
            try:
                await one(session)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1

    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await one(session)  # warm-up, not counted
        ttfc.clear(), gaps.clear(), totals.clear()
        async with asyncio.timeout(budget):
            await asyncio.gather(*(worker(session, i) for i in range(conc)))
    return {"streams": len(ttfc), "errors": errors, "ttfc_ms": ttfc, "gap_ms": gaps, "total_ms": totals}


async def _mixed_client(url: str, conc: int, count: int, budget: float) -> dict[str, Any]:
    """`count` requests, every 4th streamed, read to the end. Returns counts and errors."""
    import aiohttp

    done = errors = 0
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    counter = iter(range(count))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        for i in counter:
            try:
                body = STREAM_BODY if i % 4 == 0 else BODY
                async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    done += 1
                    errors += r.status != 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with asyncio.timeout(budget):
            await asyncio.gather(*(worker(session) for _ in range(conc)))
    return {"done": done, "errors": errors}


def client_subprocess(kind: str, *args: Any, budget: float) -> dict[str, Any]:
    cmd = pinned(CLIENT_CPU, [PY, str(Path(__file__).resolve()), f"--_{kind}", *map(str, args), str(budget)])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 60, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} client failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# ---------------------------------------------------------------- report

def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("uvicorn", "httpx", "httpcore", "aiohttp", "starlette", "uvloop", "httptools", "httpx-aiohttp",
                 "llm-edge-gateway"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    with contextlib.suppress(Exception):
        out["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5).stdout.split()[1]
    with contextlib.suppress(Exception):
        out["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=5).stderr.strip().split("/")[-1]
    return out


def fmt(v: float, nd: int = 2) -> str:
    return "-" if v != v else f"{v:.{nd}f}"


def throughput_table(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    bares = [t for t in results if t.startswith("bare-") and t != "bare-wire"]
    lines = ["| target | c | req/s | p50 ms | p99 ms | errors | CPU µs/req | / bare (fastest) | / bare-wire | / direct |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for target, by_c in results.items():
        for c, r in by_c.items():
            best_bare = max((results[b][c]["rps"] for b in bares if c in results[b]), default=0)
            own = results.get("bare-wire", {}).get(c, {}).get("rps", 0)
            direct = results.get("direct", {}).get(c, {}).get("rps", 0)
            gateway = not target.startswith(("bare-", "direct"))
            vs_bare = f"{r['rps'] / best_bare:.2f}" if best_bare and gateway else ""
            vs_own = f"{r['rps'] / own:.2f}" if own and gateway else ""
            vs_direct = f"{r['rps'] / direct:.2f}" if direct and target != "direct" else ""
            lines.append(f"| {target} | {c} | {r['rps']:.0f} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | "
                         f"{r['errors']} | {fmt(r['cpu_us_per_req'], 0)} | {vs_bare} | {vs_own} | {vs_direct} |")
    direct1 = results.get("direct", {}).get(1)
    if direct1:
        lines.append("")
        lines.append("Added p50 latency over direct at c=1: " + ", ".join(
            f"{t} +{by_c[1]['p50_ms'] - direct1['p50_ms']:.3f} ms" for t, by_c in results.items()
            if t != "direct" and 1 in by_c))
    return "\n".join(lines)


def STREAM_CELLS(streams: int) -> list[tuple[str, int, int, float]]:  # noqa: N802 - a table, not logic
    """(label, concurrency, streams per worker, stagger s): c=16 both as a burst (all 16 start
    together and stay in lockstep: TTFC then includes queueing behind the other 15 starts) and
    staggered over one stream's duration (16 in flight, arrivals spread out as in steady traffic)."""
    per = max(1, streams // 4)
    return [("1", 1, streams, 0.0), ("16", 16, per, 0.0), ("16 staggered", 16, per, STREAM_CHUNKS * STREAM_INTERVAL_MS / 1000)]


def stream_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [f"| target | c | streams | errors | TTFC p50 ms | TTFC p99 ms | gap p50 ms | gap p99 ms | "
             f"added TTFC p50 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for target, by_c in results.items():
        for c, r in by_c.items():
            base = results.get("direct", {}).get(c)
            added = fmt(pct(r["ttfc_ms"], 50) - pct(base["ttfc_ms"], 50), 3) if base and target != "direct" else ""
            lines.append(f"| {target} | {c} | {r['streams']} | {r['errors']} | {fmt(pct(r['ttfc_ms'], 50))} | "
                         f"{fmt(pct(r['ttfc_ms'], 99))} | {fmt(pct(r['gap_ms'], 50))} | {fmt(pct(r['gap_ms'], 99))} | "
                         f"{added} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- phases

def phase_throughput(args: argparse.Namespace, workdir: Path, servers: list[Server], report: dict[str, Any]) -> None:
    upstream = start_nginx(workdir) if shutil.which("nginx") else start_mock(workdir, 0, name="mock-direct")
    servers.append(upstream)
    report["direct_upstream"] = upstream.name
    targets: dict[str, Server] = {"direct": upstream}
    for name in ("httpx", "aiohttp", "wire"):
        targets[f"bare-{name}"] = s = _bare(name, upstream, workdir)
        servers.append(s)
    for transport in args.transports:
        try:
            targets[f"gateway[{transport}]"] = s = start_gateway(workdir, upstream.url, transport, "nonstream")
        except RuntimeError as exc:
            print(f"warning: gateway[{transport}] skipped: {exc}", file=sys.stderr)
            continue
        servers.append(s)
    if args.limits:
        proc, url = start_redis(workdir)
        report["redis"] = url
        args.redis_proc = proc
        try:
            name = f"gateway[{args.transports[0]}+limits]"
            targets[name] = s = start_gateway(workdir, upstream.url, args.transports[0], "limits", redis_url=url)
            servers.append(s)
        except RuntimeError as exc:
            print(f"warning: {name} skipped: {exc}", file=sys.stderr)
    if args.litellm_venv:
        s = start_litellm(workdir, Path(args.litellm_venv), upstream.url)
        if s is not None:
            targets["litellm"] = s
            servers.append(s)
    script = wrk_script(workdir)
    report["sanity"] = {}
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for name, server in targets.items():
        check = report["sanity"][name] = sanity(server.url)
        if not check["ok"]:
            print(f"warning: {name} sanity request failed: {check['status']} {check['body'][:200]}", file=sys.stderr)
        run_wrk(server, script, 16, min(2.0, args.duration))  # warm-up, discarded
        results[name] = {}
        for c in CONCURRENCY:
            r = run_wrk(server, script, c, args.duration)
            results[name][c] = r
            print(f"  {name:24} c={c:<3} {r['rps']:9.0f} req/s  p50 {fmt(r['p50_ms'])} ms  p99 {fmt(r['p99_ms'])} ms"
                  f"  CPU {fmt(r['cpu_us_per_req'], 0)} us/req"
                  + (f"  errors {r['errors']}" if r["errors"] else ""), file=sys.stderr, flush=True)
    report["throughput"] = {t: {str(c): {k: v for k, v in r.items() if k != "raw"} for c, r in by_c.items()}
                            for t, by_c in results.items()}
    report["throughput_table"] = throughput_table(results)


def _bare(name: str, upstream: Server, workdir: Path) -> Server:
    port = free_port()
    return Server(f"bare-{name}", [PY, str(BENCH / f"bare_{name}.py"), "--upstream", upstream.url, "--port",
                                   str(port)], port, workdir)


def start_stream_upstream(workdir: Path, cpu: str = SERVER_CPU) -> Server:
    """bench/stream_upstream.py: OpenAI SSE at STREAM_INTERVAL_MS, cheap per stream start (as nginx is per request)."""
    port = free_port()
    return Server("stream-upstream", [PY, str(BENCH / "stream_upstream.py"), "--port", str(port), "--chunks",
                                      str(STREAM_CHUNKS), "--interval-ms", str(STREAM_INTERVAL_MS)], port, workdir, cpu=cpu)


def phase_streaming(args: argparse.Namespace, workdir: Path, servers: list[Server], report: dict[str, Any]) -> None:
    # The upstream shares the servers' core, as nginx does: a fast one adds little there, while the
    # simulated provider (~0.5 ms of Python per stream start) would charge the gateway its own CPU.
    mock = start_stream_upstream(workdir) if args.stream_upstream == "fast" else \
        start_mock(workdir, STREAM_INTERVAL_MS, name="mock-stream")
    servers.append(mock)
    targets = {"direct": mock}
    for transport in [t for t in args.transports if t != "httpx_aiohttp"]:
        targets[f"gateway[{transport}]"] = s = start_gateway(workdir, mock.url, transport, "stream")
        servers.append(s)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for name, server in targets.items():
        results[name] = {}
        for label, conc, per_worker, stagger in STREAM_CELLS(args.streams):
            results[name][label] = r = client_subprocess("stream-client", server.url, conc, per_worker, stagger,
                                                         budget=120)
            print(f"  {name:24} c={label:<12} streams {r['streams']}  TTFC p50 {fmt(pct(r['ttfc_ms'], 50))} ms  "
                  f"gap p50 {fmt(pct(r['gap_ms'], 50))} p99 {fmt(pct(r['gap_ms'], 99))} ms", file=sys.stderr, flush=True)
    report["streaming"] = {t: {str(c): {"streams": r["streams"], "errors": r["errors"],
                                        **{f"{k}_p{q}": pct(r[k], q) for k in ("ttfc_ms", "gap_ms", "total_ms")
                                           for q in (50, 90, 99)}}
                               for c, r in by_c.items()} for t, by_c in results.items()}
    report["streaming_table"] = stream_table(results)


def phase_memory(args: argparse.Namespace, workdir: Path, servers: list[Server], report: dict[str, Any]) -> None:
    mock = start_mock(workdir, 0, cpu=CLIENT_CPU, name="mock-memory")  # fast upstream, off the gateway's core
    servers.append(mock)
    report["memory"] = {}
    for transport in [t for t in args.transports if t != "httpx_aiohttp"]:
        gw = start_gateway(workdir, mock.url, transport, "memory")
        servers.append(gw)
        row = {"start_kib": gw.rss_kib()}
        client_subprocess("mixed-client", gw.url, 32, 200, budget=120)
        row["after_200_kib"] = gw.rss_kib()
        done = 200
        for mark in args.memory_marks:
            r = client_subprocess("mixed-client", gw.url, 32, mark - done, budget=1800)
            done = mark
            row[f"after_{mark}_kib"] = gw.rss_kib()
            row[f"errors_to_{mark}"] = r["errors"]
            print(f"  gateway[{transport}] RSS after {mark} requests: {row[f'after_{mark}_kib'] / 1024:.1f} MiB",
                  file=sys.stderr, flush=True)
        report["memory"][transport] = row
        gw.stop()
    marks = args.memory_marks
    lines = ["| gateway | RSS at start MiB | after 200 | " + " | ".join(f"after {m:,}" for m in marks) + " | errors |",
             "|---|---:|---:|" + "---:|" * len(marks) + "---:|"]
    for t, row in report["memory"].items():
        lines.append(f"| gateway[{t}] | {row['start_kib'] / 1024:.1f} | {row['after_200_kib'] / 1024:.1f} | "
                     + " | ".join(f"{row[f'after_{m}_kib'] / 1024:.1f}" for m in marks)
                     + f" | {sum(row[f'errors_to_{m}'] for m in marks)} |")
    report["memory_table"] = "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    p.add_argument("--transports", default="httptools,aiohttp,httpx_aiohttp",
                   help="gateway upstream transports to measure (httptools, aiohttp, httpx_aiohttp); "
                        "the first one also runs with --limits")
    p.add_argument("--streams", type=int, default=40, help="streams at c=1 (c=16 runs 16 x streams/4)")
    p.add_argument("--memory", action="store_true", help="also measure gateway RSS after 10k and 100k requests (slow)")
    p.add_argument("--memory-marks", default="10000,100000",
                   help="request counts at which --memory reads the RSS (default 10000,100000)")
    p.add_argument("--litellm-venv", help="a venv with litellm[proxy] installed: adds LiteLLM as a target")
    p.add_argument("--skip-streaming", action="store_true")
    p.add_argument("--stream-upstream", choices=("fast", "mock"), default="fast",
                   help="streaming upstream: bench/stream_upstream.py (default) or the simulated provider")
    p.add_argument("--limits", action="store_true",
                   help="add gateway[<first transport>+limits]: a bench-owned redis-server and limits on every scope")
    args = p.parse_args()
    args.redis_proc = None
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    args.memory_marks = sorted(int(m) for m in args.memory_marks.split(",") if m.strip())
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"error: {tool} not found (apt-get install -y wrk)", file=sys.stderr)
            return 1
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
                              "duration_s": args.duration, "cpus": os.cpu_count(),
                              "pinning": f"servers CPU {SERVER_CPU}, load CPU {CLIENT_CPU}"}
    servers: list[Server] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="llm-gw-bench-") as tmp:
        workdir = Path(tmp)
        try:
            print("non-streaming (wrk):", file=sys.stderr)
            phase_throughput(args, workdir, servers, report)
            for s in servers:
                s.stop()
            servers.clear()
            if not args.skip_streaming:
                print("streaming:", file=sys.stderr)
                phase_streaming(args, workdir, servers, report)
                for s in servers:
                    s.stop()
                servers.clear()
            if args.memory:
                print("memory:", file=sys.stderr)
                phase_memory(args, workdir, servers, report)
        finally:
            for s in servers:
                s.stop()
            if args.redis_proc is not None:
                args.redis_proc.kill()
                args.redis_proc.wait()
    print("\n## Versions\n")
    print(", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"\nUpstream for non-streaming: {report['direct_upstream']}; {report['pinning']}; "
          f"wrk {args.duration:g}s per cell, 1 thread.\n")
    print("## Non-streaming chat completions (wrk)\n")
    print(report["throughput_table"])
    if "streaming_table" in report:
        source = "bench/stream_upstream.py" if args.stream_upstream == "fast" else "simulated provider"
        print(f"\n## Streaming ({source} on the servers' core, {STREAM_CHUNKS} chunks, {STREAM_INTERVAL_MS} ms apart)\n")
        print(report["streaming_table"])
    if "memory_table" in report:
        print("\n## Gateway memory (1 in 4 requests streamed)\n")
        print(report["memory_table"])
    bad = [n for n, c in report.get("sanity", {}).items() if not c["ok"]]
    if bad:
        print(f"\nWARNING: sanity request failed for: {', '.join(bad)}")
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nresults: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_serve-gateway":
        sys.path.insert(0, str(ROOT))
        _serve_gateway_httpx_aiohttp(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_stream-client":
        url, conc, per, stagger, budget = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), \
            float(sys.argv[6])
        print(json.dumps(asyncio.run(_stream_client(url, conc, per, budget, stagger))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_mixed-client":
        url, conc, count, budget = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        print(json.dumps(asyncio.run(_mixed_client(url, conc, count, budget))))
    else:
        sys.exit(main())
