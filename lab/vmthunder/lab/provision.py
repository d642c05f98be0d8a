"""The main job, end to end: N VMs provisioned from one golden image in the lab.

    rig = Rig.start(Options(nodes=4))     # control plane on the lab's host address, the lab
    try:                                   # (origin + N nodes), agent + CSI node plugin per
        run = rig.provision("golden")      # node, operator + CSI controller on the host
    finally:
        rig.close()                        # everything torn down, also on errors and Ctrl-C

What `provision` does, as a cluster would: apply an ImageCache of the golden image (source:
the origin's iSCSI target, CHAP secret, boot profile ConfigMap); then per node, at once,
CreateVolume through the CSI controller's socket with the node's topology (what
external-provisioner does under WaitForFirstConsumer), and inside the node NodeStage +
NodePublish (what kubelet does) followed by the VM's boot, replayed from the recorded boot
profile through the published device (vmthunder.lab.replay). Meanwhile a monitor polls the
ImageReplicas (phase, parent, hydration) and the bytes the origin served. Afterwards it waits
(bounded) until every cache is hydrated and detached.

Times are seconds since the ImageCache was applied ("t0"). Guest clocks are corrected by
each guest's offset to the host clock, measured over the exec channel.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vmthunder.lab.controlplane import ControlPlane, start_control_plane
from vmthunder.lab.lab import DEFAULT_RATE_MBIT, REPO, Guest, Lab
from vmthunder.lab.profile import BootProfile, load_profile
from vmthunder.lab.replay import DEFAULT_GAP_SCALE, expected_digest
from vmthunder.operator.model import (
    ATTACHED_REPLICA_PHASES,
    GROUP,
    HYDRATED_PHASES,
    VERSION,
)

NAMESPACE = "vmthunder"
TOPOLOGY_KEY = "topology.vmthunder.io/node"
ORIGIN = "@origin"
CACHE_DIR = "/var/lib/vmthunder"
CSI_SOCKET = "/run/csi/csi.sock"
# The chart's default metrics ports (values.yaml: node.csiMetricsPort, node.agentMetricsPort)
CSI_NODE_METRICS_PORT = 9818
AGENT_METRICS_PORT = 9819
REAL_BOOT_NBD_PORT = 10809
# Every guest starts its agent and CSI node plugin at once, all on 2 emulated cores: at N = 16
# the last was ready after 420 s (2026-12-07), so the imports alone take minutes.
NODE_READY_TIMEOUT = 900
WAIT_SLICE_SECONDS = 20.0  # a wait in a guest holds one of its exec ports this long at most
# Unstaging a node's volumes and its agent's teardown of an image: 180 s per 8 nodes (at N = 16
# one node's unstage took longer than 180 s: every guest runs it at once on the same 2 cores).
TEARDOWN_TIMEOUT_PER_8_NODES = 180.0


class ProvisionError(RuntimeError):
    """A step of the run failed; says which and carries the relevant log tail."""


@dataclass(frozen=True)
class Options:
    nodes: int = 4
    image: str = "small"  # small, large or a path to a raw image with boot.profile beside it
    fanout: int = 2
    origin_fanout: int = 1
    gap_scale: float = DEFAULT_GAP_SCALE
    prefetch: bool = True
    hold_seconds: int | None = None  # ImageCache spec.prefetch.holdSeconds; None: its default
    real_boot: bool = False  # boot the golden image in qemu on the host from the node's volume
    rate_mbit: int = DEFAULT_RATE_MBIT
    hydrate_timeout: float = 240.0  # how long to wait for every cache to be complete
    boot_timeout: float = 600.0
    results: Path = REPO / "results"
    live: bool = True
    slot: int | None = None  # the lab's slot; None takes the first free one


# --- pure summaries ---------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of non-empty values."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    k = max(1, math.ceil(q / 100 * len(s)))
    return s[k - 1]


@dataclass
class NodeRun:
    node: str
    parent: str = ""
    depth: int = 0
    created: float | None = None  # CreateVolume returned
    attached: float | None = None  # replica first seen attached (its image device built)
    staged: float | None = None
    published: float | None = None
    first_byte: float | None = None
    booted: float | None = None
    hydrated: float | None = None
    detached: float | None = None
    reads: int = 0
    max_read_s: float = 0.0  # the longest single read: the pause the VM saw
    read_error: str | None = None
    sha_ok: bool = False
    bytes_from_parent: int = 0
    bytes_served: int = 0  # replica status: read by children through the export
    egress: int = 0  # the node's NIC: bytes sent during the run
    hydrated_regions: int = 0
    total_regions: int = 0
    phase: str = ""
    # By the time all VMs had booted (one status of the replica): bytes read from the parent,
    # and bytes the cache held. Each block crosses each link once when they are equal.
    storm_from_parent: int = 0
    storm_cached: int = 0

    def cached_bytes(self, image_size: int) -> int:
        return image_size * self.hydrated_regions // self.total_regions if self.total_regions else 0

    @property
    def boot_seconds(self) -> float | None:
        """The VM's own boot: from its disk being published to its boot's last read."""
        if self.booted is None or self.published is None:
            return None
        return self.booted - self.published


def summarize(nodes: Sequence[NodeRun]) -> dict[str, Any]:
    booted = [n.booted for n in nodes if n.booted is not None]
    boots = [b for n in nodes if (b := n.boot_seconds) is not None]
    out: dict[str, Any] = {"nodes": len(nodes), "booted": len(booted),
                           "read_errors": sum(1 for n in nodes if n.read_error),
                           "sha_mismatches": sum(1 for n in nodes if not n.sha_ok)}
    if booted:
        out.update(all_booted=max(booted), mean_booted=statistics.fmean(booted),
                   p95_booted=percentile(booted, 95))
    if boots:
        out.update(mean_boot=statistics.fmean(boots), p95_boot=percentile(boots, 95))
    out["max_read_s"] = max((n.max_read_s for n in nodes), default=0.0)
    hydrated = [n.hydrated for n in nodes if n.hydrated is not None]
    if len(hydrated) == len(nodes) and nodes:
        out["all_hydrated"] = max(hydrated)
    detached = [n.detached for n in nodes if n.detached is not None]
    if len(detached) == len(nodes) and nodes:
        out["all_detached"] = max(detached)
    return out


def tree_problems(parents: Mapping[str, str], fanout: int, origin_fanout: int) -> list[str]:
    """What is wrong with a distribution tree: cycles, unknown parents, fan-out exceeded."""
    problems = []
    kids: dict[str, int] = {}
    for node, parent in parents.items():
        kids[parent] = kids.get(parent, 0) + 1
        if parent != ORIGIN and parent not in parents:
            problems.append(f"{node}: parent {parent} is not a node of the tree")
        seen = {node}
        p = parent
        while p != ORIGIN and p in parents:
            if p in seen:
                problems.append(f"{node}: cycle through {p}")
                break
            seen.add(p)
            p = parents[p]
    for parent, n in kids.items():
        limit = origin_fanout if parent == ORIGIN else fanout
        if n > limit:
            problems.append(f"{parent} has {n} children, more than {limit}")
    return problems


def depth_of(parents: Mapping[str, str], node: str) -> int:
    d, p = 0, node
    while p != ORIGIN and d <= len(parents):
        p = parents.get(p, ORIGIN)
        d += 1
    return d


# --- the run's record -------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    mode: str
    n: int
    options: dict[str, Any]
    profile: dict[str, Any]
    nodes: list[NodeRun] = field(default_factory=list)
    origin_bytes: int = 0  # read from the origin's disk by its iSCSI target
    origin_bytes_at_all_booted: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)  # progress over time
    tree_problems: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    setup_seconds: float = 0.0
    started: float = 0.0  # t0, the epoch time the ImageCache was applied
    faults: list[str] = field(default_factory=list)  # what was injected, when

    def summary(self) -> dict[str, Any]:
        s = summarize(self.nodes)
        s["origin_bytes"] = self.origin_bytes
        s["origin_bytes_at_all_booted"] = self.origin_bytes_at_all_booted
        s["max_node_egress"] = max((n.egress for n in self.nodes), default=0)
        return s

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "n": self.n, "options": self.options,
                "profile": self.profile, "summary": self.summary(),
                "nodes": [asdict(n) | {"boot_seconds": n.boot_seconds} for n in self.nodes],
                "origin_bytes": self.origin_bytes, "tree_problems": self.tree_problems,
                "samples": self.samples, "wall_seconds": self.wall_seconds,
                "setup_seconds": self.setup_seconds, "faults": self.faults}


# --- the environment --------------------------------------------------------------------------

def golden(image: str) -> tuple[Path, Path]:
    """(disk image, boot profile) of a golden image variant or path."""
    if image in ("small", "large"):
        from vmthunder.lab.cli import golden_image

        disk = golden_image(image)
    else:
        disk = Path(image)
    prof = disk.parent / "boot.profile"
    if not prof.exists():
        raise ProvisionError(f"no boot profile next to {disk} (scripts/build-golden.sh makes it)")
    return disk, prof


def guest_python() -> str:
    return sys.executable


def guest_env(extra: str = "") -> str:
    return (f"PYTHONPATH={REPO}/operator:{REPO}/csi:{REPO}/node:{REPO}/lab "
            f"PYTHONUNBUFFERED=1 {extra}")


def run_quick(g: Guest, cmd: str, timeout: float = 60) -> str:
    """A quick idempotent command, retried if the exec channel loses the answer."""
    from vmthunder.node.labdrive import retry_run

    r = retry_run(g, cmd, timeout=timeout)
    if not r.ok:
        raise ProvisionError(f"{g.name}: {cmd[:80]}: rc={r.rc}: {r.stderr[-1500:]}")
    return str(r.stdout)


def run_detached(g: Guest, script: str, tag: str, timeout: float) -> str:
    """A long command, run detached in the guest and polled (robust to lost answers)."""
    from vmthunder.node.labdrive import start_shell, wait_shell

    start_shell(g, script, tag)
    return wait_shell(g, tag, timeout)


def _daemon(g: Guest, cmd: str, marker: str, log: str) -> None:
    """Starts a long-running process in the guest once (checks by `marker` on a lost answer)."""
    for _ in range(3):
        try:
            g.start_background(["/bin/sh", "-c", f"exec env {cmd}"], log=log)
            return
        except Exception:
            # "[v]mthunder..." matches the process but not this shell's own command line
            if run_quick(g, f"pgrep -f '[{marker[0]}]{marker[1:]}' || true").strip():
                return
    raise ProvisionError(f"{g.name}: could not start {marker}")


def guest_clock_offset(g: Guest, samples: int = 3) -> float:
    """guest CLOCK_REALTIME minus host time, from the tightest of a few round trips."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        t1 = time.time()
        try:
            r = g.run("date +%s.%N", timeout=10, check=True)
        except Exception:
            continue
        t2 = time.time()
        off = float(r.stdout.strip()) - (t1 + t2) / 2
        if best is None or t2 - t1 < best[0]:
            best = (t2 - t1, off)
    if best is None:
        raise ProvisionError(f"{g.name}: could not read the guest's clock")
    return best[1]


