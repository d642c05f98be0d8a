"""The lab: qemu TCG guests running Debian's own kernel on a bridge in a network namespace.

Quick use (Python)::

    from vmthunder.lab.lab import Lab

    with Lab.up(nodes=3, image=golden_path) as lab:   # image=None: no origin export
        print(lab.host_ip)                            # host side of the lab bridge (veth)
        r = lab.nodes[0].run("modprobe dm-clone && lsmod", timeout=30)
        assert r.rc == 0, r.stderr
        t = lab.origin_target                         # OriginTarget: iqn, portal, CHAP, size
        lab.nodes[0].iscsi_login(t)                   # -> "/dev/sda"

CLI: ``vmthunder lab up N [--image PATH]``, ``vmthunder lab status``, ``vmthunder lab down``
(``--slot S``, ``--all``). ``Lab.attach(slot)`` gives the same object for a lab the CLI started.

What a guest is
    Debian's kernel (linux-image-amd64's dependency) booted directly by qemu under TCG, 1 vCPU,
    ``mem_mib`` of RAM (default 512). Its root is the host's ``/`` (read-only, virtio-9p) under a
    layer of guest-only packages (open-iscsi, rtslib-fb, targetcli, thin-provisioning-tools,
    busybox, the kernel's modules with dm-clone built out of tree), overlaid with a tmpfs upper.
    So the checkout (at the same path as on the host, e.g. /work/main) and the project venv
    (~/.cache/vmthunder/venv) work inside guests; writes stay in guest RAM. No udev: load
    modules yourself (virtio_net/blk, sd_mod, configfs, dm_mod are preloaded) and run
    ``dmsetup mknodes``. The system python3 in a guest has rtslib-fb; the venv does not.

    Nodes have a sparse cache disk at ``/dev/vda`` (``Guest.cache_disk``). The origin has the
    golden image read-only at ``/dev/vda`` and exports it over iSCSI (LIO, CHAP) as LUN 0.
    Each guest's iSCSI initiator name is ``Guest.iqn`` (written to /etc/iscsi/initiatorname.iscsi).

Network
    Namespace ``vmtlab<slot>`` holds bridge ``br0`` and one tap per guest. Subnet
    ``10.213.<slot>.0/24``: host ``.1`` (veth ``vmtlab<slot>h`` in the root namespace, so host
    processes such as the kube-apiserver can bind it and guests reach it), origin ``.2``,
    node i (0-based) ``.11+i``. Links are shaped both ways (guest egress: tbf in the guest;
    guest ingress: tbf on its tap) to ``rate_mbit`` (default DEFAULT_RATE_MBIT = 100; 0 means
    unshaped), which stands for 1 Gbit/s: multiply lab throughput by ``lab.scale_to_gbit`` to
    compare with the seed. Under TCG on 2 cores, several concurrent 100 Mbit/s transfers are
    CPU-bound; LINK_BOUND_RATE_MBIT (20, x50) keeps links the bottleneck (figures at the constant).

Exec channel
    A stdlib agent in every guest serves 4 virtio-serial ports (unix sockets on the host);
    a call locks one port, so up to 4 commands run at once per guest, from any host process.
    It does not depend on the guest's network (a test may cut it). Every call pings first and
    skips a port that does not answer: qemu can leave a virtio-serial port stuck when the host
    hangs up while the guest is writing (the port stays throttled), so the host waits
    GRACE_S past a command's own timeout, by which time the agent has killed it and answered.

API
    Lab.up(nodes, *, image=None, mem_mib=512, rate_mbit=DEFAULT_RATE_MBIT, cache_gib=4,
           slot=None, origin=True, chap=None) -> Lab         boots all guests in parallel
    Lab.attach(slot) -> Lab;  Lab.down();  Lab.down_slot(slot);  Lab.sweep_all()
    lab.origin: Guest | None;  lab.nodes: list[Guest];  lab.guests;  lab.guest(name)
    lab.host_ip, lab.subnet, lab.netns, lab.state_dir, lab.origin_target: OriginTarget | None
    Guest: name, ip, iqn, cache_disk, mem_mib, pid, serial_log
      .run(cmd, timeout=60, check=False, input=None, env=None) -> RunResult(rc, stdout, stderr)
      .start_background(cmd, log="/tmp/<name>.log", env=None) -> pid in the guest
      .ping() -> guest uptime;  .alive() -> bool (qemu process running)
      .poweroff(timeout=30)  clean shutdown;  .kill()  SIGKILL the qemu process (a crash)
      .freeze() / .thaw()    SIGSTOP / SIGCONT the qemu process (a hung node)
      .iscsi_login(target) -> "/dev/sdX" (open-iscsi, CHAP);  .iscsi_logout(target)
    Errors: LabError (setup, teardown), GuestError (channel dead, timeout, check=True failed).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

CACHE = Path(os.environ.get("VMT_CACHE", Path.home() / ".cache" / "vmthunder"))
REPO = Path(__file__).resolve().parents[3]
RUN_DIR = CACHE / "run"
PREFIX = "vmtlab"
EXEC_PORTS = 4
# Lab links stand for Gigabit (scale = 1000 / rate). Measured (bench/lab_boot.py, 16 nodes, the
# 2 cores shared with other work, load ~20): at 100 Mbit/s one transfer fills 77-88% of its link
# but 2/4/8 concurrent TCP pairs get only 45/28/21% of theirs (CPU-bound, ~11-21 MB/s in all);
# at 20 Mbit/s (LINK_BOUND_RATE_MBIT) 1/2/4/8 pairs get 59/63/51/41%, iSCSI 86%: links bound
# up to ~4 concurrent transfers. The default stays 100 because other code is tuned to it; pass
# rate_mbit=LINK_BOUND_RATE_MBIT for tree-wide experiments where many links run at once.
DEFAULT_RATE_MBIT = 100
LINK_BOUND_RATE_MBIT = 20
GBIT_MBIT = 1000
ISCSI_PORT = 3260
# TCG's translation cache defaults to 1 GiB per guest and fills up over time (qemu RSS > 1.5 GiB
# for a 512 MiB guest); guests run little code, so a small cache costs nothing measurable.
TB_MIB = 64
# A ping answers in milliseconds; seconds under a loaded TCG host.
PING_S = 15
# The guest answers a timed-out command after killing it; the host waits this much longer, so
# it rarely hangs up while the guest writes (that can leave the port stuck: module docstring).
GRACE_S = 60
# qboot, a minimal firmware shipped with qemu, boots -kernel faster than SeaBIOS under TCG.
QBOOT = "/usr/share/qemu/qboot.rom"
# The Python this process runs (its virtualenv and base installation), shared into guests at the
# same paths, page-cached there (guest/init), unless it lives in /usr (shared anyway).
PYTHONS = [d for d in dict.fromkeys((sys.base_prefix, sys.prefix))
           if d != "/usr" and not d.startswith("/usr/")]


class LabError(RuntimeError):
    """The lab could not be set up or torn down; carries the failing command's stderr."""


