"""Unit tests of the adapters' usage taps: realistic response bytes in, token counts out.

Each fixture is written by hand after the providers' documented stream formats and usage fields, and fed through `adapter.tap(ctx, headers)` in
chunks of 1 byte, 7 bytes and whole, so no count may depend on where a chunk boundary falls. A tap
reads a copy of the bytes; whatever an upstream sends, it must never raise.
"""
from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.anthropic import AnthropicAdapter
from providers.base import Adapter
from providers.bedrock import BedrockAdapter
from providers.eventstream import encode_message, event_frame
from providers.ollama import OllamaAdapter
from providers.openai import OpenAIAdapter
from proxy.context import RequestContext, Usage

JSON = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream; charset=utf-8")
EVENTSTREAM = (b"content-type", b"application/vnd.amazon.eventstream")
NDJSON = (b"content-type", b"application/x-ndjson")


def sse(*events: tuple[str | None, Any], eol: bytes = b"\n") -> bytes:
    out = b""
    for name, data in events:
        if name:
            out += b"event: " + name.encode() + eol
        payload = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
        out += b"data: " + payload + eol + eol
    return out


def ndjson(*objs: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objs)


def chunk_event(event: dict[str, Any]) -> bytes:
    """An InvokeModelWithResponseStream `chunk` frame wrapping one model-native event."""
    inner = base64.b64encode(json.dumps(event, separators=(",", ":")).encode()).decode()
    return event_frame("chunk", json.dumps({"bytes": inner, "p": "abcdefgh"}).encode())


# ------------------------------------------------------------------ OpenAI (WIRE §2.1, §3)

OPENAI_CHAT_JSON = json.dumps({
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion", "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help?",
                                         "refusal": None, "annotations": []},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
              "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "service_tier": "default", "system_fingerprint": "fp_fc9f1d7035",
}, indent=2).encode()


def _openai_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
            "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


_OPENAI_DELTAS = [
    _openai_chunk({"role": "assistant", "content": "", "refusal": None}, usage=None, obfuscation="xY3"),
    _openai_chunk({"content": "Hello"}, usage=None, obfuscation="k"),
    _openai_chunk({"content": " there, the usage is"}, usage=None, obfuscation="Qe9Lm"),
    _openai_chunk({}, "stop", usage=None),
]
OPENAI_SSE_USAGE = sse(
    *[(None, c) for c in _OPENAI_DELTAS],
    (None, {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
            "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices": [],
            "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
                      "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                    "accepted_prediction_tokens": 0,
                                                    "rejected_prediction_tokens": 0}}}),
    (None, b"[DONE]"),
)
OPENAI_SSE_NO_USAGE = sse(*[(None, {k: v for k, v in c.items() if k != "usage"}) for c in _OPENAI_DELTAS],
                          (None, b"[DONE]"))

_RESP = {"id": "resp_67ccd2bed1ec8190", "object": "response", "created_at": 1741476542, "model": "gpt-4.1-2025-04-14",
         "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": None}
OPENAI_RESPONSES_SSE = sse(
    ("response.created", {"type": "response.created", "sequence_number": 0,
                          "response": {**_RESP, "status": "in_progress"}}),
    ("response.in_progress", {"type": "response.in_progress", "sequence_number": 1,
                              "response": {**_RESP, "status": "in_progress"}}),
    ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
                                    "item": {"id": "msg_1", "type": "message", "status": "in_progress",
                                             "role": "assistant", "content": []}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 3,
                                    "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                    "delta": "Hi \"usage\": 5", "logprobs": []}),
    ("response.output_text.done", {"type": "response.output_text.done", "sequence_number": 4, "item_id": "msg_1",
                                   "output_index": 0, "content_index": 0, "text": "Hi", "logprobs": []}),
    ("response.completed", {"type": "response.completed", "sequence_number": 5, "response": {
        **_RESP, "status": "completed",
        "output": [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi", "annotations": []}]}],
        "usage": {"input_tokens": 37, "input_tokens_details": {"cached_tokens": 12},
                  "output_tokens": 11, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 48}}}),
)
OPENAI_EMBEDDINGS_JSON = json.dumps({
    "object": "list", "model": "text-embedding-3-small",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, -0.0028842222]}],
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}).encode()