def read_sectors(g: Guest, dev: str = "vda") -> int:
    return int(run_quick(g, f"cat /sys/block/{dev}/stat").split()[2]) * 512


def tx_bytes(g: Guest) -> int:
    if not g.alive():  # killed by a fault: nothing more to count
        return 0
    return int(run_quick(g, "cat /sys/class/net/eth0/statistics/tx_bytes").strip())


class Printer:
    """Progress lines: redrawn in place on a terminal, one summary line now and then if not."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self.tty = out.isatty()
        self.drawn = 0
        self.last = 0.0
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            self.drawn = 0
            print(text, file=self.out, flush=True)

    def frame(self, lines: list[str], summary: str) -> None:
        if not self.live:
            return
        with self.lock:
            if self.tty:
                if self.drawn:
                    self.out.write(f"\x1b[{self.drawn}F\x1b[J")
                self.out.write("\n".join(lines) + "\n")
                self.out.flush()
                self.drawn = len(lines)
            elif time.monotonic() - self.last > 5:
                self.last = time.monotonic()
                print(summary, file=self.out, flush=True)

    def freeze(self) -> None:
        with self.lock:
            self.drawn = 0


@dataclass
class Rig:
    """The lab, the control plane and the VMThunder processes of one run."""

    options: Options
    workdir: Path
    lab: Lab
    cp: ControlPlane
    disk: Path
    profile_path: Path
    profile: BootProfile
    printer: Printer
    offsets: dict[str, float] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api: Any = None
    setup_seconds: float = 0.0

    # --- bring-up ---

    @classmethod
    def start(cls, options: Options, out: TextIO = sys.stdout,
              services: bool = True) -> Rig:
        """Boots the lab and the control plane; with services, the VMThunder processes too."""
        _teardown_on_sigterm()
        printer = Printer(out, options.live)
        t0 = time.monotonic()
        disk, prof = golden(options.image)
        profile = load_profile(prof)
        workdir = Path(tempfile.mkdtemp(prefix="vmt-provision-"))
        printer.say(f"lab: origin + {options.nodes} nodes (qemu TCG), links "
                    f"{options.rate_mbit} Mbit/s standing for 1 Gbit/s, image {disk} "
                    f"({profile.image_size >> 20} MiB)")
        lab = Lab.up(options.nodes, image=disk, rate_mbit=options.rate_mbit, slot=options.slot)
        rig: Rig | None = None
        try:
            printer.say(f"  guests up in {lab.boot_seconds:.1f} s; control plane on "
                        f"{lab.host_ip}")
            cp = start_control_plane(workdir / "cp", bind_address=lab.host_ip)
            rig = cls(options, workdir, lab, cp, disk, prof, profile, printer)
            if services:
                rig._start_services()
            rig.setup_seconds = time.monotonic() - t0
            return rig
        except BaseException:
            if rig is not None:
                rig.close()
            else:
                lab.down()
                shutil.rmtree(workdir, ignore_errors=True)
            raise

    def _start_services(self) -> None:
        import kubernetes

        cp, lab, p = self.cp, self.lab, self.printer
        cp.install_vmthunder_crds()
        self.api = kubernetes.config.new_client_from_config(str(cp.kubeconfig))  # type: ignore[no-untyped-call]
        core = kubernetes.client.CoreV1Api(self.api)
        from vmthunder.lab.nodes import register_node

        for g in lab.nodes:  # the labels the CSI node plugin reports as its topology
            register_node(core, g.name, {TOPOLOGY_KEY: g.name, "kubernetes.io/hostname": g.name})
        core.create_namespace({"metadata": {"name": NAMESPACE}})  # type: ignore[arg-type]
        t = lab.origin_target
        assert t is not None
        core.create_namespaced_secret(NAMESPACE, {  # type: ignore[arg-type]
            "metadata": {"name": "golden-chap"},
            "data": {"username": base64.b64encode(t.chap_user.encode()).decode(),
                     "password": base64.b64encode(t.chap_password.encode()).decode()}})
        core.create_namespaced_config_map(NAMESPACE, {  # type: ignore[arg-type]
            "metadata": {"name": "golden-boot-profile"},
            "data": {"profile": self.profile_path.read_text()}})
        self.start_operator()
        self.start_csi_controller()
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(lab.nodes) or 1) as pool:
            list(pool.map(self._start_node, lab.nodes))
        p.say(f"  control plane, operator, CSI controller; agent + CSI node plugin on "
              f"{len(lab.nodes)} nodes ready in {time.monotonic() - t0:.1f} s")

    @property
    def controller_socket(self) -> Path:
        return self.workdir / "csi-controller.sock"

    def _start_node(self, g: Guest) -> None:
        from vmthunder.node import labdrive
        from vmthunder.node.labdrive import retry_run

        retry_run(g, "true")
        labdrive.prepare_node(g)
        run_quick(g, f"mkdir -p {os.path.dirname(CSI_SOCKET)} {CACHE_DIR}/volumes")
        self.offsets[g.name] = guest_clock_offset(g)
        self.start_agent(g)
        self.start_csi_node(g)
        self.wait_agent(g)

    # The processes, each started the one way the rig runs it: at bring-up, and again to
    # restart one after a crash (bench/kill_restart.py).

    def start_operator(self) -> None:
        """The operator on the host (kopf, peering priority 100); its log is appended to."""
        self.procs["operator"] = self.cp.spawn_operator(self.workdir / "operator.log",
                                                        priority=100)

    def start_csi_controller(self) -> None:
        """The CSI controller on the host, serving on `controller_socket`."""
        with open(self.workdir / "csi-controller.log", "ab") as log:
            self.procs["csi-controller"] = subprocess.Popen(
                [guest_python(), "-m", "vmthunder.cli", "csi", "--mode", "controller",
                 "--endpoint", f"unix://{self.controller_socket}", "--node-id", "host",
                 "--replica-wait", "120"],
                env={**self.cp.env(), "PYTHONUNBUFFERED": "1"}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def start_agent(self, g: Guest) -> None:
        """The node agent in guest g (log: /tmp/agent.log in the guest)."""
        env = guest_env(f"KUBECONFIG={self.cp.kubeconfig}")
        _daemon(g, f"{env} {guest_python()} -m vmthunder.cli agent --node {g.name} "
                f"--export-ip {g.ip} "
                f"--cache-dir {CACHE_DIR} --metrics-port {AGENT_METRICS_PORT}",
                "vmthunder.cli agent", "/tmp/agent.log")

    def wait_agent(self, g: Guest, timeout: float = NODE_READY_TIMEOUT) -> None:
        """Returns once the agent in guest g serves its metrics: it does so once its kernel side
        is prepared and its watches run. Provisioning starts after that, so what it measures
        is the agent at work, not an agent still starting."""
        listening = f":{AGENT_METRICS_PORT:04X} 00000000:0000 0A"  # /proc/net/tcp, LISTEN
        self._wait_listening(g, "the node agent", "/tmp/agent.log", timeout,
                             f"'{listening}' /proc/net/tcp")

    def start_csi_node(self, g: Guest, timeout: float = NODE_READY_TIMEOUT,
                       wait: bool = True) -> None:
        """The CSI node plugin in guest g (log: /tmp/csi-node.log); with wait, returns once
        it serves its socket, where kubelet's registrar finds it. Its NodeStage waits as long
        as the chart's does (60 s): a call given up at 30 s was called again seconds later,
        and each call again reads the volume and writes its finalizer, seconds of a busy guest
        between a VM and its boot."""
        env = guest_env(f"KUBECONFIG={self.cp.kubeconfig}")
        _daemon(g, f"{env} {guest_python()} -m vmthunder.cli csi --mode node "
                f"--endpoint unix://{CSI_SOCKET} --node-id {g.name} "
                f"--state-dir {CACHE_DIR}/volumes "
                f"--metrics-port {CSI_NODE_METRICS_PORT}", "vmthunder.cli csi",
                "/tmp/csi-node.log")
        if wait:
            # /proc/net/unix, not a Probe: a Python gRPC client costs a loaded TCG guest as
            # much CPU to start as the plugin itself. A listening stream socket, whose path
            # gRPC keeps as the URI had it (///run/...).
            self._wait_listening(g, "the CSI node plugin", "/tmp/csi-node.log", timeout,
                                 f"'00010000 0001 01 .*{CSI_SOCKET}$' /proc/net/unix")

    def _wait_listening(self, g: Guest, what: str, log: str, timeout: float,
                        grep: str) -> None:
        tries = int(timeout * 2)
        try:
            run_quick(g, f"i=0; until grep -q {grep}; do i=$((i+1)); "
                         f"[ $i -gt {tries} ] && exit 1; sleep 0.5; done", timeout=timeout + 30)
        except ProvisionError as e:
            raise ProvisionError(f"{g.name}: {what} is not ready: {e}\n"
                                 f"{run_quick(g, f'tail -c 3000 {log}')}") from None

    def close(self) -> None:
        """Tears everything down; a second Ctrl-C does not interrupt the teardown."""
        import signal

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self._close()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def _close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        try:
            self.cp.stop()
        finally:
            self.lab.down()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for name in ("operator", "csi-controller"):
            path = self.workdir / f"{name}.log"
            if path.exists():
                out.append(f"--- {name}\n{path.read_text(errors='replace')[-2500:]}")
        for g in self.lab.nodes[:4]:
            for log in ("/tmp/agent.log", "/tmp/csi-node.log"):
                with contextlib.suppress(Exception):
                    out.append(f"--- {g.name}:{log}\n"
                               f"{g.run(f'tail -c 2500 {log}', timeout=20).stdout}")
        return "\n".join(out)

    def save_logs(self, folder: Path) -> None:
        """Every process's whole log into `folder`: the operator's and CSI controller's, and
        each node's agent and CSI node plugin (their step times say where the time went)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("operator", "csi-controller"):
            with contextlib.suppress(OSError):
                shutil.copy(self.workdir / f"{name}.log", folder / f"{name}.log")
        for g in self.lab.guests:
            for log in ("agent", "csi-node"):
                with contextlib.suppress(Exception):
                    r = g.run(f"cat /tmp/{log}.log", timeout=60)
                    (folder / f"{g.name}-{log}.log").write_text(r.stdout)
            with contextlib.suppress(Exception):  # where each guest's CPU went (user, system)
                (folder / f"{g.name}-cpu.txt").write_text(cpu_table(g.run(CPU_COMMAND,
                                                                          timeout=60).stdout))

    def cpu_mark(self) -> dict[str, str]:
        """Each guest's CPU per process now, for `save_cpu_since`: the guests' CPU in one
        mode, apart from the lab's bring-up and the other modes."""
        def one(g: Guest) -> str:
            try:
                return str(g.run(CPU_COMMAND, timeout=60).stdout)
            except Exception:  # the lab's GuestError: a mark lost costs one table, no run
                return ""

        guests = self.lab.guests
        return dict(zip((g.name for g in guests), in_parallel(one, guests), strict=True))

    def save_cpu_since(self, mark: Mapping[str, str], folder: Path, tag: str) -> None:
        """`{guest}-cpu-{tag}.txt` in `folder`: each guest's CPU per process since `mark`."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, now in self.cpu_mark().items():
            if now and mark.get(name):
                (folder / f"{name}-cpu-{tag}.txt").write_text(cpu_table(now, since=mark[name]))

    # --- clients ---

    def custom(self) -> Any:
        import kubernetes

        return kubernetes.client.CustomObjectsApi(self.api)

    def replicas(self, image: str) -> list[dict[str, Any]]:
        res = self.custom().list_cluster_custom_object(
            GROUP, VERSION, "imagereplicas", label_selector=f"vmthunder.io/image-cache={image}")
        return list(res.get("items", []))

    def origin_bytes(self) -> int:
        assert self.lab.origin is not None
        return read_sectors(self.lab.origin)

    def host_time(self, g: Guest, guest_stamp: float | None) -> float | None:
        return None if guest_stamp is None else guest_stamp - self.offsets.get(g.name, 0.0)

    # --- the run ---

    def apply_image_cache(self, name: str, prefetch: bool) -> None:
        t = self.lab.origin_target
        assert t is not None
        o = self.options
        self.custom().create_cluster_custom_object(GROUP, VERSION, "imagecaches", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageCache",
            "metadata": {"name": name},
            "spec": {
                "source": {"iscsi": {"portal": t.portal, "iqn": t.iqn, "lun": 0}},
                "sizeBytes": t.size, "fanout": o.fanout, "originFanout": o.origin_fanout,
                "prefetch": {"enabled": prefetch, "profileConfigMap": {
                    "name": "golden-boot-profile", "namespace": NAMESPACE},
                    **({} if o.hold_seconds is None else {"holdSeconds": o.hold_seconds})},
                "detachPolicy": "WhenHydrated",
                "chapSecretRef": {"name": "golden-chap", "namespace": NAMESPACE},
            },
        })

    def provision(self, name: str = "golden", *, prefetch: bool | None = None,
                  wait_hydrated: bool = True, mode: str | None = None,
                  fault: Callable[[Rig, Run], None] | None = None) -> Run:
        """One ImageCache, one volume and one VM boot per node; returns the record.

        `fault`, if given, runs in its own thread from t0 on (it watches `run` and injects
        what it likes, noting it in run.faults); the wait for hydration skips killed guests."""
        o = self.options
        prefetch = o.prefetch if prefetch is None else prefetch
        nodes = self.lab.nodes
        mode = mode or ("vmthunder+prefetch" if prefetch else "vmthunder")
        run = Run(name, mode, len(nodes), {**asdict(o), "results": str(o.results)},
                  _profile_facts(self.profile, o.gap_scale), setup_seconds=self.setup_seconds)
        runs = {g.name: NodeRun(g.name) for g in nodes}
        run.nodes = list(runs.values())
        expected = expected_digest(self.disk, self.profile)
        origin0 = self.origin_bytes()
        tx0 = dict(zip([g.name for g in nodes], in_parallel(tx_bytes, nodes), strict=True))
        tag = f"vmt-boot-{name}"
        in_parallel(lambda g: start_replayer(g, self._kubelet_cmd(tag), tag), nodes)
        wall0 = time.monotonic()
        self.apply_image_cache(name, prefetch)
        t0 = run.started = time.time()
        stop = threading.Event()
        mon = threading.Thread(target=self._monitor, args=(name, run, runs, t0, origin0, stop),
                               daemon=True)
        mon.start()
        errors: list[str] = []
        injector = None
        if fault is not None:
            def inject() -> None:
                try:
                    fault(self, run)
                except Exception as e:  # reported with the run, which goes on
                    errors.append(f"fault injector: {type(e).__name__}: {e}")
            injector = threading.Thread(target=inject, daemon=True)
            injector.start()

        def one(g: Guest) -> None:
            nr = runs[g.name]
            try:
                vid, context = self.create_volume(name, g.name)
                nr.created = time.time() - t0
                go(g, tag, {"volume_id": vid, "context": context})
                out = wait_boot(g, tag, o.boot_timeout)
                for key in ("staged", "published", "first_byte", "booted"):
                    stamp = self.host_time(g, out.get(f"t_{key}"))
                    setattr(nr, key, None if stamp is None else stamp - t0)
                nr.reads = int(out["reads"])
                nr.max_read_s = float(out.get("max_read_s") or 0.0)
                nr.read_error = out["error"]
                if o.real_boot:
                    if out["error"] is None:
                        nr.booted = self._real_boot(g, int(out["nbd_port"])) - t0
                    nr.sha_ok = out["error"] is None  # the image booted to its marker
                else:
                    nr.sha_ok = out["sha256"] == expected and out["error"] is None
            except Exception as e:  # one node's failure is reported, the others go on
                nr.read_error = f"{type(e).__name__}: {e}"
                errors.append(f"{g.name}: {e}")

        pool = ThreadPoolExecutor(len(nodes))
        try:
            # Not `with`: on Ctrl-C, leave at once (the teardown kills the guests, which ends
            # the calls still waiting on them).
            for f in [pool.submit(one, g) for g in nodes]:
                f.result()
            pool.shutdown()
            if injector is not None:
                injector.join(60)
            run.origin_bytes_at_all_booted = self.origin_bytes() - origin0
            for nr in runs.values():
                nr.storm_from_parent, nr.storm_cached = nr.bytes_from_parent, nr.cached_bytes(
                    self.profile.image_size)
            if wait_hydrated:
                deadline = time.monotonic() + o.hydrate_timeout
                while time.monotonic() < deadline and not all(
                        runs[g.name].detached is not None for g in nodes if g.alive()):
                    time.sleep(1)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            stop.set()
            mon.join(30)
            self.printer.freeze()
        run.origin_bytes = self.origin_bytes() - origin0
        for g, tx in zip(nodes, in_parallel(tx_bytes, nodes), strict=True):
            runs[g.name].egress = tx - tx0[g.name]
        parents = {n.node: n.parent for n in run.nodes if n.parent}
        run.tree_problems = tree_problems(parents, o.fanout, o.origin_fanout)
        if len(parents) != len(nodes):
            run.tree_problems.append(f"{len(nodes) - len(parents)} nodes have no replica")
        run.wall_seconds = time.monotonic() - wall0
        if errors:
            self.printer.say("errors: " + "; ".join(errors)[:3000])
        return run

    def create_volume(self, image: str, node: str, pvc: str | None = None
                      ) -> tuple[str, dict[str, str]]:
        """CreateVolume as external-provisioner sends it under WaitForFirstConsumer."""
        from vmthunder.csi.client import connect
        from vmthunder.csi.proto import csi_pb2

        c = connect(f"unix://{self.controller_socket}")
        try:
            here = csi_pb2.Topology(segments={TOPOLOGY_KEY: node})
            block = csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(
                    mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
            deadline = time.monotonic() + 300
            while True:
                try:
                    vol = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                        name=pvc or f"pvc-{image}-{node}", parameters={"imageCache": image},
                        volume_capabilities=[block],
                        capacity_range=csi_pb2.CapacityRange(required_bytes=self.profile.image_size),
                        accessibility_requirements=csi_pb2.TopologyRequirement(
                            requisite=[here], preferred=[here])), timeout=150).volume
                    return vol.volume_id, dict(vol.volume_context)
                except Exception as e:  # external-provisioner retries transient codes
                    code = getattr(e, "code", lambda: None)()
                    if time.monotonic() > deadline or code is None or code.name not in (
                            "UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED"):
                        raise
                    time.sleep(1)
        finally:
            c.close()

    def _kubelet_cmd(self, tag: str) -> str:
        """The kubelet's part and the VM's boot, waiting for its volume at the ticket."""
        cmd = (f"{guest_env()} {guest_python()} -m vmthunder.lab.replay kubelet "
               f"--socket {CSI_SOCKET} --ticket {ticket_path(tag)} "
               f"--profile {self.profile_path} --scale {self.options.gap_scale}")
        if self.options.real_boot:
            cmd += f" --serve-nbd {REAL_BOOT_NBD_PORT}"
        return cmd

    def _real_boot(self, g: Guest, port: int) -> float:
        """The golden image booted for real: qemu (TCG) on the host, its disk the node's
        published volume over NBD through the lab network; returns when the VM's console
        prints its boot marker (host clock)."""
        from vmthunder.lab.profile import boot_vm
        from vmthunder.lab.replay import nbd_pid_file

        try:
            return boot_vm(f"nbd://{g.ip}:{port},cache=none", self.workdir / f"{g.name}.serial",
                           timeout=self.options.boot_timeout)
        finally:  # the VM is gone: its server too, or the volume stays busy (no unpublish)
            pid = f"$(cat {nbd_pid_file(port)})"
            run_quick(g, f"kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; "
                         f"rm -f {nbd_pid_file(port)}")

    def _monitor(self, image: str, run: Run, runs: dict[str, NodeRun], t0: float,
                 origin0: int, stop: threading.Event) -> None:
        last_origin = 0
        next_origin = 0.0
        while True:
            now = time.time() - t0
            try:
                items = self.replicas(image)
            except Exception:
                items = []
            for r in items:
                spec, st = r.get("spec") or {}, r.get("status") or {}
                nr = runs.get(str(spec.get("node")))
                if nr is None:
                    continue
                nr.parent = str(spec.get("parent", ""))
                nr.depth = int(spec.get("depth", 0))
                phase = str(st.get("phase", ""))
                nr.phase = phase
                if phase in ATTACHED_REPLICA_PHASES and nr.attached is None:
                    nr.attached = now
                if phase in HYDRATED_PHASES and nr.hydrated is None:
                    nr.hydrated = now
                if phase == "Detached" and nr.detached is None:
                    nr.detached = now
                nr.bytes_from_parent = int(st.get("bytesFromParent", 0))
                nr.bytes_served = int(st.get("bytesServed", 0))
                nr.hydrated_regions = int(st.get("hydratedRegions", 0))
                nr.total_regions = int(st.get("totalRegions", 0))
            if time.monotonic() >= next_origin:
                with contextlib.suppress(Exception):
                    last_origin = self.origin_bytes() - origin0
                next_origin = time.monotonic() + 2
            run.samples.append({"t": round(now, 2), "origin_bytes": last_origin, "nodes": {
                n.node: [n.phase, n.hydrated_regions, n.booted is not None]
                for n in run.nodes}})
            self._draw(run, now, last_origin)
            if stop.is_set():
                return
            stop.wait(1.0)

    def _draw(self, run: Run, now: float, origin: int) -> None:
        booted = sum(1 for n in run.nodes if n.booted is not None)
        hydr = sum(1 for n in run.nodes if n.hydrated is not None)
        lines = [f"  t={now:6.1f}s  booted {booted}/{run.n}  hydrated {hydr}/{run.n}  "
                 f"origin served {origin / 1e6:7.1f} MB"]
        for n in run.nodes:
            pct = 100 * n.hydrated_regions / n.total_regions if n.total_regions else 0.0
            vm = ("booted" if n.booted is not None else "booting" if n.published is not None
                  or n.attached is not None else "waiting")
            lines.append(f"    {n.node:9} <- {n.parent or '?':9} {n.phase or '-':10} "
                         f"cache {pct:5.1f}%  from parent {n.bytes_from_parent / 1e6:7.1f} MB  "
                         f"VM {vm}")
        phases: dict[str, int] = {}
        for n in run.nodes:
            phases[n.phase or "-"] = phases.get(n.phase or "-", 0) + 1
        summary = (f"  t={now:6.1f}s  booted {booted}/{run.n}  hydrated {hydr}/{run.n}  "
                   f"replicas {phases}  origin {origin / 1e6:.1f} MB")
        self.printer.frame(lines, summary)

    def delete_volumes_and_cache(self, image: str) -> None:
        """Unpublish, unstage and delete every volume of the image, delete the ImageCache, and
        wait until every node's stack of it is gone (between benchmark modes)."""
        from vmthunder.csi.client import connect
        from vmthunder.csi.proto import csi_pb2

        timeout = TEARDOWN_TIMEOUT_PER_8_NODES * max(1.0, self.options.nodes / 8)

        def unstage(g: Guest) -> None:
            script = (
                "import glob, os\nfrom vmthunder.csi.client import connect\n"
                "from vmthunder.csi.proto import csi_pb2\n"
                f"c = connect('unix://{CSI_SOCKET}')\n"
                "for t in glob.glob('/var/lib/kubelet/pods/*/volumeDevices/kubernetes.io~csi/*'):\n"
                "    vid = os.path.basename(t)\n"
                "    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest("
                "volume_id=vid, target_path=t), timeout=60)\n"
                "    st = ('/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/'"
                " + vid)\n"
                "    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest("
                "volume_id=vid, staging_target_path=st), timeout=60)\n")
            tag = f"vmt-unstage-{image}"
            run_quick(g, f"cat > /tmp/{tag}.py <<'EOF'\n{script}EOF")
            run_detached(g, f"{guest_env()} {guest_python()} /tmp/{tag}.py", tag, timeout)

        in_parallel(unstage, self.lab.nodes)
        c = connect(f"unix://{self.controller_socket}")
        from vmthunder.csi.names import volume_id_for

        for g in self.lab.nodes:
            c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
                volume_id=volume_id_for(f"pvc-{image}-{g.name}")), timeout=60)
        c.close()
        self.custom().delete_cluster_custom_object(GROUP, VERSION, "imagecaches", image)

        def gone(g: Guest) -> None:
            deadline = time.monotonic() + timeout
            while left := run_quick(g, f"dmsetup ls | grep 'vmt-{image}' || true").strip():
                if time.monotonic() > deadline:
                    raise ProvisionError(
                        f"{g.name}: the stack of {image} is still there: {left}\n"
                        f"{run_quick(g, 'tail -c 2500 /tmp/agent.log')}")
                time.sleep(1)

        in_parallel(gone, self.lab.nodes)


