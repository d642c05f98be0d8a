"""Device-mapper through dmsetup: typed tables, status, messages and dm-stats.

Callers pass dataclasses and names, never command lines. Every failure raises DmError with
dmsetup's stderr, or the kernel's error for the status and messages: those are polled, so they
are made as ioctls (vmthunder.node.dmioctl). Guests of the lab run without udev, so every call
passes --noudevsync and creation/removal ends with `dmsetup mknodes` (harmless where udev
runs).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmthunder.node import blockdev, dmioctl

SECTOR = 512
DMSETUP = os.environ.get("VMT_DMSETUP", "dmsetup")


class DmError(RuntimeError):
    """A dmsetup command failed; `stderr` is its error output."""

    def __init__(self, what: str, rc: int, stderr: str) -> None:
        super().__init__(f"dmsetup {what} failed (rc={rc}): {stderr.strip()}")
        self.what = what
        self.rc = rc
        self.stderr = stderr


@dataclass(frozen=True)
class Target:
    """One line of a table: `start length type args...` (start and length in sectors)."""

    start: int
    length: int
    type: str
    args: tuple[str, ...] = ()

    def line(self) -> str:
        return " ".join([str(self.start), str(self.length), self.type, *self.args])

    @staticmethod
    def parse(line: str) -> Target:
        words = line.split()
        return Target(int(words[0]), int(words[1]), words[2], tuple(words[3:]))


Table = Sequence[Target]


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    major: int
    minor: int
    open_count: int
    suspended: bool
    live_table: bool
    inactive_table: bool
    uuid: str

    @property
    def path(self) -> str:
        return mapper_path(self.name)


@dataclass(frozen=True)
class TargetStatus:
    start: int
    length: int
    type: str
    fields: tuple[str, ...]


def mapper_path(name: str) -> str:
    return f"/dev/mapper/{name}"


def _run(what: str, args: Sequence[str], stdin: str | None = None, timeout: float = 60) -> str:
    cmd = [DMSETUP, *args]
    try:
        p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired as e:
        raise DmError(what, -1, f"timed out after {timeout}s") from e
    except FileNotFoundError as e:
        raise DmError(what, -1, str(e)) from e
    if p.returncode != 0:
        raise DmError(what, p.returncode, p.stderr)
    return p.stdout


def _table_text(table: Table) -> str:
    if not table:
        raise ValueError("empty table")
    return "".join(t.line() + "\n" for t in table)


# --- lifecycle ------------------------------------------------------------------------------

def create(name: str, table: Table, *, uuid: str | None = None, readonly: bool = False) -> None:
    """Creates and resumes `name` with `table`, then makes its /dev/mapper node."""
    args = ["create", name, "--noudevsync"]
    if uuid:
        args += ["--uuid", uuid]
    if readonly:
        args.append("--readonly")
    _run(f"create {name}", args, stdin=_table_text(table))
    mknodes(name)


def load(name: str, table: Table) -> None:
    """Loads `table` as the inactive table of `name`; takes effect at the next resume.
    A device created read-only stays read-only (the kernel refuses a writable table: EROFS)."""
    attr = _run(f"info {name}", ["info", "-c", "--noheadings", "-o", "attr", name]).strip()
    ro = ["--readonly"] if attr.endswith("r") else []
    _run(f"load {name}", ["load", name, "--noudevsync", *ro], stdin=_table_text(table))


def suspend(name: str, *, noflush: bool = False) -> None:
    # noflush keeps in-flight I/O queued inside dm instead of waiting for it (multipath, dead paths)
    _run(f"suspend {name}", ["suspend", name, "--noudevsync", *(["--noflush"] if noflush else [])])


def resume(name: str) -> None:
    _run(f"resume {name}", ["resume", name, "--noudevsync"])


def reload(name: str, table: Table, *, noflush: bool = False) -> None:
    """Swaps the live table: load, suspend, resume. Readers see a pause, never an error."""
    load(name, table)
    suspend(name, noflush=noflush)
    try:
        resume(name)
    except DmError:
        # Never leave a device suspended: that would hang every reader.
        clear(name)
        resume(name)
        raise


def clear(name: str) -> None:
    """Drops the inactive table."""
    _run(f"clear {name}", ["clear", name])


def remove(name: str, *, retries: int = 10, deferred: bool = False) -> None:
    """Removes `name`; absent is success. Retries while a just-closed opener lets go."""
    for attempt in range(retries):
        try:
            _run(f"remove {name}", ["remove", name, "--noudevsync",
                                    *(["--deferred"] if deferred else [])])
            break
        except DmError as e:
            if "No such device" in e.stderr or "not found" in e.stderr.lower():
                break
            if attempt == retries - 1:
                raise
            time.sleep(0.2)
    mknodes(name)


def mknodes(name: str | None = None) -> None:
    _run("mknodes", ["mknodes", *([name] if name else [])])


def ensure_nodes(*wanted: str) -> None:
    """Makes right the /dev/mapper node of each of `wanted` the kernel has: missing, or naming
    another device number.

    With no udev, create() makes the node in a second dmsetup call: a process killed between
    the two leaves a device no path reaches (or, after a remove killed the same way, a stale
    node naming the old device), and a table naming that path then fails or maps the wrong
    device. Per name a stat and a sysfs read; no dmsetup call unless a node is wrong."""
    wrong = [n for n in wanted if _node_name(mapper_path(n)) != n]
    if wrong:
        in_kernel = _sysfs_names()
        for n in wrong:
            if n in in_kernel:
                mknodes(n)


def _node_name(path: str) -> str | None:
    """The device-mapper name of the device `path` is a node of, if it is one."""
    try:
        with open(f"/sys/block/{blockdev.kernel_name(path)}/dm/name") as f:
            return f.read().strip()
    except (OSError, blockdev.BlockDevError):
        return None


def _sysfs_names() -> set[str]:
    out: set[str] = set()
    try:
        entries = os.listdir("/sys/block")
    except OSError:
        return out
    for e in entries:
        if e.startswith("dm-"):
            try:
                with open(f"/sys/block/{e}/dm/name") as f:
                    out.add(f.read().strip())
            except OSError:
                pass
    return out


# --- queries --------------------------------------------------------------------------------

def names() -> list[str]:
    out = _run("ls", ["ls"])
    if "No devices found" in out:
        return []
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def _absent(e: DmError) -> bool:
    return "not exist" in e.stderr or "No such device" in e.stderr


def info(name: str) -> DeviceInfo | None:
    """The device's info, or None when it does not exist."""
    try:
        out = _run(f"info {name}", [
            "info", "-c", "--noheadings", "--separator", "|",
            "-o", "name,major,minor,open,attr,uuid", name,
        ])
    except DmError as e:
        if _absent(e):
            return None
        raise
    parts = out.strip().split("|")
    if len(parts) < 6:
        return None
    attr = parts[4]  # e.g. "L--w": live table, inactive table, suspended, read-only...
    return DeviceInfo(
        name=parts[0], major=int(parts[1]), minor=int(parts[2]), open_count=int(parts[3]),
        suspended=len(attr) > 0 and attr[0] == "s", live_table="L" in attr,
        inactive_table="I" in attr, uuid=parts[5],
    )


