"""This process's edge limits: what `server:` says, in the form the protocol reads on every connection.

Contract: `configure(settings, reserve_fds)` sets the limits every connection accepted afterwards uses
(`current()`); until then the defaults of `config.models.ServerSettings` apply (the demo runs on them).
`configure` also makes room for the connection cap in the process's file-descriptor limit: it raises
the soft RLIMIT_NOFILE towards the hard one, and when even that is too small it lowers the cap (with one
warning) so that a connection past the cap still gets its clean 503 instead of a failed accept().
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field

from config.models import ServerSettings

_log = logging.getLogger("uvicorn.error")


@dataclass(frozen=True, slots=True)
class Limits:
    """Edge limits of one process; a 0 turns that check off. The fields after `body_min_rate` are derived,
    in the form the protocol compares against (a check that is off gets a bound nothing reaches)."""

    max_connections: int = 16384
    header_timeout: float = 20.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    body_timeout: float = 20.0
    body_min_rate: float = 500.0
    headers_cap: int = field(init=False, default=0)  # header fields a request may have
    bytes_cap: int = field(init=False, default=0)  # bytes of URL plus header names and values
    head_cap: int = field(init=False, default=0)  # raw bytes an unfinished head may reach (see below)
    tick: float = field(init=False, default=0.0)  # seconds between two checks of the timeouts (0: none)

    def __post_init__(self) -> None:
        # An unfinished head is cut once its raw size passes head_cap. `max_header_bytes` counts the URL
        # and the header names and values; on the wire a head also carries the method, the version, ": "
        # and CRLF around every field (4 bytes each) and a little whitespace. head_cap leaves room for
        # that framing, so it never cuts a head that the exact count at the head's end would accept,
        # while bounding what the parser buffers before that end.
        fields = self.max_headers or self.max_header_bytes  # without a count limit, every byte may be a field
        head_cap = self.max_header_bytes + 4 * fields + 4096 if self.max_header_bytes else sys.maxsize
        # The timeouts are checked every quarter of the shortest one, between 50 ms and 1 s.
        timeouts = [t for t in (self.header_timeout, self.body_timeout) if t > 0]
        tick = min(1.0, max(0.05, min(timeouts) / 4)) if timeouts else 0.0
        for name, value in (("headers_cap", self.max_headers or sys.maxsize),
                            ("bytes_cap", self.max_header_bytes or sys.maxsize), ("head_cap", head_cap),
                            ("tick", tick)):
            object.__setattr__(self, name, value)

    @classmethod
    def from_settings(cls, s: ServerSettings) -> "Limits":
        return cls(max_connections=s.max_connections, header_timeout=s.header_timeout,
                   max_header_bytes=s.max_header_bytes, max_headers=s.max_headers,
                   body_timeout=s.body_timeout, body_min_rate=float(s.body_min_rate))


_current = Limits()


def current() -> Limits:
    return _current


def configure(settings: ServerSettings, reserve_fds: int = 1024) -> Limits:
    """Use `settings` for the connections accepted from now on in this process; returns the limits
    in force (the connection cap may be lower than configured: see `fd_room`)."""
    global _current
    limits = Limits.from_settings(settings)
    if limits.max_connections:
        room = fd_room(limits.max_connections + reserve_fds) - reserve_fds
        if room < limits.max_connections:
            capped = max(room, 1)
            _log.warning("server.max_connections %d does not fit the open-file limit of this process: capped at "
                         "%d (raise `ulimit -n` to allow more)", limits.max_connections, capped)
            limits = dataclasses.replace(limits, max_connections=capped)
    _current = limits
    return limits


def fd_room(wanted: int) -> int:
    """The soft open-file limit, first raised towards `wanted` as far as the hard limit allows."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to raise or to know
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft
