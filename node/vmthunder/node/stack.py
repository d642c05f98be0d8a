"""One image's block stack on one node: observe the kernel, plan (pure), apply.

    parent's export ──transport──► /dev/sdX
      vmt-<image>-src   dm-multipath (queue_if_no_path) or dm-linear over the parent's disk:
                        re-parenting reloads only this table
      vmt-<image>       cache layer (backend), source = -src; dm-linear over -src (a
                        pass-through) while the cache filesystem lacks room for it
      vmt-<image>-exp   dm-linear over vmt-<image>, exported read-only by LIO to the children
      vmt-vol-<id>      per volume, built by the CSI node plugin over vmt-<image>

`plan_image` is pure: it compares what is wanted with what the kernel shows and returns the
steps, in order. `apply_image` observes, plans and runs the steps. Running it twice builds
nothing twice, which is how the agent converges after a restart.

A node builds its whole stack, export included, while it has no parent to read from yet (its
parent not letting it in yet): -src is then a multipath without paths, in which reads queue.
So the levels of a tree build at once, and what each level adds to the one above is a login
and a table load: a node lets its children in once it reads from its parent (the agent's
status), they log in and load their path, and so on down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from vmthunder.node import blockdev, dm, lio, names
from vmthunder.node import transport as transports
from vmthunder.node.cache import CacheBackend, CacheSpaceError, CacheState
from vmthunder.node.iscsi import Chap, TargetAddress
from vmthunder.node.transport import Transport

log = logging.getLogger("vmthunder.stack")

SECTOR = 512
# Every parent's disk takes requests of at most this size. -src is request-based multipath:
# reads queued under one parent's limits are sent to the next parent's disk after a
# re-parent, and a disk with a smaller limit fails them (blk_insert_cloned_request: over max
# size limit), the path with them, for ever. Parents' exports advertise from 64 KiB up.
PARENT_MAX_REQUEST_KB = 64


@dataclass(frozen=True)
class Want:
    """What the node's ImageReplica and its ImageCache ask for."""

    image: str
    node: str
    size: int
    region_bytes: int
    parent: TargetAddress | None  # None: the parent has no export yet (wait)
    parent_chap: Chap | None
    export_ip: str
    export_port: int = 3260
    children: tuple[str, ...] = ()  # initiator IQNs allowed to log in
    children_chap: Chap | None = None
    detach_when_hydrated: bool = True
    multipath: bool = True  # -src as dm-multipath queue_if_no_path (else dm-linear)
    # Sessions other images on this node read through (two caches of one source share the
    # origin's session), every LUN of them: never logged out for this one.
    shared: frozenset[TargetAddress] = frozenset()
    # Failed paths not to reinstate yet: each failed again right after its last reinstatement.
    held_paths: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Seen:
    """What the kernel holds for the image now."""

    src_table: tuple[str, ...] | None  # -src's devices ("8:0") and kind, None: absent
    src_kind: str | None  # "multipath", "linear", "error"
    sessions: Mapping[TargetAddress, str] = field(default_factory=dict)  # this image's, -> "8:0"
    cache: CacheState = field(default_factory=lambda: CacheState("absent"))
    export_dev: bool = False
    export: lio.ExportInfo | None = None
    failed_paths: frozenset[str] = frozenset()  # -src's multipath paths marked failed ("8:0")
    broken: frozenset[TargetAddress] = frozenset()  # sessions of the image carrying no I/O
    # Bytes the cache filesystem lacks for the cache; only looked at while there is none.
    cache_space_missing: int = 0


# --- steps ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attach:
    address: TargetAddress


@dataclass(frozen=True)
class SetSource:
    # -src over this address's disk (create, or reload); None: -src without a path, reads wait
    address: TargetAddress | None


@dataclass(frozen=True)
class ReinstatePath:
    device: str  # "8:0": the parent's disk, back after an outage


@dataclass(frozen=True)
class BuildCache:
    pass


@dataclass(frozen=True)
class PassThrough:
    pass  # no room for a cache: vmt-<image> reads -src directly, nothing is cached


@dataclass(frozen=True)
class BuildExportDev:
    pass


@dataclass(frozen=True)
class Export:
    spec: lio.ExportSpec


@dataclass(frozen=True)
class DetachCache:
    pass


@dataclass(frozen=True)
class RemoveSource:
    pass


