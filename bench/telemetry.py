#!/usr/bin/env python
"""Telemetry cost: the same gateway with telemetry off and fully on, in the same run, interleaved.

    .venv/bin/python bench/telemetry.py [--duration 10] [--rounds 3] [--concurrency 16] [--transport aiohttp]
                                        [--protocol http/protobuf|grpc]
    .venv/bin/python bench/telemetry.py --inprocess [--requests 50000]

- off:        metrics off, tracing off, no OTLP (access log on, as in bench/run.py)
- on:         metrics on (prefix llm_gateway), tracing on at sample_rate 1.0, OTLP (`--protocol`,
              default http/protobuf) to a local sink that accepts every export and discards it
- black-hole: as `on`, but the OTLP endpoint accepts TCP and never answers (collector hung)
Upstream: nginx answering a static chat completion (else the simulated provider). Servers on CPU 0,
wrk and the sink on CPU 1 (as bench/run.py). Each round runs every target once, in turn, so drift
hits all of them alike; the table shows medians. Target: on >= 90% of off's throughput. On a noisy
machine the CPU time per request (`off CPU / CPU`: the throughput ratio a CPU-bound gateway would
see) is the steadier figure.

`--inprocess` measures the telemetry alone, in this process, pinned to the server CPU: the CPU
microseconds a request of the observer's hooks (one request, one attempt, with usage) with metrics
only, tracing only and both, the latter including the export of every span (encoding and OTLP/HTTP to
the local sink, flushed every 500 requests so nothing is dropped), and of one access-log line
written to a file. It does not see the rest of the gateway, so it is the steadier figure for
telemetry changes on a shared machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - bench/run.py: servers, wrk, pinning

SINK = r'''
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def do_GET(self):
        self.do_POST()
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
'''

GRPC_SINK = r'''
import sys, time
from concurrent import futures
import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        return trace_service_pb2.ExportTraceServiceResponse()

class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        return metrics_service_pb2.ExportMetricsServiceResponse()

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
server.wait_for_termination()
'''


def config(workdir: Path, upstream: str, port: int, tag: str, monitoring: str, transport: str = "aiohttp") -> Path:
    path = workdir / f"gateway-{tag}.yaml"
    path.write_text(f"""
gateway: {{timeout: 60s, upstream_transport: {transport}}}
auth:
  mode: keys
  keys:
    - id: bench
      sha256: {hashlib.sha256(bench.KEY.encode()).hexdigest()}
providers:
  openai: {{type: openai, base_url: "{upstream}/v1", api_key: {bench.UPSTREAM_KEY}}}
monitoring:
{monitoring}
  access_log: true
server: {{host: 127.0.0.1, port: {port}, workers: 1}}
""")
    return path


def gateway(workdir: Path, upstream: str, tag: str, monitoring: str, transport: str) -> bench.Server:
    port = bench.free_port()
    cfg = config(workdir, upstream, port, tag, monitoring, transport)
    cmd = [str(Path(bench.PY).parent / "llm-gateway"), "serve", "--config", str(cfg), "--port", str(port)]
    return bench.Server(f"gateway-{tag}", cmd, port, workdir, ready_path="/healthz")


def black_hole() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1024)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


INPROCESS_CONFIG = """
auth:
  keys:
    - {id: bench, sha256: "%s", metadata: {team: search}}
providers:
  openai: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-bench}
monitoring:
  metrics: {enabled: %s, prefix: llm_gateway}
  tracing: {enabled: %s, sample_rate: 1.0}
  otel: {endpoint: "%s", protocol: http/protobuf}
