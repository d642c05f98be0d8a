"""Kill/restart cycles (issue 10): the agent, the CSI node plugin, the CSI controller and the
operator SIGKILLed at random points while work is under way; each must converge from the
kernel's and the API server's state, leaving nothing behind.

    with rig(Options(nodes=2, image=str(small_image()), slot=9, live=False)) as r:
        chaos = Chaos(r, seed=7)
        for i in range(8):
            chaos.cycle(i, KILL_ORDER[i % 4])
        chaos.finish()                      # deletes everything, checks that nothing is left
        print(chaos.summary())

A cycle: one piece of work (apply an ImageCache, create + stage + publish a volume on a node,
unpublish + unstage + delete one, or delete an ImageCache with its volumes), a SIGKILL of one
component at a seeded random moment into it, the component restarted the way the rig starts
it (`Rig.start_*`), the work finished as kubelet and external-provisioner would (they retry),
then a wait until the cluster converged: what is wanted is there and nothing else is.

The checks are pure functions of what the API server and each node's kernel show (a census:
dm devices, iSCSI sessions, LIO targets, loop devices, COW files, kubelet mounts, processes);
each returns the problems it found, split into `missing` (wanted, not there yet) and `leaks`
(there, not wanted). A cycle converged when both are empty; what is left after the wait is
reported, and counted.
"""

from __future__ import annotations

import base64
import json
import random
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmthunder.lab.lab import CACHE, Guest
from vmthunder.lab.provision import (
    CACHE_DIR,
    CSI_SOCKET,
    NAMESPACE,
    Rig,
    guest_env,
    guest_python,
    in_parallel,
    run_detached,
    run_quick,
    tree_problems,
)
from vmthunder.node import names
from vmthunder.node.labdrive import start_shell, wait_shell
from vmthunder.operator.model import GROUP, USABLE_REPLICA_PHASES, VERSION

COMPONENTS = ("agent", "csi-node", "csi-controller", "operator")
GUEST_COMPONENTS = {"agent": "vmthunder.cli agent", "csi-node": "vmthunder.cli csi"}
ACTIONS = ("apply-image", "create-volume", "delete-volume", "delete-image")
# Which work exercises which component: a kill lands where that component has something to do.
WORK_OF = {
    "agent": ("apply-image", "delete-image"),
    "csi-node": ("create-volume", "delete-volume", "delete-image"),
    "csi-controller": ("create-volume", "delete-volume"),
    "operator": ("apply-image", "delete-image"),
}
MAX_IMAGES = 2
MAX_VOLUMES_PER_NODE = 2
STAGING = "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging"
PODS = "/var/lib/kubelet/pods/chaos/volumeDevices/kubernetes.io~csi"
EXPORT_PREFIX = f"{names.IQN_BASE}:"
KUBELET_RETRY_S = 300  # kubelet retries a failed CSI call for ever; this is our patience


# --- the image --------------------------------------------------------------------------------

def small_image(size_mib: int = 64) -> Path:
    """A small raw image (deterministic random bytes) with a synthetic boot profile beside it,
    cached outside the repo: hydrating it takes seconds, not minutes."""
    from vmthunder.lab.profile import BootProfile, Read, dump_profile
    from vmthunder.node.labdrive import golden_image, sha256_file, synthetic_profile

    folder = CACHE / f"killrestart-image-{size_mib}M"
    disk, prof = folder / "disk.img", folder / "boot.profile"
    if disk.exists() and prof.exists():
        return disk
    folder.mkdir(parents=True, exist_ok=True)
    size = size_mib << 20
    src = golden_image(size)
    tmp = disk.with_suffix(".tmp")
    tmp.write_bytes(src.read_bytes())
    reads = tuple(Read(off, n, 1000) for off, n in synthetic_profile(size))
    profile = BootProfile(image_size=size, image_sha256=sha256_file(tmp),
                          recorded_under="synthetic", gap_scale=1.0,
                          boot_seconds=len(reads) / 1000, reads=reads)
    prof.write_text(dump_profile(profile))
    tmp.rename(disk)
    return disk


# --- what is wanted ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Vol:
    volume_id: str
    image: str
    node: str
    pvc: str
    context: tuple[tuple[str, str], ...] = ()


@dataclass
class World:
    """What the cycles asked for: live ImageCaches (name -> detach policy) and volumes."""

    images: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, Vol] = field(default_factory=dict)
    deleted_images: set[str] = field(default_factory=set)
    deleted_volumes: set[str] = field(default_factory=set)
    made: int = 0  # names handed out

    def volumes_on(self, node: str) -> list[Vol]:
        return [v for v in self.volumes.values() if v.node == node]


@dataclass(frozen=True)
class Action:
    kind: str
    image: str = ""
    node: str = ""
    volume: str = ""  # volume id (delete-volume)
    detach: str = "WhenHydrated"  # apply-image


