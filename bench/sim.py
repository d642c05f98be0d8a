"""The boot storm from 160 to 10,000 nodes: VMThunder (with and without prefetch) against
copy-first, one storage server and a warm local disk. Prints one table per scenario and
writes plots (boot-time CDF, origin load vs N) under results/sim/.

    $(./scripts/setup-python.sh)/bin/python bench/sim.py [--quick] [--calibration FILE]
        [--profile FILE]

The boot profile is the lab's recorded one (lab/vmthunder/lab/**/*profile*.json) when it
exists, else the synthetic profile whose parameters are printed. The calibration is the
defaults of vmthunder.sim.calibration, overridden by --calibration (JSON of figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from vmthunder.sim.calibration import Calibration, load_calibration
from vmthunder.sim.engine import Failure, Mode, Result, Scenario, simulate
from vmthunder.sim.profile import (
    BootProfile,
    SyntheticProfile,
    describe,
    find_lab_profile,
    parse_profile,
)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "results" / "sim"
GiB = 1 << 30
MiB = 1 << 20

# The seed's published figures (VMThunder, Gigabit Ethernet, 160 VMs on 160 nodes).
SEED = {"on demand": (60.0, 20.0), "with prefetch": (18.0, 16.0)}


def for_size(cal: Calibration, nodes: int) -> Calibration:
    # Coarser simulation units at 10,000 nodes keep the run under a minute (2 cores).
    return dataclasses.replace(cal, sim_unit_bytes=4 * MiB) if nodes >= 5000 else cal


def variants(name: str, nodes: int, **kw: object) -> list[Scenario]:
    base = Scenario(f"{name}", nodes, **kw)  # type: ignore[arg-type]
    return [
        dataclasses.replace(base, name="VMThunder + prefetch"),
        dataclasses.replace(base, name="VMThunder on demand", prefetch=False),
        dataclasses.replace(base, name="copy-first", mode=Mode.COPY_FIRST),
        dataclasses.replace(base, name="one storage server", mode=Mode.ONE_SERVER),
        dataclasses.replace(base, name="local warm disk", mode=Mode.LOCAL),
    ]


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


HEADER = (
    f"{'variant':<22} {'nodes':>6} {'fan':>3} {'depth':>5} {'all s':>9} {'mean s':>8} "
    f"{'p90 s':>8} {'origin GiB':>10} {'moved':>5} {'dead':>4} {'sim s':>6}"
)


def row(r: Result) -> str:
    sc = r.scenario
    depth = str(r.depth) if sc.mode is Mode.VMTHUNDER else "-"
    return (
        f"{sc.name:<22} {sc.nodes:>6} {sc.fanout:>3} {depth:>5} {r.all_booted_s:>9.1f} "
        f"{r.mean_boot_s:>8.1f} {pct(r.boot_s, 0.9):>8.1f} {r.origin_bytes / GiB:>10.2f} "
        f"{r.reparented:>5} {r.dead:>4} {r.wall_s:>6.1f}"
    )


def run_table(
    title: str, scenarios: list[Scenario], profile: BootProfile, cal: Calibration
) -> list[Result]:
    print(f"\n## {title}")
    print(HEADER)
    out = []
    for sc in scenarios:
        r = simulate(sc, profile, for_size(cal, sc.nodes))
        print(row(r), flush=True)
        out.append(r)
    return out


def plot_cdf(results: list[Result], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        xs = sorted(r.boot_s)
        if not xs or xs[-1] > 600:
            continue  # the copy-first and one-server curves sit off this scale: see the table
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=r.scenario.name)
    ax.set_xlabel("seconds from the start of the storm")
    ax.set_ylabel("fraction of VMs booted")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_origin(by_n: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in by_n.items():
        ax.plot([n for n, _ in points], [b for _, b in points], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("bytes the origin served until all booted (GiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the 10,000-node runs")
    ap.add_argument("--calibration", type=Path, help="JSON of Calibration figures")
    ap.add_argument("--profile", type=Path, help="a recorded boot profile (JSON)")
    args = ap.parse_args()
    cal = load_calibration(args.calibration) if args.calibration else Calibration()
    path = args.profile or find_lab_profile(REPO / "lab" / "vmthunder" / "lab")
    if path is not None:
        profile = parse_profile(path.read_text(), source=str(path))
    else:
        profile = SyntheticProfile().build()
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"profile: {profile.source if path else 'synthetic, ' + repr(SyntheticProfile())}")
    print(f"         {describe(profile)}")
    print(f"calibration: {cal}")

    seed = run_table("seed: 160 nodes, 1 Gbit/s, fan-out 4", variants("seed", 160), profile, cal)
    print("\nnext to the seed (VMThunder paper, 160 VMs, Gigabit Ethernet):")
    print(f"{'':<22} {'seed all s':>10} {'seed mean s':>11} {'ours all s':>10} {'ours mean s':>11}")
    for label, r in (("on demand", seed[1]), ("with prefetch", seed[0])):
        s_all, s_mean = SEED[label]
        print(
            f"{label:<22} {s_all:>10.0f} {s_mean:>11.0f} {r.all_booted_s:>10.1f} "
            f"{r.mean_boot_s:>11.1f}"
        )
    plot_cdf(seed, "160 nodes, 1 Gbit/s, fan-out 4", OUT / "cdf-seed.png")

    sizes = [160, 1000] + ([] if args.quick else [10_000])
    by_n: dict[str, list[tuple[int, float]]] = {}
    for n in sizes[1:]:
        res = run_table(f"{n} nodes, flat 1 Gbit/s, fan-out 4", variants("n", n), profile, cal)
        plot_cdf(res, f"{n} nodes, flat 1 Gbit/s", OUT / f"cdf-{n}.png")
        for r in res:
            by_n.setdefault(r.scenario.name, []).append((n, r.origin_bytes / GiB))
    for r in seed:
        by_n[r.scenario.name].insert(0, (160, r.origin_bytes / GiB))
    plot_origin({k: v for k, v in by_n.items() if k != "local warm disk"}, OUT / "origin-vs-n.png")

    fanouts = [
        dataclasses.replace(sc, name=f"{sc.name} k={k}", fanout=k)
        for k in range(2, 9)
        for sc in variants("fanout", 1000)[:2]
    ]
    run_table("fan-out 2..8, 1000 nodes", fanouts, profile, cal)

    for n in [1000] + ([] if args.quick else [10_000]):
        res = run_table(
            f"{n} nodes in racks of 40: 1 Gbit/s nodes, 10 Gbit/s rack uplinks",
            variants("racks", n, rack_size=40),
            profile,
            cal,
        )
        plot_cdf(res, f"{n} nodes, racks of 40", OUT / f"cdf-racks-{n}.png")

    fail = [
        dataclasses.replace(sc, name=f"{sc.name}{tag}", failure=f)
        for sc in variants("fail", 1000)[:2]
        for tag, f in (("", None), (" +5% fail", Failure(at_s=4.0, fraction=0.05)))
    ]
    res = run_table(
        "parent failures at 4 s: 5% of interior nodes die, 1000 nodes", fail, profile, cal
    )
    plot_cdf(res, "1000 nodes, 5% of parents die at 4 s", OUT / "cdf-failures.png")

    hyd = [dataclasses.replace(variants("hydrate", 160)[0], until_hydrated=True)]
    (h,) = run_table("until every node is hydrated and detached (160 nodes)", hyd, profile, cal)
    print(
        f"all hydrated and detached after {max(h.hydrated_s):.0f} s "
        f"(throttle {cal.hydrate_bps / 1e6:.0f} MB/s, image {profile.image_bytes / GiB:.1f} GiB)"
        f"; origin served {h.origin_bytes / GiB:.1f} GiB"
    )
    print(f"\nplots in {OUT.relative_to(REPO)}/; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
