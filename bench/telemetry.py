#!/usr/bin/env python
"""Telemetry cost: the same gateway with telemetry off and fully on, in the same run, interleaved.

    .venv/bin/python bench/telemetry.py [--duration 10] [--rounds 3] [--concurrency 16] [--transport httptools]
                                        [--protocol http/protobuf|grpc] [--together]
    .venv/bin/python bench/telemetry.py --inprocess [--requests 50000]

- off:        metrics off, tracing off, no OTLP (access log on, as in bench/run.py)
- on:         metrics on (prefix llm_gateway), tracing on at sample_rate 1.0, OTLP (`--protocol`,
              default http/protobuf) to a local sink that accepts every export and discards it
- black-hole: as `on`, but the OTLP endpoint accepts TCP and never answers (collector hung)
Upstream: nginx answering a static chat completion (else the simulated provider). Servers on CPU 0,
wrk and the sink on CPU 1 (as bench/run.py). Each round runs every target once, in turn (odd rounds
in reverse order), so drift hits all of them alike; the table shows medians, and each target's
ratio to `off` is also given per round (runs seconds apart) with the median of those ratios. Target: on >= 90% of off's throughput. On a noisy
machine the CPU time per request (`off CPU / CPU`: the throughput ratio a CPU-bound gateway would
see) is the steadier figure. It is split into the event loop's share and the other threads' (the
span export thread, the OTLP metric push), each read per thread from `/proc/<pid>/task`.

`--together` loads all targets at the same time, each with its own wrk, all servers on CPU 0: the
scheduler shares that CPU between them, so each serves in proportion to how little CPU a request
costs it, and whatever else the machine does in that second hits every target alike. On a VM
whose speed drifts from one second to the next, these ratios vary far less from round to round
(measured: per-round on/off ratios with a standard deviation of 0.03, against 0.10 one target at
a time), at the price of every target running slower (three processes taking turns on one core,
with colder caches).

`--inprocess` (bench/telemetry_inprocess.py) measures the telemetry alone, in this process: the
CPU microseconds a request of the observer's hooks with metrics, tracing (with span export) or both,
and of one access-log line. It does not see the rest of the gateway, so it is the steadier figure
for telemetry changes on a shared machine. The local collectors are bench/otlp_sinks.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import otlp_sinks  # noqa: E402 - bench/otlp_sinks.py: the collectors the gateways export to
import run as bench  # noqa: E402 - bench/run.py: servers, wrk, pinning
import telemetry_inprocess  # noqa: E402 - bench/telemetry_inprocess.py: the --inprocess mode


def config(workdir: Path, upstream: str, port: int, tag: str, monitoring: str, transport: str = "httptools") -> Path:
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


def measure_round(targets: dict[str, bench.Server], script: Path, args: argparse.Namespace,
                  i: int) -> dict[str, dict[str, Any]]:
    """One wrk run per target: one after another (odd rounds in reverse order: a drift within a round
    favours no target), or with `--together` all at once, sharing the server CPU."""
    if not args.together:
        order = list(targets.items()) if i % 2 == 0 else list(reversed(targets.items()))
        return {name: bench.run_wrk(server, script, args.concurrency, args.duration) for name, server in order}
    results: dict[str, dict[str, Any]] = {}

    def load(name: str, server: bench.Server) -> None:
        results[name] = bench.run_wrk(server, script, args.concurrency, args.duration)

    threads = [threading.Thread(target=load, args=item) for item in targets.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {name: results[name] for name in targets}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--transport", default="httptools", help="gateway.upstream_transport (httptools, aiohttp)")
    p.add_argument("--protocol", default="http/protobuf", choices=("http/protobuf", "grpc"),
                   help="OTLP protocol of the `on` gateway and its sink (default http/protobuf)")
    p.add_argument("--together", action="store_true",
                   help="load every target at once (sharing the server CPU) instead of one after another")
    p.add_argument("--inprocess", action="store_true", help="measure the telemetry alone, in this process")
    p.add_argument("--requests", type=int, default=50_000, help="--inprocess: requests per measurement")
    args = p.parse_args()
    if args.inprocess:
        return telemetry_inprocess.main(args.requests)
    if not shutil.which("wrk"):
        print("error: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 1
    servers: list[bench.Server] = []
    hole, hole_port = otlp_sinks.black_hole()
    with tempfile.TemporaryDirectory(prefix="llm-gw-bench-telemetry-") as tmp:
        workdir = Path(tmp)
        try:
            upstream = bench.start_nginx(workdir) if shutil.which("nginx") else bench.start_mock(workdir, 0)
            servers.append(upstream)
            sink = otlp_sinks.start(workdir, args.protocol)
            servers.append(sink)
            on = ("  metrics: {enabled: true, prefix: llm_gateway}\n  tracing: {enabled: true, sample_rate: 1.0}\n"
                  "  otel: {endpoint: 'http://127.0.0.1:%d', protocol: " + args.protocol + "}")
            targets = {
                "off": gateway(workdir, upstream.url, "off", "  metrics: {enabled: false}\n  tracing: {enabled: false}",
                               args.transport),
                "on": gateway(workdir, upstream.url, "on", on % sink.port, args.transport),
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
                before = {name: server.thread_cpu() for name, server in targets.items()}
                for name, r in measure_round(targets, script, args, i).items():
                    r.pop("raw")
                    after = targets[name].thread_cpu()
                    per_req = 1e6 / r["requests"] if r["requests"] else float("nan")
                    r["cpu_loop_us_per_req"] = (after[0] - before[name][0]) * per_req
                    r["cpu_threads_us_per_req"] = (after[1] - before[name][1]) * per_req
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
    lines = ["| target | median req/s | rounds req/s | p50 ms | p99 ms (worst) | CPU us/req | of it: event loop / "
             "other threads | errors | req/s vs off | off CPU / CPU |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in rounds.items():
        each = ", ".join(str(round(r["rps"])) for r in rs)
        loop = statistics.median(r["cpu_loop_us_per_req"] for r in rs)
        threads = statistics.median(r["cpu_threads_us_per_req"] for r in rs)
        lines.append(f"| {name} | {median[name]:.0f} | {each} | "
                     f"{statistics.median(r['p50_ms'] for r in rs):.2f} | {max(r['p99_ms'] for r in rs):.2f} | "
                     f"{cpu[name]:.0f} | {loop:.0f} / {threads:.1f} | {sum(r['errors'] for r in rs)} | "
                     f"{median[name] / median['off']:.2f} | {cpu['off'] / cpu[name]:.2f} |")
    table = "\n".join(lines)
    per_round = {name: [r["rps"] / o["rps"] for r, o in zip(rs, rounds["off"]) if o["rps"]]
                 for name, rs in rounds.items() if name != "off"}
    paired = "\n".join(f"- {name} / off, median of the rounds' ratios: {statistics.median(v):.2f} "
                       f"(per round {', '.join(f'{x:.2f}' for x in v)})" for name, v in per_round.items())
    mode = "all targets at once" if args.together else "one target at a time"
    print(f"\n## Telemetry cost (wrk c={args.concurrency}, {args.duration:g}s x {args.rounds} rounds, {mode}, "
          f"transport {args.transport}, OTLP {args.protocol})\n\n{table}\n\n{paired}\n")
    print("`on` gateway telemetry counters: " + ("; ".join(dropped) or "-"))
    out = bench.BENCH / "results" / f"telemetry-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"versions": bench.versions(), "args": vars(args), "rounds": rounds,
                               "table": table, "per_round_ratios": per_round, "telemetry_counters": dropped},
                              indent=2, default=str))
    print(f"results: {out.relative_to(bench.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
