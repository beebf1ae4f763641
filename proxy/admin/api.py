"""The admin API under `/admin/*`, behind `Authorization: Bearer <auth.admin_key>`.

Contract: without a configured admin key every `/admin/*` path is 404. With one, a missing or wrong
key is 401 (compared in constant time). Answers are JSON. Endpoints:
- `GET /admin/limits`: every live limit override; `PUT /admin/limits/{scope}` with
  `{requests_per_minute, tokens_per_minute}` (400 when the scope names nothing this gateway has, see
  `unknown_scope`, unless `?force=true`); `DELETE /admin/limits/{scope}`.
- `GET /admin/keys` (managed keys, never a secret); `POST /admin/keys` with
  `{name, models, families, rpm, tpm, max_concurrent, metadata, log_bodies}` answers like `keys create --json`
  (`{id, key, aws_access_key_id, aws_secret_access_key}`, shown this once); `GET|DELETE /admin/keys/{id}`.
- `GET /admin/cache`: the response cache's stats; `DELETE /admin/cache?key_id=ID|namespace=N|all=true`
  purges entries (`proxy.cache.ops.admin`).
- `GET /admin/health`: the shared deployment health (`health_report`); the local view with
  `"degraded": true` when Redis is unavailable.
Every call is logged with who (`admin_fingerprint`: a short hash of the admin key, never the key) and
what (method, path, status); creations and revocations also name the key id.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

import orjson
import structlog

from proxy.cache import ops as cache_ops
from proxy.state import live_limits
from config.models import Config
from proxy.state.health import DeploymentStats
from proxy.state.keys import KeysDisabled, KeyStore, parse_spec
from proxy.runtime import Runtime
from proxy.state.store import StoreUnavailable

log = structlog.get_logger("llm_gateway.admin")
SCOPE = re.compile(r"^(global|(key|model|provider):[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255})$")


def valid_scope(scope: str) -> bool:
    return bool(SCOPE.fullmatch(scope))


async def unknown_scope(config: Config, scope: str, keys: KeyStore) -> str | None:
    """Why a well-formed `scope` names nothing of this gateway, or None when it does (or may).

    `provider:<name>` must be a configured deployment (enabled or not: the CLI may lack the
    variables a replica has), `model:<name>` a model a deployment serves (`Deployment.serves`: any
    name passes when a deployment lists no models), `key:<id>` a static key or a managed key in the
    store; `global` always exists."""
    kind, _, name = scope.partition(":")
    if kind == "provider" and all(d.name != name for d in config.providers):
        return f"no deployment is named {name!r} (configured: {', '.join(d.name for d in config.providers) or 'none'})"
    if kind == "model" and not any(d.serves(name) for d in config.providers):
        served = sorted({m for d in config.providers for m in d.models})
        return f"no deployment serves model {name!r} (served: {', '.join(served) or 'none'})"
    if kind == "key" and all(k.id != name for k in config.auth.keys) and await keys.get(name) is None:
        static = ", ".join(k.id for k in config.auth.keys) or "none"
        return f"no static or managed key has id {name!r} (static: {static}; managed: `llm-gateway keys list`)"
    return None


def fingerprint(admin_key: str) -> str:
    """Names the admin key in logs without revealing it (a truncated, domain-separated sha256)."""
    return "adm-" + hashlib.sha256(b"llm-gateway admin key\x00" + admin_key.encode()).hexdigest()[:12]


def _state(stats: DeploymentStats, now: float) -> str:
    if not stats.open_until:
        return "closed"
    return "open" if stats.open_until > now else "half-open"


def health_report(stats: dict[str, DeploymentStats], degraded: bool) -> dict[str, Any]:
    """The JSON of `GET /admin/health` and `llm-gateway health --json`."""
    now = time.time()
    deployments = {}
    for name, s in stats.items():
        until = datetime.fromtimestamp(s.open_until, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") \
            if s.open_until else None
        deployments[name] = {"state": _state(s, now), "open_until": until, "ejections": s.ejections,
                             "consecutive_failures": s.fails,
                             "ttfb_ewma_ms": round(s.ttfb_ewma * 1000, 1) if s.ttfb_ewma is not None else None,
                             "inflight": s.inflight}
    return {"degraded": degraded, "deployments": deployments}


def health_table(report: dict[str, Any]) -> str:
    columns = ("deployment", "state", "open_until", "ejections", "consecutive_failures", "ttfb_ewma_ms", "inflight")
    rows = [[name] + ["-" if d[c] is None else str(d[c]) for c in columns[1:]] for name, d in report["deployments"].items()]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if report["degraded"]:
        lines.append("(Redis unavailable: this is one process's local view)")
    return "\n".join(lines)


def _bad(message: str) -> tuple[int, Any]:
    return 400, {"error": {"message": message, "type": "invalid_request_error"}}


class AdminApp:
    def __init__(self, config: Config, runtime: Runtime) -> None:
        self.key = str(config.auth.admin_key)
        self.digest = hashlib.sha256(self.key.encode()).digest() if self.key else b""
        self.actor = fingerprint(self.key) if self.key else ""
        self.runtime = runtime
        self.secret = str(config.auth.secret)
        self.config = config

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, path: str) -> None:
        if not self.key:
            return await _reply(send, 404, {"error": {"message": "not found", "type": "not_found_error"}})
        presented = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = presented[7:].strip() if presented[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(hashlib.sha256(token).digest(), self.digest):
            log.warning("admin_denied", method=scope["method"], path=path[:200],
                        client=(scope.get("client") or ("", 0))[0])
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
        force = b"force=true" in scope.get("query_string", b"").split(b"&")
        try:
            if path == "/admin/cache":  # the response cache (`proxy.cache.ops`): stats, purge
                status, payload = await cache_ops.admin(self.runtime.cache, method, scope.get("query_string", b""))
                if method == "DELETE" and status == 200:
                    log.info("cache_purged", admin_fingerprint=self.actor, **payload)
            else:
                status, payload = await self._route(method, path, body, force)
        except StoreUnavailable:
            status, payload = 503, {"error": {"message": "state store unavailable", "type": "unavailable"}}
        except Exception:  # noqa: BLE001 - never a traceback to the caller
            log.exception("admin_error", admin_fingerprint=self.actor, method=method, path=path[:200])
            status, payload = 500, {"error": {"message": "internal error", "type": "api_error"}}
        log.info("admin_request", admin_fingerprint=self.actor, method=method, path=path[:200], status=status)
        await _reply(send, status, payload)

    async def _keys(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        keys = KeyStore(self.runtime.store, self.secret)
        if path == "/admin/keys" and method == "GET":
            return 200, {"keys": await keys.list()}
        if path == "/admin/keys" and method == "POST":
            try:
                spec = parse_spec(orjson.loads(body or b"null"))
            except (orjson.JSONDecodeError, ValueError) as exc:
                return _bad(f"body must be {{name, models, families, rpm, tpm, max_concurrent, metadata, log_bodies}}: "
                            f"{exc}")
            try:
                created = await keys.create(spec)
            except KeysDisabled as exc:
                return 409, {"error": {"message": str(exc), "type": "invalid_request_error"}}
            log.info("key_created", admin_fingerprint=self.actor, key_id=created["id"], name=spec.name)
            return 200, created
        key_id = unquote(path[len("/admin/keys/"):]) if path.startswith("/admin/keys/") else None
        if key_id and method == "GET":
            view = await keys.show(key_id)
            return (200, view) if view else (404, {"error": {"message": "no such key", "type": "not_found_error"}})
        if key_id and method == "DELETE":
            if not await keys.revoke(key_id):
                return 404, {"error": {"message": "no such key", "type": "not_found_error"}}
            log.info("key_revoked", admin_fingerprint=self.actor, key_id=key_id)
            return 200, {"id": key_id, "revoked": True}
        return 405, {"error": {"message": "method not allowed", "type": "invalid_request_error"}}

    async def _health(self) -> tuple[int, Any]:
        health = self.runtime.health
        try:
            return 200, health_report(await health.refresh(), False)
        except StoreUnavailable:
            return 200, health_report(health.local, True)

    async def _route(self, method: str, path: str, body: bytes, force: bool = False) -> tuple[int, Any]:
        store = self.runtime.store
        if path == "/admin/keys" or path.startswith("/admin/keys/"):
            return await self._keys(method, path, body)
        if path == "/admin/health" and method == "GET":
            return await self._health()
        if path == "/admin/limits" and method == "GET":
            return 200, {"limits": await live_limits.list_limits(store)}
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
                problem = await unknown_scope(self.config, scope, KeyStore(store, self.secret))
                if problem and not force:
                    return _bad(f"{problem}; nothing was set (add ?force=true to set it anyway)")
                await live_limits.set_limit(store, scope, rpm, tpm)
                log.info("limit_changed", actor="admin-api", admin_fingerprint=self.actor, scope=scope,
                         requests_per_minute=rpm, tokens_per_minute=tpm, **({"forced": problem} if problem else {}))
                return 200, {"scope": scope, "limits": await live_limits.get_limit(store, scope)}
            if method == "DELETE":
                cleared = await live_limits.clear_limit(store, scope)
                log.info("limit_cleared", actor="admin-api", admin_fingerprint=self.actor, scope=scope)
                return 200, {"scope": scope, "cleared": cleared}
            if method == "GET":
                return 200, {"scope": scope, "limits": await live_limits.get_limit(store, scope)}
        return 404, {"error": {"message": "unknown admin endpoint", "type": "not_found_error"}}


async def _reply(send: Any, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