def plan_action(world: World, nodes: Sequence[str], components: Sequence[str],
                rng: random.Random, kind: str | None = None) -> Action:
    """The next piece of work: `kind` if given and the world allows it, else one the
    components to be killed take part in where the world allows it, else any that the world
    allows. Pure (the caller's seeded rng decides)."""
    def feasible(kind: str) -> bool:
        if kind == "apply-image":
            return len(world.images) < MAX_IMAGES
        if kind == "create-volume":
            return bool(world.images) and any(
                len(world.volumes_on(n)) < MAX_VOLUMES_PER_NODE for n in nodes)
        if kind == "delete-volume":
            return bool(world.volumes)
        return bool(world.images)  # delete-image

    kinds = [k for k in ACTIONS if feasible(k)
             and any(k in WORK_OF.get(c, ACTIONS) for c in components)]
    kinds = kinds or [k for k in ACTIONS if feasible(k)]
    kind = kind if kind is not None and feasible(kind) else rng.choice(kinds)
    if kind == "apply-image":
        return Action(kind, image=f"kr{world.made}",
                      detach=rng.choice(("WhenHydrated", "Never")))
    if kind == "create-volume":
        node = rng.choice([n for n in nodes if len(world.volumes_on(n)) < MAX_VOLUMES_PER_NODE])
        return Action(kind, image=rng.choice(sorted(world.images)), node=node)
    if kind == "delete-volume":
        v = world.volumes[rng.choice(sorted(world.volumes))]
        return Action(kind, image=v.image, node=v.node, volume=v.volume_id)
    return Action(kind, image=rng.choice(sorted(world.images)))


def kill_schedule(cycles: int, rng: random.Random, each: int = 2,
                  per_cycle: int = 1) -> list[tuple[str, ...]]:
    """Which components each cycle kills: every component `each` times first (shuffled), then
    at random. With two per cycle, one runs in a node (agent, CSI node plugin) and one on the
    host (operator, CSI controller); with four, every component every cycle."""
    if per_cycle == len(COMPONENTS):
        out = []
        for _ in range(cycles):
            order = list(COMPONENTS)
            rng.shuffle(order)
            out.append(tuple(order))
        return out
    if per_cycle == 1:
        first = [c for c in COMPONENTS for _ in range(each)]
        rng.shuffle(first)
        rest = [rng.choice(COMPONENTS) for _ in range(max(0, cycles - len(first)))]
        return [(c,) for c in (first + rest)[:cycles]]
    if per_cycle != 2:
        raise ValueError("one, two or four kills per cycle")
    guest = [c for c in COMPONENTS if c in GUEST_COMPONENTS]
    host = [c for c in COMPONENTS if c not in GUEST_COMPONENTS]
    sides = []
    for side in (guest, host):
        order = [c for c in side for _ in range(each)]
        rng.shuffle(order)
        order += [rng.choice(side) for _ in range(max(0, cycles - len(order)))]
        sides.append(order[:cycles])
    return list(zip(*sides, strict=True))


# --- what is there: the census of a node ------------------------------------------------------

CENSUS = (
    "echo @dm; dmsetup ls 2>/dev/null | awk '$1 ~ /^vmt-/ {print $1}';"
    "echo @src; dmsetup table 2>/dev/null | grep -E '^vmt-.*-src: ';"
    "echo @sessions; for s in /sys/class/iscsi_session/session*; do [ -d \"$s\" ] || continue;"
    " d=''; for b in $s/device/target*/*:*:*:*/block/*; do [ -e \"$b/dev\" ] &&"
    " d=\"$d$(cat $b/dev),\"; done;"
    " echo \"$(cat $s/targetname)|$(cat $s/state 2>/dev/null)|$d\"; done;"
    "echo @lio; for t in /sys/kernel/config/target/iscsi/iqn.*; do [ -d \"$t\" ] || continue;"
    " echo \"$(basename $t)|$(ls $t/tpgt_1/lun 2>/dev/null | tr '\\n' ,)|"
    "$(ls $t/tpgt_1/acls 2>/dev/null | tr '\\n' ,)\"; done;"
    "echo @backstores; for b in /sys/kernel/config/target/core/*/vmt-*; do"
    " [ -d \"$b\" ] && basename $b; done;"
    "echo @loops; for l in /sys/block/loop*; do [ -f $l/loop/backing_file ] &&"
    " echo \"$(basename $l)|$(cat $l/loop/backing_file)\"; done;"
    f"echo @cow; ls {CACHE_DIR}/volumes 2>/dev/null | grep '[.]cow$';"
    f"echo @staging; ls {STAGING} 2>/dev/null;"
    "echo @mounts; awk '$5 ~ /kubelet/ {print $5}' /proc/self/mountinfo;"
    f"echo @marks; for t in {PODS}/*; do [ -e \"$t\" ] || continue;"
    " echo \"$(basename $t)|$(dd if=$t bs=4096 count=1 iflag=direct 2>/dev/null |"
    " head -c 32)\"; done;"
    "echo @procs; echo \"agent|$(pgrep -f '[v]mthunder.cli agent' | wc -l)\";"
    " echo \"csi-node|$(pgrep -f '[v]mthunder.cli csi' | wc -l)\";"
    "echo @end"
)


@dataclass(frozen=True)
class Session:
    target: str
    state: str
    devices: tuple[str, ...]  # "8:0"


@dataclass(frozen=True)
class Export:
    iqn: str
    luns: tuple[str, ...]
    acls: tuple[str, ...]


@dataclass(frozen=True)
class NodeCensus:
    node: str
    dm: tuple[str, ...] = ()
    src_devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # -src -> devs
    sessions: tuple[Session, ...] = ()
    exports: tuple[Export, ...] = ()
    backstores: tuple[str, ...] = ()
    loops: Mapping[str, str] = field(default_factory=dict)  # loopN -> backing file
    cow: tuple[str, ...] = ()  # volume ids with a COW file
    staging: tuple[str, ...] = ()
    mounts: tuple[str, ...] = ()
    marks: Mapping[str, str] = field(default_factory=dict)  # volume id -> first bytes
    procs: Mapping[str, int] = field(default_factory=dict)
    complete: bool = False  # the census ran to its end


