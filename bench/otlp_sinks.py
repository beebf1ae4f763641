"""Local OTLP endpoints for bench/telemetry.py: collectors that accept every export and discard it,
and one that never answers.

Contract:
- `start(workdir, protocol)`: an accept-all collector for `http/protobuf` (a threaded HTTP server
  answering 200 to every POST) or `grpc` (the trace and metrics services answering empty
  responses), in its own process on a free port, pinned to the client CPU as wrk is; a
  `run.Server` (`.port`, `.stop()`).
- `black_hole()`: a socket in this process that accepts TCP connections and never reads or answers
  (a hung collector); returns it and its port, close it to stop.
- Imported by bench/telemetry.py and bench/telemetry_inprocess.py, with bench/ on `sys.path`.
"""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import run as bench  # bench/run.py: servers, pinning

SINK = r'''
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def do_GET(self):
        self.do_POST()
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
'''

GRPC_SINK = r'''
import sys, time
from concurrent import futures
import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        return trace_service_pb2.ExportTraceServiceResponse()

class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        return metrics_service_pb2.ExportMetricsServiceResponse()

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
server.wait_for_termination()
'''


def start(workdir: Path, protocol: str = "http/protobuf") -> bench.Server:
    """An accept-all collector for `protocol`, started and ready."""
    port = bench.free_port()
    (workdir / "sink.py").write_text(SINK if protocol == "http/protobuf" else GRPC_SINK)
    return bench.Server("otlp-sink", [bench.PY, str(workdir / "sink.py"), str(port)], port, workdir,
                        cpu=bench.CLIENT_CPU)


def black_hole() -> tuple[socket.socket, int]:
    """A listening socket whose connections are accepted and held, never answered."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1024)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]
