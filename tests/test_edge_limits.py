"""The edge limits of `server:` against a real `llm-gateway serve` process, with raw sockets for the slow
and the oversized clients (proxy/server/protocol.py).

- A request head trickled a byte at a time gets a 408 and is closed once `header_timeout` has passed; a
  connection that sends nothing is closed without a response.
- An authenticated body trickled a byte every 0.2 s, or stalled, gets a 408 and is closed once
  `body_timeout` has passed; a body sent steadily above `body_min_rate` for longer than that is served.
- A head over `max_header_bytes` (sent whole, or 16 MiB that never ends) or with more than `max_headers`
  fields gets a 431, and the simulated upstream never sees it; heads under the limits are served.
- With `max_connections` open, the next connection gets a 503 (short body, Connection: close) and is
  closed, while the open ones are still served; once one closes, a new one is served.
- Four connections sending 8 MiB of an unfinished header block each leave the gateway's RSS far below
  what they sent: the block is cut when it passes the cap, not buffered.

Timeouts are configured small (1 s); the bounds asserted on them are generous (several seconds).
"""
from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from config.models import ServerSettings
from tests.conftest import GATEWAY_KEY, recorded, standard_config
from tests.procs import Proc, Procs

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MIN_RATE = 100  # bytes/s
MAX_HEADER_BYTES = 8192
MAX_HEADERS = 20
GENEROUS = 6.0  # seconds: an upper bound for "closed once the timeout has passed", far above the 1 s timeouts
LIMITS = f"""server:
  header_timeout: {HEADER_TIMEOUT}
  body_timeout: {BODY_TIMEOUT}
  body_min_rate: {MIN_RATE}
  max_header_bytes: {MAX_HEADER_BYTES}
  max_headers: {MAX_HEADERS}
"""
CHAT = "/v1/chat/completions"


@contextlib.contextmanager
def _serving(tmp: Path, upstream: str, server_yaml: str, name: str) -> Iterator[Proc]:
    """One `llm-gateway serve` process with the standard test config plus `server_yaml`."""
    group = Procs(tmp)
    try:
        (gw,) = group.gateways(standard_config(upstream, server_yaml), 1, name=name)
        yield gw
    finally:
        group.close()
        print(group.report())  # shown by pytest only when a test failed


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Proc]:
    with _serving(tmp_path_factory.mktemp("edge"), mock_upstream, LIMITS, "edge") as gw:
        yield gw


