"""ruff, as configured in pyproject.toml, finds nothing: style is checked where it is written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rooms_stay_small():
    """No module over 300 lines and no function over 60 in the package and the service: one job each."""
    import ast

    too_big = []
    for path in sorted([*(ROOT / "src" / "extendserve").rglob("*.py"), *(ROOT / "service").glob("*.py")]):
        text = path.read_text()
        if text.count("\n") > 300:
            too_big.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_big.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, too_big
    assert (ROOT / "service" / "service.py").read_text().count("\n") <= 200
