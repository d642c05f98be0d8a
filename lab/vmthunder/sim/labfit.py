"""The simulator calibrated from the lab.

A lab run (bench/provision.py keeps every run's record) gives most figures directly: the link
rate the lab shaped, when each VM's disk was published (the simulator's attach), how fast a
boot reads the node's own disk (the local-disk floor run). The recorded boot becomes the
simulator's profile with the gaps the lab replayed. One figure no lab run shows on its own,
the throughput of the host's cores that every transfer crosses (they emulate every guest's
initiator, target and device-mapper under TCG), is fitted so the simulator reproduces one
run's all-booted time. The forecast for a run of
another size then uses nothing measured in that run: what each guest does alone scales with
the number of guests sharing the host (`scaled_to`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from vmthunder.lab.profile import BootProfile as Recording
from vmthunder.sim.calibration import Calibration, calibrated
from vmthunder.sim.engine import Mode, Scenario, simulate
from vmthunder.sim.profile import BootProfile, Read


def profile_from_recording(rec: Recording, gap_scale: float) -> BootProfile:
    """The lab's recorded boot as the simulator reads it, with the gaps the lab replayed
    (the replay issues each read `gap` after the previous one completed, as the simulator's
    steps do; reads are not merged, the replay issues them one at a time)."""
    reads = tuple(Read(r.offset, r.length, r.gap_us * gap_scale / 1e6) for r in rec.reads)
    return BootProfile(rec.image_size, reads, 0.0, f"lab recording, gaps x{gap_scale:g}")


@dataclass(frozen=True)
class LabRun:
    """What the calibration reads of one lab run's record (Run.to_json)."""

    mode: str
    n: int
    fanout: int
    origin_fanout: int
    rate_mbit: float
    gap_scale: float
    attach_s: float  # mean time from the start to the VM's first read (its disk is there)
    all_booted_s: float
    mean_booted_s: float
    mean_boot_s: float  # mean time from the first read to the boot's end

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LabRun:
        o, nodes = record["options"], record["nodes"]
        booted = [n["booted"] for n in nodes]
        if not nodes or any(b is None for b in booted):
            raise ValueError(f"{record['mode']} at N={record['n']}: not every VM booted")
        started = [n["first_byte"] if n["first_byte"] is not None else n["published"] or 0.0
                   for n in nodes]
        return cls(mode=record["mode"], n=int(record["n"]), fanout=int(o["fanout"]),
                   origin_fanout=int(o["origin_fanout"]), rate_mbit=float(o["rate_mbit"]),
                   gap_scale=float(o["gap_scale"]), attach_s=statistics.fmean(started),
                   all_booted_s=max(booted), mean_booted_s=statistics.fmean(booted),
                   mean_boot_s=statistics.fmean(b - s for b, s in zip(booted, started,
                                                                        strict=True)))


def find_run(records: Sequence[Mapping[str, Any]], mode: str, n: int) -> LabRun:
    for r in records:
        if r["mode"] == mode and int(r["n"]) == n:
            return LabRun.from_record(r)
    raise LookupError(f"no {mode} run at N={n} among the records")


def measured(run: LabRun, profile: BootProfile, local: LabRun | None = None,
             base: Calibration | None = None) -> Calibration:
    """The figures a run shows directly: link rates, attach time, and, from the local-disk
    run, what each read costs on the node itself (the boot's time less the profile's compute
    and the disk's transfer, per read: under TCG the emulated block stack, not the disk,
    dominates)."""
    bps = run.rate_mbit * 1e6 / 8
    figures: dict[str, Any] = {"node_bps": bps, "origin_bps": bps, "attach_s": run.attach_s,
                               "merge_gap_s": 0.0,  # the replay issues one read at a time
                               "hydrate_bps": bps}  # the lab sets no hydration throttle
    if local is not None:
        cal = calibrated(base)
        reading = (local.mean_boot_s - profile.compute_s
                   - profile.read_bytes / cal.local_read_bps)
        figures["local_request_s"] = max(0.0, reading / max(1, len(profile.reads)))
    return calibrated(base, **figures)


def _scenario(run: LabRun, prefetch: bool) -> Scenario:
    return Scenario(f"lab N={run.n}", run.n, Mode.VMTHUNDER, fanout=run.fanout,
                    origin_fanout=run.origin_fanout, prefetch=prefetch)


def predict(run: LabRun, profile: BootProfile, cal: Calibration) -> float:
    """The simulator's all-booted time for a run's size and tree (its measured times unused)."""
    prefetch = "prefetch" in run.mode
    return simulate(_scenario(run, prefetch), profile, cal).all_booted_s


def fit_host_bps(run: LabRun, profile: BootProfile, cal: Calibration,
                 lo_bps: float = 1e4, hi_bps: float = 1e10, rounds: int = 40) -> Calibration:
    """The host's throughput (every transfer crosses the cores that emulate the guests) that
    makes the simulator reproduce the run's all-booted time (bisection in log space: the
    simulated time falls as the throughput grows). Clamped to [lo_bps, hi_bps]."""
    for _ in range(rounds):
        mid = math.sqrt(lo_bps * hi_bps)
        if predict(run, profile, calibrated(cal, host_bps=mid)) > run.all_booted_s:
            lo_bps = mid
        else:
            hi_bps = mid
    return calibrated(cal, host_bps=math.sqrt(lo_bps * hi_bps))


def scaled_to(cal: Calibration, fitted_n: int, n: int) -> Calibration:
    """The figures for a lab of n guests from those fitted at fitted_n: the work each guest
    does on its own (attaching its stack, the per-read cost of its block stack) shares the
    host's cores with every other guest doing the same at the same time, so it takes n /
    fitted_n times as long; the transfers already share the host link."""
    k = n / fitted_n
    return calibrated(cal, attach_s=cal.attach_s * k, local_request_s=cal.local_request_s * k)


MODE = "vmthunder+prefetch"


@dataclass(frozen=True)
class Forecast:
    fit: LabRun  # the run the calibration was fitted to
    calibration: Calibration
    reproduced_s: float  # the fitted run's all-booted time as the simulator gives it back
    forecast_s: float  # all booted at the asked N, from nothing measured at it


def forecast(records: Sequence[Mapping[str, Any]], recording: Recording, fit_n: int,
             n: int) -> Forecast:
    """Calibrates from the fit_n runs (VMThunder with prefetch and the local floor) and
    forecasts VMThunder with prefetch's all-booted time at n."""
    fit = find_run(records, MODE, fit_n)
    profile = profile_from_recording(recording, fit.gap_scale)
    cal = fit_host_bps(fit, profile, measured(fit, profile, find_run(records, "local", fit_n)))
    return Forecast(fit, cal, predict(fit, profile, cal),
                    predict(replace(fit, n=n), profile, scaled_to(cal, fit_n, n)))
