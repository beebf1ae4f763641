"""SigV4 with botocore's signer: verify a client's signature, sign an upstream request.

Contract:
- `parse_authorization(value)` splits an `AWS4-HMAC-SHA256` header into its parts, or returns None.
- `verify(...)` recomputes the signature over exactly what the client signed (method, the raw path and
  query as received, the listed signed headers, the body) with the shared secret and compares in
  constant time. It raises `SignatureMismatch`, `SignatureExpired` or `MalformedSignature`.
- `sign(...)` returns fresh `Authorization` / `X-Amz-Date` (and session token) headers for an upstream
  URL; call it on every attempt, since the signature covers a timestamp.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

MAX_SKEW_SECONDS = 15 * 60
_TS_FORMAT = "%Y%m%dT%H%M%SZ"


class MalformedSignature(ValueError):
    """The Authorization header or X-Amz-Date is not well formed."""


class SignatureMismatch(ValueError):
    """The recomputed signature differs from the one the client sent."""


class SignatureExpired(ValueError):
    """X-Amz-Date lies outside the allowed clock skew."""


@dataclass(frozen=True, slots=True)
class SigV4Header:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> SigV4Header | None:
    if not value.startswith("AWS4-HMAC-SHA256 "):
        return None
    parts: dict[str, str] = {}
    for item in value[len("AWS4-HMAC-SHA256 ") :].split(","):
        key, sep, val = item.strip().partition("=")
        if not sep:
            return None
        parts[key] = val
    try:
        akid, date, region, service, terminal = parts["Credential"].split("/")
        signed = tuple(parts["SignedHeaders"].split(";"))
        signature = parts["Signature"]
    except (KeyError, ValueError):
        return None
    if terminal != "aws4_request" or not akid or "host" not in signed:
        return None
    return SigV4Header(akid, date, region, service, signed, signature)


class _FixedTimeSigner(SigV4Auth):
    """botocore's signer with the client's own timestamp instead of now."""

    def canonical_signature(self, request: AWSRequest, timestamp: str) -> tuple[str, str]:
        request.context["timestamp"] = timestamp
        canonical = self.canonical_request(request)
        sts = self.string_to_sign(request, canonical)
        return self.signature(sts, request), self.signed_headers(self.headers_to_sign(request))


def verify(
    *,
    method: str,
    scheme: str,
    raw_path: str,
    query: str,
    headers: list[tuple[str, str]],
    body: bytes,
    auth: SigV4Header,
    secret_key: str,
    now: datetime | None = None,
) -> None:
    """Raise unless `auth` is a valid, fresh signature of this request by `secret_key`."""
    amz_date = next((v for k, v in headers if k == "x-amz-date"), "")
    try:
        stamp = datetime.strptime(amz_date, _TS_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise MalformedSignature("missing or malformed X-Amz-Date") from exc
    if not amz_date.startswith(auth.date):
        raise MalformedSignature("credential scope date does not match X-Amz-Date")
    current = now or datetime.now(timezone.utc)
    if abs((current - stamp).total_seconds()) > MAX_SKEW_SECONDS:
        raise SignatureExpired("signature expired or not yet valid")
    wanted = set(auth.signed_headers)
    signed = [(k, v) for k, v in headers if k in wanted]
    if {k for k, _ in signed} != wanted:
        raise MalformedSignature("a signed header is missing from the request")
    content_hash = next((v for k, v in headers if k == "x-amz-content-sha256"), None)
    if content_hash is not None and content_hash != hashlib.sha256(body).hexdigest():
        raise SignatureMismatch("payload hash does not match the body")
    host = next(v for k, v in signed if k == "host")
    url = f"{scheme}://{host}{raw_path}" + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, data=body)
    for k, v in signed:
        request.headers[k] = v  # HTTPHeaders appends, so repeated headers join as signed
    signer = _FixedTimeSigner(
        Credentials(auth.access_key_id, secret_key), auth.service, auth.region
    )
    # botocore treats http URLs as always payload-signed; keep that for https too.
    request.context["payload_signing_enabled"] = True
    expected, _ = signer.canonical_signature(request, amz_date)
    if not hmac.compare_digest(expected.encode(), auth.signature.encode()):
        raise SignatureMismatch("signature does not match")


class SigningCredentials(Protocol):
    """What `sign` reads: botocore's (frozen) credentials, or the bedrock adapter's static ones."""

    @property
    def access_key(self) -> str: ...

    @property
    def secret_key(self) -> str: ...

    @property
    def token(self) -> str | None: ...


def sign(
    *,
    method: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    credentials: SigningCredentials,
    region: str,
    service: str = "bedrock",
) -> dict[str, str]:
    """Headers to add for an upstream request: Authorization, X-Amz-Date, maybe the session token.

    `headers` are the ones to cover by the signature (content-type, accept, ...); the host comes
    from the URL.
    """
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    creds = Credentials(credentials.access_key, credentials.secret_key, credentials.token)
    SigV4Auth(creds, service, region).add_auth(request)
    out = {"authorization": request.headers["Authorization"], "x-amz-date": request.headers["X-Amz-Date"]}
    if creds.token:
        out["x-amz-security-token"] = creds.token
    return out
