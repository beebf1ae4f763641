"""The access-log line's own path (`proxy.telemetry.logs.access_logger`, `middlewares.telemetry._log`).

In process, into a byte buffer: the line is one JSON object with every field the README lists, in
structlog's order (fields, `event`, `level`, `timestamp`); secret-named fields are masked at the top
level and at any depth; the key metadata is masked once per principal (and truncated); the
timestamp is the wall clock in ISO 8601 UTC with microseconds; a level above INFO silences it.
The end-to-end line (a real `serve` process) is checked in tests/test_observability.py.
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import re
import time
from typing import Any

import structlog

import proxy.telemetry.logs as logs
from middlewares.telemetry import _log
from proxy.context import Attempt, Principal, RequestContext
from proxy.telemetry.logs import AccessLogger, Redacted, access_logger, redacted, render_access

REQUIRED = ("request_id", "trace_id", "key_id", "family", "operation", "model", "deployment", "status", "stream",
            "attempts", "input_tokens", "output_tokens", "cached_tokens", "ttfb_ms", "upstream_ms", "overhead_ms",
            "duration_ms", "outcome", "event", "level", "timestamp")
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def logger() -> tuple[AccessLogger, io.BytesIO]:
    out = io.BytesIO()
    return AccessLogger(structlog.BytesLogger(out), [render_access], {}), out


def lines(out: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


class _Deployment:
    name = "openai-good"


def context(metadata: dict[str, Any] | None = None) -> RequestContext:
    ctx = RequestContext(request_id="gw-abc", family="openai", adapter=None, method="POST",  # type: ignore[arg-type]
                         path="/v1/chat/completions", query="", headers=[])
    ctx.principal = Principal("team-a", metadata=metadata if metadata is not None else {"team": "search"})
    ctx.model, ctx.operation, ctx.attempts, ctx.status = "gpt-4o-mini", "chat", 1, 200
    ctx.deployment = _Deployment()  # type: ignore[assignment]
    ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.cached_tokens = 19, 8, 0
    ctx.attempt = Attempt(1, ctx.deployment, 0.0, ttfb=0.0029, open=False)  # type: ignore[arg-type]
    ctx.upstream_seconds = 0.00367
    ctx.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    return ctx


def test_access_line_has_every_field_in_structlog_order() -> None:
    log, out = logger()
    _log(log, context(), 200, "ok")
    (line,) = lines(out)
    for name in REQUIRED:
        assert name in line, name
    assert list(line)[-3:] == ["event", "level", "timestamp"]
    assert line["event"] == "request" and line["level"] == "info" and line["outcome"] == "ok"
    assert line["key_id"] == "team-a" and line["key_metadata"] == {"team": "search"}
    assert line["deployment"] == "openai-good" and line["status"] == 200 and line["stream"] is False
    assert line["ttfb_ms"] == 2.9 and line["upstream_ms"] == 3.67
    assert line["duration_ms"] >= line["overhead_ms"] >= 0
    assert out.getvalue().endswith(b"}\n") and out.getvalue().count(b"\n") == 1


def test_a_line_without_a_principal_or_attempt() -> None:
    log, out = logger()
    ctx = context()
    ctx.principal, ctx.attempts, ctx.attempt = None, 0, None
    _log(log, ctx, 401, "caller_invalid_credentials")
    (line,) = lines(out)
    assert line["key_id"] is None and "key_metadata" not in line and line["deployment"] is None
    assert line["ttfb_ms"] is None and line["status"] == 401 and line["outcome"] == "caller_invalid_credentials"


def test_bodies_only_for_a_key_that_asks_and_secrets_masked_inside_them() -> None:
    log, out = logger()
    ctx = context()
    ctx.body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"metadata":{"password":"pw1"}}'
    ctx.response_body = bytearray(b'{"choices":[{"message":{"content":"hello"}}],"api_key":"sk-x"}')
    _log(log, ctx, 200, "ok")
    assert "request_body" not in lines(out)[0] and b"pw1" not in out.getvalue()  # not asked: never
    ctx.principal.log_bodies = True  # type: ignore[union-attr]
    _log(log, ctx, 200, "ok")
    line = lines(out)[1]
    assert line["request_body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert line["request_body"]["metadata"] == {"password": "***"}
    assert line["response_body"] == {"choices": [{"message": {"content": "hello"}}], "api_key": "***"}
    assert b"pw1" not in out.getvalue() and b"sk-x" not in out.getvalue()


def test_a_secret_nested_too_deep_is_cut_never_written() -> None:
    log, out = logger()
    ctx = context()
    ctx.principal.log_bodies = True  # type: ignore[union-attr]
    deep: Any = {"password": "deep-canary"}
    for _ in range(20):
        deep = {"level": deep}
    ctx.body = json.dumps(deep).encode()
    _log(log, ctx, 200, "ok")
    assert b"deep-canary" not in out.getvalue() and lines(out)[0]["request_body"]["level"]["level"]


def test_an_upstream_error_is_logged_as_the_client_got_it() -> None:
    import asyncio
    import gzip

    from proxy.relay import _send_error

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    ctx = context()
    ctx.principal.log_bodies = True  # type: ignore[union-attr]
    error = b'{"error":{"message":"overloaded","type":"server_error"}}'
    native = (502, [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")], gzip.compress(error))
    asyncio.run(_send_error(ctx, Attempt(1, None, 0.0), native, "transient", send))  # type: ignore[arg-type]
    assert sent[-1]["body"] == native[2]  # the client got the upstream's bytes, untouched
    log, out = logger()
    _log(log, ctx, 502, "upstream_error")
    assert lines(out)[0]["response_body"] == {"error": {"message": "overloaded", "type": "server_error"}}


def test_a_body_that_cannot_be_shown_never_costs_the_line(monkeypatch: Any) -> None:
    import middlewares.telemetry as telemetry

    def broken(encoding: str) -> Any:
        raise RuntimeError("inflater gone")

    monkeypatch.setattr(telemetry, "Decompressor", broken)
    log, out = logger()
    ctx = context()
    ctx.principal.log_bodies = True  # type: ignore[union-attr]
    ctx.body, ctx.response_body, ctx.response_encoding = b"{}", bytearray(b"x"), "gzip"
    _log(log, ctx, 200, "ok")
    (line,) = lines(out)
    assert line["request_body"] == line["response_body"] == "<unreadable>" and line["outcome"] == "ok"


def test_bodies_are_inflated_cut_and_kept_as_text_when_not_json() -> None:
    import gzip

    from proxy.relay import BODY_LOG_LIMIT

    log, out = logger()
    ctx = context()
    ctx.principal.log_bodies = True  # type: ignore[union-attr]
    ctx.body = b'{"a": "' + b"x" * BODY_LOG_LIMIT + b'"}'
    ctx.response_body, ctx.response_encoding = bytearray(gzip.compress('data: {"delta":"café"}\n\n'.encode())), "gzip"
    _log(log, ctx, 200, "ok")
    line = lines(out)[0]
    assert line["request_body_truncated"] is True and len(line["request_body"]) == BODY_LOG_LIMIT
    assert line["request_body"].startswith('{"a": "xxx') and "response_body_truncated" not in line
    assert line["response_body"] == 'data: {"delta":"café"}\n\n'  # an SSE stream: text, inflated


def test_timestamp_is_the_wall_clock_in_utc() -> None:
    log, out = logger()
    before = datetime.datetime.now(datetime.timezone.utc)
    for _ in range(3):
        log.info("request", request_id="x")
        time.sleep(0.01)
    after = datetime.datetime.now(datetime.timezone.utc)
    stamps = [line["timestamp"] for line in lines(out)]
    assert all(STAMP.match(s) for s in stamps), stamps
    parsed = [datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
              for s in stamps]
    assert before - datetime.timedelta(milliseconds=1) <= parsed[0] <= parsed[1] <= parsed[2] <= after
    assert parsed[2] - parsed[0] >= datetime.timedelta(milliseconds=15)


def test_timestamp_prefix_follows_the_second(monkeypatch: Any) -> None:
    clock = logs._Clock()
    for ns in (1_700_000_000_999_999_000, 1_700_000_001_000_001_000, 1_700_003_600_000_000_000):
        monkeypatch.setattr(logs.time, "time_ns", lambda ns=ns: ns)
        expected = datetime.datetime.fromtimestamp(ns // 1000 / 1e6, datetime.timezone.utc)
        assert clock.now() == expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_secret_named_fields_are_masked_at_any_depth() -> None:
    log, out = logger()
    log.info("request", request_id="r1", api_key="sk-top", x_secret="s1", nested={"authorization": "Bearer t",
             "inner": [{"password": "p", "fine": 1}]}, tags=("a", {"session_token": "t2"}))
    (line,) = lines(out)
    assert line["api_key"] == "***" and line["x_secret"] == "***"
    assert line["nested"] == {"authorization": "***", "inner": [{"password": "***", "fine": 1}]}
    assert line["tags"] == ["a", {"session_token": "***"}]
    assert b"sk-top" not in out.getvalue() and b"Bearer t" not in out.getvalue()
    log.info("request", request_id="r2", api_key="sk-again")  # a name seen before is masked again
    assert lines(out)[-1]["api_key"] == "***"


def test_key_metadata_is_masked_truncated_and_made_once() -> None:
    metadata = {"team": "search", "api_key": "not-for-logs", **{f"tag{i}": str(i) for i in range(30)}}
    log, out = logger()
    ctx = context(metadata)
    _log(log, ctx, 200, "ok")
    _log(log, ctx, 200, "ok")
    first, second = lines(out)
    assert first["key_metadata"]["api_key"] == "***" and first["key_metadata"]["team"] == "search"
    assert len(first["key_metadata"]) == 16 and second["key_metadata"] == first["key_metadata"]
    assert b"not-for-logs" not in out.getvalue()
    assert redacted(metadata, 16) is redacted(metadata, 16)  # once per mapping
    other = dict(metadata)
    assert redacted(other, 16) is not redacted(metadata, 16) and redacted(other, 16) == redacted(metadata, 16)


def test_redacted_values_are_plain_dicts_to_json_and_not_scanned_again() -> None:
    value = redacted({"team": "a", "nested": {"private_key": "k"}})
    assert isinstance(value, Redacted) and value == {"team": "a", "nested": {"private_key": "***"}}
    assert logs._scrub(value) is value
    assert json.loads(render_access(None, "info", {"m": value, "event": "e"}))["m"] == value


def test_a_level_above_info_silences_the_access_line(monkeypatch: Any) -> None:
    monkeypatch.setattr(logs, "_level", logging.WARNING)
    quiet = access_logger()
    monkeypatch.setattr(logs, "_level", logging.INFO)
    assert type(quiet) is not AccessLogger and type(access_logger()) is AccessLogger
    quiet.info("request", request_id="x")  # nothing to see, nothing raised


def test_bound_context_is_kept() -> None:
    log, out = logger()
    log.bind(replica="r1").info("request", request_id="x")
    (line,) = lines(out)
    assert line["replica"] == "r1" and line["request_id"] == "x" and line["event"] == "request"


def test_names_trusted_without_a_scan_are_not_secret_names() -> None:
    assert not [name for name in logs._safe if logs._secret(name)]
    assert logs._secret("api_key") and logs._secret("Authorization") and logs._secret("session_token")