# A guest's CPU per process: the clock's ticks, every /proc/PID/stat, every command line.
CPU_COMMAND = ("getconf CLK_TCK; for s in /proc/[0-9]*/stat; do cat $s; echo; done; "
               "ps -e -o pid,args")


def _cpu_ticks(text: str) -> tuple[int, dict[str, tuple[int, int, int, str]], dict[str, str]]:
    """CPU_COMMAND's output: ticks a second; by pid, (user, system, start time, name), the
    user and system time of its waited-for children counted in (the agent's dmsetup and
    iscsiadm are the agent's); arguments by pid."""
    lines = text.splitlines()
    hz = int(lines[0]) if lines and lines[0].isdigit() else 100
    ticks: dict[str, tuple[int, int, int, str]] = {}
    args: dict[str, str] = {}
    for line in lines[1:]:
        if ") " in line and line.split(" ", 1)[0].isdigit():
            pid = line.split(" ", 1)[0]
            name = line[line.index("(") + 1:line.rindex(")")]
            f = line[line.rindex(")") + 2:].split()
            ticks[pid] = (int(f[11]) + int(f[13]), int(f[12]) + int(f[14]), int(f[19]), name)
        elif line.strip() and line.split(None, 1)[0].isdigit():
            pid, _, rest = line.strip().partition(" ")
            args[pid] = rest.strip()
    return hz, ticks, args