# ------------------------------------------------------------------ Anthropic (WIRE §2.2, §3)

ANTHROPIC_JSON = json.dumps({
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 21, "cache_creation_input_tokens": 188, "cache_read_input_tokens": 1800,
              "cache_creation": {"ephemeral_5m_input_tokens": 188, "ephemeral_1h_input_tokens": 0},
              "output_tokens": 393, "service_tier": "standard"},
}).encode()

_ANTHROPIC_EVENTS: list[tuple[str, Any]] = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [],
        "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 472, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2048,
                  "output_tokens": 2, "service_tier": "standard"}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello, the usage"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": " is cumulative."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "pause_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 89}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"input_tokens": 472, "cache_creation_input_tokens": 0,
                                 "cache_read_input_tokens": 2048, "output_tokens": 120}}),
    ("message_stop", {"type": "message_stop"}),
]
ANTHROPIC_SSE = sse(*_ANTHROPIC_EVENTS)
ANTHROPIC_SSE_CRLF = sse(*_ANTHROPIC_EVENTS, eol=b"\r\n")

# ------------------------------------------------------------------ Bedrock (WIRE §2.3, §3)

BEDROCK_CONVERSE_JSON = json.dumps({
    "output": {"message": {"role": "assistant", "content": [{"text": "Hello from Bedrock."}]}},
    "stopReason": "end_turn",
    "usage": {"inputTokens": 30, "outputTokens": 12, "totalTokens": 3042,
              "cacheReadInputTokens": 2000, "cacheWriteInputTokens": 1000},
    "metrics": {"latencyMs": 812},
}).encode()

BEDROCK_CONVERSE_STREAM = b"".join([
    event_frame("messageStart", b'{"p":"abcdefghijklmnopq","role":"assistant"}'),
    *[event_frame("contentBlockDelta", json.dumps({"contentBlockIndex": 0, "delta": {"text": t},
                                                   "p": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJK"[:n]}).encode())
      for n, t in enumerate(["Hello", " from", " the", " stream", ". metadata"], start=3)],
    event_frame("contentBlockStop", b'{"contentBlockIndex":0,"p":"abcd"}'),
    event_frame("messageStop", b'{"p":"abcdefghijklmn","stopReason":"end_turn"}'),
    event_frame("metadata", json.dumps({
        "metrics": {"latencyMs": 300},
        "p": "abcdefghijklmnopqrstuvwxyzABCDEF",
        "usage": {"inputTokens": 25, "outputTokens": 40, "totalTokens": 165,
                  "cacheReadInputTokens": 100, "cacheWriteInputTokens": 0}}).encode()),
])

def _invoke_stream(**cache: int) -> bytes:
    return b"".join([
        chunk_event({"type": "message_start", "message": {
            "id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": "claude-3-sonnet-20240229",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 16, "output_tokens": 1}}}),
        chunk_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        *[chunk_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})
          for t in ["Hi", " there", " friend"]],
        chunk_event({"type": "content_block_stop", "index": 0}),
        chunk_event({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                     "usage": {"output_tokens": 42}}),
        chunk_event({"type": "message_stop", "amazon-bedrock-invocationMetrics": {
            "inputTokenCount": 16, "outputTokenCount": 42, "invocationLatency": 1234, "firstByteLatency": 300,
            **cache}}),
    ])


BEDROCK_INVOKE_STREAM = _invoke_stream()
BEDROCK_INVOKE_STREAM_CACHED = _invoke_stream(cacheReadInputTokenCount=900, cacheWriteInputTokenCount=64)

