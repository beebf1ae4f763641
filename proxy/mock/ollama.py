"""Ollama native wire format for the mock provider (deployment base_url `http://host:port`).

Contract: `handle(ex, path)` serves POST /api/chat and /api/generate (NDJSON
`application/x-ndjson` when "stream" is true or absent, one JSON object when false; the final object
has "done": true, done_reason and nanosecond durations, prompt_eval_count = len(body)//4 (min 1),
eval_count = words emitted), POST /api/embed, POST /api/embeddings (legacy), GET/HEAD /api/tags,
POST /api/show, GET /api/version and GET/HEAD / ("Ollama is running"); False otherwise.
`error(status, message, kind)` renders `{"error": message}`; in a stream the error is a final line.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from proxy.mock.app import Exchange

REQUEST_ID_HEADER = None
NDJSON = b"application/x-ndjson"
DEFAULT_MODELS = ["llama3.2:latest", "qwen2.5:7b", "nomic-embed-text:latest"]
_DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"


def error(status: int, message: str, kind: str | None = None) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return orjson.dumps({"error": message}), []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _details(model: str) -> dict[str, Any]:
    family = model.split(":")[0].rstrip("0123456789.") or "llama"
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}


def _final(ex: "Exchange", model: str, chat: bool, n_in: int, n_out: int) -> dict[str, Any]:
    total = max(1, time.perf_counter_ns() - ex.started_ns)
    out: dict[str, Any] = {"model": model, "created_at": _now()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason="stop", total_duration=total, load_duration=total // 10,
               prompt_eval_count=n_in, prompt_eval_duration=total // 5, eval_count=n_out,
               eval_duration=total - total // 10 - total // 5)
    return out


async def _generate(ex: "Exchange", chat: bool) -> None:
    req = ex.json_body()
    model = str(req.get("model") or DEFAULT_MODELS[0])
    pieces, n_out = ex.completion(model)
    n_in = ex.input_tokens
    if req.get("stream", True) is False:
        out = _final(ex, model, chat, n_in, n_out)
        text = "".join(pieces)
        if chat:
            out["message"]["content"] = text
        else:
            out["response"] = text
        await ex.json(out)
        return
    created = _now()
    deltas = [_line({"model": model, "created_at": created,
                     **({"message": {"role": "assistant", "content": p}} if chat else {"response": p}),
                     "done": False}) for p in pieces]
    await ex.stream(NDJSON, [], deltas, lambda: [_line(_final(ex, model, chat, n_in, n_out))],
                    _line({"error": "simulated mid-stream error"}))


async def _embed(ex: "Exchange", legacy: bool) -> None:
    req = ex.json_body()
    model = str(req.get("model") or DEFAULT_MODELS[-1])
    if legacy:
        await ex.json({"embedding": ex.vector(str(req.get("prompt", "")), 16)})
        return
    raw = req.get("input", "")
    inputs = [raw] if isinstance(raw, str) else [str(x) for x in raw]
    total = max(1, time.perf_counter_ns() - ex.started_ns)
    await ex.json({"model": model, "embeddings": [ex.vector(x, 16) for x in inputs],
                   "total_duration": total, "load_duration": total // 10,
                   "prompt_eval_count": ex.input_tokens})


async def handle(ex: "Exchange", path: str) -> bool:
    method = ex.method
    if method == "POST":
        if path in ("/api/chat", "/api/generate"):
            await _generate(ex, path == "/api/chat")
        elif path in ("/api/embed", "/api/embeddings"):
            await _embed(ex, path == "/api/embeddings")
        elif path == "/api/show":
            req = ex.json_body()
            model = str(req.get("model") or req.get("name") or DEFAULT_MODELS[0])
            await ex.json({"modelfile": f"FROM {model}\n", "parameters": "stop \"<|eot_id|>\"",
                           "template": "{{ .Prompt }}", "details": _details(model),
                           "model_info": {"general.architecture": _details(model)["family"],
                                          "general.parameter_count": 3212749888},
                           "capabilities": ["completion"], "modified_at": "2025-01-01T00:00:00Z"})
        else:
            return False
        return True
    if method not in ("GET", "HEAD"):
        return False
    if path == "/api/tags":
        await ex.json({"models": [
            {"name": m, "model": m, "modified_at": "2025-01-01T00:00:00Z", "size": 2019393189,
             "digest": _DIGEST, "details": _details(m)} for m in ex.models(DEFAULT_MODELS)]})
    elif path == "/api/version":
        await ex.json({"version": "0.6.3"})
    elif path == "/":
        await ex.respond(200, b"Ollama is running", b"text/plain; charset=utf-8")
    else:
        return False
    return True
