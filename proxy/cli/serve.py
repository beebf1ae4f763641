"""What `serve` and `demo` share: the uvicorn options and the worker's app factory.

Contract: `uvicorn_options()` is the one set of server options (httptools, uvloop when installed,
no access log or server header); `app_factory()` is uvicorn's factory for `serve` (each worker
process builds its own app from `LLM_GATEWAY_CONFIG`).
"""
from __future__ import annotations

import gc
import os
from typing import Any


def app_factory() -> Any:
    """uvicorn factory for `serve` (each worker process builds its own app)."""
    from proxy.app import build_app

    app = build_app(os.environ.get("LLM_GATEWAY_CONFIG"))
    gc.freeze()  # the long-lived startup objects never need scanning again: cheaper collections per request
    # Requests leave no cycles (tests/test_no_cycles.py), so the default young-generation threshold
    # (700) only buys a useless collection every few requests (~8 us a request at c=16, bench/run.py).
    gc.set_threshold(10_000, 20, 50)
    return app


def uvicorn_options() -> dict[str, Any]:
    opts: dict[str, Any] = {"access_log": False, "log_level": "warning", "lifespan": "on",
                            "timeout_graceful_shutdown": 10, "http": "httptools",  # a dependency
                            "server_header": False,  # don't advertise the server software
                            # X-Forwarded-For (admin logs' client address) only for the LBs ops trust
                            "proxy_headers": bool(os.environ.get("FORWARDED_ALLOW_IPS"))}
    try:
        import uvloop  # noqa: F401
        opts["loop"] = "uvloop"
    except ImportError:
        opts["loop"] = "asyncio"
    return opts