def exists(name: str) -> bool:
    return info(name) is not None


def table(name: str) -> list[Target]:
    return [Target.parse(line) for line in _run(f"table {name}", ["table", name]).splitlines()
            if line.strip()]


def table_if_exists(name: str) -> list[Target] | None:
    """The live table, or None when the device does not exist: one dmsetup call where
    exists() + table() take two (each costs ~0.1 s of a TCG guest's CPU)."""
    try:
        return table(name)
    except DmError as e:
        if _absent(e):
            return None
        raise


def status(name: str, *, noflush: bool = False) -> list[TargetStatus]:
    """noflush: dm-clone and dm-thin commit their metadata for a status unless told not to;
    a poller need not cost the device a commit each time."""
    try:
        lines = dmioctl.table_status(name, noflush=noflush)
    except dmioctl.DmIoctlError as e:
        raise DmError(f"status {name}", e.errno or -1, str(e)) from None
    return [TargetStatus(t.start, t.length, t.type, tuple(t.params.split())) for t in lines]


def status_if_exists(name: str, *, noflush: bool = False) -> list[TargetStatus] | None:
    """The targets' status (type and length included), or None when the device is absent."""
    try:
        return status(name, noflush=noflush)
    except DmError as e:
        if _absent(e):
            return None
        raise


