"""Unit tests of providers/eventstream.py against the AWS event-stream encoding
(`application/vnd.amazon.eventstream`: prelude, headers, payload, CRC32s).

botocore's own parser (`botocore.eventstream.EventStreamBuffer`, which checks both CRC32s) is the
reference: frames we write must parse there, and frames written independently here (with every
header type) must decode the same way in both.
"""
from __future__ import annotations

import binascii
import struct
import uuid
from typing import Any

import botocore.eventstream as bes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers.eventstream import (
    MAX_HEADERS, MAX_PAYLOAD, FrameError, FrameReader, encode_message, event_frame, exception_frame,
)


def botocore_messages(data: bytes) -> list[tuple[dict[str, Any], bytes]]:
    buf = bes.EventStreamBuffer()
    buf.add_data(data)
    return [(m.headers, m.payload) for m in buf]


def read_all(data: bytes, sizes: list[int] | None = None) -> list[tuple[dict[str, object], bytes]]:
    reader, out, i, n = FrameReader(), [], 0, 0
    sizes = sizes or [len(data) or 1]
    while i < len(data):
        step = max(1, sizes[n % len(sizes)])
        out.extend(reader.feed(data[i:i + step]))
        i, n = i + step, n + 1
    assert not reader._buf
    return out


# An independent writer (binascii's CRC32, header bytes spelt out by type) for all ten types.
def raw_header(name: str, kind: int, value: bytes = b"") -> bytes:
    raw = name.encode()
    return bytes([len(raw)]) + raw + bytes([kind]) + value


def raw_frame(headers: bytes, payload: bytes) -> bytes:
    total = 16 + len(headers) + len(payload)
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    body = prelude + headers + payload
    return body + struct.pack(">I", binascii.crc32(body))


UUID = uuid.UUID("12345678-1234-5678-9abc-def012345678").bytes
ALL_TYPES = b"".join([
    raw_header("t", 0),
    raw_header("f", 1),
    raw_header("i8", 2, struct.pack(">b", -7)),
    raw_header("i16", 3, struct.pack(">h", -30000)),
    raw_header("i32", 4, struct.pack(">i", 2_000_000_000)),
    raw_header("i64", 5, struct.pack(">q", -(2 ** 62))),
    raw_header("bytes", 6, struct.pack(">H", 3) + b"\x00\xff\x10"),
    raw_header("str", 7, struct.pack(">H", 5) + "héllo".encode()[:5]),
    raw_header("ts", 8, struct.pack(">q", 1_700_000_000_123)),
    raw_header("uuid", 9, UUID),
])
ALL_TYPES_DECODED = {"t": True, "f": False, "i8": -7, "i16": -30000, "i32": 2_000_000_000, "i64": -(2 ** 62),
                     "bytes": b"\x00\xff\x10", "str": "héllo".encode()[:5].decode(), "ts": 1_700_000_000_123,
                     "uuid": UUID}


def test_reader_decodes_every_header_type_like_botocore() -> None:
    frame = raw_frame(ALL_TYPES, b'{"ok":true}')
    [(headers, payload)] = read_all(frame)
    assert headers == ALL_TYPES_DECODED
    assert payload == b'{"ok":true}'
    [(bh, bp)] = botocore_messages(frame)
    assert bh == headers and bp == payload


def test_encode_round_trip_with_every_written_type() -> None:
    headers: dict[str, str | bytes | bool] = {
        ":message-type": "event", ":event-type": "contentBlockDelta", ":content-type": "application/json",
        "flag-true": True, "flag-false": False, "blob": bytes(range(256)), "unicode": "日本語 ✓", "empty": "",
        "empty-bytes": b"",
    }
    payload = b'{"contentBlockIndex":0,"delta":{"text":"hi"},"p":"abc"}'
    frame = encode_message(headers, payload)
    assert read_all(frame) == [(headers, payload)]
    assert botocore_messages(frame) == [(headers, payload)]
    # the encoder writes the documented layout: total and header lengths, then CRCs over those bytes
    total, hlen, pcrc = struct.unpack_from(">III", frame)
    assert total == len(frame) and pcrc == binascii.crc32(frame[:8])
    assert struct.unpack_from(">I", frame, total - 4)[0] == binascii.crc32(frame[:-4])
    assert len(frame) == 16 + hlen + len(payload)


def test_empty_payload_and_no_headers() -> None:
    frame = encode_message({}, b"")
    assert len(frame) == 16
    assert read_all(frame) == [({}, b"")] == botocore_messages(frame)


def test_event_and_exception_frames_parse_in_botocore() -> None:
    ev = event_frame("metadata", b'{"usage":{"inputTokens":1}}')
    ex = exception_frame("throttlingException", b'{"message":"slow down"}')
    [(eh, ep), (xh, xp)] = botocore_messages(ev + ex)
    assert eh == {":message-type": "event", ":event-type": "metadata", ":content-type": "application/json"}
    assert ep == b'{"usage":{"inputTokens":1}}'
    assert xh == {":message-type": "exception", ":exception-type": "throttlingException",
                  ":content-type": "application/json"}
    assert xp == b'{"message":"slow down"}'
    # and botocore's response parser turns the exception frame into the modelled error
    msg = next(iter(_buffer(ex)))
    assert msg.to_response_dict()["status_code"] == 400