def cpu_table(text: str, since: str | None = None) -> str:
    """The CPU seconds (user, system) of a guest's processes with their waited-for
    children's, most first (kernel threads too), from CPU_COMMAND's output; with `since` (an
    earlier output), only what was spent after it (a process started since counts whole).
    What exited meanwhile unwaited for is not there."""
    hz, ticks, args = _cpu_ticks(text)
    before = _cpu_ticks(since)[1] if since is not None else {}
    rows = []
    for pid, (user, system, started, name) in ticks.items():
        u0, s0, started0, _ = before.get(pid, (0, 0, started, name))
        if started0 != started:  # another process with the same pid
            u0 = s0 = 0
        rows.append((max(0, user - u0) / hz, max(0, system - s0) / hz, pid, name))
    rows.sort(key=lambda r: -(r[0] + r[1]))
    out = [f"{'user s':>8} {'sys s':>8} {'pid':>6}  command"]
    out += [f"{u:8.1f} {st:8.1f} {pid:>6}  {args.get(pid, name)[:150]}"
            for u, st, pid, name in rows if u + st > 0]
    return "\n".join(out) + "\n"


def ticket_path(tag: str) -> str:
    return f"/tmp/{tag}.ticket"


def start_replayer(g: Guest, cmd: str, tag: str, timeout: float = NODE_READY_TIMEOUT) -> None:
    """Starts a replay command given `--ticket ticket_path(tag)` detached in the guest, and
    returns once it waits for its go (vmthunder.lab.replay: started ahead of the clock)."""
    from vmthunder.node.labdrive import start_shell

    ticket = ticket_path(tag)
    # One replayer per ticket: one left waiting by an earlier run would start with this one.
    stop_replayer(g, tag)
    run_quick(g, f"rm -f {ticket} {ticket}.ready")
    start_shell(g, cmd, tag)
    run_quick(g, f"i=0; until [ -e {ticket}.ready ] || [ -e /tmp/{tag}.rc ]; do i=$((i+1)); "
                 f"[ $i -gt {int(timeout * 2)} ] && break; sleep 0.5; done", timeout=timeout + 30)
    if not run_quick(g, f"[ -e {ticket}.ready ] && echo ready || true").strip():
        err = run_quick(g, f"tail -c 2000 /tmp/{tag}.err 2>/dev/null || true")
        raise ProvisionError(f"{g.name}: the replayer did not start: {err}")


