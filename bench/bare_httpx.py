"""Bare pass-through baseline: Starlette + one shared httpx.AsyncClient, nothing else.

POST /v1/chat/completions is forwarded to --upstream and the response is streamed back chunk by chunk
(raw ASGI endpoint, so no Request/StreamingResponse overhead). Run:
    python bench/bare_httpx.py --upstream http://127.0.0.1:8788 --port 9001
"""
from __future__ import annotations

import argparse

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length", b"te", b"upgrade"}


class Relay:
    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/") + "/v1/chat/completions"
        self.client = httpx.AsyncClient(timeout=60, trust_env=False, limits=httpx.Limits(
            max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30))

    async def __call__(self, scope: dict, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP]
        response = await self.client.send(self.client.build_request("POST", self.url, headers=headers, content=body),
                                          stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    app = Starlette(routes=[Route("/v1/chat/completions", Relay(a.upstream), methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=a.port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning", lifespan="off")
