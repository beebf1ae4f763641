"""AWS event-stream framing (application/vnd.amazon.eventstream).

Contract: `encode_message` builds one frame with both CRC32s; `FrameReader` splits a byte stream into
decoded `(headers, payload)` messages incrementally, whatever the chunk boundaries. Only the header
types Bedrock uses are written (string, bytes, bool); all ten are read. The relay never re-encodes
upstream frames: this codec is for reading usage and for writing the gateway's own exception frames.
"""
from __future__ import annotations

import struct
import zlib
from typing import Iterator

_PRELUDE = struct.Struct(">III")
MAX_HEADERS = 128 * 1024
MAX_PAYLOAD = 24 * 1024 * 1024


class FrameError(ValueError):
    """The bytes are not a valid event-stream frame (bad length or CRC)."""


def _encode_header(name: str, value: str | bytes | bool) -> bytes:
    raw_name = name.encode()
    head = bytes([len(raw_name)]) + raw_name
    if value is True:
        return head + b"\x00"
    if value is False:
        return head + b"\x01"
    if isinstance(value, str):
        data = value.encode()
        return head + b"\x07" + struct.pack(">H", len(data)) + data
    return head + b"\x06" + struct.pack(">H", len(value)) + value


def encode_message(headers: dict[str, str | bytes | bool], payload: bytes) -> bytes:
    """One complete frame: prelude, prelude CRC, headers, payload, message CRC."""
    raw_headers = b"".join(_encode_header(k, v) for k, v in headers.items())
    total = 16 + len(raw_headers) + len(payload)
    prelude = struct.pack(">II", total, len(raw_headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + raw_headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def event_frame(event_type: str, payload: bytes) -> bytes:
    return encode_message(
        {":message-type": "event", ":event-type": event_type, ":content-type": "application/json"},
        payload,
    )


def exception_frame(exception_type: str, payload: bytes) -> bytes:
    return encode_message(
        {
            ":message-type": "exception",
            ":exception-type": exception_type,
            ":content-type": "application/json",
        },
        payload,
    )


def _decode_headers(data: bytes) -> dict[str, object]:
    headers: dict[str, object] = {}
    i, end = 0, len(data)
    while i < end:
        n = data[i]
        name = data[i + 1 : i + 1 + n].decode()
        i += 1 + n
        kind = data[i]
        i += 1
        value: object
        if kind in (0, 1):
            value = kind == 0
        elif kind == 2:
            value = struct.unpack_from(">b", data, i)[0]
            i += 1
        elif kind == 3:
            value = struct.unpack_from(">h", data, i)[0]
            i += 2
        elif kind == 4:
            value = struct.unpack_from(">i", data, i)[0]
            i += 4
        elif kind in (5, 8):
            value = struct.unpack_from(">q", data, i)[0]
            i += 8
        elif kind in (6, 7):
            size = struct.unpack_from(">H", data, i)[0]
            raw = data[i + 2 : i + 2 + size]
            value = raw.decode() if kind == 7 else raw
            i += 2 + size
        elif kind == 9:
            value = data[i : i + 16]
            i += 16
        else:
            raise FrameError(f"unknown header type {kind}")
        if name in headers:
            raise FrameError(f"duplicate header {name}")
        headers[name] = value
    if i > end:
        raise FrameError("a header value overruns the headers section")
    return headers


class FrameReader:
    """Incremental decoder: feed arbitrary chunks, iterate complete messages."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> Iterator[tuple[dict[str, object], bytes]]:
        buf = self._buf
        buf += chunk
        while len(buf) >= 12:
            total, hlen, pcrc = _PRELUDE.unpack_from(buf, 0)
            if zlib.crc32(bytes(buf[:8])) != pcrc:
                raise FrameError("prelude CRC mismatch")
            if hlen > MAX_HEADERS or total - hlen - 16 > MAX_PAYLOAD or total < 16 + hlen:
                raise FrameError("frame too large or malformed")
            if len(buf) < total:
                return
            frame = bytes(buf[:total])
            del buf[:total]
            (mcrc,) = struct.unpack_from(">I", frame, total - 4)
            if zlib.crc32(frame[: total - 4]) != mcrc:
                raise FrameError("message CRC mismatch")
            try:
                headers = _decode_headers(frame[12 : 12 + hlen])
            except (IndexError, struct.error, UnicodeDecodeError) as exc:
                raise FrameError(f"malformed headers: {exc}") from None
            yield headers, frame[12 + hlen : total - 4]