def stop_replayer(g: Guest, tag: str) -> None:
    """Kills the replay of `tag`'s ticket, if one runs ([-]: the pattern must not match the
    command line of the shell that runs pkill)."""
    run_quick(g, f"pkill -f -- '[-]-ticket {ticket_path(tag)} ' || true")


def go(g: Guest, tag: str, ticket: Mapping[str, Any]) -> None:
    """The replayer's go: its ticket, written whole (it starts as soon as the file exists)."""
    data = base64.b64encode(json.dumps(dict(ticket)).encode()).decode()
    path = ticket_path(tag)
    run_quick(g, f"echo {data} | base64 -d > {path}.tmp && mv {path}.tmp {path}")


def boot_output(g: Guest, cmd: str, tag: str, timeout: float) -> dict[str, Any]:
    """Runs a replay command detached in the guest; its JSON line (also on a failed read)."""
    from vmthunder.node.labdrive import start_shell

    start_shell(g, cmd, tag)
    return wait_boot(g, tag, timeout)


def _teardown_on_sigterm() -> None:
    """A SIGTERM (kill, a job's timeout) ends the run as Ctrl-C does, through the callers'
    `finally: rig.close()`: by default it killed the run and left the control plane's and the
    operator's processes behind."""
    import signal

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def wait_boot(g: Guest, tag: str, timeout: float, setup: str | None = None) -> dict[str, Any]:
    """The JSON line of the replay running detached as `tag` (also on a failed read). A failure
    of the script running detached as `setup` (the one that gives the replayer its go) ends
    the wait too. The guest waits for the files itself (Guest.wait_for_any): polling them
    with a command twice a second took CPU from what is measured (VMThunder with prefetch
    at N = 8: 207.9 s with it, 133.1 s without, 2026-12-07)."""
    deadline = time.monotonic() + timeout
    setup_done = setup is None
    while True:
        watched = [f"/tmp/{tag}.rc", *([] if setup_done else [f"/tmp/{setup}.rc"])]
        found = g.wait_for_any(watched, min(WAIT_SLICE_SECONDS,
                                            max(0.0, deadline - time.monotonic())))
        rc = run_quick(g, f"cat /tmp/{tag}.rc 2>/dev/null || true").strip()
        if not rc.isdigit() and not setup_done:
            setup_rc = run_quick(g, f"cat /tmp/{setup}.rc 2>/dev/null || true").strip()
            if setup_rc.isdigit() and setup_rc != "0":
                err = run_quick(g, f"tail -c 2000 /tmp/{setup}.err")
                raise ProvisionError(f"{g.name}: {setup} failed rc={setup_rc}: {err}")
            setup_done = setup_rc == "0"
        if rc.isdigit():
            text = run_quick(g, f"cat /tmp/{tag}.out").strip()
            try:
                out: dict[str, Any] = json.loads(text.splitlines()[-1])
                return out
            except (IndexError, ValueError):
                err = run_quick(g, f"tail -c 2000 /tmp/{tag}.err")
                raise ProvisionError(f"{g.name}: boot failed rc={rc}: {err}") from None
        if time.monotonic() > deadline:
            # Stopped: it holds the volume open, which would fail the unstage that follows
            # and leave it reading beside the next run (N = 16, 2026-12-07).
            stop_replayer(g, tag)
            raise ProvisionError(f"{g.name}: boot still running after {timeout:.0f} s; stopped")
        if found is not None:
            time.sleep(0.2)  # an rc file being written: its digits come in a moment


