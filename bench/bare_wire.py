"""Bare pass-through on the gateway's own wire: Starlette + one shared `proxy.upstream.wire.WireTransport`.

Not a third-party client: this is the gateway's transport with nothing else around it, so the gap
between this row and the gateway's is what the middleware stack costs. POST /v1/chat/completions
is forwarded to --upstream and streamed back chunk by chunk (raw ASGI endpoint). Run:
    python bench/bare_wire.py --upstream http://127.0.0.1:8788 --port 9003
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.upstream.wire import WireTransport  # noqa: E402

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length", b"te", b"upgrade"}
TIMEOUTS = {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 5.0}


class Relay:
    def __init__(self, upstream: str) -> None:
        self.url = httpx.URL(upstream.rstrip("/") + "/v1/chat/completions")
        self.wire = WireTransport(max_connections=1000)

    async def __call__(self, scope: dict, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP]
        headers += [(b"host", self.url.netloc), (b"content-length", str(len(body)).encode())]
        request = httpx.Request("POST", self.url, headers=headers, stream=httpx.ByteStream(body),
                                extensions={"timeout": dict(TIMEOUTS)})
        response = await self.wire.handle_async_request(request)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP]})
            async for chunk in response.stream:
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
