"""A VM boot, replayed: the golden image's recorded boot reads through a block device.

The lab runs under TCG, so a qemu inside a node guest would be emulation inside emulation.
A VM boot is therefore replayed from the recorded profile (vmthunder.lab.profile): the same
reads, in the same order, one at a time (a booting VM waits on each read), and before each
read the recorded gap multiplied by a stated scale factor (the VM's compute between reads;
gaps were recorded under TCG, about ten times slower than hardware, hence the default 0.1).

Runs inside a node guest (stdlib + vmthunder.lab.profile, and vmthunder.csi.client for the
kubelet path)::

    python -m vmthunder.lab.replay device --device /dev/sda --profile P --scale 0.1
    python -m vmthunder.lab.replay kubelet --socket /run/csi/csi.sock --volume-id ID \
        --context '{"imageCache": "golden"}' --profile P --scale 0.1 [--serve-nbd PORT]

(--serve-nbd: the real-boot mode; the published device is served to a VM on the host.)

With `--ticket PATH` instead of --device or --volume-id, the replayer starts ahead of the
clock, as a VM's hypervisor is there before the VM: it loads the profile and its imports,
touches PATH.ready, and waits for the rig's go, the JSON it writes at PATH ({"device": ...} or
{"volume_id": ..., "context": {...}}). Python's start-up in an emulated guest (seconds of CPU)
is then the lab's, not the boot's.

and prints one JSON line: wall-clock stamps (the guest's CLOCK_REALTIME; the host corrects
them by the guest's measured clock offset), the sha256 of every byte the boot read (in read
order, exactly the requested ranges), the read count and the first read error if any.
The host computes the expected digest from the image file with `expected_digest`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmthunder.lab.profile import BootProfile, load_profile

ALIGN = 4096
DEFAULT_GAP_SCALE = 0.1


@dataclass(frozen=True)
class Step:
    offset: int
    length: int
    gap_s: float  # compute before this read


def plan_replay(profile: BootProfile, scale: float) -> list[Step]:
    """The reads of a boot with their gaps scaled (pure)."""
    if scale < 0:
        raise ValueError("gap scale must be >= 0")
    return [Step(r.offset, r.length, r.gap_us * scale / 1e6) for r in profile.reads]


def expected_digest(image: str | Path, profile: BootProfile) -> str:
    """sha256 of the bytes a correct boot reads, in order (host side, from the image file)."""
    h = hashlib.sha256()
    with open(image, "rb") as f:
        for r in profile.reads:
            f.seek(r.offset)
            h.update(f.read(r.length))
    return h.hexdigest()


def replay(device: str, steps: Sequence[Step]) -> dict[str, Any]:
    """Replays the steps on device with O_DIRECT (no page cache: every read reaches the
    stack). Stops at the first failing read and reports it."""
    h = hashlib.sha256()
    out: dict[str, Any] = {"device": device, "t_start": time.time(), "t_first_byte": None,
                           "reads": 0, "bytes": 0, "error": None, "max_read_s": 0.0,
                           "io_s": 0.0}
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4 << 20)
    try:
        for s in steps:
            if s.gap_s > 0:
                time.sleep(s.gap_s)
            a = s.offset // ALIGN * ALIGN
            e = -(-(s.offset + s.length) // ALIGN) * ALIGN
            if e - a > len(buf):
                buf.close()
                buf = mmap.mmap(-1, e - a)
            t = time.monotonic()
            try:
                n = os.preadv(fd, [memoryview(buf)[: e - a]], a)
            except OSError as err:
                out["error"] = f"read at {s.offset}+{s.length}: {err}"
                break
            dt = time.monotonic() - t
            out["io_s"] += dt
            out["max_read_s"] = max(out["max_read_s"], dt)
            if n < s.offset + s.length - a:
                out["error"] = f"short read at {s.offset}+{s.length}: {n} bytes"
                break
            if out["t_first_byte"] is None:
                out["t_first_byte"] = time.time()
            h.update(buf[s.offset - a: s.offset - a + s.length])
            out["reads"] += 1
            out["bytes"] += s.length
    finally:
        os.close(fd)
        buf.close()
    out["t_booted"] = time.time()
    out["sha256"] = h.hexdigest()
    return out


def nbd_pid_file(port: int) -> str:
    return f"/run/vmt-nbd-{port}.pid"


def serve_nbd(device: str, port: int) -> dict[str, Any]:
    """The real-boot path: hands the published device to a VM on the host over NBD (the
    host's qemu is the VM; the guest only serves). Returns once qemu-nbd listens."""
    import subprocess

    p = subprocess.run(["qemu-nbd", "--fork", "--persistent", "--shared=2", "--format=raw",
                        "--cache=none", "--bind=0.0.0.0", f"--port={port}",
                        f"--pid-file={nbd_pid_file(port)}", device],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60, check=False, start_new_session=True)
    err = None if p.returncode == 0 else f"qemu-nbd: {p.stderr.decode(errors='replace')[-500:]}"
    return {"device": device, "nbd_port": port, "error": err, "reads": 0, "t_first_byte": None,
            "t_booted": None, "sha256": None}


def await_ticket(path: str, timeout: float) -> dict[str, Any]:
    """Says it is ready (PATH.ready), then waits for the rig's go at PATH and returns it."""
    with open(f"{path}.ready", "w"):
        pass
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go at {path} within {timeout:.0f} s")
        time.sleep(0.05)
    with open(path) as f:
        ticket: dict[str, Any] = json.load(f)
    return ticket


def _kubelet(a: argparse.Namespace, steps: Sequence[Step]) -> dict[str, Any]:
    """NodeStage then NodePublish of a block volume, as kubelet does before it starts the
    VM's pod; then the boot through the published path."""
    from vmthunder.csi.client import connect
    from vmthunder.csi.proto import csi_pb2

    t0 = time.time()
    block = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    context = json.loads(a.context)
    staging = f"/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/{a.volume_id}"
    pod_dir = f"/var/lib/kubelet/pods/{a.volume_id[:8]}/volumeDevices/kubernetes.io~csi"
    target = f"{pod_dir}/{a.volume_id}"
    os.makedirs(staging, exist_ok=True)
    os.makedirs(pod_dir, exist_ok=True)
    c = connect(f"unix://{a.socket}")
    stage_attempts = 0
    deadline = time.monotonic() + a.stage_timeout
    while True:  # kubelet retries NodeStage until the replica is attached
        stage_attempts += 1
        try:
            c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=a.volume_id, staging_target_path=staging, volume_capability=block,
                volume_context=context), timeout=120)
            break
        except Exception as e:
            code = getattr(e, "code", lambda: None)()
            if time.monotonic() > deadline or code is None or code.name not in (
                    "UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED"):
                raise
            time.sleep(0.5)
    t_staged = time.time()
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=a.volume_id, staging_target_path=staging, target_path=target,
        volume_capability=block, volume_context=context), timeout=60)
    t_published = time.time()
    out = serve_nbd(target, a.serve_nbd) if a.serve_nbd else replay(target, steps)
    out.update(t_kubelet=t0, t_staged=t_staged, t_published=t_published,
               stage_attempts=stage_attempts, target=target)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("device", help="replay the boot on a block device")
    d.add_argument("--device")
    k = sub.add_parser("kubelet", help="stage + publish a CSI block volume, then replay")
    k.add_argument("--socket", required=True)
    k.add_argument("--volume-id")
    k.add_argument("--context", default="{}")
    k.add_argument("--stage-timeout", type=float, default=600)
    k.add_argument("--serve-nbd", type=int, default=0, metavar="PORT",
                   help="instead of replaying, serve the published device over NBD (real boot)")
    for x in (d, k):
        x.add_argument("--profile", required=True)
        x.add_argument("--scale", type=float, default=DEFAULT_GAP_SCALE)
        x.add_argument("--ticket", help="start ahead, then wait for the go at this path")
        x.add_argument("--ticket-timeout", type=float, default=3600)
    a = p.parse_args(argv)
    steps = plan_replay(load_profile(a.profile), a.scale)
    if a.cmd == "kubelet":
        import vmthunder.csi.client
        import vmthunder.csi.proto.csi_pb2  # noqa: F401  (imported ahead of the go)
    if a.ticket:
        go = await_ticket(a.ticket, a.ticket_timeout)
        if a.cmd == "kubelet":
            a.volume_id, a.context = go["volume_id"], json.dumps(go.get("context") or {})
        else:
            a.device = go["device"]
    if not (a.device if a.cmd == "device" else a.volume_id):
        p.error("--device or --volume-id, or --ticket, is required")
    out = _kubelet(a, steps) if a.cmd == "kubelet" else replay(a.device, steps)
    out["scale"] = a.scale
    print(json.dumps(out), flush=True)
    return 0 if out["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