def _connect(gw: Proc) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def _read_until_closed(sock: socket.socket, timeout: float = GENEROUS) -> bytes:
    """Everything the server sends until it closes (a reset after its answer counts as closing)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, leaving the connection open."""
    sock.settimeout(GENEROUS)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    length = int(_head_and_body(data)[0]["content-length"])
    while len(data.partition(b"\r\n\r\n")[2]) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def _head_and_body(answer: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    return headers, body


def _trickle(sock: socket.socket, data: bytes, interval: float) -> tuple[bytes, float]:
    """Send `data` a byte every `interval` until the server answers or closes; (its answer, seconds taken)."""
    start = time.monotonic()
    for i in range(len(data)):
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            break
        try:
            sock.sendall(data[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        pytest.fail(f"the server waited for all {len(data)} bytes sent at one every {interval}s")
    answer = _read_until_closed(sock)
    return answer, time.monotonic() - start


def _request(path: str, headers: list[tuple[str, str]], body: bytes = b"", method: str = "POST",
             keep_alive: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", *(f"{k}: {v}" for k, v in headers)]
    if not keep_alive:
        lines.append("Connection: close")
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chat_body(marker: str, size: int = 0) -> bytes:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": marker}]}).encode()
    return body + b" " * max(0, size - len(body))  # trailing whitespace keeps it valid JSON


def _auth(marker: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {GATEWAY_KEY}"), ("Content-Type", "application/json"), ("X-Marker", marker)]


def _exchange(gw: Proc, raw: bytes) -> bytes:
    with _connect(gw) as sock:
        sock.sendall(raw)
        return _read_until_closed(sock)


def _upstream_saw(upstream: str, marker: str) -> bool:
    return marker in json.dumps(recorded(upstream))


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


# Header timeout


def test_a_request_head_trickled_a_byte_at_a_time_gets_408_once_header_timeout_passes(gateway: Proc) -> None:
    head = _request(CHAT, _auth("slow-head"), _chat_body("slow-head"))
    with _connect(gateway) as sock:
        answer, seconds = _trickle(sock, head, 0.1)
    assert _status(answer) == 408, answer
    headers, body = _head_and_body(answer)
    assert headers["connection"] == "close" and json.loads(body)["error"]["message"]
    assert HEADER_TIMEOUT * 0.9 <= seconds < GENEROUS, seconds


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(gateway: Proc) -> None:
    with _connect(gateway) as sock:
        start = time.monotonic()
        answer = _read_until_closed(sock)
        seconds = time.monotonic() - start
    assert answer == b"" and seconds < GENEROUS


def test_a_keep_alive_connection_times_each_head_from_its_first_byte(gateway: Proc) -> None:
    """A second request that starts long after the connection opened is not refused for it."""
    with _connect(gateway) as sock:
        sock.sendall(_request("/healthz", [], method="GET", keep_alive=True))
        assert _status(_read_response(sock)) == 200
        time.sleep(HEADER_TIMEOUT * 1.5)  # beyond the header timeout, within uvicorn's keep-alive wait (5 s)
        sock.sendall(_request("/healthz", [], method="GET"))
        assert _status(_read_until_closed(sock)) == 200


# Body timeout and minimum rate


@pytest.mark.parametrize("pace", ["trickle", "stall"])
def test_a_slow_authenticated_body_gets_408_and_never_reaches_the_upstream(gateway: Proc, mock_upstream: str,
                                                                             pace: str) -> None:
    marker = f"slow-body-{pace}"
    body = _chat_body(marker, 2000)
    raw = _request(CHAT, _auth(marker), body)
    head, _, rest = raw.partition(b"\r\n\r\n")
    with _connect(gateway) as sock:
        sock.sendall(head + b"\r\n\r\n" + rest[:20])
        start = time.monotonic()
        if pace == "trickle":  # a steady byte every 0.2 s: progress, but 5 bytes/s is far under the minimum
            answer, _ = _trickle(sock, rest[20:], 0.2)
        else:  # nothing more after the first 20 bytes
            answer = _read_until_closed(sock)
        seconds = time.monotonic() - start
    assert _status(answer) == 408, answer
    assert _head_and_body(answer)[0]["connection"] == "close"
    assert BODY_TIMEOUT * 0.9 <= seconds < GENEROUS, seconds
    assert not _upstream_saw(mock_upstream, marker)


def test_a_body_sent_steadily_above_the_minimum_rate_is_served_past_body_timeout(gateway: Proc) -> None:
    marker = "steady-body"
    raw = _request(CHAT, _auth(marker), _chat_body(marker, 1000))
    head, _, body = raw.partition(b"\r\n\r\n")
    with _connect(gateway) as sock:
        sock.sendall(head + b"\r\n\r\n")
        start = time.monotonic()
        for i in range(0, len(body), 100):  # ~250 bytes/s for ~4 s: above the minimum, longer than the timeout
            sock.sendall(body[i:i + 100])
            time.sleep(0.4)
        assert time.monotonic() - start > BODY_TIMEOUT * 2
        answer = _read_until_closed(sock)
    assert _status(answer) == 200, answer[:500]


# Header size and count


def test_a_head_over_max_header_bytes_gets_431_and_never_reaches_the_upstream(gateway: Proc, mock_upstream: str) -> None:
    refused, served = "big-header-refused", "big-header-served"
    big = _request(CHAT, _auth(refused) + [("X-Big", "a" * (MAX_HEADER_BYTES + 100))], _chat_body(refused))
    answer = _exchange(gateway, big)
    assert _status(answer) == 431, answer
    headers, body = _head_and_body(answer)
    assert headers["connection"] == "close" and int(headers["content-length"]) == len(body) < 200
    fits = _request(CHAT, _auth(served) + [("X-Big", "a" * (MAX_HEADER_BYTES // 2))], _chat_body(served))
    assert _status(_exchange(gateway, fits)) == 200
    assert _upstream_saw(mock_upstream, served) and not _upstream_saw(mock_upstream, refused)


def test_a_16_mib_header_is_cut_with_431_and_never_reaches_the_upstream(gateway: Proc, mock_upstream: str) -> None:
    marker = "huge-header"
    head = _request(CHAT, _auth(marker), b"").split(b"\r\n\r\n")[0] + b"\r\nX-Huge: "
    with _connect(gateway) as sock:
        try:
            sock.sendall(head)
            block = b"a" * (1 << 20)
            for _ in range(16):
                sock.sendall(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_until_closed(sock)
    assert _status(answer) == 431, answer
    assert not _upstream_saw(mock_upstream, marker)


def test_too_many_header_fields_get_431_and_never_reach_the_upstream(gateway: Proc, mock_upstream: str) -> None:
    refused, served = "many-headers-refused", "many-headers-served"
    extra = [(f"X-H{i}", "v") for i in range(MAX_HEADERS + 1)]
    answer = _exchange(gateway, _request(CHAT, _auth(refused) + extra, _chat_body(refused)))
    assert _status(answer) == 431, answer
    assert b"too many" in answer
    many = [(f"X-H{i}", "v") for i in range(100_000)]  # the 100,000 headers, sent whole
    assert _status(_exchange(gateway, _request(CHAT, _auth(refused) + many, _chat_body(refused)))) == 431
    some = [(f"X-H{i}", "v") for i in range(MAX_HEADERS - len(_auth(served)) - 3)]  # and Host, Content-Length, Connection
    assert _status(_exchange(gateway, _request(CHAT, _auth(served) + some, _chat_body(served)))) == 200
    assert _upstream_saw(mock_upstream, served) and not _upstream_saw(mock_upstream, refused)


# Memory before authentication


def test_unfinished_header_blocks_do_not_grow_the_process(gateway: Proc) -> None:
    """Four connections each send 8 MiB of a header block that never ends: the gateway keeps none of it."""
    per_connection = 8 << 20
    before = _rss_kib(gateway.pid)
    answers: list[bytes] = []

    def flood() -> None:
        with _connect(gateway) as sock:
            try:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Block: ")
                block = b"b" * (256 << 10)
                for _ in range(per_connection // len(block)):
                    sock.sendall(block)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answers.append(_read_until_closed(sock))

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = _rss_kib(gateway.pid)
    sent_kib = 4 * per_connection // 1024
    grown = after["VmRSS"] - before["VmRSS"]
    peak = after["VmHWM"] - before["VmHWM"]
    assert grown < sent_kib // 8 and peak < sent_kib // 4, (before, after)  # < 4 MiB of 32 sent (peak < 8)
    assert len(answers) == 4 and all(_status(a) == 431 for a in answers), answers


# Connection cap


@pytest.fixture
def capped(tmp_path: Path, mock_upstream: str) -> Iterator[Proc]:
    with _serving(tmp_path, mock_upstream, "server: {max_connections: 4, header_timeout: 30}\n", "capped") as gw:
        yield gw


def _healthz(sock: socket.socket) -> int:
    sock.sendall(_request("/healthz", [], method="GET", keep_alive=True))
    return _status(_read_response(sock))


def test_past_max_connections_a_connection_gets_503_and_the_open_ones_are_still_served(capped: Proc) -> None:
    time.sleep(0.3)  # the start-up probe's connection is closed on the server's side too
    held = [_connect(capped) for _ in range(4)]
    try:
        for sock in held:
            assert _healthz(sock) == 200  # keep-alive: each of the four stays open
        with _connect(capped) as extra:
            start = time.monotonic()
            extra.sendall(_request("/healthz", [], method="GET"))
            answer = _read_until_closed(extra)
            assert time.monotonic() - start < GENEROUS
        assert _status(answer) == 503, answer
        headers, body = _head_and_body(answer)
        assert headers["connection"] == "close" and headers["retry-after"] == "1"
        assert len(body) == int(headers["content-length"]) < 200 and json.loads(body)["error"]["message"]
        for sock in held:
            assert _healthz(sock) == 200
        held.pop().close()
        deadline = time.monotonic() + GENEROUS
        while True:  # the server sees the close a moment later
            with _connect(capped) as again:
                again.sendall(_request("/healthz", [], method="GET"))
                status = _status(_read_until_closed(again))
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        for sock in held:
            sock.close()


# Defaults


def test_the_defaults_are_safe_and_let_one_process_hold_10000_streams() -> None:
    s = ServerSettings()
    assert s.max_connections >= 16384
    assert 10 <= s.header_timeout <= 30 and 0 < s.body_timeout <= 60 and s.body_min_rate > 0
    assert 0 < s.max_header_bytes <= 64 * 1024 and 0 < s.max_headers <= 100


@pytest.mark.parametrize(("soft", "hard", "cap", "expect_cap", "expect_soft"), [
    (512, 512, 16384, 256, 512),  # no room to raise: the cap comes down so that a 503 can still be sent
    (256, 4096, 1000, 1000, 1256),  # room: the soft limit goes up to the cap and the reserve
])
def test_the_connection_cap_fits_the_open_file_limit(soft: int, hard: int, cap: int, expect_cap: int,
                                                     expect_soft: int) -> None:
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
            "from config.models import ServerSettings\nfrom proxy.server import configure\n"
            f"limits = configure(ServerSettings(max_connections={cap}), reserve_fds=256)\n"
            "print(limits.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(expect_cap), str(expect_soft)]
    assert ("does not fit the open-file limit" in result.stderr) == (expect_cap < cap), result.stderr


def test_serve_runs_the_limited_protocol() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from proxy.cli.serve import uvicorn_options
    from proxy.server import EdgeProtocol

    http: Callable[..., Any] = uvicorn_options()["http"]
    assert http is EdgeProtocol and issubclass(http, HttpToolsProtocol)
