"""Managed gateway keys: generation, the peppered digest, derived SigV4 secrets, the key store in
Redis, and the auth backend that reads it.

Contract:
- A key is `gwk_<id>_<secret>`: `id` is 12 lower-case base32 characters (60 random bits; safe to log,
  it names the key), the secret 32 random bytes in urlsafe base64 (43 characters). Its SigV4 identity
  is `GWK` + the id upper-cased + 5 random base32 characters (20 characters, like an AWS access key id),
  so the id is read back from either credential and no index is needed.
- Nothing usable is stored. Redis keeps HMAC-SHA256(auth.secret, key) (the digest; compared in
  constant time), and the SigV4 secret is derived when needed as
  base64(HMAC-SHA256(auth.secret, "sigv4:" + access key id))[:40]. Without `auth.secret` no managed key
  can be created (`KeysDisabled`) or used.
- One Redis hash per key, `llmgw:{llmgw}:apikey:<id>`, without TTL (ops own it, like live limits);
  revoking deletes it.
- `ManagedKeys` is the auth backend. It caches every lookup, found or not, for `CACHE_TTL` (0.5 s),
  keyed by digest or access key id, so revocation and policy changes reach every replica within a
  second. While Redis is unavailable a key seen in the last `STALE_TTL` keeps working (unless
  `state.on_redis_error` is `closed`); any other managed key gets a 503.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
import structlog

from config.models import FAMILIES
from proxy.context import Principal
from proxy.errors import GatewayError
from proxy.state.store import TAG, Store, StoreUnavailable

log = structlog.get_logger("llm_gateway.keys")
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
KEY_FORMAT = re.compile(r"gwk_([a-z2-7]{12})_[A-Za-z0-9_-]{43}")
AKID_FORMAT = re.compile(r"GWK([A-Z2-7]{12})[A-Z2-7]{5}")
ID_FORMAT = re.compile(r"[a-z2-7]{12}")
CACHE_TTL = 0.5
STALE_TTL = 60.0
CACHE_MAX = 10_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@:/+-]{0,63}")
_MODEL = re.compile(r"[A-Za-z0-9._:/@+-]{1,256}")
_META_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_META_VALUE = re.compile(r"[\x20-\x7e]{0,256}")
DISABLED_MESSAGE = ("auth.secret is not set: managed keys need a server-side secret "
                    "(set GATEWAY_SECRET, the same on every replica and for the CLI)")


class KeysDisabled(Exception):
    """`auth.secret` is empty, so managed keys can be neither created nor used."""


def record_key(key_id: str) -> str:
    return f"llmgw:{TAG}:apikey:{key_id}"


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def key_digest(secret: str, key: str) -> str:
    return hmac.new(secret.encode(), key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def sigv4_secret(secret: str, access_key_id: str) -> str:
    mac = hmac.new(secret.encode(), b"sigv4:" + access_key_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()[:40]


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed managed key (None for anything else)."""
    match = KEY_FORMAT.fullmatch(key)
    return match.group(1) if match else None


@dataclass(slots=True)
class KeySpec:
    """What a managed key may do; validated by `parse_spec`."""

    name: str
    models: list[str] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    log_bodies: bool = False


def _count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return value


def _names(name: str, value: Any, pattern: re.Pattern[str]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and pattern.fullmatch(v) for v in value):
        raise ValueError(f"{name} must be a list of names")
    return list(dict.fromkeys(value))


