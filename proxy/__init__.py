"""The gateway kernel and composition root. `build_app(config)` is the public entry point."""
from __future__ import annotations

from typing import Any


def build_app(config: Any = None) -> Any:
    from proxy.app import build_app as _build  # lazy: keep `import proxy.mock` light

    return _build(config)


__all__ = ["build_app"]
