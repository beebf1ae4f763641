"""Operating the response cache: what `GET|DELETE /admin/cache` and `llm-gateway cache` share.

Contract:
- `purge_target(key_id, namespace, everything)`: exactly one of them, validated (a key id of 1-128
  visible ASCII characters, a namespace as `x-gateway-cache-namespace` takes it); a ValueError says
  what is wrong.
- `admin(cache, method, query)`: `GET` -> 200 with `stats()`; `DELETE ?key_id=ID | namespace=N |
  all=true` -> 200 `{"purged": n, "target": ...}`; a bad query is a 400, another method a 405.
- `stats_table(stats)`: the human form of `stats()` (`llm-gateway cache stats` without `--json`).
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from proxy.cache.key import NAMESPACE

_KEY_ID = re.compile(r"[\x21-\x7e]{1,128}")
Target = tuple[str | None, str | None]


def purge_target(key_id: str | None, namespace: str | None, everything: bool) -> Target:
    if sum((key_id is not None, namespace is not None, everything)) != 1:
        raise ValueError("give exactly one of key_id, namespace or all=true")
    if key_id is not None and not _KEY_ID.fullmatch(key_id):
        raise ValueError("key_id must be 1 to 128 visible ASCII characters")
    if namespace is not None and not NAMESPACE.fullmatch(namespace):
        raise ValueError("namespace must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return key_id, namespace


def describe(target: Target) -> str:
    key_id, namespace = target
    return f"key:{key_id}" if key_id is not None else f"namespace:{namespace}" if namespace is not None else "all"


async def admin(cache: Any, method: str, query: bytes) -> tuple[int, Any]:
    if method == "GET":
        return 200, await cache.stats()
    if method != "DELETE":
        return 405, {"error": {"message": "method not allowed", "type": "invalid_request_error"}}
    try:
        params = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=False))
        everything = params.get("all")
        if everything not in (None, "true"):
            raise ValueError("all must be true")
        target = purge_target(params.get("key_id"), params.get("namespace"), everything == "true")
    except ValueError as exc:
        return 400, {"error": {"message": f"DELETE /admin/cache?key_id=ID|namespace=N|all=true: {exc}",
                               "type": "invalid_request_error"}}
    purged = await cache.purge(*target)
    return 200, {"purged": purged, "target": describe(target)}


def stats_table(stats: dict[str, Any]) -> str:
    requests = stats["requests"]
    total = sum(requests.values())
    served = requests["hit"] + requests["coalesced"]
    lines = [f"backend:        {stats['backend']}",
             f"entries:        {stats['entries']}",
             f"bytes:          {stats['bytes']}" + (f" of {stats['max_bytes']}" if "max_bytes" in stats else ""),
             "requests:       " + ", ".join(f"{name} {n}" for name, n in requests.items()),
             f"served:         {served} of {total} from the cache ({served / total:.1%})" if total else
             "served:         -",
             f"saved tokens:   {stats['saved_tokens']}",
             f"saved cost:     ${stats['saved_cost_usd']:.4f}"]
    return "\n".join(lines)
