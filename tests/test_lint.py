"""No eval, exec, pickle or unsafe YAML load anywhere in the product: CI runs only pytest, so the lint runs here.

- `ruff check` with the bandit rules (`S`, configured in pyproject.toml `[tool.ruff.lint]`) over proxy/,
  middlewares/, providers/ and config/ must report nothing. A justified exception is a `# noqa: S...` with
  a reason on that line, or a per-file ignore with a reason in pyproject.toml.
- A second, dependency-free check walks the AST for the worst offenders, so they are caught even where a
  per-file ignore is broad.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("proxy", "middlewares", "providers", "config")
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "jsonpickle"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _ruff() -> list[str]:
    try:
        import ruff  # noqa: F401

        return [sys.executable, "-m", "ruff"]
    except ImportError:
        found = shutil.which("ruff")
        if found is None:
            pytest.fail("ruff is required for the security lint: pip install -e '.[test]'")
        return [found]


def test_ruff_bandit_rules_are_clean() -> None:
    result = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", *FOLDERS],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "select" not in result.stderr.lower() or result.returncode == 0, result.stderr
    assert result.returncode == 0, "security lint findings:\n" + result.stdout + result.stderr


def test_ruff_config_selects_the_bandit_rules() -> None:
    import tomllib

    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "S" in lint["select"]
    for rule in ("S102", "S307", "S301", "S506"):
        assert rule not in lint.get("ignore", []), rule
        assert all(rule not in rules for rules in lint.get("per-file-ignores", {}).values()), rule


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dynamic_code_or_unsafe_deserialisation(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                problems.append(f"{node.lineno}: {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if func.value.id == "yaml" and func.attr in UNSAFE_YAML:
                    loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                    if loader is None and len(node.args) > 1:
                        loader = node.args[1]
                    if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                        problems.append(f"{node.lineno}: yaml.{func.attr} without SafeLoader")
                if func.value.id in FORBIDDEN_MODULES:
                    problems.append(f"{node.lineno}: {func.value.id}.{func.attr}()")
        elif isinstance(node, ast.Import):
            problems += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            problems.append(f"{node.lineno}: from {node.module} import ...")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)