BEDROCK_INVOKE_HEADERS = [JSON, (b"x-amzn-requestid", b"b9d7c4d2-0f3c-4a4e-9f8e-4f5c1e2d3a4b"),
                          (b"x-amzn-bedrock-invocation-latency", b"2100"),
                          (b"x-amzn-bedrock-output-token-count", b"20"),
                          (b"x-amzn-bedrock-input-token-count", b"10"),
                          (b"x-amzn-bedrock-cache-read-input-token-count", b"300"),
                          (b"x-amzn-bedrock-cache-write-input-token-count", b"50")]
BEDROCK_INVOKE_BODY = json.dumps({
    "id": "msg_bdrk_02", "type": "message", "role": "assistant", "model": "claude-3-sonnet-20240229",
    "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 300,
              "cache_creation_input_tokens": 50}}).encode()

# ------------------------------------------------------------------ Ollama (WIRE §2.4, §3)

_OLLAMA_PARTS = [{"model": "llama3.2", "created_at": "2025-01-01T00:00:0%dZ" % i,
                  "message": {"role": "assistant", "content": t}, "done": False}
                 for i, t in enumerate(["The", " sky", " is", " \"done\":true", " blue."])]
_OLLAMA_DONE = {"model": "llama3.2", "created_at": "2025-01-01T00:00:09Z",
                "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                "total_duration": 4883583458, "load_duration": 1334875, "prompt_eval_count": 26,
                "prompt_eval_duration": 342546000, "eval_count": 282, "eval_duration": 4535599000}
OLLAMA_NDJSON = ndjson(*_OLLAMA_PARTS, _OLLAMA_DONE)
OLLAMA_NDJSON_CACHED_PROMPT = ndjson(*_OLLAMA_PARTS, {k: v for k, v in _OLLAMA_DONE.items()
                                                      if k not in ("prompt_eval_count", "prompt_eval_duration")})
OLLAMA_GENERATE_NO_TRAILING_NEWLINE = ndjson(
    {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "response": "Hi", "done": False}
) + json.dumps({"model": "llama3.2", "created_at": "2025-01-01T00:00:01Z", "response": "", "done": True,
                "done_reason": "stop", "context": [1, 2, 3], "total_duration": 10, "load_duration": 1,
                "prompt_eval_count": 5, "prompt_eval_duration": 2, "eval_count": 7, "eval_duration": 3}).encode()
OLLAMA_CHAT_JSON = json.dumps({**_OLLAMA_DONE, "message": {"role": "assistant", "content": "The sky is blue."}}).encode()
OLLAMA_EMBED_JSON = json.dumps({"model": "all-minilm", "embeddings": [[0.010071029, -0.0017594862, 0.05007221],
                                                                      [-0.0098027075, 0.06042469, 0.025571823]],
                                "total_duration": 14143917, "load_duration": 1019500, "prompt_eval_count": 8}).encode()


@dataclass(frozen=True)
class Case:
    name: str
    adapter: type[Adapter]
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    want: tuple[int | None, int | None, int | None]  # input, output, cached
    reply: tuple[str | None, tuple[str, ...] | None] = (None, None)  # answering model, finish reasons


