"""open-iscsi initiator: discovery, login/logout with CHAP, sessions and their disks.

Sessions are read from sysfs (the kernel's truth); iscsiadm changes them. Callers never see
a command line. Every failure raises IscsiError with iscsiadm's stderr, CHAP passwords
replaced by REDACTED: the error ends up in logs and in the replica's status.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

ISCSIADM = os.environ.get("VMT_ISCSIADM", "iscsiadm")
INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"
# iscsiadm exit codes: 15 = session exists, 21 = no objects found
RC_SESSION_EXISTS = 15
RC_NO_OBJECTS = 21
REDACTED: Final = "***"
RESCAN_AFTER = 1.5  # seconds a logged-in session's disk may take before we ask for a scan
# How long a read may wait at a live parent. A parent's reads queue while it has no parent of
# its own loaded yet or is being re-parented; at the SCSI layer's default (30 s) the read
# would be aborted, the LUN reset and the session dropped instead.
DISK_TIMEOUT_SECONDS = 300
# Node record keys whose values are secrets (iscsiadm takes them on its command line).
SECRET_KEYS: Final = frozenset({"node.session.auth.password", "node.session.auth.password_in"})


class IscsiError(RuntimeError):
    """An iscsiadm command failed; `stderr` is its error output."""

    def __init__(self, what: str, rc: int, stderr: str) -> None:
        super().__init__(f"iscsiadm {what} failed (rc={rc}): {stderr.strip()}")
        self.what = what
        self.rc = rc
        self.stderr = stderr


@dataclass(frozen=True)
class Chap:
    username: str
    password: str
    mutual_username: str | None = None
    mutual_password: str | None = None

    def __repr__(self) -> str:  # secrets never reach logs
        return f"Chap(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class TargetAddress:
    portal: str  # "ip:port"
    iqn: str
    lun: int = 0

    @property
    def ip(self) -> str:
        return self.portal.rsplit(":", 1)[0] if ":" in self.portal else self.portal

    @property
    def port(self) -> int:
        return int(self.portal.rsplit(":", 1)[1]) if ":" in self.portal else 3260

    @property
    def normalized_portal(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Session:
    sid: int
    iqn: str
    portal: str  # "ip:port"
    state: str  # LOGGED_IN, FAILED, FREE
    recovery_tmo: int
    disks: dict[int, str]  # lun -> /dev/sdX

    def disk(self, lun: int = 0) -> str | None:
        return self.disks.get(lun)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each non-empty secret replaced by REDACTED."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _run(what: str, args: Sequence[str], timeout: float = 60,
         ok: Sequence[int] = (), secrets: Sequence[str] = ()) -> tuple[int, str]:
    try:
        p = subprocess.run([ISCSIADM, *args], capture_output=True, text=True, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired:
        # Not chained: TimeoutExpired's text is the whole command line, secrets included.
        raise IscsiError(what, -1, f"timed out after {timeout:g} s") from None
    except FileNotFoundError as e:
        raise IscsiError(what, -1, str(e)) from None
    if p.returncode != 0 and p.returncode not in ok:
        raise IscsiError(what, p.returncode, redact(p.stderr, secrets))
    return p.returncode, p.stdout


def initiator_name() -> str:
    with open(INITIATOR_FILE) as f:
        for line in f:
            if line.startswith("InitiatorName="):
                return line.split("=", 1)[1].strip()
    raise IscsiError("initiator name", -1, f"no InitiatorName in {INITIATOR_FILE}")


def ensure_daemon() -> None:
    """Starts iscsid when no one runs it (lab guests have no systemd)."""
    for comm in glob.glob("/proc/[0-9]*/comm"):
        try:
            with open(comm) as f:
                if f.read().strip() == "iscsid":
                    return
        except OSError:
            continue
    try:
        subprocess.run(["modprobe", "-a", "iscsi_tcp", "sd_mod"], capture_output=True, check=False)
        # iscsid daemonizes: its child must not inherit our pipes, or a caller reading them
        # waits for an EOF that never comes.
        p = subprocess.run(["iscsid"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30, check=False,
                           start_new_session=True)
    except (subprocess.TimeoutExpired, FileNotFoundError) as e:
        raise IscsiError("start iscsid", -1, str(e)) from e
    if p.returncode != 0:
        raise IscsiError("start iscsid", p.returncode, "iscsid exited with an error")
    time.sleep(0.3)


def discover(portal: str) -> list[TargetAddress]:
    _, out = _run(f"discovery {portal}", ["-m", "discovery", "-t", "sendtargets", "-p", portal])
    result = []
    for line in out.splitlines():
        w = line.split()
        if len(w) == 2:
            result.append(TargetAddress(w[0].split(",")[0], w[1]))
    return result


def _node(t: TargetAddress) -> list[str]:
    return ["-m", "node", "-T", t.iqn, "-p", t.normalized_portal]


def _update(t: TargetAddress, settings: Sequence[tuple[str, str]]) -> None:
    """One iscsiadm for all of them (it takes several -n/-v pairs): each process costs about a
    second in an emulated guest, and a login waits for them."""
    args = [a for key, value in settings for a in ("-n", key, "-v", value)]
    _run(f"update {t.iqn} {', '.join(k for k, _ in settings)}",
         [*_node(t), "-o", "update", *args],
         secrets=[v for k, v in settings if k in SECRET_KEYS])


def sessions() -> list[Session]:
    result = []
    for path in sorted(glob.glob("/sys/class/iscsi_session/session*")):
        sid = int(os.path.basename(path)[len("session"):])

        def read(p: str) -> str:
            try:
                with open(p) as f:
                    return f.read().strip()
            except OSError:
                return ""

        conn = glob.glob(f"/sys/class/iscsi_connection/connection{sid}:*")
        ip = read(f"{conn[0]}/persistent_address") if conn else ""
        port = read(f"{conn[0]}/persistent_port") if conn else ""
        disks: dict[int, str] = {}
        for blk in glob.glob(f"{path}/device/target*/*:*:*:*/block/*"):
            lun = int(blk.split("/")[-3].split(":")[-1])
            disks[lun] = f"/dev/{os.path.basename(blk)}"
        tmo = read(f"{path}/recovery_tmo")
        result.append(Session(sid, read(f"{path}/targetname"), f"{ip}:{port}",
                              read(f"{path}/state"), int(tmo) if tmo.isdigit() else 0, disks))
    return result


def find_session(t: TargetAddress) -> Session | None:
    for s in sessions():
        if s.iqn == t.iqn and s.portal == t.normalized_portal:
            return s
    return None


def login(t: TargetAddress, chap: Chap | None = None, *, replacement_timeout: int = 120,
          wait_disk: float = 20.0) -> Session:
    """Logs in (idempotent) and waits for the LUN's disk; returns the session."""
    existing = find_session(t)
    if existing is None or existing.disk(t.lun) is None:
        ensure_daemon()
        try:
            _run(f"new node {t.iqn}", [*_node(t), "-o", "new"])
        except IscsiError:
            # An existing record is fine; anything else shows up in the update below.
            _run(f"show node {t.iqn}", [*_node(t)])
        settings = [("node.session.auth.authmethod", "CHAP" if chap else "None")]
        if chap is not None:
            settings += [("node.session.auth.username", chap.username),
                         ("node.session.auth.password", chap.password)]
            if chap.mutual_username and chap.mutual_password:
                settings += [("node.session.auth.username_in", chap.mutual_username),
                             ("node.session.auth.password_in", chap.mutual_password)]
        settings += [("node.session.timeo.replacement_timeout", str(replacement_timeout)),
                     ("node.startup", "manual")]
        _update(t, settings)
        if existing is None:
            secrets = (chap.password, chap.mutual_password or "") if chap else ()
            _run(f"login {t.iqn}", [*_node(t), "--login"], ok=(RC_SESSION_EXISTS,),
                 secrets=secrets)
    start = time.monotonic()
    # iscsid scans a session it just logged in: a rescan only if that is slow. A session
    # found without its disk gets one at once.
    rescanned = start if existing is None else start - RESCAN_AFTER
    while True:
        s = find_session(t)
        if s is not None and s.disk(t.lun) is not None and os.path.exists(s.disks[t.lun]):
            return s
        now = time.monotonic()
        if now - start > wait_disk:
            raise IscsiError(f"login {t.iqn}", -1, f"no disk for LUN {t.lun} after {wait_disk}s")
        # Each iscsiadm costs about a second in an emulated guest, which the login waits for.
        if s is not None and now - rescanned >= RESCAN_AFTER:
            rescan(s.sid)
            rescanned = time.monotonic()
        time.sleep(0.1)


