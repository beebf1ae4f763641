"""The adapter registry and the path table that maps a gateway path to an inbound API family.

Contract: `route(raw_path, has_anthropic_version)` returns `(family, family_relative_raw_path)` or
None for a path no family owns. Prefixed paths (`/openai/v1/...`, `/anthropic/v1/...`,
`/bedrock/model/...`, `/ollama/api/...`) and the bare ones follow the path table in the README ("Point an SDK at the gateway").
`build_adapters()` returns one adapter instance per family.
"""
from __future__ import annotations

from providers.anthropic import AnthropicAdapter
from providers.base import Adapter
from providers.bedrock import BedrockAdapter
from providers.ollama import OllamaAdapter
from providers.openai import OpenAIAdapter

FAMILIES = ("openai", "anthropic", "bedrock", "ollama")


def build_adapters() -> dict[str, Adapter]:
    bedrock = BedrockAdapter()
    return {"openai": OpenAIAdapter(), "anthropic": AnthropicAdapter(bedrock), "bedrock": bedrock,
            "ollama": OllamaAdapter()}


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/") or path.startswith(root + "?")


def route(path: str, anthropic_version: bool) -> tuple[str, str] | None:
    if path.startswith("/openai/"):
        rest = path[7:]
        return ("openai", rest) if _is_under(rest, "/v1") and rest != "/v1" else None
    if path.startswith("/anthropic/"):
        rest = path[10:]
        return ("anthropic", rest) if rest.startswith("/v1/") else None
    if path.startswith("/bedrock/"):
        rest = path[8:]
        return ("bedrock", rest) if rest.startswith("/model/") else None
    if path.startswith("/ollama/"):
        rest = path[7:]
        return ("ollama", rest) if rest.startswith("/api/") else None
    if path.startswith("/v1/"):
        if _is_under(path, "/v1/messages"):
            return "anthropic", path
        if _is_under(path, "/v1/models") and anthropic_version:
            return "anthropic", path
        return "openai", path
    if path.startswith("/model/"):
        return "bedrock", path
    if path.startswith("/api/"):
        return "ollama", path
    return None


__all__ = ["Adapter", "FAMILIES", "build_adapters", "route"]
