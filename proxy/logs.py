"""Logging setup: structlog JSON lines on stdout, secrets redacted by field name before rendering.

Contract: `configure_logging()` is idempotent. Any event field whose name is a credential name
(`key`, `api_key`, `secret`, `authorization`, `*_token`, `*_secret`, ...) is replaced by `***`, at
any depth of nested dicts and lists (e.g. inside `key_metadata`). Access lines carry the request id
and the trace id, so a log line, a trace and the client's `x-gateway-request-id` join up.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import orjson
import structlog

_SECRET_NAMES = frozenset({"key", "api_key", "apikey", "admin_key", "secret", "password", "authorization",
                           "signature", "credential", "credentials", "token", "x-api-key", "api-key"})
_SECRET_SUFFIXES = ("_key", "_secret", "secret_key", "_password", "_token", "_signature", "_credential")
_configured = False


@functools.lru_cache(maxsize=4096)  # field names repeat on every line: decide once per name
def _secret(name: object) -> bool:
    lowered = str(name).lower()
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 8:
        return value
    if isinstance(value, dict):
        return {k: "***" if _secret(k) else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, depth + 1) for v in value]
    return value


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for name, value in list(event.items()):
        if _secret(name):
            event[name] = "***"
        elif isinstance(value, (dict, list, tuple)):
            event[name] = _scrub(value)
    return event


def configure_logging(level: int = logging.INFO, stream: Any = None) -> None:
    """JSON lines to `stream` (default stdout; the admin CLI passes stderr so its own output stays clean)."""
    global _configured
    if _configured:
        return
    _configured = True
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory((stream or sys.stdout).buffer),
        cache_logger_on_first_use=True,
    )