CASES = [
    Case("openai-chat-json-cached", OpenAIAdapter, "/v1/chat/completions", [JSON], OPENAI_CHAT_JSON, (1117, 46, 1024),
         ("gpt-4o-2024-08-06", ("stop",))),
    Case("openai-chat-sse-include-usage", OpenAIAdapter, "/v1/chat/completions", [SSE], OPENAI_SSE_USAGE, (19, 10, 0),
         ("gpt-4o-mini", ("stop",))),
    Case("openai-chat-sse-no-usage", OpenAIAdapter, "/v1/chat/completions", [SSE], OPENAI_SSE_NO_USAGE,
         (None, None, None),
         ("gpt-4o-mini", ("stop",))),
    Case("openai-responses-sse-completed", OpenAIAdapter, "/v1/responses", [SSE], OPENAI_RESPONSES_SSE, (37, 11, 12),
         ("gpt-4.1-2025-04-14", None)),
    Case("openai-embeddings-json", OpenAIAdapter, "/v1/embeddings", [JSON], OPENAI_EMBEDDINGS_JSON, (8, 0, None),
         ("text-embedding-3-small", None)),
    Case("openai-chat-json-gzip", OpenAIAdapter, "/v1/chat/completions",
         [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")], gzip.compress(OPENAI_CHAT_JSON),
         (1117, 46, 1024),
         ("gpt-4o-2024-08-06", ("stop",))),
    Case("anthropic-json-cache", AnthropicAdapter, "/v1/messages", [JSON], ANTHROPIC_JSON, (21 + 188 + 1800, 393, 1988),
         ("claude-sonnet-4-5", ("end_turn",))),
    Case("anthropic-sse-cumulative", AnthropicAdapter, "/v1/messages", [SSE], ANTHROPIC_SSE, (472 + 2048, 120, 2048),
         ("claude-sonnet-4-5", ("end_turn",))),
    Case("anthropic-sse-crlf", AnthropicAdapter, "/v1/messages", [SSE], ANTHROPIC_SSE_CRLF, (472 + 2048, 120, 2048),
         ("claude-sonnet-4-5", ("end_turn",))),
    Case("bedrock-converse-json", BedrockAdapter, "/model/m/converse", [JSON], BEDROCK_CONVERSE_JSON,
         (30 + 2000 + 1000, 12, 3000),
         (None, ("end_turn",))),
    Case("bedrock-converse-stream-metadata", BedrockAdapter, "/model/m/converse-stream", [EVENTSTREAM],
         BEDROCK_CONVERSE_STREAM, (125, 40, 100),
         (None, ("end_turn",))),
    Case("bedrock-invoke-stream-metrics", BedrockAdapter, "/model/m/invoke-with-response-stream", [EVENTSTREAM],
         BEDROCK_INVOKE_STREAM, (16, 42, None),
         ("claude-3-sonnet-20240229", ("end_turn",))),
    Case("bedrock-invoke-stream-metrics-cache", BedrockAdapter, "/model/m/invoke-with-response-stream",
         [EVENTSTREAM], BEDROCK_INVOKE_STREAM_CACHED, (16 + 900 + 64, 42, 964),
         ("claude-3-sonnet-20240229", ("end_turn",))),
    Case("bedrock-invoke-token-headers", BedrockAdapter, "/model/m/invoke", BEDROCK_INVOKE_HEADERS,
         BEDROCK_INVOKE_BODY, (10 + 300 + 50, 20, 350),
         ("claude-3-sonnet-20240229", ("end_turn",))),
    Case("ollama-ndjson-done", OllamaAdapter, "/api/chat", [NDJSON], OLLAMA_NDJSON, (26, 282, None),
         ("llama3.2", ("stop",))),
    Case("ollama-ndjson-done-without-prompt-eval-count", OllamaAdapter, "/api/chat", [NDJSON],
         OLLAMA_NDJSON_CACHED_PROMPT, (0, 282, None),
         ("llama3.2", ("stop",))),
    Case("ollama-generate-no-trailing-newline", OllamaAdapter, "/api/generate", [NDJSON],
         OLLAMA_GENERATE_NO_TRAILING_NEWLINE, (5, 7, None),
         ("llama3.2", ("stop",))),
    Case("ollama-chat-json", OllamaAdapter, "/api/chat", [(b"content-type", b"application/json; charset=utf-8")],
         OLLAMA_CHAT_JSON, (26, 282, None),
         ("llama3.2", ("stop",))),
    Case("ollama-embed-json", OllamaAdapter, "/api/embed", [JSON], OLLAMA_EMBED_JSON, (8, 0, None),
         ("all-minilm", None)),
]


def run_tap(case: Case, body: bytes, size: int) -> Usage:
    adapter = case.adapter()
    ctx = RequestContext(request_id="t", family=adapter.family, adapter=adapter, method="POST",
                         path=case.path, query="", headers=[])
    tap = adapter.tap(ctx, list(case.headers))
    if tap is not None:
        for i in range(0, len(body), size):
            tap.feed(body[i:i + size])
        tap.finish()
    return ctx.usage


@pytest.mark.parametrize("size", [1, 7, 1 << 30], ids=["1B", "7B", "whole"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tap_reads_usage(case: Case, size: int) -> None:
    usage = run_tap(case, case.body, size)
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == case.want
    assert (usage.response_model, usage.finish_reasons) == case.reply


def test_fixtures_are_what_they_claim() -> None:
    """Guard the hand-written fixtures themselves (so a passing tap test means something)."""
    assert OPENAI_SSE_USAGE.count(b"data: ") == 6 and OPENAI_SSE_USAGE.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in OPENAI_SSE_NO_USAGE
    assert ANTHROPIC_SSE_CRLF.count(b"\r\n\r\n") == len(_ANTHROPIC_EVENTS) and b"\n\n" not in ANTHROPIC_SSE_CRLF
    assert gzip.decompress(gzip.compress(OPENAI_CHAT_JSON)) == OPENAI_CHAT_JSON
    assert BEDROCK_INVOKE_STREAM_CACHED.startswith(BEDROCK_INVOKE_STREAM[:200])
    assert b"cacheReadInputTokenCount" not in BEDROCK_INVOKE_STREAM
    import botocore.eventstream as bes
    buf = bes.EventStreamBuffer()
    buf.add_data(BEDROCK_INVOKE_STREAM_CACHED)
    messages = list(buf)
    assert len(messages) == 8
    last = json.loads(base64.b64decode(json.loads(messages[-1].payload)["bytes"]))
    assert last["amazon-bedrock-invocationMetrics"]["cacheReadInputTokenCount"] == 900
    assert not OLLAMA_GENERATE_NO_TRAILING_NEWLINE.endswith(b"\n")


def test_finish_reasons_of_several_choices_and_of_a_cut_short_response() -> None:
    """Each choice's reason arrives in its own last chunk (in any order); a Responses answer that
    stopped early names why."""
    two = _openai_chunk({"content": "a"}) | {"choices": [
        {"index": 0, "delta": {"content": "a"}, "logprobs": None, "finish_reason": None},
        {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "length"}]}
    body = sse((None, two), (None, _openai_chunk({}, "stop")), (None, b"[DONE]"))
    chat = Case("c", OpenAIAdapter, "/v1/chat/completions", [SSE], b"", (None, None, None))
    for size in (1, 7, len(body)):
        usage = run_tap(chat, body, size)
        assert (usage.response_model, usage.finish_reasons) == ("gpt-4o-mini", ("length", "stop"))
    cut = {"type": "response.incomplete", "response": {"id": "resp_1", "object": "response", "model": "gpt-4.1",
                                                         "status": "incomplete",
                                                         "incomplete_details": {"reason": "max_output_tokens"},
                                                         "usage": {"input_tokens": 5, "output_tokens": 16}}}
    usage = run_tap(Case("r", OpenAIAdapter, "/v1/responses", [SSE], b"", (None, None, None)),
                    sse(("response.incomplete", cut)), 7)
    assert (usage.input_tokens, usage.output_tokens) == (5, 16)
    assert (usage.response_model, usage.finish_reasons) == ("gpt-4.1", ("max_output_tokens",))


def test_bedrock_invoke_usage_comes_from_the_headers_and_the_stop_reason_from_the_body() -> None:
    case = CASES[[c.name for c in CASES].index("bedrock-invoke-token-headers")]
    adapter = BedrockAdapter()
    ctx = RequestContext(request_id="t", family="bedrock", adapter=adapter, method="POST",
                         path=case.path, query="", headers=[])
    tap = adapter.tap(ctx, case.headers)
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.cached_tokens) == (360, 20, 350)  # at once
    assert tap is not None and ctx.usage.finish_reasons is None
    tap.feed(case.body)
    tap.finish()  # the body's own (Anthropic-shaped) usage never replaces the headers' counts
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.cached_tokens) == (360, 20, 350)
    assert (ctx.usage.response_model, ctx.usage.finish_reasons) == ("claude-3-sonnet-20240229", ("end_turn",))


def test_bedrock_stream_usage_survives_an_unreadable_event() -> None:
    """A frame whose payload is not JSON must not hide the metadata frame after it."""
    body = event_frame("metadata", b"not json") + BEDROCK_CONVERSE_STREAM
    case = CASES[[c.name for c in CASES].index("bedrock-converse-stream-metadata")]
    for size in (1, 7, len(body)):
        usage = run_tap(case, body, size)
        assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (125, 40, 100)


def test_bedrock_exception_frame_carries_no_usage() -> None:
    body = b"".join([event_frame("messageStart", b'{"role":"assistant"}'),
                     encode_message({":message-type": "exception", ":exception-type": "throttlingException",
                                     ":content-type": "application/json"}, b'{"message":"slow down"}')])
    case = CASES[[c.name for c in CASES].index("bedrock-converse-stream-metadata")]
    usage = run_tap(case, body, 7)
    assert (usage.input_tokens, usage.output_tokens) == (None, None)


# ------------------------------------------------------------------ a tap never raises

_CONTENT_TYPES = [JSON, SSE, EVENTSTREAM, NDJSON]
_ADAPTERS = [OpenAIAdapter, AnthropicAdapter, BedrockAdapter, OllamaAdapter]


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    adapter=st.sampled_from(_ADAPTERS),
    ctype=st.sampled_from(_CONTENT_TYPES),
    gz=st.booleans(),
    data=st.one_of(
        st.binary(max_size=600),
        st.builds(_mutate, st.sampled_from([c.body for c in CASES]),
                  st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6)),
    ),
    size=st.integers(1, 64),
)
def test_tap_never_raises_on_garbage(adapter: type[Adapter], ctype: tuple[bytes, bytes], gz: bool, data: bytes,
                                     size: int) -> None:
    headers = [ctype] + ([(b"content-encoding", b"gzip")] if gz else [])
    case = Case("fuzz", adapter, "/x", headers, data, (None, None, None))
    run_tap(case, data, size)


