"""In-process single flight: identical requests on one replica share one resolution.

Contract:
- A `Flight` is the one request of this process resolving a cache key (its owner); identical
  requests here attach to it instead of asking the store or the upstream again. It ends in one of:
  - `ENTRY`: answered from the store, or by a finished upstream answer: followers replay `entry`;
  - `LIVE`: the owner's upstream answer has started (a 2xx head): followers send the same head
    (`status`, `headers`) and then every chunk as it arrives (`chunks`), until `done`; `ok` says it
    ended normally;
  - `FAILED`: the owner failed before a 2xx head (an error status, an exception, a client gone):
    followers resolve again, so that one of them becomes the next owner.
  `wait_event()` is a broadcast: the event set (and replaced) on every change of state or new chunk.
- When its owner goes upstream (`upstream(send, label, limit)`), the flight is also the owner's ASGI
  `send` (the capture): it adds `x-gateway-cache`, records the head and keeps the body chunks for
  storage up to `limit` bytes; past it the answer is not stored (`overflow`) and the chunks are kept
  only while followers read them live (a late follower cannot join any more). A request that goes
  upstream alone (no coalescing) uses an unregistered flight the same way. One object for both roles:
  nothing to allocate twice on a miss, and no reference cycle between two (a request's objects are
  freed when it ends, not by the garbage collector).
"""
from __future__ import annotations

import asyncio
from typing import Any

from proxy.cache.entry import Entry

PENDING, ENTRY, LIVE, FAILED = "pending", "entry", "live", "failed"
HEADER = b"x-gateway-cache"


class Flight:
    __slots__ = ("state", "origin", "entry", "age", "status", "headers", "chunks", "size", "limit", "overflow",
                 "complete", "followers", "done", "ok", "tokens", "deployment", "changed", "send", "label")

    def __init__(self) -> None:
        self.state = PENDING
        self.origin = "coalesced"  # what a follower's answer is: "hit" when it came from the store
        self.entry: Entry | None = None
        self.age: int | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []  # the owner's body so far
        self.size = self.limit = 0
        self.overflow = self.complete = self.done = self.ok = False
        self.followers = 0  # reading the live answer
        self.tokens = (0, 0)
        self.deployment = ""
        self.changed: asyncio.Event | None = None  # made when someone waits
        self.send: Any = None
        self.label = b""

    def wait_event(self) -> asyncio.Event:
        if self.changed is None:
            self.changed = asyncio.Event()
        return self.changed

    def _notify(self) -> None:
        changed, self.changed = self.changed, None
        if changed is not None:
            changed.set()

    @property
    def joinable(self) -> bool:
        return self.state != FAILED and not (self.state == LIVE and self.overflow)

    def resolve(self, entry: Entry, origin: str, age: int | None) -> None:
        """Answered without going upstream itself: from the store (`origin` "hit") or from another
        replica's upstream answer it waited for ("coalesced")."""
        self.state, self.entry, self.origin, self.age = ENTRY, entry, origin, age
        self.done = self.ok = True
        self.tokens, self.deployment = (entry.input_tokens, entry.output_tokens), entry.deployment
        self._notify()

    def finish(self, ok: bool, entry: Entry | None, tokens: tuple[int, int], deployment: str) -> None:
        """The owner's upstream answer ended (`ok`: normally); with an entry, later arrivals replay it.
        Live followers read `done` and `ok`; a flight nobody follows and nothing was stored from fails, so
        that the next arrival goes upstream itself."""
        if self.state == ENTRY:
            return
        self.tokens, self.deployment = tokens, deployment
        if entry is not None and ok:
            self.state, self.entry, self.origin, self.age = ENTRY, entry, "coalesced", 0
        elif self.state == PENDING or not self.followers:
            self.state = FAILED
        self.done, self.ok = True, ok
        self._notify()

    # --- the owner's send ------------------------------------------------------------------------
    def upstream(self, send: Any, label: bytes, limit: int) -> "Flight":
        self.send, self.label, self.limit = send, label, limit
        return self

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            body = message.get("body", b"")
            if body and 200 <= self.status < 300:
                size = self.size = self.size + len(body)
                if size <= self.limit and self.changed is None:
                    self.chunks.append(body)  # the common case: nobody to tell, nothing to let go
                else:
                    self._add(body, size)
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.response.start":
            headers = message.get("headers") or []
            status = self.status = message["status"]
            self.headers = headers
            message = {**message, "headers": [*headers, (HEADER, self.label)]}
            if self.state == PENDING:
                self.state = LIVE if 200 <= status < 300 else FAILED
                self._notify()
        await self.send(message)

    def _add(self, body: bytes, size: int) -> None:
        if size <= self.limit or self.followers:
            self.chunks.append(body)
            if size > self.limit:
                self.overflow = True
        elif not self.overflow:
            self.overflow = True
            self.chunks.clear()  # nobody reads them and they will not be stored: let them go
        self._notify()
