"""Logging setup: structlog JSON lines on stdout, secrets redacted by field name before rendering.

Contract: `configure_logging()` is idempotent. Any event field whose name looks like a credential
(`key`, `secret`, `token`, `authorization`, `password`, ...) is replaced by `***`.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_SECRET_WORDS = ("secret", "password", "token", "authorization", "api_key", "apikey", "credential", "signature")
_configured = False


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for name in list(event):
        lowered = name.lower()
        if lowered.endswith("_tokens") or lowered in ("key_id", "event"):
            continue
        if any(word in lowered for word in _SECRET_WORDS) or lowered in ("key", "admin_key"):
            event[name] = "***"
    return event


def configure_logging(level: int = logging.INFO) -> None:
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
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