"""


def inprocess(requests: int) -> dict[str, float]:
    """CPU us a request of each telemetry piece (see the module docstring), best of three runs."""
    import asyncio
    import os

    sys.path.insert(0, str(bench.ROOT))
    from config import parse_config
    from middlewares.telemetry import _log
    from proxy.context import Principal, RequestContext
    from proxy.logs import access_logger, configure_logging
    from proxy.observability import GatewayObserver
    from proxy.observer import Observer

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(bench.SERVER_CPU)})
    principal = Principal("bench", metadata={"team": "search"})

    def one(observer: Any, dep: Any) -> RequestContext:
        ctx = RequestContext(request_id="gw-0123456789abcdef", family="openai", adapter=None,  # type: ignore[arg-type]
                             method="POST", path="/v1/chat/completions", query="",
                             headers=[(b"host", b"gw"), (b"content-type", b"application/json")])
        ctx.principal, ctx.model, ctx.operation = principal, bench.MODEL, "chat"
        ctx.deployment, ctx.candidates = dep, [dep]
        handle = observer.request_start(ctx, {})
        attempt = observer.attempt_start(ctx, dep, "http://upstream/v1/chat/completions", [("content-type", "x")])
        ctx.attempts, ctx.committed, ctx.status, ctx.upstream_seconds = 1, True, 200, 0.003
        ctx.tried.append(dep.name)
        ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.cached_tokens = 16, 8, 0
        observer.attempt_end(ctx, dep, attempt, 200, None)
        observer.request_end(ctx, handle, 200, "ok")
        return ctx

    def cpu(observer: Any, dep: Any, n: int) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for i in range(n):
                one(observer, dep)
                if i % 500 == 499 and hasattr(observer, "flush"):
                    observer.flush()  # the export of these spans is part of their cost
            if hasattr(observer, "flush"):
                observer.flush()
            best = min(best, time.process_time() - started)
        return best / n * 1e6

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="llm-gw-bench-telemetry-") as tmp:
        workdir = Path(tmp)
        port = bench.free_port()
        (workdir / "sink.py").write_text(SINK)
        sink = bench.Server("otlp-sink", [bench.PY, str(workdir / "sink.py"), str(port)], port, workdir,
                            cpu=bench.CLIENT_CPU)
        try:
            variants = {"metrics": ("true", "false"), "tracing + export": ("false", "true"),
                        "metrics + tracing + export": ("true", "true")}
            base_cfg = parse_config(INPROCESS_CONFIG % ("0" * 64, "false", "false", ""), "bench.yaml", {})
            dep = base_cfg.providers[0]
            cpu(Observer(), dep, 2000)
            base = cpu(Observer(), dep, requests)  # the request context itself
            for name, (metrics, tracing) in variants.items():
                cfg = parse_config(INPROCESS_CONFIG % ("0" * 64, metrics, tracing, f"http://127.0.0.1:{port}"),
                                   "bench.yaml", {})
                observer = GatewayObserver(cfg)
                cpu(observer, dep, 2000)
                results[name] = cpu(observer, dep, requests) - base
                asyncio.run(observer.aclose())
            with (workdir / "access.log").open("w") as log_file:
                configure_logging(stream=log_file)
                log = access_logger()
                ctx = one(Observer(), dep)
                ctx.upstream_ttfb = 0.0029
                for _ in range(2000):
                    _log(log, ctx, 200, "ok")
                best = float("inf")
                for _ in range(3):
                    started = time.process_time()
                    for _ in range(requests):
                        _log(log, ctx, 200, "ok")
                    best = min(best, time.process_time() - started)
                results["access-log line"] = best / requests * 1e6
        finally:
            sink.stop()
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--transport", default="aiohttp", help="gateway.upstream_transport (aiohttp, httpx)")
    p.add_argument("--protocol", default="http/protobuf", choices=("http/protobuf", "grpc"),
                   help="OTLP protocol of the `on` gateway and its sink (default http/protobuf)")
    p.add_argument("--inprocess", action="store_true", help="measure the telemetry alone, in this process")
    p.add_argument("--requests", type=int, default=50_000, help="--inprocess: requests per measurement")
    args = p.parse_args()
    if args.inprocess:
        figures = inprocess(args.requests)
        print(f"\n## Telemetry CPU per request, in process ({args.requests} requests, best of 3)\n")
        print("| piece | CPU us/req |\n|---|---:|")
        for name, value in figures.items():
            print(f"| {name} | {value:.1f} |")
        return 0
    if not shutil.which("wrk"):
        print("error: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 1
    servers: list[bench.Server] = []
    hole, hole_port = black_hole()
    with tempfile.TemporaryDirectory(prefix="llm-gw-bench-telemetry-") as tmp:
        workdir = Path(tmp)
        try:
            upstream = bench.start_nginx(workdir) if shutil.which("nginx") else bench.start_mock(workdir, 0)
            servers.append(upstream)
            sink_port = bench.free_port()
            (workdir / "sink.py").write_text(SINK if args.protocol == "http/protobuf" else GRPC_SINK)
            sink = bench.Server("otlp-sink", [bench.PY, str(workdir / "sink.py"), str(sink_port)], sink_port, workdir,
                                cpu=bench.CLIENT_CPU)
            servers.append(sink)
            on = ("  metrics: {enabled: true, prefix: llm_gateway}\n  tracing: {enabled: true, sample_rate: 1.0}\n"
                  "  otel: {endpoint: 'http://127.0.0.1:%d', protocol: " + args.protocol + "}")
            targets = {
                "off": gateway(workdir, upstream.url, "off", "  metrics: {enabled: false}\n  tracing: {enabled: false}",
                               args.transport),
                "on": gateway(workdir, upstream.url, "on", on % sink_port, args.transport),
                "black-hole": gateway(workdir, upstream.url, "hole", on % hole_port, args.transport),
            }
            servers.extend(targets.values())
            script = bench.wrk_script(workdir)
            for name, server in targets.items():
                check = bench.sanity(server.url)
                if not check["ok"]:
                    raise RuntimeError(f"{name}: sanity request failed: {check['status']} {check['body'][:200]}")
                bench.run_wrk(server, script, args.concurrency, min(2.0, args.duration))  # warm-up
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            for i in range(args.rounds):
                for name, server in targets.items():
                    r = bench.run_wrk(server, script, args.concurrency, args.duration)
                    r.pop("raw")
                    rounds[name].append(r)
                    print(f"  round {i + 1} {name:10} {r['rps']:8.0f} req/s  p50 {bench.fmt(r['p50_ms'])} ms  "
                          f"p99 {bench.fmt(r['p99_ms'])} ms  CPU {bench.fmt(r['cpu_us_per_req'], 0)} us/req  "
                          f"errors {r['errors']}", file=sys.stderr, flush=True)
            import httpx

            exported = httpx.get(targets["on"].url + "/metrics", timeout=10).text
            dropped = [line for line in exported.splitlines()
                       if line.startswith(("llm_gateway_telemetry_spans_dropped_total",
                                           "llm_gateway_telemetry_export_failures_total"))]
        finally:
            for s in servers:
                s.stop()
            hole.close()
    median = {name: statistics.median(r["rps"] for r in rs) for name, rs in rounds.items()}
    cpu = {name: statistics.median(r["cpu_us_per_req"] for r in rs) for name, rs in rounds.items()}
    lines = ["| target | median req/s | rounds req/s | p50 ms | p99 ms (worst) | CPU us/req | errors | req/s vs off "
             "| off CPU / CPU |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in rounds.items():
        each = ", ".join(str(round(r["rps"])) for r in rs)
        lines.append(f"| {name} | {median[name]:.0f} | {each} | "
                     f"{statistics.median(r['p50_ms'] for r in rs):.2f} | {max(r['p99_ms'] for r in rs):.2f} | "
                     f"{cpu[name]:.0f} | {sum(r['errors'] for r in rs)} | "
                     f"{median[name] / median['off']:.2f} | {cpu['off'] / cpu[name]:.2f} |")
    table = "\n".join(lines)
    print(f"\n## Telemetry cost (wrk c={args.concurrency}, {args.duration:g}s x {args.rounds} rounds, "
          f"transport {args.transport}, OTLP {args.protocol})\n\n{table}\n")
    print("`on` gateway telemetry counters: " + ("; ".join(dropped) or "-"))
    out = bench.BENCH / "results" / f"telemetry-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"versions": bench.versions(), "args": vars(args), "rounds": rounds,
                               "table": table, "telemetry_counters": dropped}, indent=2, default=str))
    print(f"results: {out.relative_to(bench.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
