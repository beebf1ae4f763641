"""Telemetry: one structured access-log line per request, and the gateway-overhead figure.

Contract: wraps `send` to see the status and the first byte; after the request (success, native
error, cut stream or client disconnect) it logs one JSON line with request id, key id, family,
model, deployment, status, attempts, tokens, upstream time, overhead and total duration, and the
outcome. Never bodies, never secrets. It sits outside auth so auth failures are logged too.
"""
from __future__ import annotations

import time
from typing import Any

import structlog

from config.models import Config
from proxy.context import get_context
from proxy.errors import GatewayError
from proxy.runtime import Runtime

log = structlog.get_logger("llm_gateway.access")


class TelemetryMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.enabled = config.monitoring.access_log

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        status = 0

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except GatewayError as err:
            ctx.error_code = err.code
            status = status or (ctx.adapter.render_error(err, ctx.request_id)[0] if not ctx.committed else 0)
            raise
        except Exception:
            ctx.error_code = "gateway_internal"
            status = status or 500
            raise
        finally:
            total = time.perf_counter() - ctx.started
            outcome = ("client_disconnected" if ctx.client_disconnected else
                       ctx.error_code or ("ok" if status and status < 400 else "upstream_error"))
            log.info(
                "request",
                request_id=ctx.request_id,
                key_id=ctx.principal.key_id if ctx.principal else None,
                family=ctx.family,
                operation=ctx.operation,
                model=ctx.model,
                deployment=ctx.deployment.name if ctx.deployment else None,
                status=status or ctx.status,
                stream=ctx.stream,
                attempts=ctx.attempts,
                input_tokens=ctx.usage.input_tokens,
                output_tokens=ctx.usage.output_tokens,
                cached_tokens=ctx.usage.cached_tokens,
                upstream_ms=round(ctx.upstream_seconds * 1000, 2),
                overhead_ms=round((total - ctx.upstream_seconds) * 1000, 2),
                duration_ms=round(total * 1000, 2),
                outcome=outcome,
            )