def in_parallel(fn: Callable[[Guest], Any], guests: Sequence[Guest]) -> list[Any]:
    with ThreadPoolExecutor(max(1, len(guests))) as pool:
        return list(pool.map(fn, guests))


def _profile_facts(p: BootProfile, scale: float) -> dict[str, Any]:
    return {"reads": len(p.reads), "bytes_read": p.bytes_read, "unique_bytes": p.unique_bytes,
            "recorded_boot_seconds": p.boot_seconds, "recorded_under": p.recorded_under,
            "gap_scale": scale, "scaled_compute_seconds": p.total_gap_us * scale / 1e6,
            "image_size": p.image_size}


# --- output -----------------------------------------------------------------------------------

def _t(x: float | None) -> str:
    return "      -" if x is None else f"{x:7.1f}"


def report(run: Run, out: TextIO = sys.stdout) -> None:
    from vmthunder.operator.treeview import render_tree

    s = run.summary()
    pf = run.profile
    if run.options.get("real_boot"):
        print(f"\nmode: real boot (the golden image in qemu TCG on the host, its disk the "
              f"node's published volume over NBD), {run.mode}, N={run.n}", file=out)
    else:
        print(f"\nmode: replayed boot ({pf['reads']} reads, {pf['unique_bytes'] / 1e6:.1f} MB "
              f"of the image, compute gaps x{pf['gap_scale']:g} of the TCG recording = "
              f"{pf['scaled_compute_seconds']:.1f} s), {run.mode}, N={run.n}", file=out)
    parents = {n.node: n.parent for n in run.nodes if n.parent}
    notes = {n.node: f"depth {n.depth}  {n.phase}" for n in run.nodes}
    print("\ntree (planned by the operator):", file=out)
    print(render_tree(parents, notes, root_label=f"origin ({run.name})"), file=out)
    if run.tree_problems:
        print("tree problems: " + "; ".join(run.tree_problems), file=out)
    for f in run.faults:
        print(f"fault injected: {f}", file=out)
    print("\nseconds since the ImageCache was applied", file=out)
    print(f"{'node':9} {'parent':9} {'d':>1} {'volume':>7} {'attach':>7} {'staged':>7} "
          f"{'1st B':>7} {'booted':>7} {'boot':>6} {'hydrat.':>7} {'detach':>7} "
          f"{'fromPar MB':>10} {'served MB':>9} {'egress MB':>9}  check", file=out)
    for n in run.nodes:
        ok = "ok" if n.sha_ok else (n.read_error or "sha256 MISMATCH")[:60]
        boot = n.boot_seconds
        print(f"{n.node:9} {n.parent:9} {n.depth:1} {_t(n.created)} {_t(n.attached)} "
              f"{_t(n.staged)} {_t(n.first_byte)} {_t(n.booted)} "
              f"{'     -' if boot is None else f'{boot:6.1f}'} {_t(n.hydrated)} "
              f"{_t(n.detached)} {n.bytes_from_parent / 1e6:10.1f} {n.bytes_served / 1e6:9.1f} "
              f"{n.egress / 1e6:9.1f}  {ok}", file=out)
    if "all_booted" in s:
        print(f"\nall booted {s['all_booted']:.1f} s, mean {s['mean_booted']:.1f} s, "
              f"p95 {s['p95_booted']:.1f} s (VM boot alone: mean {s.get('mean_boot', 0):.1f} s, "
              f"p95 {s.get('p95_boot', 0):.1f} s); {s['booted']}/{s['nodes']} booted, "
              f"{s['read_errors']} read errors, {s['sha_mismatches']} checksum mismatches; "
              f"longest single read {s['max_read_s']:.2f} s", file=out)
    hyd = (f"all hydrated {s['all_hydrated']:.1f} s" if "all_hydrated" in s
           else "not all hydrated within the wait")
    det = f"all detached {s['all_detached']:.1f} s" if "all_detached" in s else "not all detached"
    print(f"{hyd}, {det}", file=out)
    img = pf["image_size"]
    print(f"origin served {run.origin_bytes / 1e6:.1f} MB ({run.origin_bytes / img:.2f} images;"
          f" {run.origin_bytes_at_all_booted / 1e6:.1f} MB by the time all had booted); "
          f"max node egress {s['max_node_egress'] / 1e6:.1f} MB", file=out)
    print("by the time all had booted, MB from the parent / MB cached: " + ", ".join(
        f"{n.node} {n.storm_from_parent / 1e6:.1f}/{n.storm_cached / 1e6:.1f}"
        for n in run.nodes), file=out)


