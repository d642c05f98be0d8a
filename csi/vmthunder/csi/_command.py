"""Runs one command for a kernel wrapper module; the wrapper names its own error type."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


class CommandError(Exception):
    """A command failed; carries its stderr. Each wrapper module subclasses it."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{argv[0]} {argv[1] if len(argv) > 1 else ''}: "
                         f"exit {returncode}: {stderr.strip()}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def run(argv: Sequence[str], error: type[CommandError], timeout: float = 60.0,
        ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if result.returncode not in ok_codes:
        raise error(argv, result.returncode, result.stderr or result.stdout)
    return result
