"""Real servers for tests: any ASGI app under uvicorn on a free 127.0.0.1 port, in a thread.

`serve(app)` is a context manager yielding the base URL ("http://127.0.0.1:PORT"). The server is a
real socket server, so SDK clients, httpx and raw sockets all talk to it over TCP.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # threads cannot own signal handlers
        pass


@contextlib.contextmanager
def serve(app: Any, *, port: int | None = None, lifespan: str = "auto", **kwargs: Any) -> Iterator[str]:
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan,
        loop="asyncio", **kwargs,
    )
    server = _Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