@dataclass(frozen=True)
class Logout:
    address: TargetAddress


Step = (Attach | SetSource | ReinstatePath | BuildCache | PassThrough | BuildExportDev | Export
        | DetachCache | RemoveSource | Logout)


def export_spec(w: Want) -> lio.ExportSpec:
    return lio.ExportSpec(
        iqn=names.export_iqn(w.image, w.node), backstore=names.backstore(w.image),
        device=dm.mapper_path(names.export_dev(w.image)), ip=w.export_ip, port=w.export_port,
        chap=w.children_chap, initiators=tuple(sorted(w.children)),
    )


def plan_image(w: Want, s: Seen) -> list[Step]:
    """The steps that take the kernel from `s` to `w`, in the order they must run. A node
    that has no parent to read from yet builds and exports its stack all the same, over a
    -src without a path (multipath only: a dm-linear -src needs the parent's disk)."""
    steps: list[Step] = []
    detached = s.cache.kind == "detached"
    if not detached:
        if w.parent is not None:
            if w.parent not in s.sessions:
                steps.append(Attach(w.parent))
            points_at_parent = (
                w.parent in s.sessions and s.src_table is not None
                and s.src_table == (s.sessions[w.parent],)
                and s.src_kind == ("multipath" if w.multipath else "linear")
            )
            if not points_at_parent:
                steps.append(SetSource(w.parent))
            elif (s.sessions[w.parent] in s.failed_paths and w.parent not in s.broken
                  and s.sessions[w.parent] not in w.held_paths):
                # The parent's session recovered, but multipath still shuns the path its
                # outage failed: reads would queue for ever.
                steps.append(ReinstatePath(s.sessions[w.parent]))
        elif s.src_table is None:
            if not w.multipath:
                return steps  # nothing to read from yet
            steps.append(SetSource(None))
        if s.cache.kind == "absent":
            steps.append(PassThrough() if s.cache_space_missing else BuildCache())
        elif (s.cache.kind == "passthrough" and not s.cache_space_missing
              and w.parent is not None and w.parent in s.sessions and w.parent not in s.broken
              and s.sessions[w.parent] not in s.failed_paths):
            # Room again: the pass-through becomes a cache. Only while the parent answers:
            # the reload's suspend waits for the reads queued in -src.
            steps.append(BuildCache())
    if not s.export_dev:
        steps.append(BuildExportDev())
    spec = export_spec(w)
    if s.export is None or not _export_matches(s.export, spec):
        steps.append(Export(spec))
    done = detached or (s.cache.complete and s.cache.kind == "caching")
    if done and w.detach_when_hydrated:
        if not detached:
            steps.append(DetachCache())
        if s.src_table is not None and s.src_kind != "error":
            steps.append(RemoveSource())
        steps += [Logout(a) for a in sorted(s.sessions, key=_key) if a not in w.shared]
    else:
        steps += [Logout(a) for a in sorted(s.sessions, key=_key)
                  if a != w.parent and a not in w.shared]
    return steps


def exported_to(w: Want, seen: Seen, steps: Sequence[Step]) -> tuple[str, ...] | None:
    """The initiators the image's export lets in once `steps` ran; None: no export with
    `w`'s ACLs (none built yet, or the plan stopped short of it)."""
    spec = export_spec(w)
    if any(isinstance(s, Export) for s in steps) or (
            seen.export is not None and _export_matches(seen.export, spec)):
        return spec.initiators
    return None


def let_in(w: Want) -> Export:
    """Converges the built export's ACLs to `w.children`; returns the step it took."""
    step = Export(export_spec(w))
    lio.ensure_export(step.spec)
    return step


def _key(a: TargetAddress) -> tuple[str, str, int]:
    return (a.iqn, a.portal, a.lun)


def _export_matches(e: lio.ExportInfo, spec: lio.ExportSpec) -> bool:
    return (e.iqn == spec.iqn and e.backstore == spec.backstore
            and f"{spec.ip}:{spec.port}" in e.portals
            and tuple(sorted(e.initiators)) == tuple(sorted(spec.initiators)))


def sessions_of_image(image: str, origin_iqn: str | None,
                      attached: Mapping[TargetAddress, str]) -> dict[TargetAddress, str]:
    """The transport's connections that feed `image`: the origin's target or a node's export
    of the image (named by names.export_iqn)."""
    return {a: d for a, d in attached.items()
            if a.iqn == origin_iqn
            or (a.iqn.endswith(f".{image}") and a.iqn.startswith(names.IQN_BASE + ":"))}


