#!/usr/bin/env python
"""The c=16 target ratios measured in interleaved rounds, for machines whose speed drifts.

    .venv/bin/python bench/ratios.py [--rounds 6] [--duration 4] [--concurrency 16]

One wrk run after another, round by round, over: bare-aiohttp (the fastest third-party bare
pass-through), the gateway (httptools transport, limits off) and the gateway with limits on every
scope against a bench-owned redis-server (as `bench/run.py --limits`). Drift then hits every target
alike (odd rounds run the targets in reverse order, so a drift within a round favours none); each
round's ratio compares runs seconds apart, and the median of those ratios gives:
- gateway / bare-aiohttp   (issue #2: >= 0.80)
- limits on / limits off   (issue #3: >= 0.85)
It also prints each round's ratios and the gateway's own mean Redis round trip (from /metrics).
Servers on CPU 0, wrk and Redis on CPU 1, as in bench/run.py. Telemetry on/off has its own
interleaved runner: bench/telemetry.py.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - bench/run.py: servers, wrk, pinning


def redis_mean_ms(server: bench.Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = re.search(r'redis_call_duration_seconds_sum\{status="ok"\} ([\d.e+-]+)', text)
    count = re.search(r'redis_call_duration_seconds_count\{status="ok"\} ([\d.e+-]+)', text)
    return float(total.group(1)) / float(count.group(1)) * 1000 if total and count and float(count.group(1)) else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-gw-bench-ratios-") as tmp:
        workdir = Path(tmp)
        servers: list[bench.Server] = []
        redis_proc = None
        try:
            upstream = bench.start_nginx(workdir)
            servers.append(upstream)
            redis_proc, redis_url = bench.start_redis(workdir)
            targets = {"bare-aiohttp": bench._bare("aiohttp", upstream, workdir),
                       "gateway": bench.start_gateway(workdir, upstream.url, "httptools", "off"),
                       "gateway+limits": bench.start_gateway(workdir, upstream.url, "httptools", "lim", redis_url=redis_url)}
            servers.extend(targets.values())
            script = bench.wrk_script(workdir)
            for server in targets.values():
                bench.run_wrk(server, script, args.concurrency, 1)  # warm-up
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            for i in range(args.rounds):
                # ABBA order: a drift within a round favours no target
                for name, server in (list(targets.items()) if i % 2 == 0 else reversed(targets.items())):
                    runs[name].append(bench.run_wrk(server, script, args.concurrency, args.duration))
            redis_ms = redis_mean_ms(targets["gateway+limits"])
        finally:
            for server in servers:
                server.stop()
            if redis_proc is not None:
                redis_proc.kill()
    print(f"## c={args.concurrency}, {args.rounds} interleaved rounds of {args.duration:g} s\n")
    print("| target | median req/s | rounds req/s | median CPU µs/req | errors |")
    print("|---|---:|---|---:|---:|")
    median = {}
    for name, rs in runs.items():
        median[name] = statistics.median(r["rps"] for r in rs)
        rounds = ", ".join(f"{r['rps']:.0f}" for r in rs)
        cpu = statistics.median(r["cpu_us_per_req"] for r in rs)
        print(f"| {name} | {median[name]:.0f} | {rounds} | {cpu:.0f} | {sum(r['errors'] for r in rs)} |")
    pairs = {"gateway / bare-aiohttp (#2, >= 0.80)": ("gateway", "bare-aiohttp"),
             "limits on / off (#3, >= 0.85)": ("gateway+limits", "gateway")}
    print()
    for label, (a, b) in pairs.items():
        per_round = [x["rps"] / y["rps"] for x, y in zip(runs[a], runs[b]) if y["rps"]]
        listed = ", ".join(f"{r:.2f}" for r in per_round)
        print(f"- {label}: median of the rounds' ratios {statistics.median(per_round):.2f} (per round {listed}); "
              f"ratio of the medians {median[a] / median[b]:.2f}")
    print(f"- gateway+limits mean Redis round trip as the gateway sees it: {redis_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
