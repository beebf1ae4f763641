"""Authentication: the gateway key, presented the way the client's SDK presents a provider key.

Contract:
- `auth.mode: keys`: Bearer / `x-api-key` keys are hashed (sha256) and looked up among the static keys
  (and, through the key backend, managed keys); digests are compared in constant time. SigV4 clients
  (boto3) are verified by recomputing the signature with the key's secret over the received Host,
  raw path and query, signed headers and body; `X-Amz-Date` must be within 15 minutes.
- Missing key: 401 (Bedrock: 403 MissingAuthenticationTokenException); unknown key: 401
  (Bedrock: UnrecognizedClientException); bad/expired/other-body signature: Bedrock 403
  InvalidSignatureException. All native to the inbound family.
- `auth.mode: none`: everyone is the anonymous principal (a warning is logged at startup).
- Sets `ctx.principal`. The client credential itself is never forwarded (the adapters drop it).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any, Protocol

from config.models import Config, StaticKey
from proxy.context import Principal, RequestContext, get_context, read_body
from proxy.errors import GatewayError
from proxy.runtime import Runtime
from providers import sigv4


class KeyBackend(Protocol):
    """Where keys come from. Static config keys are one backend; managed keys in Redis another."""

    async def by_digest(self, digest: str) -> Principal | None: ...
    async def by_access_key(self, access_key_id: str) -> tuple[Principal, str] | None: ...


def principal_of(key: StaticKey) -> Principal:
    return Principal(key_id=key.id, models=tuple(key.models), rpm=key.rate_limit.requests_per_minute,
                     tpm=key.rate_limit.tokens_per_minute, max_concurrent=key.max_concurrent,
                     metadata=dict(key.metadata))


class StaticKeys:
    def __init__(self, keys: list[StaticKey]) -> None:
        self._by_digest = {k.sha256: (bytes.fromhex(k.sha256), principal_of(k)) for k in keys}
        self._by_akid = {k.aws_access_key_id: (principal_of(k), str(k.aws_secret_access_key))
                         for k in keys if k.aws_access_key_id}

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
        self.backends: list[KeyBackend] = backends if backends is not None else [StaticKeys(config.auth.keys)]
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
            await read_body(ctx, receive, self.max_body)
            ctx.principal = await self._sigv4(ctx, scope)
        else:
            ctx.principal = await self._key(ctx)
        await self.app(scope, receive, send)

    async def _key(self, ctx: RequestContext) -> Principal:
        key = ctx.adapter.credential(ctx)
        if not key:
            raise GatewayError("caller_missing_credentials", "missing gateway API key")
        if len(key) > 512:
            raise GatewayError("caller_invalid_credentials", "invalid gateway API key")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        for backend in self.backends:
            principal = await backend.by_digest(digest)
            if principal is not None:
                return principal
        raise GatewayError("caller_invalid_credentials", "invalid gateway API key")

    async def _sigv4(self, ctx: RequestContext, scope: dict[str, Any]) -> Principal:
        auth = sigv4.parse_authorization(ctx.header(b"authorization") or "")
        if auth is None:
            raise GatewayError("caller_invalid_signature", "malformed SigV4 Authorization header")
        found = None
        for backend in self.backends:
            found = await backend.by_access_key(auth.access_key_id)
            if found is not None:
                break
        if found is None:
            raise GatewayError("caller_invalid_credentials", "The security token included in the request is invalid.")
        principal, secret = found
        raw = scope.get("raw_path") or scope["path"].encode()
        try:
            sigv4.verify(
                method=ctx.method, scheme=scope.get("scheme", "http"), raw_path=raw.decode("latin-1").split("?", 1)[0],
                query=ctx.query, headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in ctx.headers],
                body=ctx.body, auth=auth, secret_key=secret,
            )
        except sigv4.SignatureExpired:
            raise GatewayError("caller_invalid_signature", "Signature expired: the request time is too far from the server time.") from None
        except (sigv4.SignatureMismatch, sigv4.MalformedSignature):
            raise GatewayError("caller_invalid_signature", "The request signature we calculated does not match the signature you provided.") from None
        return principal

