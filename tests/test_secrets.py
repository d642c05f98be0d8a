"""CHAP passwords never reach an error message, a logged traceback or a replica's status.

iscsiadm takes CHAP settings on its command line, and rtslib may quote a value it could not
write; the errors the wrappers raise end up in `log.exception` output and, through the agent,
in ImageReplica status. The host has no iSCSI, so iscsiadm is a stand-in script that behaves
like the worst real one (it repeats its whole command line on stderr), and rtslib is a
stand-in module whose CHAP password setter fails quoting the value. Unit tests of the
redaction logic: the kernel paths themselves run in the lab tests.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
import types
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from vmthunder.node import iscsi, lio
from vmthunder.node.agent import Agent, Report, plan_status
from vmthunder.node.cache import CacheState
from vmthunder.node.iscsi import Chap, IscsiError, TargetAddress

PASSWORD = "s3cret-Chap-pass"
MUTUAL = "mutual-s3cret-pass"
CHAP = Chap("node-user", PASSWORD, "target-user", MUTUAL)
TARGET = TargetAddress("10.0.0.1:3260", "iqn.2026-01.io.vmthunder:golden.node-a")

FAKE_ISCSIADM = """#!/bin/sh
# Repeats its command line on stderr (as some iscsiadm errors do) and fails when the
# argument named by FAIL_ON is present; with FAIL_MODE=sleep it hangs instead.
for a in "$@"; do
  if [ "$a" = "$FAIL_ON" ]; then
    if [ "$FAIL_MODE" = sleep ]; then sleep 5; fi
    echo "iscsiadm: cannot apply: $*" >&2
    exit 7
  fi
done
exit 0
"""


def leaks(text: str) -> bool:
    return PASSWORD in text or MUTUAL in text


def rendered(e: BaseException) -> str:
    """Everything a log line of the error shows: message, traceback, chained causes."""
    record = logging.LogRecord("t", logging.ERROR, __file__, 0, "failed", None,
                               (type(e), e, e.__traceback__))
    return "".join(traceback.format_exception(e)) + logging.Formatter().format(record)


@pytest.fixture
def fake_iscsiadm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("iscsiadm", FAKE_ISCSIADM), ("iscsid", "#!/bin/sh\nexit 0\n"),
                       ("modprobe", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setattr(iscsi, "ISCSIADM", str(bin_dir / "iscsiadm"))
    yield


def login_error(monkeypatch: pytest.MonkeyPatch, fail_on: str, mode: str = "") -> IscsiError:
    monkeypatch.setenv("FAIL_ON", fail_on)
    monkeypatch.setenv("FAIL_MODE", mode)
    with pytest.raises(IscsiError) as info:
        iscsi.login(TARGET, CHAP, wait_disk=0.1)
    return info.value


@pytest.mark.parametrize("key", sorted(iscsi.SECRET_KEYS))
def test_iscsiadm_failure_setting_a_chap_password_names_the_key_but_not_the_password(
    fake_iscsiadm: None, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    e = login_error(monkeypatch, key)
    assert e.rc == 7 and key in str(e)
    assert iscsi.REDACTED in e.stderr  # the stand-in did repeat the value: it was replaced
    assert not leaks(str(e)) and not leaks(e.stderr) and not leaks(rendered(e))


def test_iscsiadm_timeout_setting_a_chap_password_does_not_chain_the_command_line(
    fake_iscsiadm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = subprocess.run

    def quick(*args: Any, **kwargs: Any) -> Any:  # iscsi waits 60 s; the test 1 s
        kwargs["timeout"] = min(kwargs.get("timeout") or 60, 1.0)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", quick)
    e = login_error(monkeypatch, "node.session.auth.password", mode="sleep")
    assert "timed out" in str(e) and "node.session.auth.password" in str(e)
    assert e.__cause__ is None and e.__suppress_context__
    assert not leaks(rendered(e))


def test_redact_replaces_every_secret_longest_first_and_ignores_empty_ones() -> None:
    text = f"a {PASSWORD} b {PASSWORD}x c {MUTUAL}"
    assert iscsi.redact(text, [PASSWORD, "", MUTUAL]) == "a *** b ***x c ***"
    assert iscsi.redact("pw-long pw", ["pw", "pw-long"]) == "*** ***"
    assert iscsi.redact("nothing here", [""]) == "nothing here"


def test_chap_repr_hides_both_passwords() -> None:
    assert not leaks(repr(CHAP)) and not leaks(repr(lio.ExportSpec(
        "iqn.x", "vmt-golden", "/dev/mapper/vmt-golden", "10.0.0.1", chap=CHAP)))


# --- LIO ------------------------------------------------------------------------------------

class RTSLibError(Exception):
    pass


def fake_rtslib() -> types.ModuleType:
    """Just enough of rtslib_fb for ensure_export to reach the ACL's CHAP settings."""

    class Obj:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.network_portals: list[Any] = []
            self.luns: list[Any] = []
            self.node_acls: list[Any] = []
            self.mapped_luns: list[Any] = []
            self.storage_objects: list[Any] = []

        def set_attribute(self, name: str, value: str) -> None:
            pass

    class NodeACL(Obj):
        chap_userid = ""

        @property
        def chap_password(self) -> str:
            return ""

        @chap_password.setter
        def chap_password(self, value: str) -> None:
            raise RTSLibError(f"Cannot set auth/password to {value!r}: Invalid argument")

    mod = types.ModuleType("rtslib_fb")
    for name in ("RTSRoot", "BlockStorageObject", "FabricModule", "Target", "TPG",
                 "NetworkPortal", "LUN", "MappedLUN"):
        setattr(mod, name, Obj)
    mod.NodeACL = NodeACL  # type: ignore[attr-defined]
    return mod