def write_results(run: Run, folder: Path, stem: str) -> tuple[Path, Path | None]:
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / f"{stem}.json"
    js.write_text(json.dumps(run.to_json(), indent=1))
    png: Path | None = folder / f"{stem}.png"
    try:
        plot_timeline(run, png)  # type: ignore[arg-type]
    except ImportError:
        png = None
    return js, png


def plot_timeline(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = run.nodes
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 2.5 + 0.35 * len(nodes)),
                                  gridspec_kw={"height_ratios": [max(2, len(nodes)), 2]},
                                  sharex=True)
    for i, n in enumerate(nodes):
        y = len(nodes) - 1 - i

        def bar(a: float | None, b: float | None, color: str, label: str, y: int = y,
                first: bool = i == 0) -> None:
            if a is not None and b is not None and b > a:
                ax.barh(y, b - a, left=a, color=color, height=0.6,
                        label=label if first else None)

        bar(0.0, n.created, "#bbbbbb", "CreateVolume")
        bar(n.created, n.staged, "#f0b429", "attach + stage")
        bar(n.published, n.booted, "#2f80ed", "VM boot (replay)")
        bar(n.booted, n.hydrated, "#9bd3ae", "background hydration")
        if n.first_byte is not None:
            ax.plot([n.first_byte], [y], "k|", markersize=10)
        if n.detached is not None:
            ax.plot([n.detached], [y], "rx")
    ax.set_yticks(range(len(nodes)))
    ax.set_yticklabels([f"{n.node} (d{n.depth})" for n in reversed(nodes)])
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"VMThunder lab: {run.n} VMs from one image ({run.mode}; | first byte, "
                 f"x detached)")
    ts = [s["t"] for s in run.samples]
    ax2.plot(ts, [s["origin_bytes"] / 1e6 for s in run.samples], label="origin served (MB)")
    ax2.set_xlabel("seconds since the ImageCache was applied")
    ax2.set_ylabel("MB")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_provision(options: Options, out: TextIO = sys.stdout) -> int:
    """`vmthunder demo`: the whole run, printed, with results written; everything torn down."""
    t0 = time.monotonic()
    rig = Rig.start(options, out)
    try:
        run = rig.provision("golden")
        run.wall_seconds = time.monotonic() - t0
        report(run, out)
        stem = f"provision-n{options.nodes}-{time.strftime('%Y%m%d-%H%M%S')}"
        js, png = write_results(run, options.results, stem)
        rig.save_logs(options.results / f"{stem}-logs")
        print(f"\nresults: {js}" + (f", {png}" if png else "") + f", logs in {stem}-logs/",
              file=out)
        s = run.summary()
        ok = s["booted"] == s["nodes"] and not s["read_errors"] and not s["sha_mismatches"]
        if not ok:
            print(rig.logs(), file=sys.stderr)
        return 0 if ok else 1
    finally:
        t1 = time.monotonic()
        rig.close()
        print(f"torn down in {time.monotonic() - t1:.1f} s; whole run "
              f"{time.monotonic() - t0:.1f} s", file=out)


@contextlib.contextmanager
def rig(options: Options, out: TextIO = sys.stdout, services: bool = True) -> Iterator[Rig]:
    r = Rig.start(options, out, services)
    try:
        yield r
    finally:
        r.close()
