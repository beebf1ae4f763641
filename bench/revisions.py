#!/usr/bin/env python
"""Before and after a change, in one run: the gateway of another git revision against this checkout's.

    .venv/bin/python bench/revisions.py --before REV [--rounds 8] [--duration 4] [--concurrency 16]

The other revision is checked out into a temporary git worktree and served from there with this
venv (`PYTHONPATH` puts its packages first), so both run on the same interpreter and dependencies.
Targets: each revision's gateway with limits off, and with limits on every scope against one
bench-owned redis-server (as `bench/ratios.py`). Rounds are interleaved in ABBA order (odd rounds
reversed), so drift favours no target; the ratios printed are the median of the rounds' ratios
(after / before) and the ratio of the medians. Servers on CPU 0, wrk and Redis on CPU 1.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - bench/run.py: servers, wrk, pinning


def gateway_at(tree: Path, workdir: Path, upstream: str, tag: str, redis_url: str = "") -> bench.Server:
    """`python -m proxy.cli serve` from `tree` (this checkout or a worktree of another revision)."""
    port = bench.free_port()
    cfg = bench.gateway_config(workdir, upstream, port, tag, "httptools", redis_url)
    cmd = [bench.PY, "-m", "proxy.cli", "serve", "--config", str(cfg), "--port", str(port)]
    return bench.Server(f"gateway-{tag}", cmd, port, workdir, env={"PYTHONPATH": str(tree)}, ready_path="/healthz")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="the git revision to compare with (e.g. a commit id)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-gw-bench-rev-") as tmp:
        workdir = Path(tmp)
        old = workdir / "before"
        subprocess.run(["git", "-C", str(bench.ROOT), "worktree", "add", "--detach", "-q", str(old), args.before],
                       check=True)
        servers: list[bench.Server] = []
        redis_proc = None
        try:
            upstream = bench.start_nginx(workdir)
            servers.append(upstream)
            redis_proc, redis_url = bench.start_redis(workdir)
            targets = {"before": gateway_at(old, workdir, upstream.url, "before"),
                       "after": gateway_at(bench.ROOT, workdir, upstream.url, "after"),
                       "before+limits": gateway_at(old, workdir, upstream.url, "before-lim", redis_url),
                       "after+limits": gateway_at(bench.ROOT, workdir, upstream.url, "after-lim", redis_url)}
            servers.extend(targets.values())
            script = bench.wrk_script(workdir)
            for server in targets.values():
                bench.run_wrk(server, script, args.concurrency, 1)  # warm-up
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            for i in range(args.rounds):
                for name, server in (list(targets.items()) if i % 2 == 0 else reversed(targets.items())):
                    runs[name].append(bench.run_wrk(server, script, args.concurrency, args.duration))
        finally:
            for server in servers:
                server.stop()
            if redis_proc is not None:
                redis_proc.kill()
            subprocess.run(["git", "-C", str(bench.ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print(f"## before = {args.before}, after = this checkout; c={args.concurrency}, "
          f"{args.rounds} interleaved rounds of {args.duration:g} s\n")
    print("| target | median req/s | rounds req/s | median CPU µs/req | p99 ms | errors |")
    print("|---|---:|---|---:|---:|---:|")
    median = {}
    for name, rs in runs.items():
        median[name] = statistics.median(r["rps"] for r in rs)
        rounds = ", ".join(f"{r['rps']:.0f}" for r in rs)
        cpu = statistics.median(r["cpu_us_per_req"] for r in rs)
        p99 = statistics.median(r["p99_ms"] for r in rs)
        print(f"| {name} | {median[name]:.0f} | {rounds} | {cpu:.0f} | {p99:.2f} | {sum(r['errors'] for r in rs)} |")
    print()
    for a, b in (("after", "before"), ("after+limits", "before+limits")):
        per_round = [x["rps"] / y["rps"] for x, y in zip(runs[a], runs[b]) if y["rps"]]
        print(f"- {a} / {b}: median of the rounds' ratios {statistics.median(per_round):.3f} "
              f"(per round {', '.join(f'{r:.2f}' for r in per_round)}); ratio of the medians {median[a] / median[b]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
