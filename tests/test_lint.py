"""The package stays lint-clean (ruff) and strictly typed (mypy), as pyproject.toml configures them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff():
    subprocess.run([sys.executable, "-m", "ruff", "check", "kerb_jupyter", "tests", "benchmarks"], cwd=ROOT,
                   check=True)


def test_mypy_strict():
    out = subprocess.run([sys.executable, "-m", "mypy", "kerb_jupyter"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
