"""The in-process mode of bench/telemetry.py (`--inprocess`): the telemetry alone, without the gateway.

Contract:
- `inprocess(requests)`: CPU microseconds a request, best of three runs of `requests` each, pinned
  to the server CPU, after a warm-up, minus a bare `Observer`'s run (the request context itself):
  the observer's hooks for one request with one attempt and usage, with metrics only, tracing
  only and both; tracing includes the export of every span (encoding and OTLP/HTTP to a local
  `otlp_sinks` collector, flushed every 500 requests so nothing is dropped). Also one access-log
  line written to a file. Returns {piece: us}.
- `main(requests)` prints them as a Markdown table and returns 0.
- It does not see the rest of the gateway, so it is the steadier figure for telemetry changes on a
  shared machine. Imported by bench/telemetry.py, with bench/ on `sys.path`.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import otlp_sinks
import run as bench  # bench/run.py: paths, pinning

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
    from proxy.telemetry.logs import access_logger, configure_logging
    from proxy.telemetry.observability import GatewayObserver
    from proxy.telemetry.observer import Observer

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
        sink = otlp_sinks.start(workdir)
        try:
            variants = {"metrics": ("true", "false"), "tracing + export": ("false", "true"),
                        "metrics + tracing + export": ("true", "true")}
            base_cfg = parse_config(INPROCESS_CONFIG % ("0" * 64, "false", "false", ""), "bench.yaml", {})
            dep = base_cfg.providers[0]
            cpu(Observer(), dep, 2000)
            base = cpu(Observer(), dep, requests)  # the request context itself
            for name, (metrics, tracing) in variants.items():
                cfg = parse_config(INPROCESS_CONFIG % ("0" * 64, metrics, tracing, f"http://127.0.0.1:{sink.port}"),
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


def main(requests: int) -> int:
    figures = inprocess(requests)
    print(f"\n## Telemetry CPU per request, in process ({requests} requests, best of 3)\n")
    print("| piece | CPU us/req |\n|---|---:|")
    for name, value in figures.items():
        print(f"| {name} | {value:.1f} |")
    return 0