def _buffer(data: bytes) -> bes.EventStreamBuffer:
    buf = bes.EventStreamBuffer()
    buf.add_data(data)
    return buf


_header_values = st.one_of(st.booleans(), st.text(max_size=40), st.binary(max_size=40))
_messages = st.lists(
    st.tuples(st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) < 256),
                              _header_values, max_size=5),
              st.binary(max_size=300)),
    min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(messages=_messages, sizes=st.lists(st.integers(1, 97), min_size=1, max_size=8))
def test_reader_handles_any_chunk_split(messages: list[tuple[dict[str, Any], bytes]], sizes: list[int]) -> None:
    stream = b"".join(encode_message(h, p) for h, p in messages)
    assert read_all(stream, sizes) == messages
    assert botocore_messages(stream) == messages


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 200))
def test_incomplete_frame_waits_for_more_bytes(cut: int) -> None:
    frame = event_frame("chunk", b'{"bytes":"aGk="}' * 5)
    cut = min(cut, len(frame) - 1)
    reader = FrameReader()
    assert list(reader.feed(frame[:cut])) == []
    assert list(reader.feed(frame[cut:])) == [(
        {":message-type": "event", ":event-type": "chunk", ":content-type": "application/json"},
        b'{"bytes":"aGk="}' * 5)]


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:]


@pytest.mark.parametrize("pos", [0, 3, 5, 8, 11], ids=lambda p: f"byte{p}")
def test_corrupted_prelude_raises(pos: int) -> None:
    frame = event_frame("metadata", b"{}")
    with pytest.raises(FrameError):
        read_all(_flip(frame, pos))
    with pytest.raises(bes.ChecksumMismatch):
        botocore_messages(_flip(frame, pos))


@pytest.mark.parametrize("where", ["header", "payload", "crc"])
def test_corrupted_message_crc_raises(where: str) -> None:
    frame = event_frame("metadata", b'{"usage":{}}')
    pos = {"header": 20, "payload": len(frame) - 6, "crc": len(frame) - 1}[where]
    with pytest.raises(FrameError, match="message CRC"):
        read_all(_flip(frame, pos))
    with pytest.raises(bes.ChecksumMismatch):
        botocore_messages(_flip(frame, pos))


def test_good_frame_before_a_corrupt_one_is_still_delivered() -> None:
    good = event_frame("messageStart", b'{"role":"assistant"}')
    bad = _flip(event_frame("metadata", b"{}"), 30)  # a header byte: the message CRC fails
    reader = FrameReader()
    got = []
    with pytest.raises(FrameError):
        for message in reader.feed(good + bad):
            got.append(message)
    assert got == [({":message-type": "event", ":event-type": "messageStart",
                     ":content-type": "application/json"}, b'{"role":"assistant"}')]


def _prelude(total: int, hlen: int) -> bytes:
    head = struct.pack(">II", total, hlen)
    return head + struct.pack(">I", binascii.crc32(head))


@pytest.mark.parametrize("total,hlen", [
    (15, 0),                          # shorter than prelude + message CRC
    (20, 10),                         # headers longer than the frame
    (16 + MAX_HEADERS + 1, MAX_HEADERS + 1),
    (16 + MAX_PAYLOAD + 1, 0),        # payload over 24 MiB: refused from the prelude alone
], ids=["too-short", "headers-overrun", "headers-too-large", "payload-too-large"])
def test_impossible_lengths_raise_before_buffering(total: int, hlen: int) -> None:
    with pytest.raises(FrameError):
        list(FrameReader().feed(_prelude(total, hlen)))


@pytest.mark.parametrize("headers", [
    raw_header("a", 7, struct.pack(">H", 1) + b"x") + raw_header("a", 7, struct.pack(">H", 1) + b"y"),
    raw_header("a", 10),                                     # unknown type
    b"\x05ab",                                               # name overruns the headers section
    raw_header("a", 4, b"\x00\x00"),                         # int32 cut short
    raw_header("a", 7, struct.pack(">H", 9) + b"abc"),       # string length overruns
    raw_header("a", 9, b"\x00" * 8),                         # uuid cut short
    b"\x02\xff\xfe\x07\x00\x01a",                            # name is not UTF-8
], ids=["duplicate", "unknown-type", "name-overrun", "int-short", "string-overrun", "uuid-short", "bad-utf8"])
def test_malformed_headers_with_valid_crcs_raise_frame_error(headers: bytes) -> None:
    with pytest.raises(FrameError):
        read_all(raw_frame(headers, b"{}"))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4))
def test_reader_raises_only_frame_error_on_garbage(data: bytes, sizes: list[int]) -> None:
    stream, reader, i, n = event_frame("x", b"{}") + data, FrameReader(), 0, 0
    try:
        while i < len(stream):
            list(reader.feed(stream[i:i + sizes[n % len(sizes)]]))
            i, n = i + sizes[n % len(sizes)], n + 1
    except FrameError:
        pass