class GuestError(RuntimeError):
    """A guest command failed (check=True), timed out, or the guest's channel is gone."""

    def __init__(self, msg: str, result: RunResult | None = None) -> None:
        super().__init__(msg)
        self.result = result


@dataclass(frozen=True)
class RunResult:
    rc: int
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


@dataclass(frozen=True)
class OriginTarget:
    """The origin's iSCSI export of the golden image (read-only LUN 0, CHAP)."""

    iqn: str
    ip: str
    port: int
    chap_user: str
    chap_password: str
    size: int
    image: str

    @property
    def portal(self) -> str:
        return f"{self.ip}:{self.port}"


def sh(
    *argv: str, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: rc={p.returncode}: {p.stderr.strip()}")
    return p


def build_guest_env() -> Path:
    """Runs scripts/build-guest.sh (cached: seconds when built) and returns the guest dir."""
    p = subprocess.run([str(REPO / "scripts" / "build-guest.sh")], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"build-guest.sh failed: {p.stderr[-3000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


@dataclass
class Guest:
    """One qemu guest. Host-side handle: everything here works from any host process."""

    name: str
    role: str  # "origin" or "node"
    index: int
    ip: str
    iqn: str
    mac: str
    tap: str
    state_dir: str
    mem_mib: int
    disk: str  # host path of the guest's /dev/vda (cache file, or the golden image)
    pid: int = 0
    start_ticks: int = 0  # the qemu process's start time: tells it from a reused pid

    @property
    def cache_disk(self) -> str:
        """Device of the node's local cache disk inside the guest."""
        return "/dev/vda"

    @property
    def serial_log(self) -> Path:
        return Path(self.state_dir) / f"{self.name}.serial.log"

    def sock(self, i: int) -> Path:
        return Path(self.state_dir) / f"{self.name}.exec{i}.sock"

    # --- process control ---------------------------------------------------------------------

    def alive(self) -> bool:
        """The qemu process runs (not a zombie, and the same process, not a reused pid)."""
        st = _proc_stat(self.pid) if self.pid > 0 else None
        if st is None or st[0] == "Z":
            return False
        if self.start_ticks:
            return st[1] == self.start_ticks
        try:  # state written before start_ticks existed
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return self.state_dir.encode() in f.read()
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the qemu process: the guest vanishes as in a power cut."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, 10)

    def freeze(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)

    def poweroff(self, timeout: float = 30) -> None:
        """Clean shutdown (sync, power off); kills the qemu process if it does not exit."""
        if not self.alive():
            return
        with contextlib.suppress(GuestError):
            self.start_background("sleep 0.2; sync; busybox poweroff -f")
        if not _wait_gone(self.pid, timeout):
            self.kill()

    # --- exec ----------------------------------------------------------------------------------

    def _call(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Sends req on a free exec port and waits for its answer. Each connection starts with a
        ping, so a port that stopped answering (see the module docstring) is skipped, not used."""
        if not self.alive():
            raise GuestError(f"{self.name}: qemu process is not running")
        ports = list(range(EXEC_PORTS))
        random.shuffle(ports)
        dead: list[int] = []
        for i in ports:
            fd = _lock_port(self, i, blocking=False)
            if fd is None:
                continue  # another caller has it
            try:
                res = self._try_port(i, req, timeout)
            finally:
                os.close(fd)
            if res is not None:
                return res
            dead.append(i)
        alive = [i for i in ports if i not in dead]
        if not alive:
            raise GuestError(f"{self.name}: no exec port answers a ping")
        fd = _lock_port(self, alive[0], blocking=True)  # all busy: wait for one
        assert fd is not None
        try:
            res = self._try_port(alive[0], req, timeout)
        finally:
            os.close(fd)
        if res is None:
            raise GuestError(f"{self.name}: exec port {alive[0]} does not answer a ping")
        return res

    def _try_port(self, i: int, req: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The answer to req on port i, or None if the port does not answer a ping."""
        with contextlib.closing(self._connect(i)) as s:
            try:
                _exchange(s, {"op": "ping", "id": uuid.uuid4().hex}, PING_S, self.name)
            except GuestError:
                return None
            return _exchange(s, {**req, "id": uuid.uuid4().hex}, timeout, self.name)

    def _connect(self, i: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(10)
            s.connect(str(self.sock(i)))
        except OSError as e:
            s.close()
            raise GuestError(f"{self.name}: exec channel {i}: {e}") from e
        return s

    def run(
        self,
        cmd: str | Sequence[str],
        timeout: float = 60,
        check: bool = False,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RunResult:
        """Runs cmd in the guest (a string goes through /bin/sh) and waits for it."""
        req: dict[str, Any] = {
            "op": "run",
            "cmd": cmd if isinstance(cmd, str) else list(cmd),
            "timeout": timeout,
            "env": dict(env or {}),
        }
        if input is not None:
            data = input.encode() if isinstance(input, str) else input
            req["stdin"] = base64.b64encode(data).decode()
        res = self._call(req, timeout + GRACE_S)
        r = RunResult(
            rc=int(res["rc"]),
            stdout=base64.b64decode(res["stdout"]).decode(errors="replace"),
            stderr=base64.b64decode(res["stderr"]).decode(errors="replace"),
            timed_out=bool(res["timed_out"]),
            seconds=float(res["seconds"]),
        )
        if check and not r.ok:
            raise GuestError(
                f"{self.name}: {cmd!r}: rc={r.rc} timed_out={r.timed_out}: {r.stderr.strip()}", r
            )
        return r

    def start_background(
        self,
        cmd: str | Sequence[str],
        log: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Starts cmd detached in the guest (output to log) and returns its pid in the guest."""
        req = {
            "op": "spawn",
            "cmd": cmd if isinstance(cmd, str) else list(cmd),
            "log": log or f"/tmp/{self.name}.bg.log",
            "env": dict(env or {}),
        }
        return int(self._call(req, 30)["pid"])

    def wait_for_any(self, paths: Sequence[str], timeout: float) -> str | None:
        """The first of `paths` found to exist in the guest within `timeout`, or None."""
        res = self._call({"op": "wait", "paths": list(paths), "timeout": timeout},
                         timeout + GRACE_S)
        return None if res.get("found") is None else str(res["found"])

    def ping(self, timeout: float = 10) -> float:
        return float(self._call({"op": "ping"}, timeout)["uptime"])

    # --- iSCSI initiator (thin convenience for tests; the node agent has its own wrapper) -----

    def iscsi_login(self, t: OriginTarget, timeout: float = 60) -> str:
        """Logs in to t with CHAP and returns the LUN's device (e.g. /dev/sda)."""
        script = f"""
set -e
pidof iscsid >/dev/null || iscsid
modprobe iscsi_tcp
iscsiadm -m discovery -t st -p {t.portal} >/dev/null
node="iscsiadm -m node -T {t.iqn} -p {t.portal}"
$node -o update -n node.session.auth.authmethod -v CHAP
$node -o update -n node.session.auth.username -v {t.chap_user}
$node -o update -n node.session.auth.password -v {t.chap_password}
$node --login >/dev/null
for i in $(seq 100); do
  for h in /sys/class/iscsi_session/session*/device/target*/*/block/*; do
    [ -e "$h" ] || continue
    tgt=$(cat "${{h%%/device/*}}/targetname")
    [ "$tgt" = "{t.iqn}" ] && {{ echo "/dev/$(basename "$h")"; exit 0; }}
  done
  sleep 0.1
done
echo "no block device for {t.iqn}" >&2; exit 1
"""
        return self.run(script, timeout=timeout, check=True).stdout.strip()

    def iscsi_logout(self, t: OriginTarget) -> None:
        self.run(f"iscsiadm -m node -T {t.iqn} -p {t.portal} --logout", timeout=30, check=True)


def _lock_port(g: Guest, i: int, blocking: bool) -> int | None:
    """flock on the port's lock file (one caller per port, across processes); the fd or None."""
    fd = os.open(f"{g.sock(i)}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _exchange(s: socket.socket, req: dict[str, Any], timeout: float, name: str) -> dict[str, Any]:
    try:
        s.settimeout(10)
        s.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"{name}: no answer to {req['op']} within {timeout:.0f}s")
            s.settimeout(left)
            try:
                chunk = s.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"{name}: channel closed (guest died?)")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    res: dict[str, Any] = json.loads(line)
                except ValueError:
                    continue  # garbage from a previous client's half-written request
                if res.get("id") == req["id"]:
                    if "error" in res:
                        raise GuestError(f"{name}: agent: {res['error']}")
                    return res
    except OSError as e:
        raise GuestError(f"{name}: exec channel: {e}") from e


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def netns_name(slot: int) -> str:
    return f"{PREFIX}{slot}"


def host_if_name(slot: int) -> str:
    return f"{PREFIX}{slot}h"


def state_dir_of(slot: int) -> Path:
    return RUN_DIR / f"lab{slot}"


@dataclass
class Lab:
    slot: int
    guests: list[Guest] = field(default_factory=list)
    rate_mbit: int = DEFAULT_RATE_MBIT
    image: str | None = None
    origin_target: OriginTarget | None = None
    boot_seconds: float = 0.0
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # --- naming -------------------------------------------------------------------------------

    @property
    def netns(self) -> str:
        return netns_name(self.slot)

    @property
    def host_if(self) -> str:
        return host_if_name(self.slot)

    @property
    def subnet(self) -> str:
        return f"10.213.{self.slot}.0/24"

    @property
    def host_ip(self) -> str:
        return f"10.213.{self.slot}.1"

    @property
    def state_dir(self) -> Path:
        return state_dir_of(self.slot)

    @property
    def origin(self) -> Guest | None:
        return next((g for g in self.guests if g.role == "origin"), None)

    @property
    def nodes(self) -> list[Guest]:
        return [g for g in self.guests if g.role == "node"]

    @property
    def scale_to_gbit(self) -> float:
        """Factor from lab link throughput to the 1 Gbit/s links it stands for."""
        return GBIT_MBIT / self.rate_mbit if self.rate_mbit else 1.0

    def guest(self, name: str) -> Guest:
        for g in self.guests:
            if g.name == name:
                return g
        raise KeyError(name)

    # --- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        nodes: int = 3,
        *,
        image: str | Path | None = None,
        mem_mib: int = 512,
        rate_mbit: int = DEFAULT_RATE_MBIT,
        cache_gib: float = 4,
        slot: int | None = None,
        origin: bool = True,
        chap: tuple[str, str] | None = None,
        boot_timeout: float = 300,
    ) -> Lab:
        """Creates the network, boots origin + nodes in parallel, exports image from the origin."""
        if nodes < 0 or nodes > 200:
            raise LabError(f"nodes must be in 0..200, not {nodes}")
        guest_env = build_guest_env()
        lab = cls(slot=_claim_slot(slot), rate_mbit=rate_mbit)
        lab.image = str(Path(image).resolve()) if image else None
        try:
            lab._make_network()
            specs: list[tuple[str, int]] = [("origin", 0)] if origin else []
            specs += [("node", i) for i in range(nodes)]
            for role, i in specs:
                lab.guests.append(lab._make_guest(role, i, mem_mib, cache_gib))
            lab._save()
            t0 = time.monotonic()
            for g in lab.guests:
                lab._start_qemu(g, guest_env)
            lab._save()
            lab._wait_ready(boot_timeout)
            lab.boot_seconds = time.monotonic() - t0
            if lab.image and lab.origin:
                from vmthunder.lab import origin as origin_mod

                user, password = chap or ("vmthunder", uuid.uuid4().hex[:16])
                lab.origin_target = origin_mod.export_image(lab.origin, lab.image, user, password)
            lab._save()
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def attach(cls, slot: int = 0) -> Lab:
        """The lab in `slot`, as recorded by whoever brought it up (e.g. `vmthunder lab up`)."""
        path = state_dir_of(slot) / "state.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LabError(f"no lab in slot {slot}: {e}") from e
        t = data.get("origin_target")
        return cls(
            slot=data["slot"],
            guests=[Guest(**g) for g in data["guests"]],
            rate_mbit=data["rate_mbit"],
            image=data.get("image"),
            origin_target=OriginTarget(**t) if t else None,
            boot_seconds=data.get("boot_seconds", 0.0),
        )

    def down(self) -> None:
        """Removes every guest, tap, bridge, namespace and file of this lab."""
        for g in self.guests:
            g.kill()
        Lab.down_slot(self.slot)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    @staticmethod
    def down_slot(slot: int) -> None:
        """Tears down a lab by its names alone (works after a crash, with or without state)."""
        _teardown(slot, remove_state=True)

    @staticmethod
    def sweep_all() -> list[int]:
        """Tears down every lab on this host (by name prefix); returns the slots it found."""
        slots: set[int] = set()
        for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit():
                slots.add(int(name[len(PREFIX) :]))
        for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(PREFIX) and name.endswith("h") and name[len(PREFIX) : -1].isdigit():
                slots.add(int(name[len(PREFIX) : -1]))
        if RUN_DIR.is_dir():
            for d in RUN_DIR.iterdir():
                if d.name.startswith("lab") and d.name[3:].isdigit():
                    slots.add(int(d.name[3:]))
        for s in sorted(slots):
            Lab.down_slot(s)
        return sorted(slots)

    # --- internals ----------------------------------------------------------------------------

    def _save(self) -> None:
        data = {
            "slot": self.slot,
            "netns": self.netns,
            "host_if": self.host_if,
            "host_ip": self.host_ip,
            "rate_mbit": self.rate_mbit,
            "image": self.image,
            "boot_seconds": self.boot_seconds,
            "origin_target": asdict(self.origin_target) if self.origin_target else None,
            "guests": [asdict(g) for g in self.guests],
        }
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.state_dir / "state.json")

    def _make_network(self) -> None:
        ns = self.netns
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", netns=ns)
        sh("ip", "link", "add", "br0", "type", "bridge", netns=ns)
        sh("ip", "link", "set", "br0", "up", netns=ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "host", "netns", ns)
        sh("ip", "link", "set", "host", "master", "br0", netns=ns)
        sh("ip", "link", "set", "host", "up", netns=ns)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")

    def _make_guest(self, role: str, i: int, mem_mib: int, cache_gib: float) -> Guest:
        if role == "origin":
            name, host_octet = "origin", 2
            if not self.image:
                disk = str(self.state_dir / "origin.empty.img")
                _sparse(Path(disk), 1 << 20)
            else:
                disk = self.image
        else:
            name, host_octet = f"node-{i:02d}", 11 + i
            disk = str(self.state_dir / f"{name}.cache.img")
            _sparse(Path(disk), int(cache_gib * (1 << 30)))
        return Guest(
            name=name,
            role=role,
            index=i,
            ip=f"10.213.{self.slot}.{host_octet}",
            iqn=f"iqn.2026-11.io.vmthunder.lab{self.slot}:{name}",
            mac=f"52:54:00:d5:{self.slot:02x}:{host_octet:02x}",
            tap=f"tap-{name}"[:15],
            state_dir=str(self.state_dir),
            mem_mib=mem_mib,
            disk=disk,
        )

    def _start_qemu(self, g: Guest, env_dir: Path) -> None:
        ns = self.netns
        sh("ip", "tuntap", "add", "dev", g.tap, "mode", "tap", netns=ns)
        sh("ip", "link", "set", g.tap, "master", "br0", netns=ns)
        sh("ip", "link", "set", g.tap, "up", netns=ns)
        burst = _burst_bytes(self.rate_mbit)
        if self.rate_mbit:
            sh(
                "tc",
                "qdisc",
                "add",
                "dev",
                g.tap,
                "root",
                "tbf",
                "rate",
                f"{self.rate_mbit}mbit",
                "burst",
                str(burst),
                "latency",
                "100ms",
                netns=ns,
            )
        sd = self.state_dir
        rate = f"{self.rate_mbit}mbit" if self.rate_mbit else "0"
        cmdline = " ".join(
            [
                # no_timer_check: under TCG on a loaded host the boot's timer check can miss
                # its ticks and panic ("IO-APIC + timer doesn't work"; N = 16, 2026-12-08).
                "console=ttyS0 quiet panic=-1 mitigations=off no_timer_check",
                f"vmt.repo={REPO} vmt.name={g.name} vmt.ip={g.ip}/24 vmt.iqn={g.iqn}",
                f"vmt.host={self.host_ip} vmt.rate={rate} vmt.burst={burst}",
                f"vmt.pythons={','.join(PYTHONS)}" if PYTHONS else "",
                os.environ.get("VMT_LAB_KERNEL_ARGS", ""),  # e.g. loglevel=7 to debug a boot
            ]
        )
        ro = "on" if g.role == "origin" else "off"
        argv = [
            "ip", "netns", "exec", ns,
            "qemu-system-x86_64",
            "-name", f"{ns}-{g.name}",
            "-accel", f"tcg,tb-size={TB_MIB}", "-smp", "1", "-m", str(g.mem_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            *(["-bios", QBOOT] if os.path.exists(QBOOT) else []),
            "-kernel", str(env_dir / "vmlinux"),  # PVH entry: no decompression (build-guest.sh)
            "-initrd", str(env_dir / "initrd.cpio.gz"),
            "-append", cmdline,
            "-chardev", f"file,id=ser0,path={sd}/{g.name}.serial.log",
            "-serial", "chardev:ser0",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
            "multidevs=remap",
            "-virtfs", f"local,path={env_dir}/layer,mount_tag=layer,security_model=none,"
            "readonly=on,multidevs=remap",
            "-virtfs", "local,path=/usr,mount_tag=hostusr,security_model=none,readonly=on,"
            "multidevs=remap",
            *[a for i, d in enumerate(PYTHONS) for a in (
                "-virtfs", f"local,path={d},mount_tag=python{i},security_model=none,"
                "readonly=on,multidevs=remap")],
            "-netdev", f"tap,id=net0,ifname={g.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={g.mac}",
            "-drive", f"file={g.disk},if=none,id=disk0,format=raw,readonly={ro},aio=threads",
            "-device", "virtio-blk-pci,drive=disk0,serial=vmt-disk0",
            "-device", "virtio-serial-pci,id=vser0",
            "-qmp", f"unix:{sd}/{g.name}.qmp.sock,server=on,wait=off",
        ]  # fmt: skip
        for i in range(EXEC_PORTS):
            argv += [
                "-chardev", f"socket,id=exec{i},path={g.sock(i)},server=on,wait=off",
                "-device", f"virtserialport,bus=vser0.0,chardev=exec{i},name=vmt.exec.{i}",
            ]  # fmt: skip
        log = open(sd / f"{g.name}.qemu.log", "wb")  # noqa: SIM115 - handed to the child
        # `ip netns exec` execs qemu, so this pid is qemu's; own session so a Ctrl-C of the
        # CLI that brought the lab up does not take the guests down.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        g.pid = proc.pid
        st = _proc_stat(proc.pid)
        g.start_ticks = st[1] if st else 0
        self._procs[g.name] = proc

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {g.name: g for g in self.guests}
        while pending:
            for name, g in list(pending.items()):
                try:
                    text = g.serial_log.read_text(errors="replace")
                except OSError:
                    text = ""
                if "VMT-AGENT-READY" in text:
                    del pending[name]
                elif not g.alive():
                    qlog = Path(g.state_dir) / f"{g.name}.qemu.log"
                    proc = self._procs.get(name)
                    rc = proc.poll() if proc else None
                    raise LabError(
                        f"{name} (pid {g.pid}) died while booting, exit status {rc}: "
                        f"{qlog.read_text()[-2000:]}"
                        f"\nserial: {text[-2000:]}"
                    )
            if pending and time.monotonic() > deadline:
                late = next(iter(pending.values()))
                raise LabError(
                    f"{sorted(pending)} not ready after {timeout:.0f}s; "
                    f"{late.name} serial: {late.serial_log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.2)


def _teardown(slot: int, remove_state: bool) -> None:
    sd = state_dir_of(slot)
    for pid in _pids_with(str(sd).encode() + b"/"):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10)
    ns = netns_name(slot)
    p = sh("ip", "netns", "pids", ns, check=False)
    if p.returncode == 0:
        for npid in p.stdout.split():
            with contextlib.suppress(OSError):
                os.kill(int(npid), signal.SIGKILL)
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", host_if_name(slot), check=False)
    if remove_state:
        shutil.rmtree(sd, ignore_errors=True)
    else:  # keep the dir (it is the slot's claim), drop its contents
        for f in sd.iterdir():
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)


def _burst_bytes(rate_mbit: int) -> int:
    # tbf needs burst >= rate/HZ; 10 ms worth of bytes, at least 32 KiB.
    return max(32 * 1024, rate_mbit * 1_000_000 // 8 // 100)


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _pids_with(marker: bytes) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if marker in f.read():
                    pids.append(int(d))
        except OSError:
            continue
    return pids


def _claim_slot(slot: int | None) -> int:
    """Reserves a slot by creating its state dir (mkdir is atomic, so two processes never get
    the same slot), then removes whatever a crashed lab left under the slot's names."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for s in [slot] if slot is not None else list(range(64)):
        sd = state_dir_of(s)
        try:
            sd.mkdir()
        except FileExistsError:
            if slot is not None:
                raise LabError(
                    f"slot {s} is in use: `vmthunder lab down --slot {s}` first"
                ) from None
            continue
        _teardown(s, remove_state=False)
        return s
    raise LabError("no free lab slot")