def message(name: str, msg: Sequence[str], sector: int = 0) -> str:
    """Sends a target message; returns the target's answer (dm-stats answers this way)."""
    try:
        return dmioctl.target_message(name, sector, " ".join(msg)).strip()
    except dmioctl.DmIoctlError as e:
        raise DmError(f"message {name} {msg[0] if msg else ''}", e.errno or -1, str(e)) from None


def deps(name: str) -> list[tuple[int, int]]:
    """(major, minor) of the devices `name` sits on."""
    out = _run(f"deps {name}", ["deps", "-o", "devno", name])
    result = []
    for part in out.split(":", 1)[-1].split("(")[1:]:
        major, minor = part.split(")")[0].split(",")
        result.append((int(major), int(minor)))
    return result


# --- table builders (pure) ------------------------------------------------------------------

def linear(sectors: int, device: str, offset: int = 0, start: int = 0) -> Target:
    return Target(start, sectors, "linear", (device, str(offset)))


def error(sectors: int) -> Target:
    return Target(0, sectors, "error")


def zero(sectors: int) -> Target:
    return Target(0, sectors, "zero")


@dataclass(frozen=True)
class CloneArgs:
    metadata: str
    destination: str
    source: str
    region_sectors: int
    hydration: bool = False
    hydration_threshold: int | None = None
    hydration_batch_size: int | None = None
    discard_passdown: bool = False


def clone(sectors: int, a: CloneArgs) -> Target:
    """dm-clone (the kernel doc's constructor): source read-only, destination local."""
    features = [] if a.hydration else ["no_hydration"]
    if not a.discard_passdown:
        features.append("no_discard_passdown")
    core: list[str] = []
    if a.hydration_threshold is not None:
        core += ["hydration_threshold", str(a.hydration_threshold)]
    if a.hydration_batch_size is not None:
        core += ["hydration_batch_size", str(a.hydration_batch_size)]
    args = [a.metadata, a.destination, a.source, str(a.region_sectors),
            str(len(features)), *features]
    if core:
        args += [str(len(core)), *core]
    return Target(0, sectors, "clone", tuple(args))


@dataclass(frozen=True)
class CloneStatus:
    region_sectors: int
    hydrated: int
    total: int
    hydrating: int
    features: tuple[str, ...]
    core: dict[str, str] = field(default_factory=dict)
    metadata_mode: str = "rw"
    failed: bool = False

    @property
    def complete(self) -> bool:
        return not self.failed and self.total > 0 and self.hydrated >= self.total

    @staticmethod
    def parse(fields: Sequence[str]) -> CloneStatus:
        if not fields or fields[0] == "Fail":
            return CloneStatus(0, 0, 0, 0, (), {}, "Fail", True)
        region = int(fields[2])
        hydrated, total = (int(x) for x in fields[3].split("/"))
        hydrating = int(fields[4])
        nf = int(fields[5])
        features = tuple(fields[6:6 + nf])
        i = 6 + nf
        nc = int(fields[i])
        kv = fields[i + 1:i + 1 + nc]
        core = dict(zip(kv[::2], kv[1::2], strict=True))
        mode = fields[i + 1 + nc] if len(fields) > i + 1 + nc else "rw"
        return CloneStatus(region, hydrated, total, hydrating, features, core, mode)


def clone_status(name: str) -> CloneStatus:
    st = status(name)
    if not st or st[0].type != "clone":
        raise DmError(f"status {name}", 0, f"{name} is not a clone device: {st}")
    return CloneStatus.parse(st[0].fields)


def snapshot(sectors: int, origin: str, cow: str, *, chunk_sectors: int = 16,
             persistent: bool = True) -> Target:
    """dm-snapshot of a read-only origin: writes go to `cow`, reads of unwritten chunks to origin.

    A plain `snapshot` target is enough because nobody writes the origin (the image layer is
    read-only); `snapshot-origin` is only needed when the origin itself is written.
    """
    return Target(0, sectors, "snapshot",
                  (origin, cow, "P" if persistent else "N", str(chunk_sectors)))


def thin_pool(sectors: int, metadata: str, data: str, *, block_sectors: int = 128,
              low_water_blocks: int = 0, skip_zeroing: bool = True) -> Target:
    features = ["skip_block_zeroing"] if skip_zeroing else []
    return Target(0, sectors, "thin-pool", (metadata, data, str(block_sectors),
                                            str(low_water_blocks), str(len(features)), *features))


