"""The product type-checks: mypy over proxy/, middlewares/, providers/ and config/ reports nothing.

- `python -m mypy` from the repo root, configured by pyproject.toml `[tool.mypy]` (which folders, how
  strict; `warn_unused_ignores`, so a `# type: ignore` that no longer hides anything fails too).
- Every `# type: ignore` left in the product names its error code(s) and says why after it:
  `# type: ignore[union-attr]  # the router set ctx.deployment`. A bare or unexplained one fails.
"""
from __future__ import annotations

import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("proxy", "middlewares", "providers", "config")
_IGNORE = re.compile(r"type:\s*ignore")
# `type: ignore[code, code]`, then a comment of its own with the reason (a few characters at least)
_JUSTIFIED = re.compile(r"type:\s*ignore\[[a-z0-9-]+(?:\s*,\s*[a-z0-9-]+)*\]\s*#\s*\S.{2,}")


def test_mypy_is_clean() -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is required for the type check: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"mypy exited {result.returncode}:\n{result.stdout}{result.stderr}", pytrace=False)


def test_mypy_config_checks_the_product_folders() -> None:
    import tomllib

    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert set(FOLDERS) <= set(mypy["files"])
    assert mypy["warn_unused_ignores"] is True
    assert mypy.get("ignore_missing_imports") is not True, "list the untyped packages in [[tool.mypy.overrides]]"


def _ignores(path: Path) -> list[tuple[int, str]]:
    """(line, comment) of each comment in `path` holding `type: ignore` (comments only, never strings)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [(tok.start[0], tok.string) for tok in tokens if tok.type == tokenize.COMMENT and _IGNORE.search(tok.string)]


def test_every_type_ignore_names_its_code_and_reason() -> None:
    offenders = []
    for path in sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")):
        for line, comment in _ignores(path):
            if not all(_JUSTIFIED.match(comment, m.start()) for m in _IGNORE.finditer(comment)):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {comment}")
    if offenders:
        pytest.fail("each `# type: ignore` needs its error code and a reason after it, e.g. "
                    "`# type: ignore[union-attr]  # the router set ctx.deployment`:\n" + "\n".join(offenders),
                    pytrace=False)