# --- observe and apply ------------------------------------------------------------------------

def observe(image: str, origin_iqn: str | None, backend: CacheBackend, transport: Transport,
            export_iqn: str) -> Seen:
    src = names.src_dev(image)
    # An agent killed inside dm.create leaves a device without its node (see ensure_nodes).
    dm.ensure_nodes(src, names.cache_dev(image), names.export_dev(image))
    src_table: tuple[str, ...] | None = None
    src_kind: str | None = None
    failed: frozenset[str] = frozenset()
    t = dm.table_if_exists(src)
    if t is not None:
        src_kind = t[0].type if t else None
        src_table = tuple(_table_devices(t))
    if src_kind == "multipath":
        st = dm.status_if_exists(src) or []
        failed = frozenset().union(*(dm.multipath_failed_paths(x.fields) for x in st))
    connections = transport.connections()
    attached = {a: _devno(c.device) for a, c in connections.items()}
    sessions = sessions_of_image(image, origin_iqn, attached)
    exports = {e.iqn: e for e in lio.exports()}
    return Seen(
        src_table=src_table, src_kind=src_kind, sessions=sessions,
        cache=backend.observe(image), export_dev=dm.exists(names.export_dev(image)),
        export=exports.get(export_iqn), failed_paths=failed,
        broken=transports.broken(connections) & sessions.keys(),
    )


def _devno(path: str) -> str:
    try:
        return blockdev.devno_str(path)
    except OSError:
        return path


def _table_devices(t: Sequence[dm.Target]) -> list[str]:
    out: list[str] = []
    for x in t:
        if x.type == "linear":
            out.append(x.args[0])
        elif x.type == "multipath":
            out += [a for a in x.args if ":" in a and a.replace(":", "").isdigit()]
    return out


def reads_from_parent(image: str) -> bool:
    """Whether the image's -src has a parent's disk to read from."""
    return bool(_table_devices(dm.table_if_exists(names.src_dev(image)) or []))


def source_table(w: Want, device: str | None) -> list[dm.Target]:
    """-src over the parent's disk; with `device` None, a multipath without paths."""
    sectors = w.size // SECTOR
    if w.multipath:
        return [dm.multipath(sectors, [device] if device else [], queue_if_no_path=True)]
    assert device is not None, "a dm-linear -src needs its parent's disk"
    return [dm.linear(sectors, device)]


def sessions_used_by_others(image: str,
                            attached: Mapping[TargetAddress, str]) -> frozenset[TargetAddress]:
    """Every address of each session whose disk another image's -src reads. The kernel's
    tables say so, also right after an agent restart; a logout ends the whole session, so
    one LUN in use keeps all of them."""
    others: set[str] = set()
    for n in dm.names():
        img = names.image_of(n)
        if img is not None and img != image and n == names.src_dev(img):
            others.update(_table_devices(dm.table_if_exists(n) or []))
    busy = {(a.iqn, a.normalized_portal) for a, d in attached.items() if _devno(d) in others}
    return frozenset(a for a in attached if (a.iqn, a.normalized_portal) in busy)


def apply_image(w: Want, backend: CacheBackend, transport: Transport,
                origin_iqn: str | None) -> tuple[Seen, list[Step]]:
    """Observes, plans and applies; returns what was seen and the steps taken."""
    spec = export_spec(w)
    seen = observe(w.image, origin_iqn, backend, transport, spec.iqn)
    if seen.cache.kind in ("absent", "passthrough"):
        seen = replace(seen, cache_space_missing=backend.missing_bytes(
            w.image, w.size, w.region_bytes))
    steps = plan_image(w, seen)
    if any(isinstance(s, Logout) for s in steps):  # read the other stacks only then
        shared = sessions_used_by_others(w.image, transports.devices(transport.connections()))
        if shared:
            w = replace(w, shared=shared)
            steps = plan_image(w, seen)
    for step in steps:
        t0 = time.monotonic()
        _apply_step(w, step, backend, transport)
        log.info("%s: %s in %.2f s", w.image, type(step).__name__, time.monotonic() - t0)
    return seen, steps


