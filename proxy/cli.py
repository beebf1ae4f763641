"""The `llm-gateway` command line.

Contract (see DESIGN.md "CLI"): `serve`, `check-config`, `demo`, `mock-provider` and `limits`. Every command
takes `--config F`; the file comes from `--config`, then `LLM_GATEWAY_CONFIG`, then
`./config/gateway.yaml`. Config errors print `file:line: field: message` and exit 1. Secrets are
masked in every dump.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Sequence

import yaml

from config import Config, ConfigError, Secret, load_config, resolve_path


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


def effective_config(cfg: Config) -> str:
    data = _masked(cfg)
    data["providers"] = {d.pop("name"): d for d in data["providers"]}
    if isinstance(data.get("state", {}).get("redis_url"), str) and cfg.state.redis_url:
        data["state"]["redis_url"] = "***"
    return yaml.safe_dump(data, sort_keys=False)


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _load_lenient(path: str | None) -> Config:
    """Admin commands need the state settings only; a missing default config is fine."""
    if path is None and not resolve_path(None).exists():
        return Config()
    return _load(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(effective_config(cfg), end="")
    if not cfg.enabled_providers:
        print(f"error: {resolve_path(args.config)}: providers: no provider is enabled", file=sys.stderr)
        return 1
    return 0


def app_factory() -> Any:
    """uvicorn factory for `serve` (each worker process builds its own app)."""
    from proxy.app import build_app

    return build_app(os.environ.get("LLM_GATEWAY_CONFIG"))


def uvicorn_options() -> dict[str, Any]:
    opts: dict[str, Any] = {"access_log": False, "log_level": "warning", "lifespan": "on",
                            "timeout_graceful_shutdown": 10}
    try:
        import uvloop  # noqa: F401

        opts["loop"] = "uvloop"
    except ImportError:
        opts["loop"] = "asyncio"
    try:
        import httptools  # noqa: F401

        opts["http"] = "httptools"
    except ImportError:
        opts["http"] = "h11"
    return opts


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    cfg = _load(args.config)
    if not cfg.enabled_providers:
        print("error: no provider is enabled: " + "; ".join(cfg.warnings), file=sys.stderr)
        return 1
    os.environ["LLM_GATEWAY_CONFIG"] = str(resolve_path(args.config))
    host = args.host or cfg.server.host
    port = args.port or cfg.server.port
    workers = args.workers or cfg.server.workers
    tls = {"ssl_certfile": cfg.server.certfile, "ssl_keyfile": cfg.server.keyfile} if cfg.server.certfile else {}
    uvicorn.run("proxy.cli:app_factory", factory=True, host=host, port=port, workers=workers,
                **tls, **uvicorn_options())
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from proxy.mock import options_from_args, serve_mock

    serve_mock(options_from_args(args), host=args.host, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(host=args.host, port=args.port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-gateway", description="LLM edge gateway: native provider APIs through one host.")
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
    d = command("demo", "gateway + simulated providers + embedded state in one command")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(func=cmd_demo)
    from proxy import limits_cli

    def with_redis(c: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if not any(a.dest == "config" for a in c._actions):
            c.add_argument("--config", help="config file")
        c.add_argument("--redis-url", help="Redis URL (default: state.redis_url of the config)")
        return c

    limits_cli.add_arguments(sub, with_redis)
    sub.choices["limits"].set_defaults(func=lambda a: limits_cli.run(a, _load_lenient(a.config)))
    m = command("mock-provider", "the simulated upstream (OpenAI, Anthropic, Bedrock, Ollama)")
    from proxy.mock import add_mock_arguments

    add_mock_arguments(m)
    m.set_defaults(func=cmd_mock)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
