"""Simulated upstream provider: a real HTTP server speaking the native OpenAI, Anthropic, Bedrock
runtime and Ollama wire formats at the real providers' paths (`llm-gateway mock-provider`).

Public API:
- `MockOptions`: global behaviour (protocols, chunking, latency, faults, auth, models, recording).
  Per request, header `x-mock-<option>` overrides any option in `HEADER_OPTIONS`.
- `build_mock_app(options) -> ASGI callable` (a `MockApp`; its `records` deque holds the requests).
- `add_mock_arguments(parser)` / `options_from_args(ns)`: the CLI surface, including --host/--port;
  `describe(options, host, port)`: the short block the CLI prints at start (address, families, faults).
- `serve_mock(options, host, port)`: run it under uvicorn (uvloop/httptools when installed, no
  access log). `main(argv)` does parse + serve.
Control endpoints (not recorded): GET/DELETE /__mock/requests, GET /__mock/health.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging

from proxy.mock.app import HEADER_OPTIONS, PROTOCOLS, MockApp, MockOptions, MockStreamCut

__all__ = ["HEADER_OPTIONS", "PROTOCOLS", "MockApp", "MockOptions", "MockStreamCut", "add_mock_arguments",
           "build_mock_app", "describe", "main", "options_from_args", "serve_mock", "DEFAULT_PORT"]

DEFAULT_PORT = 8788


class _QuietCuts(logging.Filter):
    """Drop uvicorn's traceback for the connection drops that `cut_after` causes on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], MockStreamCut))


def build_mock_app(options: MockOptions | None = None) -> MockApp:
    """The mock provider as a pure ASGI callable."""
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietCuts) for f in log.filters):
        log.addFilter(_QuietCuts())
    return MockApp(options or MockOptions())


def _protocols(value: str) -> set[str]:
    out: set[str] = set()
    for item in value.split(","):
        item = item.strip().lower()
        if item == "all":
            out.update(PROTOCOLS)
        elif item in PROTOCOLS:
            out.add(item)
        elif item:
            raise argparse.ArgumentTypeError(f"unknown protocol {item!r} (choose from {', '.join(PROTOCOLS)}, all)")
    return out


def add_mock_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mock provider's options (every MockOptions field, plus --host/--port) to `parser`."""
    d = MockOptions()
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    a("--port", type=int, default=DEFAULT_PORT, help=f"bind port (default {DEFAULT_PORT})")
    a("--protocol", dest="protocol", action="append", type=_protocols, metavar="NAME",
      help="openai|anthropic|bedrock|ollama|all; repeat or comma-separate (default all)")
    a("--chunks", type=int, default=d.chunks, help="stream chunks per response (default %(default)s)")
    a("--chunk-interval-ms", type=float, default=d.chunk_interval_ms, help="delay between stream chunks")
    a("--latency-ms", type=float, default=d.latency_ms, help="delay before response headers")
    a("--stall-ms", type=float, default=d.stall_ms, help="stall before the first byte")
    a("--fault-status", type=int, default=None, help="answer with this HTTP status (e.g. 429, 503, 529)")
    a("--fault-rate", type=float, default=None, help="probability of the fault, 0..1 (default 1)")
    a("--retry-after", type=float, default=None, help="seconds sent in retry-after on faults")
    a("--cut-after", type=int, default=None, help="drop the connection after N stream chunks")
    a("--stream-error-after", type=int, default=None, help="in-band stream error after N chunks")
    a("--stream-error-type", default=None, help="override the in-band error type/exception name")
    a("--api-key", default=None, help="require this key (Bearer / x-api-key)")
    a("--aws-access-key-id", default=None, help="require SigV4 from this access key id (Bedrock)")
    a("--aws-secret-access-key", default=None, help="verify Bedrock SigV4 signatures with this secret")
    a("--models", default=None, help="comma-separated model ids the model lists report")
    a("--no-record", dest="record", action="store_false", help="do not record requests")


def options_from_args(ns: argparse.Namespace) -> MockOptions:
    protocols: set[str] = set().union(*ns.protocol) if ns.protocol else set(PROTOCOLS)
    models = [m.strip() for m in ns.models.split(",") if m.strip()] if ns.models else None
    return MockOptions(
        protocols=protocols, chunks=ns.chunks, chunk_interval_ms=ns.chunk_interval_ms,
        latency_ms=ns.latency_ms, stall_ms=ns.stall_ms, fault_status=ns.fault_status,
        fault_rate=ns.fault_rate, retry_after=ns.retry_after, cut_after=ns.cut_after,
        stream_error_after=ns.stream_error_after, stream_error_type=ns.stream_error_type,
        api_key=ns.api_key, aws_access_key_id=ns.aws_access_key_id,
        aws_secret_access_key=ns.aws_secret_access_key, models=models, record=ns.record,
    )


def describe(options: MockOptions, host: str, port: int) -> str:
    """What `llm-gateway mock-provider` says before it serves: where, which families, which faults."""
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    faults = [f"status {options.fault_status} on {options.fault_rate if options.fault_rate is not None else 1:g} "
              f"of requests"] if options.fault_status else []
    faults += [f"{name.replace('_', ' ')} {value:g}" for name, value in (
        ("latency_ms", options.latency_ms), ("stall_ms", options.stall_ms), ("cut_after", options.cut_after),
        ("stream_error_after", options.stream_error_after)) if value]
    auth = "requires " + " and ".join(n for n, v in (("--api-key", options.api_key),
                                                     ("SigV4 from --aws-access-key-id", options.aws_access_key_id)) if v) \
        if options.api_key or options.aws_access_key_id else "accepts any credential"
    return "\n".join([
        f"llm-gateway mock-provider: simulated {', '.join(p for p in PROTOCOLS if p in options.protocols)} on {base}",
        f"  deployment base_url: openai {base}/v1, anthropic/bedrock/ollama {base}",
        f"  faults: {', '.join(faults) or 'none'}; {auth}; requests {'recorded' if options.record else 'not recorded'}"])


def serve_mock(options: MockOptions, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Run the mock provider in the foreground until interrupted."""
    import uvicorn

    has = importlib.util.find_spec
    uvicorn.run(
        build_mock_app(options), host=host, port=port, lifespan="off", access_log=False,
        log_level="warning", loop="uvloop" if has("uvloop") else "asyncio",
        http="httptools" if has("httptools") else "h11",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llm-gateway mock-provider", description=__doc__.split("\n")[0])
    add_mock_arguments(parser)
    ns = parser.parse_args(argv)
    serve_mock(options_from_args(ns), host=ns.host, port=ns.port)