def _apply_step(w: Want, step: Step, backend: CacheBackend, transport: Transport) -> None:
    src = names.src_dev(w.image)
    if isinstance(step, Attach):
        transport.attach(step.address, w.parent_chap)
    elif isinstance(step, SetSource) and step.address is None:
        dm.create(src, source_table(w, None), readonly=True)
        # The requests queued in it now go to a parent's disk later: they must fit its limits
        # (see PARENT_MAX_REQUEST_KB), and a table without a disk has none of its own.
        blockdev.cap_max_sectors_kb(dm.mapper_path(src), PARENT_MAX_REQUEST_KB)
    elif isinstance(step, SetSource) and step.address is not None:
        disk = transport.attach(step.address, w.parent_chap)  # idempotent: gives the disk
        blockdev.cap_max_sectors_kb(disk, PARENT_MAX_REQUEST_KB)  # before dm stacks its limits
        table = source_table(w, blockdev.devno_str(disk))
        if dm.exists(src):
            # noflush: I/O queued in multipath moves to the new path instead of failing.
            dm.reload(src, table, noflush=w.multipath)
        else:
            dm.create(src, table, readonly=True)
    elif isinstance(step, ReinstatePath):
        dm.message(src, ["reinstate_path", step.device])
    elif isinstance(step, BuildCache):
        try:
            backend.build(w.image, w.size, w.region_bytes)
        except CacheSpaceError:
            # The room went between the look and the build (a volume's COW grew): pass
            # through now; the next full round looks again.
            if not dm.exists(names.cache_dev(w.image)):
                _apply_step(w, PassThrough(), backend, transport)
    elif isinstance(step, PassThrough):
        dm.create(names.cache_dev(w.image),
                  [dm.linear(w.size // SECTOR, dm.mapper_path(src))])
    elif isinstance(step, BuildExportDev):
        dm.create(names.export_dev(w.image),
                  [dm.linear(w.size // SECTOR, dm.mapper_path(names.cache_dev(w.image)))],
                  readonly=True)
    elif isinstance(step, Export):
        lio.ensure_export(step.spec)
    elif isinstance(step, DetachCache):
        backend.detach(w.image)
    elif isinstance(step, RemoveSource):
        if dm.exists(names.cache_dev(w.image)) and backend.name == "qemu-cor":
            return  # qemu keeps its backing open; -src stays as an error table
        dm.remove(src)
    elif isinstance(step, Logout):
        transport.detach(step.address)


def fail_queued_reads(image: str) -> None:
    """Reads queued in -src for a parent that is gone fail now instead of waiting for a path
    that will not come back: the stack is going away, and a hydrator blocked in such a read
    keeps the cache device open (busy: it could never be removed)."""
    src = names.src_dev(image)
    if any(t.type == "multipath" for t in dm.table_if_exists(src) or []):
        dm.message(src, ["fail_if_no_path"])


def remove_image(image: str, node: str, backend: CacheBackend, transport: Transport,
                 origin_iqn: str | None) -> None:
    """Tears the image's stack down (volumes over it must be gone first), keeping the
    sessions other images read through. The image's sessions are those its name says and
    those its -src reads (an origin's, whose IQN a caller may not know).

    -src goes last: it is how a restarted agent finds the image and its origin session, so
    an agent killed anywhere in here finds what is left and finishes the job."""
    src_devs = set(_table_devices(dm.table_if_exists(names.src_dev(image)) or []))
    fail_queued_reads(image)
    lio.remove_export(names.export_iqn(image, node), names.backstore(image))
    dm.remove(names.export_dev(image))
    backend.remove(image)
    attached = transports.devices(transport.connections())
    shared = sessions_used_by_others(image, attached)
    mine = set(sessions_of_image(image, origin_iqn, attached))
    mine |= {a for a, d in attached.items() if _devno(d) in src_devs}
    for a in sorted(mine - shared, key=_key):
        transport.detach(a)  # -src still maps the LUN, idle: a logout does not wait on it
    dm.remove(names.src_dev(image))


@dataclass(frozen=True)
class Counters:
    bytes_from_parent: int  # read through -src (kernel counter, survives agent restarts)
    bytes_served: int  # read by children through the export device


def counters(image: str) -> Counters:
    def read(name: str) -> int:
        path = dm.mapper_path(name)
        try:
            return blockdev.iostat(path).bytes_read
        except (OSError, blockdev.BlockDevError):
            return 0

    return Counters(read(names.src_dev(image)), read(names.export_dev(image)))