_DEVNO = re.compile(r"^\d+:\d+$")


def parse_census(node: str, text: str) -> NodeCensus:
    """The census command's output -> NodeCensus (pure)."""
    parts: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("@"):
            section = line[1:].strip()
            parts.setdefault(section, [])
        elif section and line.strip():
            parts[section].append(line.rstrip("\n"))

    def rows(name: str, n: int) -> list[list[str]]:
        return [(line.split("|") + [""] * n)[:n] for line in parts.get(name, [])]

    def items(s: str) -> tuple[str, ...]:
        return tuple(x for x in s.split(",") if x)

    src = {}
    for line in parts.get("src", []):
        name, _, table = line.partition(": ")
        src[name] = tuple(t for t in table.split() if _DEVNO.match(t))
    return NodeCensus(
        node=node,
        dm=tuple(parts.get("dm", [])),
        src_devices=src,
        sessions=tuple(Session(t, st, items(d)) for t, st, d in rows("sessions", 3)),
        exports=tuple(Export(i, items(lu), items(a)) for i, lu, a in rows("lio", 3)),
        backstores=tuple(parts.get("backstores", [])),
        loops={n: f for n, f in rows("loops", 2)},
        cow=tuple(c.removesuffix(".cow") for c in parts.get("cow", [])),
        staging=tuple(parts.get("staging", [])),
        mounts=tuple(parts.get("mounts", [])),
        marks={v: m for v, m in rows("marks", 2)},
        procs={p: int(n) if n.strip().isdigit() else 0 for p, n in rows("procs", 2)},
        complete="end" in parts,
    )


def census_counts(c: NodeCensus) -> dict[str, int]:
    """How much state of each kind a census shows (evidence that the checks read real state)."""
    return {"dm": len(c.dm), "sessions with a disk": sum(1 for s in c.sessions if s.devices),
            "-src tables": len(c.src_devices), "LIO targets": len(c.exports),
            "LIO ACLs": sum(len(e.acls) for e in c.exports), "loop devices": len(c.loops),
            "COW files": len(c.cow), "published volumes": len(c.marks)}


# --- the checks -------------------------------------------------------------------------------

@dataclass
class Problems:
    missing: list[str] = field(default_factory=list)  # wanted, not (yet) there
    leaks: list[str] = field(default_factory=list)  # there, not wanted

    def __bool__(self) -> bool:
        return bool(self.missing or self.leaks)

    def extend(self, other: Problems) -> None:
        self.missing += other.missing
        self.leaks += other.leaks


@dataclass(frozen=True)
class ReplicaView:
    image: str
    node: str
    parent: str
    phase: str
    ready: bool


def replica_view(obj: Mapping[str, Any]) -> ReplicaView:
    spec, st = obj.get("spec") or {}, obj.get("status") or {}
    labels = (obj.get("metadata") or {}).get("labels") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in st.get("conditions") or [])
    return ReplicaView(str(spec.get("imageCache") or labels.get("vmthunder.io/image-cache", "")),
                       str(spec.get("node", "")), str(spec.get("parent", "")),
                       str(st.get("phase", "")), ready)


def api_problems(world: World, nodes: Sequence[str], caches: Iterable[str],
                 replicas: Sequence[ReplicaView], volumes: Mapping[str, str],
                 fanout: int, origin_fanout: int) -> Problems:
    """The API server's objects against the world: every live ImageCache has a Ready replica
    in a usable phase on every node, in a valid tree; no replica outlives its ImageCache; the
    ImageVolumes are exactly the live volumes (`volumes`: id -> phase), each Published."""
    p = Problems()
    caches = set(caches)
    for image in sorted(world.images):
        if image not in caches:
            p.missing.append(f"ImageCache {image} is gone")
        mine = {r.node: r for r in replicas if r.image == image}
        for n in nodes:
            r = mine.get(n)
            if r is None:
                p.missing.append(f"ImageReplica {image}.{n}: none")
            elif r.phase not in USABLE_REPLICA_PHASES or not r.ready:
                p.missing.append(f"ImageReplica {image}.{n}: phase {r.phase or '-'}, "
                                 f"ready {r.ready}")
        parents = {r.node: r.parent for r in mine.values()}
        p.missing += [f"tree of {image}: {x}"
                      for x in tree_problems(parents, fanout, origin_fanout)]
    for r in replicas:
        if r.image not in world.images:
            p.leaks.append(f"ImageReplica {r.image}.{r.node} of "
                           f"{'deleted' if r.image not in caches else 'unwanted'} "
                           f"ImageCache {r.image}")
    for image in sorted(caches - set(world.images)):
        p.leaks.append(f"ImageCache {image} still exists")
    for vid, phase in sorted(volumes.items()):
        if vid not in world.volumes:
            p.leaks.append(f"ImageVolume {vid} of a deleted volume (phase {phase})")
        elif phase != "Published":
            p.missing.append(f"ImageVolume {vid}: phase {phase}")
    p.missing += [f"ImageVolume {vid}: none" for vid in sorted(set(world.volumes) - set(volumes))]
    return p


