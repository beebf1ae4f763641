"""Request inspection: read the body once (bounded), parse it, find the model, enforce the allowlist.

Contract:
- The body is read once into `ctx.body`; past `gateway.max_body_bytes` it is a native 413.
- A JSON body that does not parse is a native 400; so is a path segment decoding to `.`/`..`, and
  a top-level field or header that tries to choose the upstream (`api_base`, `base_url`, ...).
- The family adapter sets `ctx.model`, `ctx.stream` and `ctx.operation` (it may rewrite the body for
  the documented OpenAI `include_usage` case).
- A model outside the principal's allowlist is a native 403.
- `ctx.estimated_tokens` = prompt bytes / 4 + `max_tokens` (or the family's output field; else
  `gateway.model_output_tokens[model]`, else `gateway.default_output_tokens`), the figure rate
  limiting reserves before the real usage is known.
"""
from __future__ import annotations

from typing import Any

import orjson

from config.models import Config
from proxy.context import RequestContext, get_context, read_body
from proxy.errors import GatewayError
from proxy.runtime import Runtime
from providers.base import check_path, reject_upstream_pickers

_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")


def estimate_tokens(ctx: RequestContext, default_output: int) -> int:
    body = ctx.json if isinstance(ctx.json, dict) else {}
    out = next((body[f] for f in _OUTPUT_FIELDS if isinstance(body.get(f), int)), None)
    if out is None:
        cfg = body.get("inferenceConfig") or body.get("options") or {}
        out = cfg.get("maxTokens") or cfg.get("num_predict") if isinstance(cfg, dict) else None
    if ctx.operation in ("embeddings", "count_tokens"):
        out = 0
    return max(1, len(ctx.body) // 4) + (out if isinstance(out, int) and out >= 0 else default_output)


class InspectMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime) -> None:
        self.app = app
        self.max_body = config.gateway.max_body_bytes
        self.default_output = config.gateway.default_output_tokens
        self.per_model = {m: int(v) for m, v in config.gateway.model_output_tokens.items()}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        check_path(ctx.path)
        await read_body(ctx, receive, self.max_body)
        if ctx.body:
            ctype = (ctx.header(b"content-type") or "").lower()
            declared_json = "json" in ctype
            # Ollama's own docs post JSON with curl's default form content type: sniff the body too.
            if declared_json or ("multipart" not in ctype and ctx.body.lstrip()[:1] in (b"{", b"[")):
                try:
                    ctx.json = orjson.loads(ctx.body)
                except orjson.JSONDecodeError:
                    if declared_json or ctx.family != "openai":
                        raise GatewayError("caller_invalid_request", "the request body is not valid JSON") from None
        reject_upstream_pickers(ctx)
        ctx.adapter.inspect(ctx)
        principal = ctx.principal
        if principal is not None and not principal.allows(ctx.family, ctx.model):
            if principal.families and ctx.family not in principal.families:
                raise GatewayError("caller_forbidden", f"this key may not use the {ctx.family} API")
            raise GatewayError("caller_forbidden", f"this key may not use model {ctx.model!r}")
        ctx.estimated_tokens = estimate_tokens(ctx, self.per_model.get(ctx.model or "", self.default_output))
        await self.app(scope, receive, send)
