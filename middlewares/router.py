"""Router: choose and order the deployments that may serve this request; answer model lists.

Contract:
- Candidates are the enabled deployments that serve the request's family and model (a deployment
  without `models` serves any model of its family; a Bedrock deployment whose `deployments:` map
  names the model also serves Anthropic Messages clients). None is a native 404 for the model.
- The routing strategy (`gateway.routing_strategy`, per model `gateway.routing_overrides`) orders
  them from the shared health snapshot, without I/O. Already-tried and open-circuit deployments go
  last. `ctx.candidates` is the ordered list; the rate limiter's reservation then takes the first
  candidate that is healthy and within its own limits (`ctx.admitted`), and the failover loop
  starts there (or at the head when nothing was reserved) and walks the rest.
- A request the response cache answers (`ctx.replay`) gets no candidates: nothing is routed.
- A model list (`GET /v1/models`, `/api/tags`) is answered in the family's own shape with the union
  of the configured `models`; a deployment without a list is asked, and its answer merged.
"""
from __future__ import annotations

from typing import Any

import httpx
import structlog

from config.models import Config, Deployment
from proxy.context import RequestContext, get_context
from proxy.errors import GatewayError
from proxy.headers import gateway_headers
from proxy.routing import arrange, load_strategy
from proxy.runtime import Runtime

log = structlog.get_logger("llm_gateway")


class RouterMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.runtime = deps
        self.by_family: dict[str, list[Deployment]] = {}
        self.translated: list[Deployment] = []  # Bedrock deployments that serve Anthropic clients
        for dep in config.enabled_providers:
            self.by_family.setdefault(dep.family, []).append(dep)
            if dep.type == "bedrock" and dep.deployment_map:
                self.translated.append(dep)
        self.strategy = load_strategy(config.gateway.routing_strategy)
        self.overrides = {m: load_strategy(s) for m, s in config.gateway.routing_overrides.items()}

    def candidates(self, ctx: RequestContext) -> list[Deployment]:
        deps = [d for d in self.by_family.get(ctx.family, ()) if d.serves(ctx.model)]
        if ctx.family == "anthropic" and ctx.operation == "chat" and ctx.model:
            deps += [d for d in self.translated if ctx.model in d.deployment_map]
        strategy = self.overrides.get(ctx.model or "", self.strategy)
        return arrange(strategy, deps, ctx, self.runtime.health.snapshot())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        if ctx.model_list:
            await self._model_list(ctx, send)
            return
        if ctx.replay is not None:  # answered from the response cache: no deployment, no candidates
            await self.app(scope, receive, send)
            return
        ctx.candidates = self.candidates(ctx)
        if not ctx.candidates:
            if not self.by_family.get(ctx.family):
                raise GatewayError("caller_not_found", f"no deployment serves the {ctx.family} API")
            raise GatewayError("caller_not_found", f"The model '{ctx.model}' does not exist or is not served by this gateway")
        await self.app(scope, receive, send)

    async def _model_list(self, ctx: RequestContext, send: Any) -> None:
        models: list[str] = []
        for dep in self.by_family.get(ctx.family, ()):
            listed = dep.models or await self._ask(ctx, dep)
            models.extend(m for m in listed if m not in models)
        principal = ctx.principal
        if principal is not None and principal.models:
            models = [m for m in models if principal.allows(ctx.family, m)]
        body = ctx.adapter.model_list_response(models)
        ctx.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *gateway_headers(ctx)]})
        await send({"type": "http.response.body", "body": b"" if ctx.method == "HEAD" else body})

    async def _ask(self, ctx: RequestContext, dep: Deployment) -> list[str]:
        up = ctx.adapter.upstream(ctx, dep)
        timeout = httpx.Timeout(dep.timeouts.connect, read=min(dep.timeouts.first_byte, 10.0))
        try:
            response = await self.runtime.client.request("GET", up.url, headers=up.headers, timeout=timeout)
            if response.status_code == 200:
                return ctx.adapter.models_from_response(response.content)
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            pass
        log.warning("model_list_unavailable", deployment=dep.name)
        return []