def node_problems(c: NodeCensus, world: World, replicas: Sequence[ReplicaView],
                  initiators: Mapping[str, str]) -> Problems:
    """One node's kernel against the world. `initiators`: node -> its iSCSI initiator name."""
    p = Problems()
    node = c.node
    if not c.complete:
        p.missing.append(f"{node}: census incomplete")
        return p
    for proc in GUEST_COMPONENTS:
        n = c.procs.get(proc, 0)
        if n != 1:
            (p.missing if n == 0 else p.leaks).append(f"{node}: {n} {proc} processes")
    live = set(world.images)
    mine = {v.volume_id for v in world.volumes_on(node)}
    dm = set(c.dm)
    # device-mapper: the stack of every live image, every live volume of the node, nothing else
    for name in sorted(dm):
        if name.startswith(names.PREFIX + "vol-"):
            vid = name[len(names.PREFIX + "vol-"):].removesuffix("-base")
            if vid not in mine:
                p.leaks.append(f"{node}: dm {name} of {_vol_fate(vid, world)}")
            continue
        image = names.image_of(name)
        if image is not None and image not in live:
            p.leaks.append(f"{node}: dm {name} of {_image_fate(image, world)}")
    for image in sorted(live):
        for dev in (names.cache_dev(image), names.export_dev(image)):
            if dev not in dm:
                p.missing.append(f"{node}: dm {dev}: none")
    for vid in sorted(mine):
        if names.volume_dev(vid) not in dm:
            p.missing.append(f"{node}: dm {names.volume_dev(vid)}: none (not staged)")
    # iSCSI: a session some -src reads through, to a live image's parent; nothing else
    read_by_src = {d for devs in c.src_devices.values() for d in devs}
    for s in c.sessions:
        image = _export_image(s.target)
        if image is not None and image not in live:
            p.leaks.append(f"{node}: iSCSI session to {s.target} ({s.state}) of "
                           f"{_image_fate(image, world)}")
        elif not set(s.devices) & read_by_src:
            p.leaks.append(f"{node}: iSCSI session to {s.target} ({s.state}, disks "
                           f"{','.join(s.devices) or 'none'}) that no -src reads")
    # LIO: one export (one LUN) per live image, with an ACL for each child and no one else
    exports = {e.iqn: e for e in c.exports}
    for e in c.exports:
        image = _export_image(e.iqn)
        if image is None:
            continue
        if image not in live or not e.iqn.startswith(f"{EXPORT_PREFIX}{node}."):
            p.leaks.append(f"{node}: LIO target {e.iqn} (LUNs {','.join(e.luns) or 'none'}) "
                           f"of {_image_fate(image, world)}")
            continue
        children = {initiators.get(r.node, r.node) for r in replicas
                    if r.image == image and r.parent == node}
        for acl in sorted(set(e.acls) - children):
            p.leaks.append(f"{node}: LIO ACL {acl} on {e.iqn}: not a child")
        for acl in sorted(children - set(e.acls)):
            p.missing.append(f"{node}: LIO ACL {acl} on {e.iqn}: none")
        if len(e.luns) != 1:
            (p.missing if not e.luns else p.leaks).append(
                f"{node}: LIO target {e.iqn} has LUNs {list(e.luns)}")
    for image in sorted(live):
        if names.export_iqn(image, node) not in exports:
            p.missing.append(f"{node}: LIO target {names.export_iqn(image, node)}: none")
    for b in c.backstores:
        image = names.image_of(b)
        if image is not None and image not in live:
            p.leaks.append(f"{node}: LIO backstore {b} of {_image_fate(image, world)}")
    # volumes: loop devices, COW files, kubelet paths and mounts of live volumes only
    for loop, backing in sorted(c.loops.items()):
        vid = Path(backing.removesuffix(" (deleted)")).stem
        if backing.endswith("(deleted)") or (backing.endswith(".cow") and vid not in mine):
            p.leaks.append(f"{node}: {loop} over {backing} of {_vol_fate(vid, world)}")
    for vid in c.cow:
        if vid not in mine:
            p.leaks.append(f"{node}: COW file of {_vol_fate(vid, world)}")
    for vid in c.staging:
        if vid not in mine:
            p.leaks.append(f"{node}: staging path of {_vol_fate(vid, world)}")
    published = {Path(m).name for m in c.mounts if m.startswith(PODS + "/")}
    for m in c.mounts:
        vid = Path(m).name
        if vid not in mine:
            p.leaks.append(f"{node}: mount {m} of {_vol_fate(vid, world)}")
    for vid in sorted(mine):
        if vid not in published:
            p.missing.append(f"{node}: volume {vid} not published")
        elif c.marks.get(vid) != vid:
            p.missing.append(f"{node}: volume {vid} reads {c.marks.get(vid)!r}, "
                             "not what was written to it")
    return p


def _export_image(iqn: str) -> str | None:
    """The image a node's export IQN ("<base>:<node>.<image>") names; None for others."""
    if not iqn.startswith(EXPORT_PREFIX):
        return None
    _, dot, image = iqn[len(EXPORT_PREFIX):].partition(".")
    return image if dot else None


def _image_fate(image: str, world: World) -> str:
    return f"{'deleted ' if image in world.deleted_images else 'unknown '}image {image}"


def _vol_fate(vid: str, world: World) -> str:
    v = world.volumes.get(vid)
    if v is not None:
        return f"volume {vid} (live on {v.node})"
    return f"{'deleted ' if vid in world.deleted_volumes else 'unknown '}volume {vid}"


