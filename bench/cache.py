#!/usr/bin/env python
"""The response cache's cost and gain, measured in interleaved rounds at c=16 (issue #19's targets).

    .venv/bin/python bench/cache.py [--rounds 6] [--duration 4] [--concurrency 16] [--no-redis]

Targets (each `llm-gateway serve`, nginx upstream, non-streaming chat completions, as bench/run.py):
  off[embedded]       cache.enabled false, no Redis URL: the pass-through, loaded twice a round: with one
                      body repeated (the hits' baseline) and with a new body each request (the misses')
  hit[embedded]       cache on, one body repeated: every request after the warm-up is a hit
  miss[embedded]      cache on, a new body each request (a per-run prefix, then a counter): every one a miss,
                      looked up, captured and stored (the LRU fills up to max_bytes, as in production)
  off[redis], hit[redis], miss[redis]: the same against a bench-owned redis-server (on the load
                      generator's core, as if remote); with a Redis URL the limiter's script runs on
                      every request in all three, so these compare with off[redis]
A wrk script that makes each request's body (the misses') costs the server more than a fixed one
(~8% here), so each ratio compares runs of the same script. Rounds are interleaved (odd rounds in
reverse order, as bench/ratios.py does) and the medians of each round's ratios are printed against
the targets: hit/off >= 1.5 (embedded) and >= 1.0 (Redis), miss/off >= 0.92. Servers on CPU 0, wrk
and Redis on CPU 1.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - bench/run.py: servers, wrk, pinning

TARGETS = {"hit[embedded]": (1.5, "off[embedded]"), "miss[embedded]": (0.92, "off+new[embedded]"),
           "hit[redis]": (1.0, "off[redis]"), "miss[redis]": (0.92, "off+new[redis]")}


def start(workdir: Path, upstream: str, name: str, cache: bool, redis_url: str) -> bench.Server:
    port = bench.free_port()
    tag = name.replace("[", "-").replace("]", "")
    path = bench.gateway_config(workdir, upstream, port, tag, "httptools")
    text = path.read_text()
    if redis_url:  # no limits: the same limiter work on every target of the pair (its script on every request)
        text = text.replace('state: {redis_url: ""}', f'state: {{redis_url: "{redis_url}"}}')
    path.write_text(text + f"cache: {{enabled: {'true' if cache else 'false'}}}\n")
    cmd = [str(Path(bench.PY).parent / "llm-gateway"), "serve", "--config", str(path), "--port", str(port)]
    return bench.Server(name, cmd, port, workdir, ready_path="/healthz")


_runs = itertools.count()


def miss_script(workdir: Path) -> Path:
    """A wrk script whose every request has a body never sent before (a prefix per run, then a counter)."""
    prefix = f"{os.getpid()}-{next(_runs)}"
    body = json.loads(bench.BODY)
    head, _, tail = json.dumps(body).partition("Say hello in one sentence.")
    path = workdir / f"miss-{prefix}.lua"
    path.write_text(f"""wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {bench.KEY}"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, [[{head}Say hello {prefix} ]] .. n .. [[{tail}]])
end
""")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-redis", action="store_true", help="only the embedded targets")
    args = p.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="llm-gw-bench-cache-") as tmp:
        workdir = Path(tmp)
        servers: list[bench.Server] = []
        redis_proc = None
        try:
            upstream = bench.start_nginx(workdir)
            servers.append(upstream)
            stores = {"embedded": ""}
            if not args.no_redis:
                redis_proc, stores["redis"] = bench.start_redis(workdir)
            targets: dict[str, bench.Server] = {}
            for store, url in stores.items():
                for kind in ("off", "hit", "miss"):
                    targets[f"{kind}[{store}]"] = s = start(workdir, upstream.url, f"{kind}[{store}]", kind != "off", url)
                    servers.append(s)
            fixed = bench.wrk_script(workdir)
            for name, server in targets.items():  # warm-up (and the hit targets' one miss)
                bench.run_wrk(server, miss_script(workdir) if name.startswith("miss") else fixed, args.concurrency, 1)
            # (name, server, new body per request?): the off targets run both scripts
            order = [(n, s, n.startswith("miss")) for n, s in targets.items()]
            order += [(n.replace("off", "off+new"), s, True) for n, s in targets.items() if n.startswith("off")]
            runs = {name: [] for name, _, _ in order}
            for i in range(args.rounds):
                for name, server, new in (order if i % 2 == 0 else list(reversed(order))):
                    script = miss_script(workdir) if new else fixed
                    runs[name].append(bench.run_wrk(server, script, args.concurrency, args.duration))
        finally:
            for server in servers:
                server.stop()
            if redis_proc is not None:
                redis_proc.kill()
    print(f"## Response cache, c={args.concurrency}, {args.rounds} interleaved rounds of {args.duration:g} s\n")
    print("| target | median req/s | rounds req/s | median CPU µs/req | p50 / p99 ms | errors |")
    print("|---|---:|---|---:|---|---:|")
    for name, rs in runs.items():
        rps = statistics.median(r["rps"] for r in rs)
        cpu = statistics.median(r["cpu_us_per_req"] for r in rs)
        p50, p99 = statistics.median(r["p50_ms"] for r in rs), statistics.median(r["p99_ms"] for r in rs)
        rounds = ", ".join(f"{r['rps']:.0f}" for r in rs)
        print(f"| {name} | {rps:.0f} | {rounds} | {cpu:.0f} | {p50:.2f} / {p99:.2f} | {sum(r['errors'] for r in rs)} |")
    print()
    for name, (goal, base) in TARGETS.items():
        if name not in runs:
            continue
        ratios = [a["rps"] / b["rps"] for a, b in zip(runs[name], runs[base]) if b["rps"]]
        median = statistics.median(ratios)
        print(f"- {name} / {base}: median of the rounds' ratios {median:.2f} (target >= {goal}: "
              f"{'met' if median >= goal else 'NOT met'}; per round {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