# Structurally valid responses whose usage fields have the wrong types. Only the families whose
# taps guard their field types are listed; see the report for OpenAI/Anthropic.
_odd = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=3),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@settings(max_examples=80, deadline=None)
@given(fields=st.dictionaries(
    st.sampled_from(["inputTokens", "outputTokens", "cacheReadInputTokens", "cacheWriteInputTokens",
                     "inputTokenCount", "outputTokenCount", "cacheReadInputTokenCount"]), _odd, max_size=4),
    wrap=st.booleans())
def test_bedrock_tap_survives_odd_usage_types(fields: dict[str, Any], wrap: bool) -> None:
    converse = Case("c", BedrockAdapter, "/model/m/converse", [JSON], b"", (None, None, None))
    run_tap(converse, json.dumps({"usage": fields if wrap else list(fields)}).encode(), 5)
    stream = b"".join([event_frame("metadata", json.dumps({"usage": fields}).encode()),
                       chunk_event({"type": "message_stop", "amazon-bedrock-invocationMetrics": fields})])
    usage = run_tap(Case("s", BedrockAdapter, "/model/m/converse-stream", [EVENTSTREAM], b"", (None, None, None)),
                    stream, 3)
    for value in (usage.input_tokens, usage.output_tokens, usage.cached_tokens):
        assert value is None or (type(value) is int and value >= 0)


@settings(max_examples=60, deadline=None)
@given(prompt=_odd, out=_odd, streamed=st.booleans())
def test_ollama_tap_keeps_only_integer_counts(prompt: Any, out: Any, streamed: bool) -> None:
    done = {"model": "m", "done": True, "prompt_eval_count": prompt, "eval_count": out}
    body = ndjson(done) if streamed else json.dumps(done).encode()
    usage = run_tap(Case("o", OllamaAdapter, "/api/chat", [NDJSON if streamed else JSON], body,
                         (None, None, None)), body, 4)
    for value in (usage.input_tokens, usage.output_tokens):
        assert type(value) is int and value >= 0