# --- the kubelet side, in a node --------------------------------------------------------------

# One Python start per batch: NodeStage + NodePublish + a marker write ("up") or NodeUnpublish
# + NodeUnstage ("down"), each call retried as kubelet does (the plugin may be dead or busy).
KUBELET = """
import json, mmap, os, sys, time
from vmthunder.csi.client import connect
from vmthunder.csi.proto import csi_pb2
ops = json.loads(sys.argv[1])
patience = float(sys.argv[2])
socket, staging, pods = sys.argv[3:6]
block = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
retries = {}
def call(method, request, timeout):
    deadline = time.monotonic() + patience
    while True:
        c = connect('unix://' + socket)
        try:
            return getattr(c.node, method)(request, timeout=timeout)
        except Exception as e:
            code = getattr(e, 'code', lambda: None)()
            key = method + ':' + (code.name if code else type(e).__name__)
            retries[key] = retries.get(key, 0) + 1
            if time.monotonic() > deadline:
                raise
        finally:
            c.close()
        time.sleep(1)
for op, vid, ctx in ops:
    st = staging + '/' + vid
    tgt = pods + '/' + vid
    if op == 'up':
        os.makedirs(st, exist_ok=True); os.makedirs(pods, exist_ok=True)
        call('NodeStageVolume', csi_pb2.NodeStageVolumeRequest(volume_id=vid,
             staging_target_path=st, volume_capability=block, volume_context=ctx), 120)
        call('NodePublishVolume', csi_pb2.NodePublishVolumeRequest(volume_id=vid,
             staging_target_path=st, target_path=tgt, volume_capability=block,
             volume_context=ctx), 60)
        buf = mmap.mmap(-1, 4096)
        buf.write(vid.encode().ljust(4096, b'.'))
        fd = os.open(tgt, os.O_RDWR | os.O_DIRECT)
        os.pwrite(fd, buf, 0)
        os.fsync(fd)
        os.close(fd)
    else:
        call('NodeUnpublishVolume', csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid,
             target_path=tgt), 60)
        call('NodeUnstageVolume', csi_pb2.NodeUnstageVolumeRequest(volume_id=vid,
             staging_target_path=st), 60)
        if os.path.isdir(st):
            os.rmdir(st)  # kubelet's part; fails if the plugin left something in it
print(json.dumps({'done': len(ops), 'retries': retries}))
"""


# --- the run ----------------------------------------------------------------------------------

@dataclass
class Kill:
    component: str
    target: str  # the guest of a guest component, "host" otherwise
    due: float  # seconds into the cycle the kill was due
    at: float = 0.0  # seconds into the cycle it happened
    when: str = ""  # during the work, while converging, or at rest (converged before due)
    killed: bool = False  # a process was there to kill
    restart_seconds: float = 0.0  # kill to restarted (the rig's start call returned)

    def text(self) -> str:
        where = self.component + (f"@{self.target}" if self.target != "host" else "")
        return (f"{where} at +{self.at:.1f} s {self.when}"
                f"{'' if self.killed else ' (no process)'}")


@dataclass
class CycleRecord:
    index: int
    action: Action
    kills: list[Kill]
    action_seconds: float = 0.0
    converge_seconds: float = 0.0  # work done and every kill restarted -> no problem left
    converged: bool = False
    missing: list[str] = field(default_factory=list)  # left when the wait ended
    leaks: list[str] = field(default_factory=list)
    waited_on: list[tuple[str, float]] = field(default_factory=list)  # slowest to clear
    error: str = ""  # the work failed
    retries: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        a = self.action
        what = " ".join(x for x in (a.kind, a.image, a.node, a.volume[:8]) if x)
        state = ("converged" if self.converged else
                 f"NOT converged ({len(self.missing)} missing, {len(self.leaks)} leaks)")
        slowest = "; ".join(f"{p[:90]} ({t:.0f} s)" for p, t in self.waited_on[:2])
        return (f"cycle {self.index}: {what}; kill {', '.join(k.text() for k in self.kills)}; "
                f"work {self.action_seconds:.1f} s"
                f"{' FAILED ' + self.error[:300] if self.error else ''}; {state} after "
                f"{self.converge_seconds:.1f} s; cycle {self.seconds:.1f} s"
                + (f"\n    slowest to clear: {slowest}" if slowest else ""))


