"""Shared fixtures: the real control plane (etcd + kube-apiserver + kube-controller-manager)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmthunder.lab.controlplane import ControlPlane, start_control_plane

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One API server for the session, with the project's CRDs applied as a user would."""
    cp = start_control_plane(tmp_path_factory.mktemp("control-plane"))
    try:
        cp.install_vmthunder_crds()
        yield cp
    finally:
        cp.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from fault_table import table

    lines = table()
    if lines:
        terminalreporter.section("faults injected in the lab")
        for line in lines:
            terminalreporter.write_line(line)