def thin(sectors: int, pool: str, dev_id: int, external_origin: str | None = None) -> Target:
    """A thin volume; with an external origin, unprovisioned blocks read from that device."""
    args = [pool, str(dev_id)]
    if external_origin:
        args.append(external_origin)
    return Target(0, sectors, "thin", tuple(args))


def thin_create(pool_name: str, dev_id: int) -> None:
    """Creates thin device `dev_id` in the pool; already existing is success."""
    try:
        message(pool_name, ["create_thin", str(dev_id)])
    except DmError as e:
        if "File exists" not in e.stderr:
            raise


def thin_delete(pool_name: str, dev_id: int) -> None:
    try:
        message(pool_name, ["delete", str(dev_id)])
    except DmError as e:
        if "No data available" not in e.stderr and "not found" not in e.stderr.lower():
            raise


def multipath(sectors: int, paths: Sequence[str], *, queue_if_no_path: bool = True) -> Target:
    """One priority group, round-robin over `paths`; queue_if_no_path makes reads wait. No
    paths: no group (the kernel takes no empty one), so every read waits for a reload."""
    features = ["1", "queue_if_no_path"] if queue_if_no_path else ["0"]
    if not paths:
        return Target(0, sectors, "multipath", (*features, "0", "0", "0"))
    args = [*features, "0", "1", "1", "round-robin", "0", str(len(paths)), "1"]
    for p in paths:
        args += [p, "1"]
    return Target(0, sectors, "multipath", tuple(args))


def multipath_failed_paths(fields: Sequence[str]) -> frozenset[str]:
    """The paths ("8:0") a multipath target's status marks failed (F). Nothing reinstates a
    failed path by itself (multipathd would): a parent that comes back stays unused until
    `reinstate_path`. Status layout: features, handler, groups, then per group its state,
    selector status, paths and per path <dev> <A|F> <fail count> <selector info>."""
    it = iter(fields)

    def skip(n: int) -> None:
        for _ in range(n):
            next(it)

    failed = set()
    skip(int(next(it)))  # features
    skip(int(next(it)))  # hardware handler
    groups = int(next(it))
    next(it)  # the next group to use
    for _ in range(groups):
        next(it)  # group state
        skip(int(next(it)))  # selector status of the group
        paths, info_args = int(next(it)), int(next(it))
        for _ in range(paths):
            dev, state = next(it), next(it)
            next(it)  # fail count
            skip(info_args)
            if state == "F":
                failed.add(dev)
    return frozenset(failed)


# --- dm-stats (per-area I/O counters) -------------------------------------------------------

@dataclass(frozen=True)
class AreaCounters:
    start: int  # sector
    length: int
    reads: int
    sectors_read: int
    writes: int
    sectors_written: int


def stats_create(name: str, area_sectors: int, program_id: str) -> int:
    """Counts I/O per `area_sectors`-sized area of the whole device; returns the region id."""
    return int(message(name, ["@stats_create", "-", str(area_sectors), program_id]))


def stats_list(name: str, program_id: str | None = None) -> list[tuple[int, str]]:
    """(region id, program id) of the device's stats regions."""
    out = message(name, ["@stats_list", *([program_id] if program_id else [])])
    result = []
    for line in out.splitlines():
        w = line.split()
        # "<region_id>: <start>+<len> <step> <program_id> <aux>"
        if len(w) >= 4 and w[0].endswith(":"):
            result.append((int(w[0][:-1]), w[3]))
    return result


def stats_print(name: str, region_id: int, *, clear_after: bool = False) -> list[AreaCounters]:
    """The areas that saw I/O (the others are left out)."""
    verb = "@stats_print_clear" if clear_after else "@stats_print"
    return parse_stats(message(name, [verb, str(region_id)]))


def parse_stats(out: str) -> list[AreaCounters]:
    """`@stats_print` output: one line per area, "<start>+<length>" and its counters."""
    result = []
    for line in out.splitlines():
        if not line.partition(" ")[2].strip("0 "):
            continue  # no I/O: most of ~12,000 areas, skipped unparsed (slow in TCG guests)
        w = line.split()
        if len(w) < 8 or "+" not in w[0]:
            continue
        start, length = (int(x) for x in w[0].split("+"))
        result.append(AreaCounters(start, length, int(w[1]), int(w[3]), int(w[5]), int(w[7])))
    return result


def stats_delete(name: str, region_id: int) -> None:
    message(name, ["@stats_delete", str(region_id)])
