"""`llm-gateway cache stats|purge`: the shared response cache, from the command line.

Contract: talks to the Redis named by `--redis-url`, else `state.redis_url` of the config (the
embedded cache lives inside one gateway process: use `GET|DELETE /admin/cache` there).
- `stats [--json]`: entries and their bytes (a SCAN of the entry keys), requests by result (hit,
  miss, bypass, coalesced) and saved tokens and cost, as every replica flushed them (each once a
  second); a table, or JSON.
- `purge (--key ID | --namespace N | --all) [--json]`: removes the entries of one key's scope, of one
  namespace, or all of them; prints how many. Exactly one of the three; the change is logged as a JSON
  line on stderr (`cache_purged`).
Exit 1 with one `error:` line when Redis cannot be reached or the arguments are wrong.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import Any

import orjson

from config import Config, Secret
from proxy.cache.ops import describe, purge_target, stats_table
from proxy.cache.store import SharedCache
from proxy.state.store import Store, StoreUnavailable


def add_arguments(sub: Any, common: Any) -> None:
    p = common(sub.add_parser("cache", help="the shared response cache (in Redis)"))
    actions = p.add_subparsers(dest="action", required=True)
    s = common(actions.add_parser("stats", help="entries, bytes, requests by result, saved tokens and cost"))
    s.add_argument("--json", action="store_true")
    g = common(actions.add_parser("purge", help="remove entries: one key's, one namespace's, or all"))
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", dest="key_id", metavar="ID", help="the entries written in this key's scope")
    which.add_argument("--namespace", metavar="N", help="the entries of this x-gateway-cache-namespace")
    which.add_argument("--all", action="store_true", help="every entry")
    g.add_argument("--json", action="store_true")


async def _run(args: argparse.Namespace, cfg: Config) -> int:
    url = args.redis_url or str(cfg.state.redis_url)
    if not url:
        print("error: no Redis: pass --redis-url or set state.redis_url (the embedded cache lives inside one "
              "gateway process; use GET|DELETE /admin/cache there)", file=sys.stderr)
        return 1
    target = None
    if args.action == "purge":
        try:
            target = purge_target(args.key_id, args.namespace, args.all)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    state = dataclasses.replace(cfg.state, redis_url=Secret(url), redis_timeout=max(cfg.state.redis_timeout, 2.0))
    cfg = dataclasses.replace(cfg, state=state)
    store = Store(cfg)
    cache = SharedCache(cfg, store)
    try:
        if target is None:
            stats = await cache.stats()
            stats.pop("this_replica", None)  # the CLI is no replica
            print(orjson.dumps(stats).decode() if args.json else stats_table(stats))
            return 0
        purged = await cache.purge(*target)
        from proxy.cli.limits import audit_logger

        audit_logger("llm_gateway.cache").info("cache_purged", actor="cli", target=describe(target), purged=purged)
        print(orjson.dumps({"purged": purged, "target": describe(target)}).decode() if args.json
              else f"purged {purged} entries ({describe(target)})")
        return 0
    except StoreUnavailable as exc:
        print(f"error: Redis unavailable ({exc})", file=sys.stderr)
        return 1
    finally:
        await cache.aclose()
        await store.aclose()


def run(args: argparse.Namespace, cfg: Config) -> int:
    return asyncio.run(_run(args, cfg))
