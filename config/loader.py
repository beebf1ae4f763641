"""Load, expand and validate a gateway YAML file into `config.models.Config`.

Contract:
- `${VAR}` and `${VAR:-default}` are expanded in every string value. This module is the only code
  that reads the environment.
- A provider with an unset `${VAR}` (no default) is disabled with a warning naming the variable; an
  unset variable anywhere else is an error.
- Every error is a `ConfigError` whose message names the file, the line and the dotted field. The
  loader reports every problem it finds in one pass: the raised error's `errors` lists them all in
  file order (one line each in its message), the first one's location being the error's own.
- Durations accept `500ms`, `60s`, `2m`, `1h` or a bare number of seconds; sizes accept `32MiB` etc.
- Only `yaml.SafeLoader` is used.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from config import models as m

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-)?")  # the head of ${VAR} / ${VAR:-default}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
_DURATION_FIELDS = {"timeout", "connect", "first_byte", "idle", "redis_timeout", "circuit_base_ejection",
                    "header_timeout", "body_timeout", "ttl", "coalesce_wait"}
_SIZE_FIELDS = {"max_body_bytes", "max_header_bytes", "max_entry_bytes", "max_bytes"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_AZURE_DEPLOYMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BEDROCK_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,2047}$")
DEFAULT_PATH = Path("config/gateway.yaml")


class ConfigError(ValueError):
    """A config problem, located as `file:line: field: message`; `errors` holds it and any others found."""

    def __init__(self, source: str, line: int | None, field: str, message: str) -> None:
        self.source, self.line, self.field = source, line, field
        where = f"{source}:{line}" if line else source
        self.errors: list[ConfigError] = [self]
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")

    @classmethod
    def of(cls, errors: list["ConfigError"]) -> "ConfigError":
        """One error standing for several: the first (in file order) locates it; the message lists all."""
        unique = list({str(e): e for e in sorted(errors, key=lambda e: e.line or 0)}.values())
        if len(unique) == 1:
            return unique[0]
        combined = cls(unique[0].source, unique[0].line, unique[0].field, "")
        combined.args = ("\n".join(str(e) for e in unique),)
        combined.errors = unique
        return combined


class _Reported(Exception):
    """A value could not be built because of errors already recorded in `_Doc.errors`."""


_FAILED = object()


class _Doc:
    """The parsed YAML tree plus the line of every dotted path, and the unset variables seen."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source, self.env = source, env
        self.lines: dict[str, int] = {}
        self.unset: dict[str, list[str]] = {}
        self.errors: list[ConfigError] = []

    def report(self, path: str, message: str) -> None:
        """Record a problem and go on, so that one run names every problem of the file."""
        self.errors.append(self.error(path, message))

    def attempt(self, build: Any, *args: Any) -> Any:
        """`build(*args)`, or `_FAILED` with its error recorded: one bad value never hides the next."""
        try:
            return build(*args)
        except ConfigError as exc:
            self.errors.append(exc)
        except _Reported:
            pass
        return _FAILED

    def error(self, path: str, message: str) -> ConfigError:
        line = self.lines.get(path)
        probe = path
        while line is None and "." in probe:
            probe = probe.rsplit(".", 1)[0]
            line = self.lines.get(probe)
        return ConfigError(self.source, line, path, message)

    def expand(self, path: str, text: str) -> str:
        """Expand `${VAR}` and `${VAR:-default}`; a default may itself hold `${...}` (expanded only if used)."""
        out: list[str] = []
        i = 0
        while (start := text.find("${", i)) >= 0:
            out.append(text[i:start])
            match = _VAR.match(text, start)
            end = _closing_brace(text, match.end()) if match else -1
            if match is None or end < 0 or (match.group(2) is None and end != match.end()):
                out.append("${")  # not a variable reference: keep it as written
                i = start + 2
                continue
            name = match.group(1)
            value = self.env.get(name)
            if match.group(2) is not None and not value:  # unset or empty: the default
                value = self.expand(path, text[match.end():end])
            elif value is None:
                self.unset.setdefault(path, []).append(name)
                value = ""
            out.append(value)
            i = end + 1
        out.append(text[i:])
        return "".join(out)

    def walk(self, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)  # a mapping entry has its key's line
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                child = f"{path}.{key}" if path else key
                self.lines[child] = key_node.start_mark.line + 1
                if key in out:
                    self.report(child, "duplicate key")
                    continue
                out[key] = self.walk(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        value = yaml.SafeLoader.construct_scalar(yaml.SafeLoader(""), node)
        if "${" in value:
            expanded = self.expand(path, value)
            return yaml.safe_load(expanded) if node.style is None and expanded else expanded
        return yaml.safe_load(value) if node.style is None and value else value


def _closing_brace(text: str, pos: int) -> int:
    """Index of the `}` closing a `${` whose body starts at `pos` (nested `${...}` skipped), or -1."""
    depth = 1
    while pos < len(text):
        if text.startswith("${", pos):
            depth, pos = depth + 1, pos + 2
            continue
        if text[pos] == "}":
            depth -= 1
            if depth == 0:
                return pos
        pos += 1
    return -1


def parse_duration(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"invalid duration {value!r} (use e.g. 500ms, 60s, 2m)")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def parse_size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"invalid size {value!r} (use e.g. 32MiB)")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def _convert(doc: _Doc, path: str, hint: Any, value: Any, name: str) -> Any:
    if name in _DURATION_FIELDS:
        return parse_duration(value)
    if name in _SIZE_FIELDS:
        return parse_size(value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(doc, path, args[0], value, name)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a hint is a class, never an instance
        if value is None:
            return hint()
        return _build(doc, path, hint, value)
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise doc.error(path, "expected a list")
        (item,) = typing.get_args(hint)
        items = [doc.attempt(_convert, doc, f"{path}[{i}]", item, v, "") for i, v in enumerate(value)]
        return [i for i in items if i is not _FAILED]  # a bad item is reported and left out
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise doc.error(path, "expected a mapping")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise doc.error(path, f"expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):  # a quoted "${PORT:-8080}" is still a number
            try:
                value = float(value) if hint is float or "." in value else int(value)
            except ValueError:
                raise doc.error(path, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise doc.error(path, f"expected a number, got {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise doc.error(path, f"expected a whole number, got {value!r}")
        if value < 0:
            raise doc.error(path, "must not be negative")
        return hint(value)
    if hint is m.Secret:
        return m.Secret("" if value is None else str(value))
    if hint is str:
        if isinstance(value, (dict, list)):
            raise doc.error(path, "expected a string")
        return "" if value is None else str(value)
    return value


def _build(doc: _Doc, path: str, cls: type, data: Any, skip: tuple[str, ...] = ()) -> Any:
    if not isinstance(data, dict):
        raise doc.error(path, "expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    kwargs: dict[str, Any] = {}
    failed: set[str] = set()
    for key, value in data.items():  # a bad field is reported and keeps its default: the others are still checked
        child = f"{path}.{key}" if path else key
        if key not in names:
            shown = sorted((names - _INTERNAL) | ({"deployments"} if cls is m.Deployment else set()))
            doc.report(child, f"unknown field (expected one of: {', '.join(shown)})")
            continue
        try:
            kwargs[key] = _convert(doc, child, hints[key], value, key)
        except (ValueError, _Reported) as exc:  # a ConfigError is located already; other ValueErrors here
            failed.add(key)
            if isinstance(exc, ValueError):
                doc.errors.append(exc if isinstance(exc, ConfigError) else doc.error(child, str(exc)))
    required = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in failed]
    if missing:
        raise doc.error(path, f"missing required field {', '.join(repr(n) for n in missing)}")
    if required:  # a required field was there but invalid (already reported)
        raise _Reported
    return cls(**kwargs)


# Filled in by the loader itself, never from YAML.
_INTERNAL = frozenset({"name", "family", "disabled_reason", "deployment_map"})
_TOP = {"gateway": m.GatewaySettings, "state": m.StateSettings, "auth": m.AuthSettings,
        "monitoring": m.MonitoringSettings, "server": m.ServerSettings, "cache": m.CacheSettings}


def _provider(doc: _Doc, name: str, data: Any) -> m.Deployment:
    path = f"providers.{name}"
    if not _NAME.match(name):
        raise doc.error(path, "provider names use letters, digits, '.', '_' and '-'")
    if data is not None and not isinstance(data, dict):
        raise doc.error(path, "expected a mapping")
    data = dict(data or {})
    for key in _INTERNAL & set(data):
        raise doc.error(f"{path}.{key}", "unknown field")
    kind = data.pop("type", name)
    if kind not in m.DEPLOYMENT_TYPES:
        raise doc.error(f"{path}.type", f"unknown type {kind!r} (one of: {', '.join(m.DEPLOYMENT_TYPES)})")
    if "deployments" in data:  # Azure: model -> deployment name
        data["deployment_map"] = data.pop("deployments")
    dep = _build(doc, path, m.Deployment, {**data, "name": name, "type": kind,
                                          "family": m.DEPLOYMENT_TYPES[kind]})
    if kind == "bedrock" and not dep.region and not dep.base_url:
        dep.region = "us-east-1"
    if dep.region and not re.fullmatch(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$", dep.region):
        doc.report(f"{path}.region", f"invalid AWS region {dep.region!r}")
    if not dep.base_url:
        defaults = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com",
                    "ollama": "http://localhost:11434"}
        if kind == "bedrock":
            dep.base_url = f"https://bedrock-runtime.{dep.region}.amazonaws.com"
        elif kind in defaults:
            dep.base_url = defaults[kind]
        else:
            doc.report(f"{path}.base_url", f"deployments of type {kind} need a base_url")
    if dep.base_url and not re.fullmatch(r"^https?://[^/?#@\s]+(/[^?#\s]*)?$", dep.base_url):
        doc.report(f"{path}.base_url", f"not an http(s) URL without query or credentials: {dep.base_url!r}")
    dep.base_url = dep.base_url.rstrip("/")
    unset = sorted({v for p, names in doc.unset.items() if p.startswith(path + ".") for v in names})
    if unset:
        dep.enabled = False
        dep.disabled_reason = f"unset variable {', '.join(unset)}"
    elif kind in ("openai", "anthropic", "azure_openai") and not dep.api_key:
        dep.enabled, dep.disabled_reason = False, "no api_key"
    return dep


def parse_config(text: str, source: str = "<config>", env: Mapping[str, str] | None = None) -> m.Config:
    doc = _Doc(source, os.environ if env is None else env)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(source, mark.line + 1 if mark else None, "", "invalid YAML: " + " ".join(str(getattr(exc, "problem", None) or exc).split())) from None
    raw = doc.walk(node, "") if node is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(source, 1, "", "the top level must be a mapping")
    cfg = m.Config(source=Path(source) if source != "<config>" else None)
    for key, value in raw.items():  # every section is checked, whatever the others hold
        if key in _TOP:
            if (section := doc.attempt(_convert, doc, key, _TOP[key], value, key)) is not _FAILED:
                setattr(cfg, key, section)
        elif key == "app":
            cfg.app = value if isinstance(value, dict) else {}
        elif key != "providers":
            doc.report(key, f"unknown section (expected one of: app, providers, {', '.join(_TOP)})")
    providers = raw.get("providers") or {}
    if not isinstance(providers, dict):
        doc.report("providers", "expected a mapping of deployment name to settings")
        providers = {}
    built = [doc.attempt(_provider, doc, name, data) for name, data in providers.items()]
    cfg.providers = [dep for dep in built if dep is not _FAILED]
    for path, names in doc.unset.items():
        if not path.startswith("providers."):
            doc.report(path, f"variable {', '.join(names)} is not set")
    otel = cfg.monitoring.otel
    if not otel.endpoint:  # the standard OTel variables, when the config names no collector
        otel.endpoint = doc.env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        if doc.env.get("OTEL_EXPORTER_OTLP_PROTOCOL") in ("grpc", "http/protobuf"):
            otel.protocol = doc.env["OTEL_EXPORTER_OTLP_PROTOCOL"]
    _validate(doc, cfg)
    if doc.errors:
        raise ConfigError.of(doc.errors)
    for dep in cfg.providers:
        if not dep.enabled and dep.disabled_reason:
            cfg.warnings.append(f"provider {dep.name!r} disabled: {dep.disabled_reason}")
    return cfg


def _validate(doc: _Doc, cfg: m.Config) -> None:
    def choice(path: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            doc.report(path, f"{value!r} is not one of: {', '.join(a for a in allowed if a)}")

    for path, name in [("gateway.routing_strategy", cfg.gateway.routing_strategy)] + [
            (f"gateway.routing_overrides.{model}", value) for model, value in cfg.gateway.routing_overrides.items()]:
        if "." not in name and ":" not in name:  # a dotted name is a custom strategy by import path
            choice(path, name, m.ROUTING_STRATEGIES)
    choice("state.on_redis_error", cfg.state.on_redis_error, m.REDIS_ERROR_MODES)
    choice("gateway.upstream_transport", cfg.gateway.upstream_transport, ("httptools", "aiohttp"))
    choice("auth.mode", cfg.auth.mode, ("keys", "none"))
    choice("monitoring.otel.protocol", cfg.monitoring.otel.protocol, ("grpc", "http/protobuf"))
    if not 0.0 <= cfg.monitoring.tracing.sample_rate <= 1.0:
        doc.report("monitoring.tracing.sample_rate", "must be between 0 and 1")
    if cfg.state.replicas < 1:
        doc.report("state.replicas", "must be at least 1")
    choice("cache.scope", cfg.cache.scope, m.CACHE_SCOPES)
    if cfg.cache.ttl < 1:
        doc.report("cache.ttl", "must be at least 1s")
    seen: set[str] = set()
    for i, key in enumerate(cfg.auth.keys):
        path = f"auth.keys[{i}]"
        if not _NAME.match(key.id) or key.id in seen:
            doc.report(f"{path}.id", f"missing, malformed or duplicate key id {key.id!r}")
        seen.add(key.id)
        if not re.fullmatch(r"[0-9a-f]{64}", key.sha256.lower()):
            doc.report(f"{path}.sha256", "must be the 64-hex-digit sha256 of the key")
        key.sha256 = key.sha256.lower()
        if bool(key.aws_access_key_id) != bool(key.aws_secret_access_key):
            doc.report(path, "aws_access_key_id and aws_secret_access_key go together")
        for family in key.families:
            choice(f"{path}.families", family, m.FAMILIES)
    for dep in cfg.providers:  # names templated into upstream paths are validated here and per request
        pattern = {"azure_openai": _AZURE_DEPLOYMENT, "bedrock": _BEDROCK_MODEL}.get(dep.type)
        for model, name in dep.deployment_map.items():
            if pattern is not None and not pattern.fullmatch(name):
                doc.report(f"providers.{dep.name}.deployments.{model}", f"invalid deployment name {name!r}")


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """--config, then LLM_GATEWAY_CONFIG, then ./config/gateway.yaml."""
    return Path(path or os.environ.get("LLM_GATEWAY_CONFIG") or DEFAULT_PATH)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> m.Config:
    target = resolve_path(path)
    try:
        text = target.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(target), None, "", f"cannot read config: {exc.strerror}") from None
    return parse_config(text, str(target), env)
