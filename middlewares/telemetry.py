"""Telemetry: the request's span and metrics (through `runtime.observer`) and one access-log line.

Contract: reads the status the client got from the context (the error layer's `send` wrapper
records it; the forwarder reports a stream's first chunk itself). After the request (success, native error, cut stream or client disconnect) it reports
`request_end` to the observer and, with `monitoring.access_log`, logs one JSON line: request id,
trace id, key id and key metadata, family, operation, model, deployment, status, attempts, tokens,
upstream time, overhead and total duration, and the outcome (`ok`, a closed error code, or
`client_disconnected`); with the response cache on, `cache` (hit, miss, bypass, coalesced). Never secrets; bodies only for a key with `log_bodies` (`request_body`,
`response_body`: see `_bodies`). It sits outside auth so auth failures are
seen too. Telemetry never changes what the client gets. The line goes through
`proxy.telemetry.logs.access_logger()` (one fused structlog processor; the key metadata is redacted once per
principal, not per line).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from config.models import Config
from proxy.context import RequestContext, get_context
from proxy.errors import GatewayError
from proxy.telemetry.logs import AccessLogger, access_logger, redacted
from proxy.telemetry.metrics import error_type
from proxy.relay import BODY_LOG_LIMIT
from proxy.runtime import Runtime
from providers.base import Decompressor

_METADATA_LIMIT = 16


class TelemetryMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.runtime = deps
        self.log = access_logger() if config.monitoring.access_log else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        observer = self.runtime.observer
        handle = observer.request_start(ctx, scope)
        status = 0
        try:
            await self.app(scope, receive, send)
            status = ctx.response_status
        except GatewayError as err:
            status = ctx.response_status
            ctx.error_code = err.code
            if not status and not ctx.committed and not ctx.client_disconnected:
                status = ctx.adapter.render_error(err, ctx.request_id)[0]
            raise
        except asyncio.CancelledError:
            ctx.error_code = ctx.error_code or ("client_disconnected" if ctx.client_disconnected else "cancelled")
            raise
        except Exception:
            ctx.error_code = "gateway_internal"
            status = ctx.response_status or 500
            raise
        finally:
            status = status or ctx.response_status
            if not status:
                status = 499 if ctx.client_disconnected else (ctx.status or 0)
            outcome = _outcome(ctx, status)
            observer.request_end(ctx, handle, status, outcome)
            if self.log is not None:
                _log(self.log, ctx, status, outcome)


def _outcome(ctx: RequestContext, status: int) -> str:
    if ctx.client_disconnected:
        return "client_disconnected"
    if ctx.error_code:
        return ctx.error_code
    if 0 < status < 400:
        return "ok"
    attempt = ctx.attempt
    return (error_type(attempt.error) if attempt is not None else "") or "_OTHER"


def _log(log: AccessLogger, ctx: RequestContext, status: int, outcome: str) -> None:
    total = time.perf_counter() - ctx.started
    upstream = ctx.upstream_seconds
    principal = ctx.principal
    usage = ctx.usage
    fields: dict[str, Any] = {  # a dict, not keyword arguments: those cost ~1 us a line to copy
        "request_id": ctx.request_id,
        "trace_id": ctx.trace_id,
        "key_id": principal.key_id if principal is not None else None,
        "family": ctx.family,
        "operation": ctx.operation,
        "model": ctx.model,
        "deployment": ctx.deployment.name if ctx.deployment and ctx.attempts else None,
        "status": status,
        "stream": ctx.stream,
        "attempts": ctx.attempts,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_tokens": usage.cached_tokens,
        # milliseconds to 2 decimals; round() to an integer is half the cost of round(x, 2)
        "ttfb_ms": round(ttfb * 100_000) / 100 if (ttfb := ctx.upstream_ttfb) is not None else None,
        "upstream_ms": round(upstream * 100_000) / 100,
        "overhead_ms": round(max(0.0, total - upstream) * 100_000) / 100,
        "duration_ms": round(total * 100_000) / 100,
        "outcome": outcome,
    }
    if ctx.cache_status is not None:  # the response cache is on
        fields["cache"] = ctx.cache_status
    if principal is not None and principal.metadata:
        fields["key_metadata"] = redacted(principal.metadata, _METADATA_LIMIT)
    if principal is not None and principal.log_bodies:
        try:
            _bodies(ctx, fields)
        except Exception:  # noqa: BLE001 - a body that cannot be shown never costs the line itself
            fields["request_body"] = fields["response_body"] = "<unreadable>"
    log.write("request", fields)


def _bodies(ctx: RequestContext, fields: dict[str, Any]) -> None:
    """A `log_bodies` key's request and response bodies: parsed when JSON (so the logger's redaction by
    field name reaches into them), else text; each at most `BODY_LOG_LIMIT` bytes, flagged when cut."""
    response = bytes(ctx.response_body) if ctx.response_body is not None else b""
    whole = len(response) < BODY_LOG_LIMIT
    if response and ctx.response_encoding:
        inflated = Decompressor(ctx.response_encoding)(response)  # an unknown or broken encoding: as received
        if inflated:
            response, whole = inflated[:BODY_LOG_LIMIT], whole and len(inflated) < BODY_LOG_LIMIT
    for name, body, whole in (("request_body", ctx.body, len(ctx.body) <= BODY_LOG_LIMIT),
                              ("response_body", response, whole)):
        if not body:
            continue
        if whole:
            try:
                fields[name] = orjson.loads(body)
                continue
            except orjson.JSONDecodeError:
                pass
        else:
            fields[name + "_truncated"] = True
        fields[name] = body[:BODY_LOG_LIMIT].decode("utf-8", "replace")
