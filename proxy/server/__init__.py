"""The HTTP server layer: what runs under the app, on bytes and sockets, before a request exists.

What lives here:
- `protocol.EdgeProtocol`: uvicorn's httptools protocol with the edge limits of `server:` (connection
  cap, header and body timeouts, header size and count); `serve` and `demo` pass it as uvicorn's `http=`
  (proxy/cli/serve.py `uvicorn_options`).
- `limits`: those limits for this process (`configure(settings)` in each worker, before it serves).

What it may import: `config` and third-party server code (uvicorn, httptools) only. It sits just below
`proxy.cli` (tests/test_layers.py) but takes nothing from the app, middlewares, state or telemetry: its
refusals happen before authentication and must not cost the request path anything measurable.
"""
from __future__ import annotations

from proxy.server.limits import Limits, configure, current
from proxy.server.protocol import EdgeProtocol

__all__ = ["EdgeProtocol", "Limits", "configure", "current"]
