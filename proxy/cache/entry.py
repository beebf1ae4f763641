"""A stored answer, and whether an answer is complete enough to store.

Contract:
- `Entry` (a named tuple): the status, the content headers and the body bytes exactly as the client first received
  them (streams included: SSE, NDJSON, the AWS event stream), whether it streams, the tokens it
  cost and the deployment that answered (for saved tokens and cost), and when it was stored.
  `encode`/`decode` is its Redis form: a 4-byte length, a small JSON head, then the body as is.
- `stored_headers(headers, replaced)`: what an entry keeps of a response head: everything but the
  gateway's own `x-gateway-*`, framing (`content-length`, recomputed on replay), `age`, and the
  family's rate-limit headers (`replaced` prefixes: the limiter writes fresh ones on every answer).
- `entry_of(...)`: `stored_headers` and `complete` in one pass: the entry of an answer, or None.
- `complete(family, path, headers, body)`: True only for an answer that ended as its family ends a
  normal answer, with no in-band error: OpenAI chat/completions SSE ending `data: [DONE]` without an
  `{"error": ...}` event, a Responses stream ending `response.completed` (no `error`,
  `response.failed` or `response.incomplete`); Anthropic ending `message_stop` without `event:
  error`; a Bedrock event stream of valid frames, only `event` messages, with `messageStop`
  (ConverseStream) or a last chunk carrying `amazon-bedrock-invocationMetrics` (invoke stream);
  Ollama NDJSON whose last line is `"done": true` and no line an `{"error": ...}`. A plain (JSON)
  answer must be non-empty and as long as its `content-length` said. A compressed stream is
  inflated to be judged (gzip, deflate); any other encoding is not stored.
"""
from __future__ import annotations

import base64
import functools
import struct
import zlib
from typing import NamedTuple

import orjson

from providers.eventstream import FrameError, FrameReader

STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson", b"application/vnd.amazon.eventstream")
_DROPPED = frozenset({b"content-length", b"age", b"transfer-encoding"})
_LEN = struct.Struct(">I")


class Entry(NamedTuple):
    """Plain values only (headers a tuple of byte pairs), so that the embedded store can keep an entry as
    one plain tuple the garbage collector stops tracking (`proxy.cache.embedded`)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    streaming: bool
    input_tokens: int = 0
    output_tokens: int = 0
    deployment: str = ""
    created: float = 0.0  # unix seconds; the Redis store keeps its own (server) time beside it

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def encode(entry: Entry) -> bytes:
    head = orjson.dumps([entry.status, [[k.decode("latin-1"), v.decode("latin-1")] for k, v in entry.headers],
                         entry.streaming, entry.input_tokens, entry.output_tokens, entry.deployment, entry.created])
    return _LEN.pack(len(head)) + head + entry.body


def decode(blob: bytes, offset: int = 0) -> Entry:
    """The entry `encode` wrote (at `offset` in `blob`); ValueError for anything else (a foreign or damaged value)."""
    try:
        (n,) = _LEN.unpack_from(blob, offset)
        start = offset + 4 + n
        status, headers, streaming, inp, out, deployment, created = orjson.loads(blob[offset + 4:start])
        pairs = tuple([(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])
    except (struct.error, orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a cache entry: {exc}") from None
    return Entry(int(status), pairs, blob[start:], bool(streaming), int(inp), int(out), str(deployment), float(created))


def stored_headers(headers: list[tuple[bytes, bytes]], replaced: tuple[bytes, ...]) -> tuple[tuple[bytes, bytes], ...]:
    dropped = (b"x-gateway-", *replaced)
    return tuple([(k, v) for k, v in headers if k not in _DROPPED and not k.startswith(dropped)])


def streaming_type(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the content type is one of `STREAM_TYPES` (matched as the relay matches them)."""
    for k, v in headers:
        if k == b"content-type":
            return b"event-stream" in v or b"x-ndjson" in v or b"vnd.amazon.eventstream" in v
    return False


