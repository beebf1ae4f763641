"""Bare pass-through baseline: Starlette + one shared aiohttp.ClientSession, nothing else.

POST /v1/chat/completions is forwarded to --upstream and the response is streamed back chunk by chunk
(raw ASGI endpoint, wire bytes: auto_decompress off). Run:
    python bench/bare_aiohttp.py --upstream http://127.0.0.1:8788 --port 9002
"""
from __future__ import annotations

import argparse

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length", b"te", b"upgrade"}


class Relay:
    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/") + "/v1/chat/completions"
        self.session: aiohttp.ClientSession | None = None  # created inside the running loop

    async def __call__(self, scope: dict, receive, send) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=30), auto_decompress=False,
                trust_env=False, cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=60))
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in HOP]
        async with self.session.post(self.url, data=body, headers=headers, allow_redirects=False) as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(k, v) for k, v in response.raw_headers if k.lower() not in HOP]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    app = Starlette(routes=[Route("/v1/chat/completions", Relay(a.upstream), methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=a.port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning", lifespan="off")
