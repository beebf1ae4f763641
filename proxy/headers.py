"""The gateway's own response headers (`x-gateway-*`), built here and nowhere else.

Contract:
- `gateway_headers(ctx, error=None)`: `x-gateway-request-id`, `x-gateway-attempts`, and once an
  attempt went upstream `x-gateway-provider` (the deployment that answered or failed last); with
  `error`, `x-gateway-error` (the gateway error code, so our own 429 is told apart from a
  provider's). Every response the stack sends carries them: relayed answers, relayed upstream
  errors, the gateway's own errors and model lists.
- `overhead_header(ctx, started)`: `x-gateway-overhead-ms`, elapsed time minus upstream time (an
  attempt still open counts as upstream), stamped by the error layer on every response start
  (unless `monitoring.overhead_header: false`). It reads only kernel-owned fields, so the figure
  is the same with telemetry off.
- Client-sent `x-gateway-*` headers never reach an upstream (`providers.base.forward_request_headers`).
"""
from __future__ import annotations

import time

from proxy.context import RequestContext

Header = tuple[bytes, bytes]


def gateway_headers(ctx: RequestContext, error: str | None = None) -> list[Header]:
    headers = [(b"x-gateway-request-id", ctx.request_id.encode()),
               (b"x-gateway-attempts", b"%d" % ctx.attempts)]
    if ctx.attempts and ctx.deployment is not None:
        headers.append((b"x-gateway-provider", ctx.deployment.name.encode()))
    if error is not None:
        headers.append((b"x-gateway-error", error.encode()))
    return headers


def overhead_header(ctx: RequestContext | None, started: float) -> Header:
    now = time.perf_counter()
    upstream = 0.0
    if ctx is not None:
        upstream = ctx.upstream_seconds
        attempt = ctx.attempt
        if attempt is not None and attempt.open:
            upstream += now - attempt.started
    return b"x-gateway-overhead-ms", f"{max(0.0, now - started - upstream) * 1000:.2f}".encode()
