"""The composition root: `build_app(config)` assembles the middleware stack into one ASGI app.

Contract:
- Accepts a loaded `Config` or a path; returns `GatewayApp`, an ASGI callable.
- The stack order is defined here and only here (outermost first):
  errors -> telemetry -> auth -> inspect -> cache -> router -> ratelimit -> failover -> forwarder.
  The cache sits before routing: a hit (or a coalesced answer) still passes the rate limiter, which
  counts one request and no tokens, and the failover layer replays it instead of any attempt.
  The router orders the candidate deployments before rate limiting so that one atomic Redis call
  can both admit the request and reserve the first deployment whose own limits allow it.
- `/healthz` (live) and `/readyz` (ready; reports degraded state but stays ready), `/metrics`
  (Prometheus text; 404 when `monitoring.metrics.enabled` is false) and `/admin/*` are answered
  before the stack, matched on the raw (still percent-encoded) path: `/admin%2Fkeys` or `/%61dmin/keys`
  is not the admin API. Everything else goes to the stack, which 404s paths no family owns.
- The telemetry observer (`proxy.telemetry.observability`) is installed into the runtime here, before any
  store or health object captures it, and closed with the runtime.
- Every stack response carries `x-gateway-overhead-ms` (unless `monitoring.overhead_header: false`),
  stamped by the error layer, the stack's one `send` wrapper (`middlewares.errors`).
- Works standalone (lifespan opens/closes resources) and mounted under a Starlette `Mount`
  (no lifespan: resources open lazily, and the host calls `aclose()` on shutdown).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import structlog

from config import Config, ConfigError, load_config
from middlewares.auth import AuthMiddleware
from middlewares.cache import CacheMiddleware
from middlewares.errors import ErrorMiddleware
from middlewares.failover import FailoverMiddleware
from middlewares.inspect import InspectMiddleware
from middlewares.ratelimit.middleware import RateLimitMiddleware
from middlewares.router import RouterMiddleware
from middlewares.telemetry import TelemetryMiddleware
from proxy.admin.api import AdminApp
from proxy.forward import Forwarder
from proxy.telemetry.logs import configure_logging
from proxy.telemetry.observability import build_observer
from proxy.telemetry.observer import Observer
from proxy.runtime import Runtime

log = structlog.get_logger("llm_gateway")

# Outermost first. Each entry is constructed as Middleware(app, config, deps=runtime).
STACK = (ErrorMiddleware, TelemetryMiddleware, AuthMiddleware, InspectMiddleware, CacheMiddleware, RouterMiddleware,
         RateLimitMiddleware, FailoverMiddleware)


def _json(status: int, payload: object) -> tuple[dict[str, Any], dict[str, Any]]:
    body = orjson.dumps(payload)
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]},
            {"type": "http.response.body", "body": body})


class GatewayApp:
    def __init__(self, config: Config, *, observer: Observer | None = None) -> None:
        if not config.enabled_providers:
            raise ConfigError(str(config.source or "<config>"), None, "providers",
                              "no provider is enabled: " + ("; ".join(config.warnings) or "none configured"))
        self.config = config
        self.runtime = Runtime(config)
        self.runtime.observer = observer or build_observer(config)  # before the store or health capture it
        if hasattr(self.runtime.observer, "aclose"):
            self.runtime.closers.append(self.runtime.observer.aclose)
        app: Any = Forwarder(config, deps=self.runtime)
        for middleware in reversed(STACK):
            app = middleware(app, config, deps=self.runtime)
        self.stack = app
        self.admin = AdminApp(config, self.runtime)
        for warning in config.warnings:
            log.warning("config_warning", detail=warning)
        if config.auth.mode == "none":
            log.warning("auth_disabled", detail="auth.mode is 'none': every request is accepted (development only)")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            # Gateway routes match the raw path only, as a front proxy filtering paths sees it: a path that
            # merely decodes to one (`/admin%2Fkeys`, `/%61dmin/keys`) goes to the stack, which 404s it.
            raw = scope.get("raw_path")
            path = raw.decode("latin-1").partition("?")[0] if raw else scope["path"]
            root = scope.get("root_path") or ""
            if root and path.startswith(root):
                path = path[len(root):]
            if path in ("/healthz", "/readyz"):
                start, body = _json(200, {"status": "ok"} if path == "/healthz" else self.readiness())
                await send(start)
                await send(body)
                return
            if path == "/metrics":
                await self._metrics(send)
                return
            if path == "/admin" or path.startswith("/admin/"):
                await self.admin(scope, receive, send, path)
                return
            await self.stack(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:  # websockets are not part of any provider API we serve
            await send({"type": "websocket.close", "code": 1008})

    async def _metrics(self, send: Any) -> None:
        render = getattr(self.runtime.observer, "render_metrics", None)
        body = render() if render is not None else None
        if body is None:
            start, message = _json(404, {"error": {"message": "metrics are disabled", "type": "not_found_error"}})
            await send(start)
            await send(message)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def readiness(self) -> dict[str, Any]:
        store = self.runtime.store
        return {"status": "ready", "providers": [d.name for d in self.config.enabled_providers],
                "state": {"backend": "embedded" if store.embedded else "redis",
                          "degraded": store.degraded, "on_redis_error": self.config.state.on_redis_error}}

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        await self.runtime.aclose()


def build_app(config: Config | str | os.PathLike[str] | None = None, *,
              observer: Observer | None = None) -> GatewayApp:
    """`observer` replaces the telemetry built from `config.monitoring` (tests, embedding hosts)."""
    configure_logging()
    if not isinstance(config, Config):
        config = load_config(Path(config) if config else None)
    return GatewayApp(config, observer=observer)
