"""OTLP span encoding without protobuf objects: span records straight to OTLP wire bytes.

Contract:
- `SpanEncoder(resource, scope)`: `span(record)` encodes one `proxy.telemetry.tracing.SpanRecord` as a
  `ScopeSpans.spans` field (`spans(records)`: a list of them, in one loop); `request(spans)` wraps
  such fields in an `ExportTraceServiceRequest` with the resource and the instrumentation scope.
  The decoded message equals what the SDK's encoder makes of the same spans as `ReadableSpan`s
  (tests/test_telemetry_spans.py checks it).
- Why: the SDK's encoder builds one protobuf object per attribute (~35 us a span here), more than
  the rest of the gateway's telemetry together. Here a record's name, kind and shared `static`
  attributes are encoded once per `static` dict (checked against the record's name and kind),
  repeating attribute pairs (token counts, shared values) come from one cache by key, then value
  (string and int values only), and one-off values (request id, overhead) get a ready head per key
  (and string length) and only their own bytes. Every cache is bounded (`_CACHE_LIMIT` entries, cleared when
  full); bools and ints never share a cache entry. A batch's request is assembled by one join (the
  spans are copied once).
- One thread at a time per encoder (the span processor's export lock); no I/O.
"""
from __future__ import annotations

import struct
from typing import Any, final

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_UNIQUE = frozenset({"gateway.request_id", "gateway.overhead_ms", "gen_ai.response.time_to_first_chunk"})
_CACHE_LIMIT = 8192
_pack_q, _pack_i, _pack_d = struct.Struct("<Q").pack, struct.Struct("<I").pack, struct.Struct("<d").pack
_TIMES = struct.Struct("<BQBQ").pack  # Span.start_time_unix_nano = 7, end_time_unix_nano = 8 (fixed64)
# Span.trace_id = 1 (16 bytes), span_id = 2 and parent_span_id = 4 (8 bytes each): tag and length, then the id
_IDS, _IDS_PARENT = struct.Struct(">HQQHQ").pack, struct.Struct(">HQQHQHQ").pack
_LOW64 = (1 << 64) - 1
_SERVER, _CLIENT = SpanKind.SERVER, SpanKind.CLIENT
_OK_STATUS = b"\x7a\x00"  # Status = 15, empty (UNSET)
_FLAGS = (b"\x85\x01" + _pack_i(0x100), b"\x85\x01" + _pack_i(0x300))  # Span.flags = 16: has (and is) remote parent
_OK_TAIL = (_OK_STATUS + _FLAGS[0], _OK_STATUS + _FLAGS[1])


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:  # a span's length, typically
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (tag already encoded)."""
    n = len(payload)
    return b"%b%c%b" % (tag, n, payload) if n < 0x80 else tag + _varint(n) + payload


def _any(value: Any) -> bytes:
    """An AnyValue message."""
    if isinstance(value, str):
        return _ld(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _ld(b"\x3a", value)
    if isinstance(value, (tuple, list)):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any(v)) for v in value))
    return _ld(b"\x0a", str(value).encode())


def _attribute(key_field: bytes, value: Any, tag: bytes = b"\x4a") -> bytes:
    """A KeyValue field (Span.attributes = 9 by default): key 1 (already encoded), value 2."""
    cls = value.__class__
    if cls is str:  # short strings and floats (request id, overhead) in one step: one-byte lengths
        encoded = value.encode()
        n = len(encoded)
        if len(key_field) + n < 0x7C:
            return b"%b%c%b\x12%c\x0a%c%b" % (tag, len(key_field) + n + 4, key_field, n + 2, n, encoded)
    elif cls is float and len(key_field) < 0x75:
        return b"%b%c%b\x12\x09\x21%b" % (tag, len(key_field) + 11, key_field, _pack_d(value))
    return _ld(tag, key_field + _ld(b"\x12", _any(value)))


@final  # no subclasses: `type(entry) is _OneOff` narrows `bytes | _OneOff` both ways (SpanEncoder._miss)
class _OneOff:
    """A span attribute key whose values rarely repeat (request id, overhead): its encoded heads.

    A float's KeyValue is a fixed head and 8 bytes; a string's head depends only on its length (request
    ids have one length). Prepending a ready head is ~3x cheaper than formatting the whole field."""

    __slots__ = ("key_field", "float_head", "str_heads")

    def __init__(self, key_field: bytes) -> None:
        self.key_field = key_field
        self.float_head = b"\x4a%c%b\x12\x09\x21" % (len(key_field) + 11, key_field) if len(key_field) < 0x75 else b""
        self.str_heads: dict[int, bytes] = {}  # encoded length -> head (one-byte lengths only)

    def encode(self, value: Any) -> bytes:
        cls = value.__class__
        if cls is float and self.float_head:
            return self.float_head + _pack_d(value)
        if cls is str:
            encoded = value.encode()
            n = len(encoded)
            head = self.str_heads.get(n)
            if head is None and len(self.key_field) + n < 0x7C and len(self.str_heads) < 64:
                head = self.str_heads[n] = b"\x4a%c%b\x12%c\x0a%c" % (len(self.key_field) + n + 4, self.key_field,
                                                                       n + 2, n)
            if head is not None:
                return head + encoded
        return _attribute(self.key_field, value)


def _key_values(tag: bytes, attributes: Any) -> bytes:
    return b"".join(_attribute(_ld(b"\x0a", str(k).encode()), v, tag) for k, v in attributes.items())


class SpanEncoder:
    """Span records -> OTLP wire bytes: `span(record)` each, then `request(spans)` for a batch.

    Used by one thread at a time (the span processor's export lock)."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        head = _ld(b"\x0a", scope.name.encode()) + (_ld(b"\x12", scope.version.encode()) if scope.version else b"")
        self.scope = _ld(b"\x0a", head)
        self.resource = _ld(b"\x0a", _key_values(b"\x0a", resource.attributes))
        # key -> its encoded key field, or a `_OneOff` for keys whose values rarely repeat
        self.cache: dict[str, bytes | _OneOff] = {}
        # key -> {value: encoded attribute}, for values of class str or int exactly (those two never compare
        # equal; a bool or a float equal to an int is never looked up here), at most _CACHE_LIMIT in all
        self.pairs: dict[str, dict[Any, bytes]] = {}
        self.pair_count = 0
        self.oneoffs: dict[str, _OneOff] = {}  # the `_OneOff`s of `cache`, looked up first on a pair miss
        self.lengths: dict[int, bytes] = {}  # a span's length -> its field tag and length
        # id(static dict) -> (it, span name, kind, encoded name + kind + its attributes)
        self.shared: dict[int, tuple[dict[str, Any], str, SpanKind, bytes]] = {}

    def _miss(self, key: str, value: Any) -> bytes:
        """An attribute not in `pairs`: a one-off key's value, or a value seen for the first time (strings
        and ints repeat and are kept; bools, floats and the rest are encoded each time)."""
        entry = self.cache.get(key)
        if entry is None:
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache.clear()
                self.oneoffs.clear()
            key_field = _ld(b"\x0a", key.encode())
            entry = self.cache[key] = _OneOff(key_field) if key in _UNIQUE else key_field
            if type(entry) is _OneOff:
                self.oneoffs[key] = entry
        if type(entry) is _OneOff:  # as fast as `.__class__ is`, and narrows both ways for the type checker
            return entry.encode(value)
        encoded = _attribute(entry, value)
        cls = value.__class__
        if cls is str or cls is int:
            if self.pair_count >= _CACHE_LIMIT:
                self.pairs.clear()
                self.pair_count = 0
            values = self.pairs.get(key)
            if values is None:
                values = self.pairs[key] = {}
            values[value] = encoded
            self.pair_count += 1
        return encoded

    def _attributes(self, attributes: dict[str, Any], parts: list[bytes]) -> None:
        pairs, miss = self.pairs, self._miss
        for key, value in attributes.items():
            cls = value.__class__
            values = pairs.get(key) if cls is str or cls is int else None
            encoded = values.get(value) if values is not None else None
            parts.append(encoded if encoded is not None else miss(key, value))

    def _head(self, name: str, kind: SpanKind, static: dict[str, Any] | None) -> bytes:
        """Name, kind and shared attributes: one cached piece per `static` dict (checked, not trusted)."""
        found = self.shared.get(id(static))
        if found is not None and found[0] is static and found[1] == name and found[2] is kind:
            return found[3]  # an equal name that is another string object
        parts = [_ld(b"\x2a", name.encode()),
                 b"\x30\x02" if kind is _SERVER else b"\x30\x03" if kind is _CLIENT else b"\x30" + bytes((_KIND[kind],))]
        if static:
            self._attributes(static, parts)
        encoded = b"".join(parts)
        if static is not None:  # spans without shared attributes are rare (tests): not cached
            if len(self.shared) >= _CACHE_LIMIT:
                self.shared.clear()
            self.shared[id(static)] = (static, name, kind, encoded)  # holding the dict keeps its id unique
        return encoded

    def span(self, r: tuple[Any, ...]) -> bytes:
        """One `ScopeSpans.spans` field: tag, length, then the Span's fields."""
        return self.spans((r,))[0]

    def spans(self, records: Any) -> list[bytes]:
        """`span()` of each record. One loop with the per-span work inlined: a call costs as much as
        encoding an attribute, and a span would make five."""
        out: list[bytes] = []
        shared, pairs, miss, head_of = self.shared, self.pairs, self._miss, self._head
        oneoffs, heads = self.oneoffs, self.lengths
        for (name, kind, static, trace_id, span_id, parent, remote, trace_state, start, end, attributes, events,
             error) in records:  # `proxy.telemetry.tracing.SpanRecord`s, or tuples in their order
            found = shared.get(id(static))
            head = found[3] if (found is not None and found[0] is static and found[1] is name
                                and found[2] is kind) else head_of(name, kind, static)
            parts = [_IDS_PARENT(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, span_id, 0x2208, parent)
                     if parent else _IDS(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, span_id),
                     head, _TIMES(0x39, start, 0x41, end)]
            if trace_state:  # fields may come in any order; the decoded message is the same
                parts.append(_ld(b"\x1a", trace_state.encode()))
            if attributes:
                for key, value in attributes.items():  # this span's own values
                    cls = value.__class__
                    oneoff = oneoffs.get(key)  # one-off keys first: their values never hit `pairs`
                    if oneoff is not None:
                        if cls is float and oneoff.float_head:
                            parts.append(oneoff.float_head + _pack_d(value))
                            continue
                        if cls is str:
                            encoded = value.encode()
                            str_head = oneoff.str_heads.get(len(encoded))
                            if str_head is not None:
                                parts.append(str_head + encoded)
                                continue
                        parts.append(oneoff.encode(value))
                        continue
                    values = pairs.get(key) if cls is int or cls is str else None  # True == 1 == 1.0 as dict keys
                    encoded = values.get(value) if values is not None else None
                    parts.append(encoded if encoded is not None else miss(key, value))
            if events:  # Span.events = 11: time 1 (fixed64), name 2, attributes 3
                for event, attrs, ts in events:
                    parts.append(_ld(b"\x5a", b"\x09" + _pack_q(ts) + _ld(b"\x12", event.encode())
                                     + _key_values(b"\x1a", attrs)))
            if error is not None:  # Status = 15: message 2, code 3 (2 = ERROR)
                parts.append(_ld(b"\x7a", _ld(b"\x12", error.encode()) + b"\x18\x02"))
                parts.append(_FLAGS[remote])
            else:
                parts.append(_OK_TAIL[remote])
            body = b"".join(parts)
            n = len(body)
            span_head = heads.get(n)
            if span_head is None:
                if len(heads) >= _CACHE_LIMIT:
                    heads.clear()
                span_head = heads[n] = b"\x12" + _varint(n)
            out.append(span_head + body)
        return out

    def request(self, spans: list[bytes]) -> bytes:
        """An `ExportTraceServiceRequest` of spans from `span()`.

        The lengths are summed first so the batch (~400 KB for 1024 spans) is copied once, by one
        join, not once per enclosing message."""
        scope_spans = len(self.scope) + sum(map(len, spans))
        scope_head = b"\x12" + _varint(scope_spans)
        resource_spans = len(self.resource) + len(scope_head) + scope_spans
        return b"".join([b"\x0a" + _varint(resource_spans), self.resource, scope_head, self.scope, *spans])
