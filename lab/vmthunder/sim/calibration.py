"""Every parameter the simulator takes from the world, in one place.

Defaults are stated assumptions for Gigabit Ethernet (the seed's setting) until the lab
measures them. Feeding the lab's figures: `load_calibration(path)` reads a JSON object whose
keys are field names of `Calibration` (any subset), e.g. the lab's
    {"request_overhead_s": 0.0004, "local_read_bps": 9.0e8, "attach_s": 1.2}
(vmthunder.sim.labfit derives them from the lab's benchmark records)
and `calibrated(**figures)` does the same from Python. The boot profile is separate
(vmthunder.sim.profile): the lab's recorded profile when there is one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GBIT = 1e9 / 8  # bytes per second of one Gbit/s
MiB = 1 << 20


@dataclass(frozen=True)
class Calibration:
    node_bps: float = 1 * GBIT  # each node's NIC, each direction
    origin_bps: float = 1 * GBIT  # the origin's NIC (one storage server's)
    rack_uplink_bps: float = 10 * GBIT  # each rack's uplink, each direction (racked runs)
    latency_s: float = 100e-6  # one way, one hop
    request_overhead_s: float = 150e-6  # initiator + target + dm per request
    local_read_bps: float = 400e6  # the node's cache disk, for reads that hit
    local_request_s: float = 0.0  # per VM read on the node itself (its block stack), hit or not
    region_bytes: int = 64 << 10  # cache region (the node agent's dm-clone default)
    # Simulation granularity, not physics: the working set moves in units of this many
    # bytes of regions consecutive in first-touch order, the rest of the image in bulk units.
    sim_unit_bytes: int = 2 * MiB
    bulk_bytes: int = 256 * MiB
    attach_s: float = 1.0  # iSCSI login + block stack until the VM can start reading
    # A resource every transfer crosses: in the lab, the host's two cores emulating every
    # guest's network and block stack (TCG). Unbounded on real hardware.
    host_bps: float = math.inf
    prefetch_depth: int = 8  # prefetch requests in flight per node
    hydrate_bps: float = 40e6  # background hydration throttle per node
    detect_s: float = 5.0  # a dead parent noticed (iSCSI nop-out timeout) and re-planned
    reattach_s: float = 1.0  # log in to the new parent, reload the -src table
    merge_gap_s: float = 0.001  # reads closer than this are one step (in flight together)

    def hop_delay(self) -> float:
        """From a request to the first byte, one hop: a round trip plus per-request work."""
        return 2 * self.latency_s + self.request_overhead_s


def calibrated(base: Calibration | None = None, **figures: Any) -> Calibration:
    """`base` with the given measured figures; unknown names are an error, not ignored."""
    base = base or Calibration()
    names = {f.name for f in dataclasses.fields(Calibration)}
    unknown = set(figures) - names
    if unknown:
        raise ValueError(f"unknown calibration figures: {sorted(unknown)}")
    return dataclasses.replace(base, **figures)


def load_calibration(path: Path, base: Calibration | None = None) -> Calibration:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a calibration is a JSON object of figures")
    return calibrated(base, **data)


def local_read_s(nbytes: int, reads: int, cal: Calibration) -> float:
    """A VM's reads served by its own node: per-request cost plus the disk's transfer."""
    return reads * cal.local_request_s + nbytes / cal.local_read_bps


def with_host_link(capacity: list[float], cal: Calibration) -> int | None:
    """Appends the host's link to a network's capacities when it is bounded; its index."""
    if math.isinf(cal.host_bps):
        return None
    capacity.append(cal.host_bps)
    return len(capacity) - 1