def parse_spec(data: Any) -> KeySpec:
    """Validate `{name, models, families, rpm, tpm, max_concurrent, metadata, log_bodies}` (ValueError on a bad
    field)."""
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(data) - {"name", "models", "families", "rpm", "tpm", "max_concurrent", "metadata", "log_bodies"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError("name is required: 1-64 letters, digits, spaces or ._@:/+-")
    families = _names("families", data.get("families"), re.compile(r"[a-z]+"))
    if set(families) - set(FAMILIES):
        raise ValueError(f"families must be among: {', '.join(FAMILIES)}")
    metadata = {} if data.get("metadata") is None else data["metadata"]
    if not isinstance(metadata, dict) or len(metadata) > 32:
        raise ValueError("metadata must be an object of at most 32 entries")
    meta: dict[str, str] = {}
    for k, v in metadata.items():
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            v = ",".join(v)
        if not isinstance(k, str) or not _META_KEY.fullmatch(k) or not isinstance(v, str) or not _META_VALUE.fullmatch(v):
            raise ValueError("metadata keys are names, values printable text of at most 256 characters")
        meta[k] = v
    if data.get("log_bodies") is not None and data["log_bodies"].__class__ is not bool:  # 1 == True
        raise ValueError("log_bodies must be true or false")
    return KeySpec(name=name, models=_names("models", data.get("models"), _MODEL), families=families,
                   rpm=_count("rpm", data.get("rpm")), tpm=_count("tpm", data.get("tpm")),
                   max_concurrent=_count("max_concurrent", data.get("max_concurrent")), metadata=meta,
                   log_bodies=data.get("log_bodies") is True)


def _int(raw: bytes | None) -> int | None:
    return int(raw) if raw else None


def public_view(key_id: str, raw: dict[bytes, bytes]) -> dict[str, Any]:
    """A stored record as shown by list/get: never the digest, never a secret."""
    text = {k.decode(): v.decode() for k, v in raw.items()}
    return {"id": key_id, "name": text.get("name", ""), "aws_access_key_id": text.get("aws_access_key_id", ""),
            "models": orjson.loads(text.get("models") or "[]"), "families": orjson.loads(text.get("families") or "[]"),
            "rpm": _int(raw.get(b"rpm")), "tpm": _int(raw.get(b"tpm")),
            "max_concurrent": _int(raw.get(b"max_concurrent")),
            "metadata": orjson.loads(text.get("metadata") or "{}"), "log_bodies": raw.get(b"log_bodies") == b"1",
            "created": text.get("created", "")}


def principal_from(view: dict[str, Any]) -> Principal:
    return Principal(key_id=view["id"], models=tuple(view["models"]), families=tuple(view["families"]),
                     rpm=view["rpm"], tpm=view["tpm"], max_concurrent=view["max_concurrent"],
                     metadata={"name": view["name"], **view["metadata"]}, log_bodies=view["log_bodies"])


class KeyStore:
    """Create, list, read and revoke managed keys (the CLI, the admin API and the backend share it)."""

    def __init__(self, store: Store, secret: str) -> None:
        self.store, self.secret = store, secret

    def _deadline(self) -> float:
        return max(self.store.timeout, 2.0)

    async def create(self, spec: KeySpec) -> dict[str, str]:
        """The new key's credentials; they are returned here once and never stored."""
        if not self.secret:
            raise KeysDisabled(DISABLED_MESSAGE)
        for _ in range(5):
            key_id = _random(12)
            key = f"gwk_{key_id}_{secrets.token_urlsafe(32)}"
            akid = f"GWK{key_id.upper()}{_random(5).upper()}"
            mapping: dict[str, Any] = {
                "name": spec.name, "digest": key_digest(self.secret, key), "aws_access_key_id": akid,
                "models": orjson.dumps(spec.models), "families": orjson.dumps(spec.families),
                "metadata": orjson.dumps(spec.metadata),
                "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            }
            mapping.update({k: v for k, v in (("rpm", spec.rpm), ("tpm", spec.tpm),
                                              ("max_concurrent", spec.max_concurrent)) if v is not None})
            if spec.log_bodies:
                mapping["log_bodies"] = "1"

            async def op(c: Any, k: str = record_key(key_id), m: dict[str, Any] = mapping) -> bool:
                if not await c.hsetnx(k, "name", m["name"]):  # ids are random: a clash is vanishingly rare
                    return False
                await c.hset(k, mapping=m)
                return True

            if await self.store.call(op, deadline=self._deadline()):
                return {"id": key_id, "key": key, "aws_access_key_id": akid,
                        "aws_secret_access_key": sigv4_secret(self.secret, akid)}
        raise RuntimeError("could not allocate a key id")

    async def get(self, key_id: str, *, deadline: float | None = None) -> dict[bytes, bytes] | None:
        if not ID_FORMAT.fullmatch(key_id):
            return None
        raw = await self.store.call(lambda c: c.hgetall(record_key(key_id)), deadline=deadline)
        return raw or None

    async def show(self, key_id: str) -> dict[str, Any] | None:
        raw = await self.get(key_id, deadline=self._deadline())
        return public_view(key_id, raw) if raw else None

    async def list(self) -> list[dict[str, Any]]:
        prefix = record_key("")

        async def op(c: Any) -> list[tuple[str, dict[bytes, bytes]]]:
            names = sorted({k async for k in c.scan_iter(match=prefix + "*", count=500)})
            async with c.pipeline(transaction=False) as p:
                for name in names:
                    p.hgetall(name)
                rows = await p.execute()
            return [(n.decode()[len(prefix):], r) for n, r in zip(names, rows) if r]

        rows = await self.store.call(op, deadline=max(self.store.timeout, 5.0))
        return sorted((public_view(k, r) for k, r in rows), key=lambda v: (v["created"], v["id"]))

    async def revoke(self, key_id: str) -> bool:
        if not ID_FORMAT.fullmatch(key_id):
            return False
        return bool(await self.store.call(lambda c: c.delete(record_key(key_id)), deadline=self._deadline()))


class ManagedKeys:
    """The auth backend for managed keys (`middlewares.auth.KeyBackend`)."""

    def __init__(self, store: Callable[[], Store], secret: str, *, stale_ok: bool = True) -> None:
        self._store, self.secret, self.stale_ok = store, secret, stale_ok
        self._cache: dict[str, tuple[float, Any, float]] = {}  # digest/akid -> (fresh until, value, stale until)

    def _cached(self, name: str) -> tuple[bool, Any]:
        hit = self._cache.get(name)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def _put(self, name: str, value: Any) -> None:
        now = time.monotonic()
        if len(self._cache) >= CACHE_MAX:
            self._cache = {k: v for k, v in self._cache.items() if v[2] > now and v[1] is not None}
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
        self._cache[name] = (now + CACHE_TTL, value, now + STALE_TTL)

    async def _load(self, name: str, key_id: str) -> dict[str, Any] | None:
        try:
            raw = await KeyStore(self._store(), self.secret).get(key_id)
            return public_view(key_id, raw) | {"_digest": raw.get(b"digest", b"").decode()} if raw else None
        except StoreUnavailable:
            stale = self._cache.get(name)
            if self.stale_ok and stale is not None and stale[1] is not None and stale[2] > time.monotonic():
                raise _Stale(stale[1]) from None
            raise GatewayError("gateway_unavailable", "the key store is unavailable; retry shortly",
                               retry_after=1.0) from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warning("managed_key_unreadable", key_id=key_id)
            return None

    async def by_key(self, key: str) -> Principal | None:
        key_id = key_id_of(key)
        if key_id is None:
            return None
        digest = key_digest(self.secret, key)
        hit, value = self._cached(digest)
        if hit:
            return value
        try:
            view = await self._load(digest, key_id)
        except _Stale as stale:
            return stale.value
        found = view is not None and hmac.compare_digest(view["_digest"].encode(), digest.encode())
        principal = principal_from(view) if found and view is not None else None
        self._put(digest, principal)
        return principal

    async def by_access_key(self, access_key_id: str) -> tuple[Principal, str] | None:
        match = AKID_FORMAT.fullmatch(access_key_id)
        if match is None:
            return None
        hit, value = self._cached(access_key_id)
        if hit:
            return value
        try:
            view = await self._load(access_key_id, match.group(1).lower())
        except _Stale as stale:
            return stale.value
        found = None
        if view is not None and hmac.compare_digest(view["aws_access_key_id"].encode(), access_key_id.encode()):
            found = (principal_from(view), sigv4_secret(self.secret, access_key_id))
        self._put(access_key_id, found)
        return found


class _Stale(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


def keys_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "-"
        if isinstance(value, list):
            return ",".join(value) or "*"
        if isinstance(value, dict):
            return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
        return "-" if value is None or value == "" else str(value)

    columns = ("id", "name", "aws_access_key_id", "models", "families", "rpm", "tpm", "max_concurrent",
               "metadata", "log_bodies", "created")
    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
