"""`llm-gateway limits set|get|list|clear`: live limits in Redis, from the command line.

Contract: talks to the store named by `--redis-url`, else `state.redis_url` of the config. Scopes
are `global`, `key:<id>`, `model:<name>`, `provider:<name>`. A change applies on every replica
on its next request (the limiter reads the hash inside its script) and never resets counters.
`list` prints a table, or JSON with `--json`. Every change is logged (a JSON line on stderr).
`set` refuses a scope that names nothing (`proxy.admin.api.unknown_scope`: no such deployment, model
or static/managed key) with exit 1, unless `--force` (then a warning). The config can only vouch for
the gateway it describes: when it is the implicit `./config/gateway.yaml` (no `--config`, no
`LLM_GATEWAY_CONFIG`) and `--redis-url` names another Redis than its own, or when no config file was
found, an unknown scope is a warning.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from typing import Any

import orjson

from proxy.state import live_limits
from config import Config, Secret
from proxy.admin.api import unknown_scope, valid_scope
from proxy.state.store import Store, StoreUnavailable, limits_key


def audit_logger(name: str) -> Any:
    """Audit lines go to stderr as JSON lines: stdout carries only the output (JSON with --json).

    The configured chain renders bytes (orjson), so they are written as bytes, never as their repr."""
    import structlog

    from proxy.telemetry.logs import configure_logging

    configure_logging(stream=sys.stderr)  # idempotent: main() has done it already
    return structlog.wrap_logger(structlog.BytesLogger(sys.stderr.buffer), logger_name=name)


def _log() -> Any:
    """The audit line of a change goes to stderr: stdout carries only the output (JSON with --json)."""
    return audit_logger("llm_gateway.limits")


def add_arguments(sub: Any, common: Any) -> None:
    p = common(sub.add_parser("limits", help="live rate limits in Redis"))
    actions = p.add_subparsers(dest="action", required=True)
    for name in ("set", "get", "clear"):
        a = common(actions.add_parser(name))
        a.add_argument("scope", help="global | key:<id> | model:<name> | provider:<name>")
        if name == "set":
            a.add_argument("--rpm", type=int, help="requests per minute")
            a.add_argument("--tpm", type=int, help="tokens per minute")
            a.add_argument("--force", action="store_true",
                           help="set it even if the scope names no configured deployment, model or key")
        a.add_argument("--json", action="store_true")
    a = common(actions.add_parser("list"))
    a.add_argument("--json", action="store_true")


async def _run(args: argparse.Namespace, cfg: Config) -> int:
    url = args.redis_url or str(cfg.state.redis_url)
    if not url:
        print("error: no Redis: pass --redis-url or set state.redis_url (the embedded store lives inside one gateway process; use /admin/limits there)", file=sys.stderr)
        return 1
    # The config vouches for the scopes of the gateway behind this Redis when it was named (--config,
    # LLM_GATEWAY_CONFIG) or names this very Redis; the implicit ./config/gateway.yaml beside another
    # --redis-url may describe some other gateway.
    # (A config without providers, e.g. none found, describes no gateway at all.)
    vouches = bool(cfg.providers) and (bool(args.config or os.environ.get("LLM_GATEWAY_CONFIG"))
                                       or url == str(cfg.state.redis_url))
    cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, redis_url=Secret(url), redis_timeout=max(cfg.state.redis_timeout, 2.0)))
    store = Store(cfg)
    try:
        scope: Any = getattr(args, "scope", None)  # a str (required positional) for set, get and clear; None for list
        if scope is not None and not valid_scope(scope):
            print("error: scope must be global, key:<id>, model:<name> or provider:<name>", file=sys.stderr)
            return 1
        if args.action == "set":
            if args.rpm is None and args.tpm is None or any(v is not None and v < 0 for v in (args.rpm, args.tpm)):
                print("error: give --rpm and/or --tpm as non-negative integers", file=sys.stderr)
                return 1
            if not await _scope_accepted(args, cfg, vouches, store, scope):
                return 1
            await live_limits.set_limit(store, scope, args.rpm, args.tpm)
            _log().info("limit_changed", actor="cli", scope=scope, requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
            result: Any = {"scope": scope, "limits": await live_limits.get_limit(store, scope)}
        elif args.action == "get":
            live = await live_limits.get_limit(store, scope)
            usage = await live_limits.usage(store, scope)
            tpm = live.get("tokens_per_minute", _configured_tpm(cfg, scope))
            result = {"scope": scope, "key": limits_key(scope), "limits": live,
                      "usage": {"requests_in_window": usage["requests"],
                                "tokens_in_bucket": round(usage["tokens_ahead_ms"] * tpm / 60000) if tpm else None}}
        elif args.action == "clear":
            result = {"scope": scope, "cleared": await live_limits.clear_limit(store, scope)}
            _log().info("limit_cleared", actor="cli", scope=scope)
        else:
            result = await live_limits.list_limits(store)
            if not args.json:
                print(f"{'SCOPE':<40} {'RPM':>12} {'TPM':>14}")
                for name, values in result.items():
                    print(f"{name:<40} {values.get('requests_per_minute', '-'):>12} {values.get('tokens_per_minute', '-'):>14}")
                return 0
        if args.json or args.action != "list":
            print(orjson.dumps(result).decode())
        return 0
    except StoreUnavailable as exc:
        print(f"error: Redis unavailable ({exc})", file=sys.stderr)
        return 1
    finally:
        await store.aclose()


async def _scope_accepted(args: argparse.Namespace, cfg: Config, vouches: bool, store: Store, scope: str) -> bool:
    """False (with the error printed) when `scope` names nothing and neither --force nor doubt lets it pass."""
    from proxy.state.keys import KeyStore

    problem = await unknown_scope(cfg, scope, KeyStore(store, str(cfg.auth.secret)))
    if problem is None:
        return True
    if args.force:
        print(f"warning: {problem}; set anyway (--force)", file=sys.stderr)
        return True
    if not vouches:
        print(f"warning: {problem} in {cfg.source}, which may not describe the gateway on this Redis; set anyway "
              "(name that gateway's config with --config to have scopes checked)", file=sys.stderr)
        return True
    print(f"error: {problem}; nothing was set (--force sets it anyway)", file=sys.stderr)
    return False


def _configured_tpm(cfg: Config, scope: str) -> int | None:
    if scope == "global":
        return cfg.gateway.rate_limit.tokens_per_minute
    kind, _, name = scope.partition(":")
    if kind == "provider":
        return next((d.rate_limit.tokens_per_minute for d in cfg.providers if d.name == name), None)
    if kind == "key":
        return next((k.rate_limit.tokens_per_minute for k in cfg.auth.keys if k.id == name), None)
    return None


def run(args: argparse.Namespace, cfg: Config) -> int:
    return asyncio.run(_run(args, cfg))