class Chaos:
    """Drives the cycles on a running rig (origin + nodes, services started)."""

    def __init__(self, rig: Rig, seed: int, converge_timeout: float = 300.0,
                 say: Callable[[str], None] = print) -> None:
        self.rig = rig
        self.seed = seed
        self.rng = random.Random(seed)
        self.world = World()
        self.records: list[CycleRecord] = []
        self.converge_timeout = converge_timeout
        self.say = say
        self.nodes = [g.name for g in rig.lab.nodes]
        self.initiators = {g.name: g.iqn for g in rig.lab.nodes}
        # typical seconds each kind of work takes until the cluster settled: a kill is due
        # uniformly within; one not yet done when the cluster settled happens then ("at rest")
        self.work_seconds = {"apply-image": 40.0, "create-volume": 30.0,
                             "delete-volume": 25.0, "delete-image": 30.0}  # measured, loaded
        self.final: Problems | None = None
        # the most of each kind of kernel state a census showed: the checks saw real state
        self.seen: Counter[str] = Counter()
        for g in rig.lab.nodes:
            run_quick(g, f"cat > /tmp/vmt-kubelet.py <<'EOF'\n{KUBELET}EOF")

    # --- one cycle ---

    def cycle(self, index: int, components: Sequence[str],
              kind: str | None = None) -> CycleRecord:
        """One piece of work (`kind`, or chosen at random) with the components killed at
        random moments into it, each restarted at once; returns once the cluster converged
        (or the wait timed out)."""
        t0 = time.monotonic()
        action = plan_action(self.world, self.nodes, components, self.rng, kind)
        kills = []
        for comp in components:
            target = "host"
            if comp in GUEST_COMPONENTS:
                target = self.rng.choice(self.nodes)
                if action.node and self.rng.random() < 0.7:
                    target = action.node  # mostly the node the work is on
            kills.append(Kill(comp, target, self.rng.uniform(0, self.work_seconds[action.kind])))
        rec = CycleRecord(index, action, kills)
        phase = ["during the work"]
        now = threading.Event()  # the cluster settled before a kill was due: kill now
        killers = [threading.Thread(target=self._kill_when_due, args=(k, t0, now, phase),
                                    daemon=True) for k in kills]
        for t in killers:
            t.start()
        try:
            rec.retries = self._work(action)
        except Exception as e:  # the work failed for good: reported, the run goes on
            rec.error = f"{type(e).__name__}: {e}"
        rec.action_seconds = time.monotonic() - t0
        phase[0] = "while converging"
        self.wait_converged(self.converge_timeout,
                            until=lambda: not any(t.is_alive() for t in killers))
        if any(t.is_alive() for t in killers):
            phase[0] = "at rest"
            now.set()
        for t in killers:
            t.join()
        self._settle(rec, t0)
        self.work_seconds[action.kind] = 0.5 * self.work_seconds[action.kind] + 0.5 * rec.seconds
        return rec

    def _settle(self, rec: CycleRecord, t0: float) -> None:
        """Waits for the cluster to converge and records and prints how the cycle ended."""
        t1 = time.monotonic()
        problems = self.wait_converged(self.converge_timeout, timeline=rec.waited_on)
        rec.converge_seconds = time.monotonic() - t1
        rec.converged = not problems and not rec.error
        rec.missing, rec.leaks = problems.missing, problems.leaks
        rec.seconds = time.monotonic() - t0
        self.records.append(rec)
        self.say(rec.line())
        for x in (problems.missing + problems.leaks)[:20]:
            self.say(f"    {x}")

    def aimed_cycle(self, index: int) -> CycleRecord:
        """An aimed kill rather than a random one: an ImageCache (detach Never, so every node
        keeps its session to its parent) is deleted, and each node's agent is SIGKILLed the
        moment its removal of the image's stack has removed vmt-<image>-src (its last step:
        when the logout came after it, this kill left the parent's session behind); the
        agents are restarted and must still converge."""
        t0 = time.monotonic()
        image = f"kr{self.world.made}"
        self.world.made += 1
        self.world.images[image] = "Never"
        self.apply_image(image, "Never")
        ready = self.wait_converged(self.converge_timeout)
        src = names.src_dev(image)
        # Armed with shell builtins only, so the kill follows the removal within microseconds.
        watcher = (f"p=$(pgrep -f '[v]mthunder.cli agent'); "
                   f"while [ -e /dev/mapper/{src} ]; do :; done; kill -9 $p && echo killed")
        tag = f"vmt-aim-{image}"
        for g in self.rig.lab.nodes:
            start_shell(g, watcher, tag)
        action = Action("delete-image", image=image)
        kills = [Kill("agent", n, 0.0, when=f"at {src} removal") for n in self.nodes]
        rec = CycleRecord(index, action, kills)
        t1 = time.monotonic()
        try:
            self._work(action)
            for g, k in zip(self.rig.lab.nodes, kills, strict=True):
                k.killed = "killed" in wait_shell(g, tag, self.converge_timeout)
                k.at = time.monotonic() - t1
                self.restart("agent", g.name)
        except Exception as e:
            rec.error = f"{type(e).__name__}: {e}"
        if ready:
            rec.error += f" (not converged before the deletion: {ready.missing + ready.leaks})"
        rec.action_seconds = time.monotonic() - t1
        self._settle(rec, t0)
        return rec

    def _kill_when_due(self, k: Kill, t0: float, now: threading.Event,
                       phase: list[str]) -> None:
        now.wait(max(0.0, t0 + k.due - time.monotonic()))
        k.at = time.monotonic() - t0
        k.when = phase[0]
        k.killed = self.kill(k.component, k.target)
        self.restart(k.component, k.target)
        k.restart_seconds = time.monotonic() - t0 - k.at

    def kill(self, component: str, node: str) -> bool:
        """SIGKILL the component; says whether a process was there. Returns once it is gone."""
        if component in GUEST_COMPONENTS:
            m = GUEST_COMPONENTS[component]
            pat = f"[{m[0]}]{m[1:]}"
            out = run_quick(self.rig.lab.guest(node),
                            f"if pkill -9 -f '{pat}'; then echo killed; fi; "
                            f"while pgrep -f '{pat}' >/dev/null; do sleep 0.1; done")
            return "killed" in out
        proc = self.rig.procs[component]
        alive = proc.poll() is None
        proc.kill()
        proc.wait()
        return alive

    def restart(self, component: str, node: str) -> None:
        """The component started again the way the rig starts it."""
        if component == "agent":
            self.rig.start_agent(self.rig.lab.guest(node))
        elif component == "csi-node":
            self.rig.start_csi_node(self.rig.lab.guest(node), wait=False)
        elif component == "operator":
            self.rig.start_operator()
        else:
            self.rig.start_csi_controller()

    # --- the work (external-provisioner, kubelet and a user, as they would) ---

    def _work(self, a: Action) -> dict[str, int]:
        w = self.world
        if a.kind == "apply-image":
            w.made += 1
            w.images[a.image] = a.detach
            self.apply_image(a.image, a.detach)
            return {}
        if a.kind == "create-volume":
            w.made += 1
            pvc = f"pvc-kr{w.made}"
            vid, ctx = self.rig.create_volume(a.image, a.node, pvc)
            v = Vol(vid, a.image, a.node, pvc, tuple(sorted(ctx.items())))
            w.volumes[vid] = v
            return self._kubelet(a.node, [("up", v)])
        if a.kind == "delete-volume":
            v = w.volumes.pop(a.volume)
            w.deleted_volumes.add(v.volume_id)
            retries = self._kubelet(v.node, [("down", v)])
            self._delete_volume(v.volume_id)
            return retries
        # delete-image: its volumes first (as their pods and PVCs go), then the ImageCache
        del w.images[a.image]
        w.deleted_images.add(a.image)
        vols = [v for v in w.volumes.values() if v.image == a.image]
        for v in vols:
            del w.volumes[v.volume_id]
            w.deleted_volumes.add(v.volume_id)
        total: Counter[str] = Counter()
        by_node = [[v for v in vols if v.node == n] for n in self.nodes]
        for r in _par_items(lambda vs: self._kubelet(vs[0].node, [("down", v) for v in vs]),
                            [vs for vs in by_node if vs]):
            total.update(r)
        for v in vols:
            self._delete_volume(v.volume_id)
        self.rig.custom().delete_cluster_custom_object(GROUP, VERSION, "imagecaches", a.image)
        return dict(total)

    def apply_image(self, name: str, detach: str) -> None:
        t = self.rig.lab.origin_target
        assert t is not None
        o = self.rig.options
        self.rig.custom().create_cluster_custom_object(GROUP, VERSION, "imagecaches", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageCache",
            "metadata": {"name": name},
            "spec": {
                "source": {"iscsi": {"portal": t.portal, "iqn": t.iqn, "lun": 0}},
                "sizeBytes": t.size, "fanout": o.fanout, "originFanout": o.origin_fanout,
                "nodeSelector": {},  # every node: a tree with a parent -> child edge
                "prefetch": {"enabled": True, "profileConfigMap": {
                    "name": "golden-boot-profile", "namespace": NAMESPACE}},
                "detachPolicy": detach,
                "chapSecretRef": {"name": "golden-chap", "namespace": NAMESPACE},
            },
        })

    def _kubelet(self, node: str, ops: Sequence[tuple[str, Vol]]) -> dict[str, int]:
        g = self.rig.lab.guest(node)
        payload = base64.b64encode(json.dumps(
            [[op, v.volume_id, dict(v.context)] for op, v in ops]).encode()).decode()
        tag = f"vmt-kubelet-{ops[0][1].volume_id[:12]}"
        out = run_detached(g, f"{guest_env()} {guest_python()} /tmp/vmt-kubelet.py "
                              f"\"$(echo {payload} | base64 -d)\" {KUBELET_RETRY_S} {CSI_SOCKET} "
                              f"{STAGING} {PODS}",
                           tag, KUBELET_RETRY_S * 2 + 120)
        res = json.loads(out.strip().splitlines()[-1])
        return {str(k): int(n) for k, n in res["retries"].items()}

    def _delete_volume(self, volume_id: str) -> None:
        """DeleteVolume as external-provisioner sends it: retried while the controller is
        away."""
        from vmthunder.csi.client import connect
        from vmthunder.csi.proto import csi_pb2

        deadline = time.monotonic() + KUBELET_RETRY_S
        while True:
            c = connect(f"unix://{self.rig.controller_socket}")
            try:
                c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
                                          timeout=60)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            finally:
                c.close()
            time.sleep(1)

    # --- convergence ---

    def problems(self) -> Problems:
        """Everything wrong now, from the API server and every node's kernel."""
        custom = self.rig.custom()
        p = Problems()
        for name, proc in self.rig.procs.items():
            if proc.poll() is not None:
                p.missing.append(f"host: {name} exited with {proc.returncode}")
        p.extend(self._controller_probe())
        caches = [str(o["metadata"]["name"]) for o in custom.list_cluster_custom_object(
            GROUP, VERSION, "imagecaches").get("items", [])]
        replicas = [replica_view(o) for o in custom.list_cluster_custom_object(
            GROUP, VERSION, "imagereplicas").get("items", [])]
        volumes = {str(o["metadata"]["name"]): str((o.get("status") or {}).get("phase", ""))
                   for o in custom.list_cluster_custom_object(
                       GROUP, VERSION, "imagevolumes").get("items", [])}
        o = self.rig.options
        p.extend(api_problems(self.world, self.nodes, caches, replicas, volumes, o.fanout,
                              o.origin_fanout))
        for c in in_parallel(self.census, self.rig.lab.nodes):
            p.extend(node_problems(c, self.world, replicas, self.initiators))
            for kind, n in census_counts(c).items():
                self.seen[kind] = max(self.seen[kind], n)
        return p

    def _controller_probe(self) -> Problems:
        from vmthunder.csi.client import connect
        from vmthunder.csi.proto import csi_pb2

        c = connect(f"unix://{self.rig.controller_socket}")
        try:
            if c.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value:
                return Problems()
            return Problems(missing=["host: the CSI controller is not ready"])
        except Exception as e:
            return Problems(missing=[f"host: the CSI controller does not answer: "
                                     f"{type(e).__name__}"])
        finally:
            c.close()

    def census(self, g: Guest) -> NodeCensus:
        return parse_census(g.name, run_quick(g, CENSUS, timeout=120))

    def wait_converged(self, timeout: float, settle: float = 3.0,
                       until: Callable[[], bool] | None = None,
                       timeline: list[tuple[str, float]] | None = None) -> Problems:
        """Polls until nothing is missing or leaked (seen twice in a row, `settle` s apart),
        `until` says stop, or the timeout; returns what was wrong last. `timeline` gets the
        problems that took longest to clear, with how long each was seen."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        clean_once = False
        first_seen: dict[str, float] = {}
        last_seen: dict[str, float] = {}
        while True:
            try:
                p = self.problems()
            except Exception as e:  # the API server or a guest's channel: look again
                p = Problems(missing=[f"check failed: {type(e).__name__}: {e}"])
            now = time.monotonic()
            for x in p.missing + p.leaks:
                first_seen.setdefault(x, now)
                last_seen[x] = now
            if not p:
                if clean_once:
                    break
                clean_once = True
            else:
                clean_once = False
            if now > deadline or (until is not None and until()):
                break
            time.sleep(settle)
        if timeline is not None:
            spans = {x: last_seen[x] - t0 for x in first_seen}
            timeline[:] = sorted(spans.items(), key=lambda kv: -kv[1])[:5]
        return p

    def finish(self) -> Problems:
        """Deletes every volume and ImageCache (no kill), then checks that nothing is left:
        no stack, session, export, loop device, COW file or object of any of them."""
        for image in sorted(self.world.images):
            self._work(Action("delete-image", image=image))
        self.final = self.wait_converged(self.converge_timeout)
        return self.final

    # --- the figures ---

    def summary(self) -> dict[str, Any]:
        recs = self.records
        all_kills = [k for r in recs for k in r.kills]
        kills = Counter(k.component for k in all_kills if k.killed)
        conv = [r.converge_seconds for r in recs]
        leaks = [x for r in recs for x in r.leaks]
        out: dict[str, Any] = {
            "seed": self.seed, "cycles": len(recs),
            "kills": {c: kills.get(c, 0) for c in COMPONENTS},
            "kills_when": dict(Counter(k.when for k in all_kills if k.killed)),
            "due_kills_without_a_process": sum(1 for k in all_kills if not k.killed),
            "work": dict(Counter(r.action.kind for r in recs)),
            "converged": sum(1 for r in recs if r.converged),
            "work_failed": sum(1 for r in recs if r.error),
            "leaks": len(leaks), "leak_list": leaks,
            "missing_at_timeout": sum(len(r.missing) for r in recs),
        }
        if recs:
            out["cycle_s"] = {"mean": statistics.fmean(r.seconds for r in recs),
                              "max": max(r.seconds for r in recs)}
            out["converge_s"] = {"mean": statistics.fmean(conv), "max": max(conv)}
            by: dict[str, list[float]] = {}
            for r in recs:
                for k in r.kills:
                    by.setdefault(k.component, []).append(r.converge_seconds)
            out["converge_s_by_kill"] = {c: {"mean": round(statistics.fmean(v), 1),
                                             "max": round(max(v), 1)} for c, v in by.items()}
        out["seen"] = dict(self.seen)
        if self.final is not None:
            out["final_missing"] = self.final.missing
            out["final_leaks"] = self.final.leaks
        return out


def _par_items(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(items))) as pool:
        return list(pool.map(fn, items))


def format_summary(s: Mapping[str, Any]) -> str:
    lines = [
        f"seed {s['seed']}: {s['cycles']} cycles, kills {s['kills']} "
        f"({s['due_kills_without_a_process']} found no process; {s['kills_when']})",
        f"work {s['work']} ({s['work_failed']} failed)",
        f"converged {s['converged']}/{s['cycles']}; leaks found {s['leaks']}; "
        f"still missing at a timeout {s['missing_at_timeout']}",
    ]
    if "cycle_s" in s:
        lines.append(f"per cycle {s['cycle_s']['mean']:.1f} s (max {s['cycle_s']['max']:.1f}); "
                     f"convergence {s['converge_s']['mean']:.1f} s (max "
                     f"{s['converge_s']['max']:.1f})")
        lines.append(f"convergence by component killed: {s['converge_s_by_kill']}")
    lines.append(f"most state seen on a node at once: {s['seen']}")
    for x in s["leak_list"]:
        lines.append(f"  leak: {x}")
    if "final_leaks" in s:
        lines.append(f"after deleting everything: {len(s['final_leaks'])} leaks, "
                     f"{len(s['final_missing'])} missing")
        lines += [f"  final: {x}" for x in s["final_leaks"] + s["final_missing"]]
    return "\n".join(lines)
