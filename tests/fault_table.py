"""The faults the lab tests inject, gathered into one table printed at the end of the run
(conftest.pytest_terminal_summary): what was done, whether everything survived it, how many
bytes were checked against the image's sha256, and what was left behind."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    fault: str
    injected: int  # how many times
    survived: bool  # every VM read the exact image, every cache completed or passed through
    bytes_verified: int  # read back and compared with the image's sha256
    leaks: int  # devices, sessions, exports or objects left behind


FAULTS: list[Fault] = []


def record(fault: str, *, injected: int = 1, survived: bool, bytes_verified: int,
           leaks: int = 0) -> None:
    """Notes a fault before the test asserts on it, so failures show in the table too."""
    FAULTS.append(Fault(fault, injected, survived, bytes_verified, leaks))


def table() -> list[str]:
    if not FAULTS:
        return []
    width = max(len(f.fault) for f in FAULTS)
    lines = [f"{'fault':<{width}}  injected  survived  verified MB  leaks"]
    for f in FAULTS:
        lines.append(f"{f.fault:<{width}}  {f.injected:>8}  {'yes' if f.survived else 'NO':>8}"
                     f"  {f.bytes_verified / 1e6:>11.1f}  {f.leaks:>5}")
    return lines
