"""The `llm-gateway` command line.

Contract (README "CLI reference"): `serve`, `check-config`, `demo`, `mock-provider`, `limits`, `keys`,
`health` and `cache` (`proxy/cli/cache.py`). Every command that reads a gateway config takes `--config F` (`demo` runs its built-in config
and `mock-provider` its flags: both refuse `--config`); the file comes from `--config`, then
`LLM_GATEWAY_CONFIG`, then `./config/gateway.yaml`. Config errors print every problem of the file, one
`error: file:line: field: message` line each, and exit 1; the effective config is printed only when
valid. Secrets are masked in every dump (of a Redis URL, only the password). `serve` prints one short
block on stderr before it starts (address, config, state store, deployments, and every reason no request
could succeed); a port that cannot be bound is one `error:` line and exit 1 (`serve`, `demo`,
`mock-provider`). `keys create` prints the new key's secrets once (stdout) and nothing else there;
audit lines go to stderr as JSON lines and never carry a secret.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import os
import socket
import sys
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
import yaml

from config import Config, ConfigError, Secret, load_config, parse_config, resolve_path


def _masked(value: Any) -> Any:
    if isinstance(value, Secret):
        return value.mask()
    if dataclasses.is_dataclass(value):
        return {f.name: _masked(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in ("source", "warnings")}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    return value


def masked_url(url: str) -> str:
    """`url` with only its password masked: `redis://user:***@host:6379/0` (also `?password=`)."""
    try:
        parts = urlsplit(url)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}" if at and ":" in userinfo else parts.netloc
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*") \
            if any(k.lower() == "password" for k, _ in pairs) else parts.query
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + \
            (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        return "***"


def effective_config(cfg: Config) -> str:
    data = _masked(cfg)
    data["providers"] = {d.pop("name"): d for d in data["providers"]}
    data["state"]["redis_url"] = masked_url(str(cfg.state.redis_url))
    return yaml.safe_dump(data, sort_keys=False)


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for error in exc.errors:  # every problem of the file, one line each
            print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def auth_problems(cfg: Config) -> list[str]:
    """Every reason, visible in the config, why requests would be refused for want of a usable key."""
    auth = cfg.auth
    if auth.mode == "none":
        return ["auth.mode is none: every request is accepted without a gateway key (development only)"]
    problems = [f"auth.keys[{i}] ({k.id!r}): sha256 is all zeros, a placeholder no client key matches; set it to "
                f"the sha256 of your key (printf %s \"$KEY\" | sha256sum)" for i, k in enumerate(auth.keys)
                if set(k.sha256) == {"0"}]
    if any(set(k.sha256) != {"0"} for k in auth.keys):
        return problems
    why = "no key is configured (auth.keys is empty)" if not auth.keys else "the only static keys are placeholders"
    if not str(auth.secret):
        problems.append(f"no request can succeed: {why} and managed keys are off (auth.secret / GATEWAY_SECRET "
                        "is empty); set auth.keys[].sha256, or GATEWAY_SECRET and then `llm-gateway keys create`")
    elif not str(cfg.state.redis_url) and not str(auth.admin_key):
        problems.append(f"no request can succeed: {why}, and managed keys on the embedded store can only be made "
                        "with /admin/keys, which is off without auth.admin_key; set GATEWAY_ADMIN_KEY or REDIS_URL")
    return problems


def bind_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (None when it can), as one line that says what to do."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
            s.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"cannot listen on {host}:{port}: the port is already in use; choose another one with --port N"
        if exc.errno == errno.EACCES:
            return f"cannot listen on {host}:{port}: permission denied; choose a port above 1023 with --port N"
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host, or choose another --port"
    except OverflowError:
        return f"cannot listen on {host}:{port}: ports go from 0 to 65535; choose another one with --port N"
    return None


def _can_listen(host: str, port: int) -> bool:
    """Checked before uvicorn starts: a taken port is one line, not uvicorn's error (or a traceback)."""
    problem = bind_problem(host, port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    return problem is None


def startup_summary(cfg: Config, url: str, workers: int) -> str:
    """The block `serve` prints before it starts: where, with what, and what would stop every request."""
    redis = str(cfg.state.redis_url)
    served = [f"{d.name} ({d.type}: {', '.join(d.models) if d.models else 'any model'})" for d in cfg.enabled_providers]
    keys = [f"{len(cfg.auth.keys)} static", "managed keys " + ("on" if str(cfg.auth.secret) else "off (no auth.secret)"),
            "admin API " + ("on" if str(cfg.auth.admin_key) else "off (no auth.admin_key)")]
    lines = [f"llm-gateway serve: listening on {url} ({workers} worker{'s' if workers > 1 else ''})",
             f"  config:      {resolve_path(cfg.source).resolve()}",
             f"  state:       {masked_url(redis) if redis else 'embedded in-memory store (no Redis: one process)'}",
             f"  deployments: {', '.join(served)}",
             f"  keys:        auth.mode {cfg.auth.mode}; " + ", ".join(keys)]
    lines += [f"warning: {w}" for w in cfg.warnings + auth_problems(cfg)]
    return "\n".join(lines)


# Without any config file, the admin commands still honour the documented variables.
_ENV_ONLY = 'state: {redis_url: "${REDIS_URL:-}"}\nauth: {secret: "${GATEWAY_SECRET:-}"}\n'


def _load_lenient(path: str | None) -> Config:
    """Admin commands need the state (and auth.secret) settings only; a missing default config is fine."""
    if path is None and not resolve_path(None).exists():
        return parse_config(_ENV_ONLY, "<environment>")
    return _load(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    for warning in cfg.warnings + auth_problems(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    if not cfg.enabled_providers:
        print(f"error: {resolve_path(args.config)}: providers: no provider is enabled", file=sys.stderr)
        return 1
    print(effective_config(cfg), end="")  # only a valid config: a dump above an error would read as accepted
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.cli.serve import uvicorn_options

    cfg = _load(args.config)
    if not cfg.enabled_providers:
        print("error: no provider is enabled: " + "; ".join(cfg.warnings), file=sys.stderr)
        return 1
    os.environ["LLM_GATEWAY_CONFIG"] = str(resolve_path(args.config))
    host = args.host or cfg.server.host
    port = args.port or cfg.server.port
    workers = args.workers or cfg.server.workers
    if workers > 1:  # one /metrics for all workers: prometheus_client multiprocess mode (proxy/telemetry/metrics.py)
        from proxy.telemetry.metrics import prepare_multiprocess
        prepare_multiprocess()
    tls: dict[str, Any] = {"ssl_certfile": cfg.server.certfile, "ssl_keyfile": cfg.server.keyfile} if cfg.server.certfile else {}
    if not _can_listen(host, port):
        return 1
    shown = f"[{host}]" if ":" in host else host
    print(startup_summary(cfg, f"{'https' if tls else 'http'}://{shown}:{port}", workers), file=sys.stderr, flush=True)
    uvicorn.run("proxy.cli.serve:app_factory", factory=True, host=host, port=port, workers=workers,
                **tls, **uvicorn_options())
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from proxy.mock import describe, options_from_args, serve_mock

    if not _can_listen(args.host, args.port):
        return 1
    options = options_from_args(args)
    print(describe(options, args.host, args.port), file=sys.stderr, flush=True)
    serve_mock(options, host=args.host, port=args.port)
    return 0


def _admin_store(args: argparse.Namespace, cfg: Config, what: str) -> Any:
    """A Store on `--redis-url` or `state.redis_url` (None, with a message, when there is no Redis)."""
    from proxy.state.store import Store

    url = args.redis_url or str(cfg.state.redis_url)
    if not url:
        print(f"error: no Redis: pass --redis-url or set state.redis_url (the embedded store lives inside one "
              f"gateway process; use {what} there)", file=sys.stderr)
        return None
    state = dataclasses.replace(cfg.state, redis_url=Secret(url), redis_timeout=max(cfg.state.redis_timeout, 2.0))
    return Store(dataclasses.replace(cfg, state=state))


def _audit() -> Any:
    from proxy.cli.limits import audit_logger

    return audit_logger("llm_gateway.keys")


def add_keys_arguments(sub: Any, common: Any) -> None:
    p = common(sub.add_parser("keys", help="managed gateway keys (in Redis)"))
    actions = p.add_subparsers(dest="action", required=True)
    c = common(actions.add_parser("create", help="create a key; its secrets are printed once"))
    c.add_argument("--name", required=True)
    c.add_argument("--models", help="comma-separated model allowlist (default: every model)")
    c.add_argument("--families", help="comma-separated API families: openai,anthropic,bedrock,ollama (default: all)")
    c.add_argument("--rpm", type=int, help="requests per minute")
    c.add_argument("--tpm", type=int, help="tokens per minute")
    c.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    c.add_argument("--metadata", action="append", default=[], metavar="K=V",
                   help="attached to the access log (repeatable; a repeated name joins its values with ',')")
    c.add_argument("--log-bodies", action="store_true",
                   help="write this key's request and response bodies into its access-log lines")
    c.add_argument("--json", action="store_true")
    common(actions.add_parser("list", help="list keys (never their secrets)")).add_argument("--json", action="store_true")
    r = common(actions.add_parser("revoke", help="revoke a key (every replica refuses it within a second)"))
    r.add_argument("id")
    r.add_argument("--json", action="store_true")


async def _keys(args: argparse.Namespace, cfg: Config) -> int:
    from proxy.state.keys import DISABLED_MESSAGE, KeyStore, keys_table, parse_spec
    from proxy.state.store import StoreUnavailable

    if args.action == "create":
        if not str(cfg.auth.secret):
            print(f"error: {DISABLED_MESSAGE}; no key was created", file=sys.stderr)
            return 1
        metadata: dict[str, str] = {}
        try:
            for item in args.metadata:
                name, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"--metadata {item!r}: use NAME=VALUE")
                metadata[name] = f"{metadata[name]},{value}" if name in metadata else value
            spec = parse_spec({"name": args.name, "models": args.models, "families": args.families, "rpm": args.rpm,
                               "tpm": args.tpm, "max_concurrent": args.max_concurrent, "metadata": metadata,
                               "log_bodies": args.log_bodies})
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    store = _admin_store(args, cfg, "/admin/keys")
    if store is None:
        return 1
    keys = KeyStore(store, str(cfg.auth.secret))
    try:
        if args.action == "create":
            created = await keys.create(spec)
            _audit().info("key_created", actor="cli", key_id=created["id"], name=spec.name)
            if args.json:
                print(orjson.dumps(created).decode())
            else:
                print("\n".join(f"{k}: {v}" for k, v in created.items()))
                print("note: store the key and the AWS secret now; they are not shown again", file=sys.stderr)
        elif args.action == "list":
            rows = await keys.list()
            print(orjson.dumps({"keys": rows}).decode() if args.json else keys_table(rows))
        else:
            if not await keys.revoke(args.id):
                print(f"error: no key with id {args.id!r}", file=sys.stderr)
                return 1
            _audit().info("key_revoked", actor="cli", key_id=args.id)
            print(orjson.dumps({"id": args.id, "revoked": True}).decode() if args.json else f"revoked {args.id}")
        return 0
    except StoreUnavailable as exc:
        print(f"error: Redis unavailable ({exc})", file=sys.stderr)
        return 1
    finally:
        await store.aclose()


async def _health(args: argparse.Namespace, cfg: Config) -> int:
    from proxy.admin.api import health_report, health_table
    from proxy.state.health import SharedHealth
    from proxy.state.store import StoreUnavailable

    store = _admin_store(args, cfg, "/admin/health")
    if store is None:
        return 1
    health = SharedHealth(cfg, store)
    try:
        report = health_report(await health.refresh(), False)
    except StoreUnavailable as exc:
        print(f"error: Redis unavailable ({exc})", file=sys.stderr)
        return 1
    finally:
        await health.aclose()
        await store.aclose()
    print(orjson.dumps(report).decode() if args.json else health_table(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.cli.demo import run_demo

    if not _can_listen(args.host, args.port):
        return 1
    return run_demo(host=args.host, port=args.port)


def _refuse_config(command: argparse.ArgumentParser, why: str) -> None:
    """`--config` on a command that reads no gateway config: refused (exit 2) with what to do instead,
    rather than accepted and ignored."""

    class Refuse(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
            parser.error(f"--config: {why}")

    command.add_argument("--config", action=Refuse, default=None, help=argparse.SUPPRESS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-gateway", description="LLM edge gateway: native provider APIs through one host.")
    p.set_defaults(config=None, redis_url=None)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--config", help="config file (default: $LLM_GATEWAY_CONFIG or ./config/gateway.yaml)")
        return c

    s = command("serve", "run the gateway")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.set_defaults(func=cmd_serve)
    command("check-config", "validate and print the effective config, secrets masked").set_defaults(func=cmd_check_config)
    d = sub.add_parser("demo", help="gateway + simulated providers + embedded state in one command")
    _refuse_config(d, "the demo reads no config file: it runs its built-in config/examples/demo.yaml against "
                      "built-in simulated providers; to run your own config, use `llm-gateway serve --config F`")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(func=cmd_demo)
    from proxy.cli import limits as limits_cli

    def with_redis(c: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # SUPPRESS: `keys --config F create` and `keys create --config F` both work (a nested parser's
        # default would otherwise overwrite the outer value); the root parser holds the None defaults.
        if not any(a.dest == "config" for a in c._actions):
            c.add_argument("--config", default=argparse.SUPPRESS, help="config file")
        c.add_argument("--redis-url", default=argparse.SUPPRESS, help="Redis URL (default: state.redis_url of the config)")
        return c

    limits_cli.add_arguments(sub, with_redis)
    sub.choices["limits"].set_defaults(func=lambda a: limits_cli.run(a, _load_lenient(a.config)))
    add_keys_arguments(sub, with_redis)
    sub.choices["keys"].set_defaults(func=lambda a: asyncio.run(_keys(a, _load_lenient(a.config))))
    from proxy.cli import cache as cache_cli

    cache_cli.add_arguments(sub, with_redis)
    sub.choices["cache"].set_defaults(func=lambda a: cache_cli.run(a, _load_lenient(a.config)))
    h = with_redis(command("health", "shared deployment health as the replicas see it"))
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=lambda a: asyncio.run(_health(a, _load_lenient(a.config))))
    m = sub.add_parser("mock-provider", help="the simulated upstream (OpenAI, Anthropic, Bedrock, Ollama)")
    _refuse_config(m, "the simulated provider reads no gateway config: its flags set its behaviour (see --help)")
    from proxy.mock import add_mock_arguments

    add_mock_arguments(m)
    m.set_defaults(func=cmd_mock)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command not in ("serve", "demo", "mock-provider"):
        from proxy.telemetry.logs import configure_logging

        configure_logging(stream=sys.stderr)  # keep stdout for the command's own (JSON) output
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
