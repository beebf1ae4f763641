"""Logging setup: structlog JSON lines on stdout, secrets redacted by field name before rendering.

Contract:
- `configure_logging()` is idempotent. Any event field whose name is a credential name (`key`,
  `api_key`, `secret`, `authorization`, `*_token`, `*_secret`, ...) is replaced by `***`, at any
  depth of nested dicts and lists (e.g. inside `key_metadata`). Lines are `{fields..., "event",
  "level", "timestamp"}`, the timestamp ISO 8601 UTC with microseconds (`2026-05-09T21:40:30.123456Z`).
- `access_logger()` is the logger of the one-line-per-request access log: a structlog bound logger
  writing where the other logs go, whose whole chain is one processor (`render_access`: level,
  timestamp, redaction, orjson). It costs a few microseconds a line where the general chain cost
  ~14: redaction scans nothing when every field name is a known non-secret name and every value a
  scalar (or `Redacted`), the timestamp reuses a per-second prefix, no structlog contextvars are
  merged. Each line is still written and flushed at once.
- `redacted(mapping)` is a mapping with its secrets masked, made once per mapping (by identity) and
  marked by its type (`Redacted`, made only here) so rendering does not scan it again: the access
  line's `key_metadata`.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any, Mapping, MutableMapping

import orjson
import structlog

_SECRET_NAMES = frozenset({"key", "api_key", "apikey", "admin_key", "secret", "password", "authorization",
                           "signature", "credential", "credentials", "token", "x-api-key", "api-key"})
_SECRET_SUFFIXES = ("_key", "_secret", "secret_key", "_password", "_token", "_signature", "_credential")
_NAMES_LIMIT = 4096
_configured = False
_output: Any = None  # the binary stream the lines go to, once configured
_level = logging.INFO


@functools.lru_cache(maxsize=4096)  # field names repeat on every line: decide once per name
def _secret(name: object) -> bool:
    lowered = str(name).lower()
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


class Redacted(dict[str, Any]):
    """A dict whose secret-named fields are already masked (at any depth): rendered as it is."""


def _scrub(value: Any, depth: int = 0) -> Any:
    if value.__class__ is Redacted:
        return value
    if depth > 16:  # deeper than any log field or request body needs: cut, never written unredacted
        return "…" if isinstance(value, (dict, list, tuple)) else value
    if isinstance(value, dict):
        return {k: "***" if _secret(k) else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, depth + 1) for v in value]
    return value


# Top-level names seen not to be secrets: a line made only of these, whose values are all scalars
# (or already `Redacted`), needs no redaction pass. Learnt by `_redact`; the access line's names are
# known from the start.
_safe: set[str] = {"request_id", "trace_id", "key_id", "key_metadata", "family", "operation", "model", "deployment",
                   "status", "stream", "attempts", "input_tokens", "output_tokens", "cached_tokens", "ttfb_ms",
                   "upstream_ms", "overhead_ms", "duration_ms", "outcome", "event", "level", "timestamp"}
_PLAIN = frozenset({str, int, float, bool, type(None), Redacted})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name, value in list(event.items()):
        if _secret(name):
            event[name] = "***"
            continue
        if name.__class__ is str and len(_safe) < _NAMES_LIMIT:
            _safe.add(name)
        if isinstance(value, (dict, list, tuple)):
            event[name] = _scrub(value)
    return event


_redacted: dict[int, tuple[Mapping[str, Any], Redacted]] = {}


def redacted(mapping: Mapping[str, Any], limit: int = 0) -> Redacted:
    """`mapping` with secret-named fields masked (at most `limit` items when > 0), cached per mapping.

    The mapping is read once: later changes to the same object are not seen (principals' metadata,
    the one user, is never changed in place)."""
    found = _redacted.get(id(mapping))
    if found is not None and found[0] is mapping:
        return found[1]
    items = list(mapping.items())[:limit] if limit > 0 else mapping.items()
    result = Redacted({k: "***" if _secret(k) else _scrub(v) for k, v in items})
    if len(_redacted) >= _NAMES_LIMIT:
        _redacted.clear()
    _redacted[id(mapping)] = (mapping, result)  # holding the mapping keeps its id from being reused
    return result


class _Clock:
    """ISO 8601 UTC timestamps with microseconds; the date and time of day are formatted once a second."""

    def __init__(self) -> None:
        self.second: tuple[int, str] = (-1, "")  # one tuple, replaced whole: safe across threads

    def now(self) -> str:
        ns = time.time_ns()
        second, prefix = self.second
        if ns // 1_000_000_000 != second:
            second = ns // 1_000_000_000
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = (second, prefix)
        return f"{prefix}.{ns // 1000 % 1_000_000:06d}Z"


_clock = _Clock()


def _timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["timestamp"] = _clock.now()
    return event


def render_access(_: Any, method: str, event: MutableMapping[str, Any]) -> bytes:
    """The access line's whole processor chain: level, timestamp, redaction by name, JSON."""
    event["level"] = method
    event["timestamp"] = _clock.now()
    if not (event.keys() <= _safe and _PLAIN.issuperset(map(type, event.values()))):
        _redact(None, method, event)
    return orjson.dumps(event)


class AccessLogger(structlog.BoundLoggerBase):
    """structlog's bound logger, cut down to what an access line needs.

    `write(event, fields)` takes the fields as a dict it may keep and change: keyword arguments
    (`info(event, **fields)`, also offered) cost ~1 us a line just to be copied, and so would
    structlog's `_process_event`. It runs the processors itself and hands the bytes to the logger."""

    def info(self, event: str, **fields: Any) -> None:
        self.write(event, fields)

    def write(self, event: str, fields: dict[str, Any]) -> None:
        if self._context:
            fields = {**self._context, **fields}
        fields["event"] = event
        line: Any = fields
        for processor in self._processors:
            line = processor(self._logger, "info", line)
        self._logger.msg(line)


class _QuietAccessLogger(AccessLogger):
    def write(self, event: str, fields: dict[str, Any]) -> None:
        pass


def access_logger() -> AccessLogger:
    """The access-line logger: where and at which level `configure_logging` said (stdout, INFO by default)."""
    cls = AccessLogger if _level <= logging.INFO else _QuietAccessLogger
    return cls(structlog.BytesLogger(_output or sys.stdout.buffer), [render_access], {})


def configure_logging(level: int = logging.INFO, stream: Any = None) -> None:
    """JSON lines to `stream` (default stdout; the admin CLI passes stderr so its own output stays clean)."""
    global _configured, _output, _level
    if _configured:
        return
    _configured = True
    _output, _level = (stream or sys.stdout).buffer, level
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(_output),
        cache_logger_on_first_use=True,
    )