def set_disk_timeout(disk: str, seconds: int = DISK_TIMEOUT_SECONDS) -> None:
    """Sets how long a command to `disk` (/dev/sdX) may take before the SCSI layer aborts it."""
    name = os.path.basename(os.path.realpath(disk))
    with open(f"/sys/block/{name}/device/timeout", "w") as f:
        f.write(str(seconds))


def rescan(sid: int) -> None:
    _run(f"rescan session {sid}", ["-m", "session", "-r", str(sid), "--rescan"])


def set_replacement_timeout(sid: int, seconds: int) -> None:
    """Changes a live session's replacement timeout: how long I/O waits for a dead session."""
    with open(f"/sys/class/iscsi_session/session{sid}/recovery_tmo", "w") as f:
        f.write(str(seconds))


def logout(t: TargetAddress, *, delete_record: bool = True) -> None:
    """Logs out (absent is success) and forgets the node record."""
    _run(f"logout {t.iqn}", [*_node(t), "--logout"], ok=(RC_NO_OBJECTS,))
    if delete_record:
        _run(f"delete {t.iqn}", [*_node(t), "-o", "delete"], ok=(RC_NO_OBJECTS,))


def logout_session(sid: int) -> None:
    _run(f"logout session {sid}", ["-m", "session", "-r", str(sid), "--logout"],
         ok=(RC_NO_OBJECTS,))