def entry_of(family: str, path: str, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
             replaced: tuple[bytes, ...], tokens: tuple[int, int], deployment: str, created: float) -> Entry | None:
    """The entry of a 2xx answer as the client got it, or None when it did not end normally (`complete`).
    `stored_headers` and `complete` at the cost of one (this runs on every miss)."""
    if not body:
        return None
    found = dict(headers)
    ctype = found.get(b"content-type", b"")
    if b"event-stream" in ctype or b"x-ndjson" in ctype or b"vnd.amazon.eventstream" in ctype:
        encoding = found.get(b"content-encoding")
        if not _ended(family, path, body, encoding.strip().lower() if encoding else None):
            return None
        streaming = True
    else:
        length = found.get(b"content-length")
        if length is not None and not (length.isdigit() and int(length) == len(body)):
            return None
        streaming = False
    dropped = _prefixes(replaced)
    kept = tuple([pair for pair in headers if pair[0] not in _DROPPED and not pair[0].startswith(dropped)])
    return Entry(status, kept, body, streaming, tokens[0], tokens[1], deployment, created)


@functools.lru_cache(maxsize=16)
def _prefixes(replaced: tuple[bytes, ...]) -> tuple[bytes, ...]:
    return (b"x-gateway-", *replaced)


def complete(family: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
    if not body:
        return False
    length = encoding = None
    for k, v in headers:
        if k == b"content-length":
            length = v
        elif k == b"content-encoding":
            encoding = v.strip().lower()
    if not streaming_type(headers):
        return length is None or (length.isdigit() and int(length) == len(body))
    return _ended(family, path, body, encoding)


def _ended(family: str, path: str, body: bytes, encoding: bytes | None) -> bool:
    """A stream's body ends as its family ends a normal answer (after inflating gzip or deflate)."""
    encoding = encoding or b"identity"
    if encoding in (b"gzip", b"deflate"):
        try:
            body = zlib.decompress(body, 47 if encoding == b"gzip" else 15)
        except zlib.error:
            return False
    elif encoding != b"identity":
        return False
    try:
        if family == "bedrock":
            return _bedrock(path, body)
        if family == "ollama":
            return _ollama(body)
        events = _sse(body)
        return _anthropic(events) if family == "anthropic" else _openai(path, events)
    except (ValueError, TypeError, KeyError, AttributeError):  # unreadable: not a normal ending
        return False


def _sse(body: bytes) -> list[tuple[bytes, bytes]]:
    """(event name, data) of every SSE event; an unterminated last event counts too."""
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n")
    out = []
    for raw in body.split(b"\n\n"):
        name, data = b"", []
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        if name or data:
            out.append((name, b"\n".join(data)))
    return out


def _error_object(data: bytes) -> bool:
    if b'"error"' not in data:
        return False
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and ("error" in obj or obj.get("type") == "error")


def _openai(path: str, events: list[tuple[bytes, bytes]]) -> bool:
    if not events:
        return False
    if path == "/v1/responses":
        names = [n for n, _ in events]
        if any(n in (b"error", b"response.failed", b"response.incomplete") for n in names):
            return False
        return names[-1] == b"response.completed"
    if any(_error_object(d) for _, d in events):
        return False
    return events[-1][1].strip() == b"[DONE]"


def _anthropic(events: list[tuple[bytes, bytes]]) -> bool:
    names = [n for n, _ in events if n != b"ping"]
    return bool(names) and b"error" not in names and names[-1] == b"message_stop"


def _bedrock(path: str, body: bytes) -> bool:
    reader = FrameReader()
    try:
        frames = list(reader.feed(body))
    except FrameError:
        return False
    if not frames or reader._buf or any(h.get(":message-type") != "event" for h, _ in frames):
        return False
    if path.endswith("/converse-stream"):
        return any(h.get(":event-type") == "messageStop" for h, _ in frames)
    headers, payload = frames[-1]
    if headers.get(":event-type") != "chunk":
        return False
    inner = base64.b64decode(orjson.loads(payload)["bytes"])
    return b"amazon-bedrock-invocationMetrics" in inner


def _ollama(body: bytes) -> bool:
    lines = [line for line in body.split(b"\n") if line.strip()]
    if not lines:
        return False
    objects = [orjson.loads(line) for line in lines]
    if any(not isinstance(o, dict) or "error" in o for o in objects):
        return False
    return objects[-1].get("done") is True
