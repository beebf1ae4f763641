"""The admin API under `/admin/*`, behind `Authorization: Bearer <auth.admin_key>`.

Contract: without a configured admin key every `/admin/*` path is 404. With one, a missing or wrong
key is 401 (compared in constant time). Answers are JSON. Endpoints:
- `GET /admin/limits`: every live limit override; `PUT /admin/limits/{scope}` with
  `{requests_per_minute, tokens_per_minute}`; `DELETE /admin/limits/{scope}`.
Every change is logged with who (the admin key's fingerprint, never the key) and what.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any
from urllib.parse import unquote

import orjson
import structlog

from config.models import Config
from proxy.runtime import Runtime
from proxy.state import StoreUnavailable

log = structlog.get_logger("llm_gateway.admin")
SCOPE = re.compile(r"^(global|(key|model|provider):[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255})$")


def valid_scope(scope: str) -> bool:
    return bool(SCOPE.match(scope))


class AdminApp:
    def __init__(self, config: Config, runtime: Runtime) -> None:
        self.key = str(config.auth.admin_key)
        self.digest = hashlib.sha256(self.key.encode()).digest() if self.key else b""
        self.runtime = runtime

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, path: str) -> None:
        if not self.key:
            return await _reply(send, 404, {"error": {"message": "not found", "type": "not_found_error"}})
        presented = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = presented[7:].strip() if presented[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(hashlib.sha256(token).digest(), self.digest):
            return await _reply(send, 401, {"error": {"message": "invalid admin key", "type": "authentication_error"}})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > 65536:
                return await _reply(send, 413, {"error": {"message": "body too large", "type": "invalid_request_error"}})
            if not message.get("more_body"):
                break
        method = scope["method"]
        try:
            status, payload = await self._route(method, path, body)
        except StoreUnavailable:
            status, payload = 503, {"error": {"message": "state store unavailable", "type": "unavailable"}}
        await _reply(send, status, payload)

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        store = self.runtime.store
        if path == "/admin/limits" and method == "GET":
            return 200, {"limits": await store.list_limits()}
        if path.startswith("/admin/limits/"):
            scope = unquote(path[len("/admin/limits/"):])
            if not valid_scope(scope):
                return 400, {"error": {"message": "scope must be global, key:<id>, model:<name> or provider:<name>", "type": "invalid_request_error"}}
            if method == "PUT":
                try:
                    data = orjson.loads(body)
                    rpm, tpm = data.get("requests_per_minute"), data.get("tokens_per_minute")
                    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in (rpm, tpm)) or rpm is tpm is None:
                        raise ValueError
                except (orjson.JSONDecodeError, ValueError, AttributeError):
                    return 400, {"error": {"message": "body must be {requests_per_minute, tokens_per_minute} with non-negative integers", "type": "invalid_request_error"}}
                await store.set_limit(scope, rpm, tpm)
                log.info("limit_changed", actor="admin-api", scope=scope, requests_per_minute=rpm, tokens_per_minute=tpm)
                return 200, {"scope": scope, "limits": await store.get_limit(scope)}
            if method == "DELETE":
                cleared = await store.clear_limit(scope)
                log.info("limit_cleared", actor="admin-api", scope=scope)
                return 200, {"scope": scope, "cleared": cleared}
            if method == "GET":
                return 200, {"scope": scope, "limits": await store.get_limit(scope)}
        return 404, {"error": {"message": "unknown admin endpoint", "type": "not_found_error"}}


async def _reply(send: Any, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
