"""What `serve` and `demo` share: the uvicorn options and the worker's app factory.

Contract: `uvicorn_options()` is the one set of server options (httptools under the edge limits of
`proxy.server.EdgeProtocol`, uvloop when installed, no access log or server header); `app_factory()` is
uvicorn's factory for `serve` (each worker process loads `LLM_GATEWAY_CONFIG`, sets its edge limits from
`server:` and builds its own app). Without `app_factory` (the demo) the limits keep their defaults.
"""
from __future__ import annotations

import gc
import os
from typing import Any


def app_factory() -> Any:
    """uvicorn factory for `serve` (each worker process builds its own app)."""
    from config import load_config
    from proxy.app import build_app
    from proxy.server import configure

    cfg = load_config(os.environ.get("LLM_GATEWAY_CONFIG"))
    # before the first connection: uvicorn loads the app before it listens. The reserve keeps file
    # descriptors for the upstream pool and the process's own files beside the client connections.
    configure(cfg.server, reserve_fds=cfg.gateway.upstream_max_connections + 256)
    app = build_app(cfg)
    gc.freeze()  # the long-lived startup objects never need scanning again: cheaper collections per request
    # Requests leave no cycles (tests/test_no_cycles.py), so the default young-generation threshold
    # (700) only buys a useless collection every few requests (~8 us a request at c=16, bench/run.py).
    gc.set_threshold(10_000, 20, 50)
    return app


def uvicorn_options() -> dict[str, Any]:
    from proxy.server import EdgeProtocol

    opts: dict[str, Any] = {"access_log": False, "log_level": "warning", "lifespan": "on",
                            # httptools (a dependency) with the `server:` limits: proxy/server/protocol.py
                            "timeout_graceful_shutdown": 10, "http": EdgeProtocol,
                            "server_header": False,  # don't advertise the server software
                            # X-Forwarded-For (admin logs' client address) only for the LBs ops trust
                            "proxy_headers": bool(os.environ.get("FORWARDED_ALLOW_IPS"))}
    try:
        import uvloop  # noqa: F401
        opts["loop"] = "uvloop"
    except ImportError:
        opts["loop"] = "asyncio"
    return opts
