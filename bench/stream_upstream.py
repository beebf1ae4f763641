#!/usr/bin/env python
"""A fast streaming upstream for the time-to-first-chunk cells: OpenAI-style SSE at a fixed interval.

    python bench/stream_upstream.py --port P [--chunks 16] [--interval-ms 10]

What nginx is to the non-streaming cells: an upstream cheap enough (a raw asyncio protocol on uvloop,
every byte prepared at start) that its own cost per stream start is not what the TTFC figures
measure. Every POST gets `200 text/event-stream` (chunked, keep-alive) and its first event at once:
the role delta, then `--chunks` content deltas `--interval-ms` apart, a usage chunk when the request
asked for `stream_options.include_usage` (as the gateway does for streamed OpenAI calls), then
`data: [DONE]`. Requests on one connection are answered in order. Not a protocol implementation:
it trusts its only client, the benchmark (stdlib plus the project's uvloop).
"""
from __future__ import annotations

import argparse
import asyncio
import json

import uvloop

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n")


def _event(payload: dict | str) -> bytes:
    data = b"data: " + (payload.encode() if isinstance(payload, str) else json.dumps(payload, separators=(",", ":")).encode()) + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


def _chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
    body = {"id": "chatcmpl-bench-stream", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-4o-mini", "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if usage is None else []}
    if usage is not None:
        body["usage"] = usage
    return body


class Stream(asyncio.Protocol):
    def __init__(self, events: list[bytes], tail: tuple[bytes, bytes], interval: float) -> None:
        self.events, self.tail, self.interval = events, tail, interval
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15:].split(b"\r\n", 1)[0]) if start >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            body, self.buffer = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
            self.pending += 1
            if not self.busy:
                self._answer(b"include_usage" in body)

    def _answer(self, usage: bool) -> None:
        self.busy, self.pending = True, self.pending - 1
        assert self.transport is not None
        self.transport.write(HEAD + self.events[0])
        loop = asyncio.get_running_loop()
        for i, event in enumerate(self.events[1:], 1):
            loop.call_later(i * self.interval, self._write, event)
        last = self.tail[0] + self.tail[1] if usage else self.tail[1]
        loop.call_later(len(self.events) * self.interval, self._finish, last)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _finish(self, last: bytes) -> None:
        self._write(last + b"0\r\n\r\n")
        self.busy = False
        if self.pending:
            self._answer(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--interval-ms", type=float, default=10.0)
    args = p.parse_args()
    words = ["This", " is", " a", " simulated", " response", " from", " gpt-4o-mini."]
    events = [_event(_chunk({"role": "assistant", "content": "", "refusal": None}))]
    events += [_event(_chunk({"content": words[i % len(words)]})) for i in range(args.chunks)]
    events[-1] += _event(_chunk({}, finish="stop"))
    usage = _event(_chunk({}, usage={"prompt_tokens": 9, "completion_tokens": args.chunks,
                                      "total_tokens": 9 + args.chunks}))
    tail = (usage, _event("[DONE]"))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Stream(events, tail, args.interval_ms / 1000), "127.0.0.1",
                                          args.port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