def test_lio_error_setting_a_chap_password_carries_neither_password_nor_a_chained_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rtslib_fb", fake_rtslib())
    monkeypatch.setattr(lio, "CONFIGFS", str(tmp_path))  # present: no modprobe
    spec = lio.ExportSpec("iqn.2026-01.io.vmthunder:golden.node-a", "vmt-golden",
                          "/dev/mapper/vmt-golden", "10.0.0.1", chap=CHAP,
                          initiators=("iqn.2026-01.io.vmthunder:node-b",))
    with pytest.raises(lio.LioError) as info:
        lio.ensure_export(spec)
    e = info.value
    assert "RTSLibError" in str(e) and "auth/password" in str(e) and iscsi.REDACTED in str(e)
    assert not leaks(rendered(e))


# --- the agent's status ---------------------------------------------------------------------

class RecordingKube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, Mapping[str, Any]]] = []

    def patch_status(self, name: str, status: Mapping[str, Any]) -> None:
        self.patches.append((name, status))


def test_replica_status_after_a_chap_login_failure_holds_the_error_but_no_password(
    fake_iscsiadm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = login_error(monkeypatch, "node.session.auth.password_in")
    kube = RecordingKube()
    agent = Agent("node-a", kube, None, None, "10.0.0.2",  # type: ignore[arg-type]
                  initiator="iqn.2026-01.io.vmthunder:node-a")
    replica = {"metadata": {"name": "golden.node-a"}, "status": {"phase": "Attaching"}}
    agent._report_failure(replica, e)
    [(name, status)] = kube.patches
    assert name == "golden.node-a" and status["phase"] == "Failed"
    assert "IscsiError" in status["message"] and "password_in" in status["message"]
    assert not leaks(json.dumps(status))

    report = Report("Failed", CacheState("absent"), 0, 0, 0,
                    TargetAddress("10.0.0.2:3260", "iqn.x"), "", "iqn.2026-01.io.vmthunder:node-a",
                    str(e))
    planned = plan_status(report, status, datetime(2026, 1, 1, tzinfo=UTC))
    assert "password_in" in planned["message"]
    assert not leaks(json.dumps(planned))
