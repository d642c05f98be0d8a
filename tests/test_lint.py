"""The code's own checks: ruff (lint) and mypy --strict on the packages, as pyproject.toml
configures them. A type or lint error fails the suite like any other test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["operator/vmthunder", "csi/vmthunder", "node/vmthunder", "lab/vmthunder"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    p = run("ruff", "check", ".")
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_strict_finds_nothing_in_the_packages() -> None:
    p = run("mypy", *PACKAGES)
    assert p.returncode == 0, p.stdout + p.stderr
