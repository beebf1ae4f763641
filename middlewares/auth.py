"""Authentication: the gateway key, presented the way the client's SDK presents a provider key.

Contract:
- `auth.mode: keys`: a Bearer / `x-api-key` key is looked up in each key backend in turn: the static
  keys of the config first (sha256 digests, compared in constant time), then the managed keys of
  `proxy.state.keys` (HMAC digests with `auth.secret`; only when `auth.secret` is set, otherwise they are
  ignored and a warning is logged at startup). SigV4 clients (boto3) are verified by recomputing the
  signature with the key's secret over the received Host, raw path and query, signed headers and body;
  `X-Amz-Date` must be within 15 minutes. The Authorization header is parsed and the access key id
  resolved before the body is read: only a known identity makes the gateway buffer a body to check.
- Missing key: 401 (Bedrock: 403 MissingAuthenticationTokenException); unknown key: 401
  (Bedrock: UnrecognizedClientException); bad/expired/other-body/garbled signature: Bedrock 403
  InvalidSignatureException. All native to the inbound family; no input makes it a 500.
- `auth.mode: none`: everyone is the anonymous principal (a warning is logged at startup).
- Sets `ctx.principal` (key id, allowed models and families, limits, metadata for the access log).
  The client credential itself is never forwarded (the adapters drop it) nor logged.
- A backend is a small protocol (`KeyBackend`); pass your own list with `backends=`.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any, Protocol

import structlog

from config.models import Config, StaticKey
from proxy.context import Principal, RequestContext, get_context, read_body
from proxy.errors import GatewayError
from proxy.state.keys import ManagedKeys
from proxy.runtime import Runtime
from providers import sigv4

log = structlog.get_logger("llm_gateway.auth")
MAX_KEY_LENGTH = 512


class KeyBackend(Protocol):
    """Where keys come from. Static config keys are one backend; managed keys in Redis another."""

    async def by_key(self, key: str) -> Principal | None:
        """The principal of a Bearer / x-api-key key, or None when this backend does not know it."""

    async def by_access_key(self, access_key_id: str) -> tuple[Principal, str] | None:
        """The principal and SigV4 secret of an access key id, or None."""


def principal_of(key: StaticKey) -> Principal:
    return Principal(key_id=key.id, models=tuple(key.models), families=tuple(key.families),
                     rpm=key.rate_limit.requests_per_minute,
                     tpm=key.rate_limit.tokens_per_minute, max_concurrent=key.max_concurrent,
                     metadata=dict(key.metadata), log_bodies=key.log_bodies)


class StaticKeys:
    def __init__(self, keys: list[StaticKey]) -> None:
        self._by_digest = {k.sha256: (bytes.fromhex(k.sha256), principal_of(k)) for k in keys}
        self._by_akid = {k.aws_access_key_id: (principal_of(k), str(k.aws_secret_access_key))
                         for k in keys if k.aws_access_key_id}

    async def by_key(self, key: str) -> Principal | None:
        return await self.by_digest(hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest())

    async def by_digest(self, digest: str) -> Principal | None:
        found = self._by_digest.get(digest)
        if found is None:
            return None
        return found[1] if hmac.compare_digest(found[0], bytes.fromhex(digest)) else None

    async def by_access_key(self, access_key_id: str) -> tuple[Principal, str] | None:
        return self._by_akid.get(access_key_id)


class AuthMiddleware:
    def __init__(self, app: Any, config: Config, *, deps: Runtime, backends: list[KeyBackend] | None = None) -> None:
        self.app = app
        self.enabled = config.auth.mode == "keys"
        if backends is None:
            backends = [StaticKeys(config.auth.keys)]
            secret = str(config.auth.secret)
            if secret:
                backends.append(ManagedKeys(lambda: deps.store, secret,
                                            stale_ok=config.state.on_redis_error != "closed"))
            elif self.enabled:
                log.warning("managed_keys_disabled", detail="auth.secret is empty: keys created with "
                            "`llm-gateway keys` or /admin/keys are ignored (set GATEWAY_SECRET)")
        self.backends: list[KeyBackend] = backends
        self.anonymous = Principal(key_id="anonymous")
        self.max_body = config.gateway.max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        if not self.enabled:
            ctx.principal = self.anonymous
        elif getattr(ctx.adapter, "sigv4", False) and (ctx.header(b"authorization") or "").startswith("AWS4-HMAC-SHA256"):
            ctx.principal = await self._sigv4(ctx, scope, receive)
        else:
            ctx.principal = await self._key(ctx)
        await self.app(scope, receive, send)

    async def _key(self, ctx: RequestContext) -> Principal:
        key = ctx.adapter.credential(ctx)
        if not key:
            raise GatewayError("caller_missing_credentials", "missing gateway API key")
        if len(key) > MAX_KEY_LENGTH:
            raise GatewayError("caller_invalid_credentials", "invalid gateway API key")
        for backend in self.backends:
            principal = await backend.by_key(key)
            if principal is not None:
                return principal
        raise GatewayError("caller_invalid_credentials", "invalid gateway API key")

    async def _sigv4(self, ctx: RequestContext, scope: dict[str, Any], receive: Any) -> Principal:
        header = ctx.header(b"authorization") or ""
        auth = sigv4.parse_authorization(header) if len(header) <= 4096 else None
        if auth is None or len(auth.access_key_id) > 128:
            raise GatewayError("caller_invalid_signature", "malformed SigV4 Authorization header")
        found = None
        for backend in self.backends:
            found = await backend.by_access_key(auth.access_key_id)
            if found is not None:
                break
        if found is None:
            raise GatewayError("caller_invalid_credentials", "The security token included in the request is invalid.")
        principal, secret = found
        # Only now, for a known identity, is the body worth reading: the signature covers it.
        await read_body(ctx, receive, self.max_body)
        raw = scope.get("raw_path") or scope["path"].encode()
        try:
            sigv4.verify(
                method=ctx.method, scheme=scope.get("scheme", "http"), raw_path=raw.decode("latin-1").split("?", 1)[0],
                query=ctx.query, headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in ctx.headers],
                body=ctx.body, auth=auth, secret_key=secret,
            )
        except sigv4.SignatureExpired:
            raise GatewayError("caller_invalid_signature", "Signature expired: the request time is too far from the server time.") from None
        except (ValueError, KeyError, TypeError, IndexError):  # mismatch, malformed, or a Host botocore cannot parse
            raise GatewayError("caller_invalid_signature", "The request signature we calculated does not match the signature you provided.") from None
        return principal

