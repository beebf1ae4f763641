"""Outermost layer: build the request context, and turn every failure into a native error.

Contract:
- Maps the raw path to an inbound family (404 `not_found_error` when none owns it) and creates the
  `RequestContext`, reusing a client `x-request-id` as the gateway request id.
- A `GatewayError` before the first byte becomes the family's native error response with
  `x-gateway-*` headers (`x-gateway-error` names the code, so the gateway's own 429
  `policy_rate_limited` is told apart from a provider's); after the first byte of a stream it becomes the family's error frame and
  the stream ends (never as a clean success); after the first byte of a plain body the connection
  is dropped so the client sees a truncated response, not a false success.
- Any other exception is logged server-side and answered as a native 500 without a traceback.
- It is the one layer that wraps `send`: it records what the client got on the context
  (`response_status`, `response_streaming`; telemetry reads them), appends the headers an inner
  layer left in `ctx.response_headers` (the rate limiter's), and stamps every
  response start with `x-gateway-overhead-ms` (unless `monitoring.overhead_header: false`): time so
  far minus upstream time so far (an attempt still streaming counts as upstream time), so streams
  and errors carry it too.
"""
from __future__ import annotations

import os
import re
import time
from typing import Any

import orjson
import structlog

from config.models import Config
from proxy.context import RequestContext, set_context
from proxy.errors import GatewayError
from proxy.headers import gateway_headers, overhead_header
from proxy.runtime import Runtime
from providers import route

log = structlog.get_logger("llm_gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson", b"application/vnd.amazon.eventstream")


async def send_plain_404(send: Any, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = orjson.dumps({"error": {"message": message, "type": "not_found_error"}})
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or ())]})
    await send({"type": "http.response.body", "body": body})


class ErrorMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.adapters = deps.adapters
        self.overhead = config.monitoring.overhead_header

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        path = path.split("?", 1)[0]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):  # mounted under a prefix: route on what follows it
            path = path[len(root):] or "/"
        headers = scope["headers"]
        header_map = dict(reversed(headers))  # first value per name; the context keeps it for later lookups
        found = route(path, b"anthropic-version" in header_map)
        if found is None:
            started = time.perf_counter()
            await send_plain_404(send, f"unknown path {scope['path']!r}",
                                 [overhead_header(None, started)] if self.overhead else None)
            return
        family, rel = found
        raw_id = header_map.get(b"x-request-id")
        client_id = raw_id.decode("latin-1") if raw_id is not None else None
        request_id = client_id if client_id and _REQUEST_ID.match(client_id) else f"gw-{os.urandom(16).hex()}"
        ctx = RequestContext(
            request_id=request_id, family=family, adapter=self.adapters[family], method=scope["method"],
            path=rel, query=scope.get("query_string", b"").decode("latin-1"), headers=headers,
            header_map=header_map,
        )
        set_context(scope, ctx)
        overhead = self.overhead

        async def tracking_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                ctx.response_status = message["status"]
                ctype = next((v for k, v in headers if k == b"content-type"), b"")
                ctx.response_streaming = any(t in ctype for t in _STREAM_TYPES)
                added = ctx.response_headers
                if overhead:
                    message = {**message, "headers": [*headers, *added, overhead_header(ctx, ctx.started)]
                               if added else [*headers, overhead_header(ctx, ctx.started)]}
                elif added:
                    message = {**message, "headers": [*headers, *added]}
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except GatewayError as err:
            await self._fail(ctx, err, send)
        except Exception:  # noqa: BLE001 - last line of defence: never a traceback to the client
            log.exception("unhandled_error", request_id=ctx.request_id, family=ctx.family)
            await self._fail(ctx, GatewayError("gateway_internal", "internal gateway error"), send)

    async def _fail(self, ctx: RequestContext, err: GatewayError, send: Any) -> None:
        ctx.error_code = err.code
        if ctx.client_disconnected:
            return
        if ctx.response_status:
            if ctx.response_streaming:
                await send({"type": "http.response.body", "body": ctx.adapter.error_frame(err), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return  # a plain body cannot carry an error: leave it incomplete so the client sees the cut
        status, headers, body = ctx.adapter.render_error(err, ctx.request_id)
        ctx.status = status
        headers = headers + [(k.encode(), v.encode()) for k, v in err.headers.items()]
        headers += [(b"content-length", str(len(body)).encode()), *gateway_headers(ctx, err.code)]
        if self.overhead:
            headers.append(overhead_header(ctx, ctx.started))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
