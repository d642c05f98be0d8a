"""Kill/restart cycles (issue 10): the agent, the CSI node plugin, the CSI controller and the
operator SIGKILLed at random points while ImageCaches and volumes come and go, in the lab
(origin + 2 nodes, a 64 MiB image); after each cycle the cluster must converge from kernel and
API state with nothing leaked (vmthunder.lab.killrestart says what is checked).

Prints one line per cycle and a summary: cycles run, kills per component, how many converged,
leaks found, time per cycle. Target: every cycle converges, 0 leaks, and nothing is left
after everything is deleted.

    python bench/kill_restart.py [--cycles 50] [--seed N] [--slot 9] [--json PATH]
                                 [--logs DIR] [--kills-per-cycle 2] [--aimed K]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path += [str(Path(__file__).resolve().parents[1] / d) for d in ("operator", "csi", "node",
                                                                      "lab")]

from vmthunder.lab.killrestart import Chaos, format_summary, kill_schedule, small_image
from vmthunder.lab.provision import Options, Rig, rig


def save_logs(r: Rig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in r.workdir.glob("*.log"):
        shutil.copy(path, folder / path.name)
    for g in r.lab.nodes:
        for log in ("agent", "csi-node"):
            (folder / f"{g.name}-{log}.log").write_text(
                g.run(f"tail -c 3000000 /tmp/{log}.log", timeout=120).stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock, printed")
    ap.add_argument("--slot", type=int, default=None, help="lab slot (default: first free)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--image-mib", type=int, default=64)
    ap.add_argument("--kills-per-cycle", type=int, default=1, choices=(1, 2, 4),
                    help="2: one component in a node and one on the host each cycle; "
                         "4: every component every cycle")
    ap.add_argument("--aimed", type=int, default=0,
                    help="then this many aimed cycles: every agent killed the moment an "
                         "image's -src is removed, the last step of its teardown")
    ap.add_argument("--converge-timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    ap.add_argument("--logs", type=Path, default=None,
                    help="copy the operator's, controller's, agents' and plugins' logs here")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    print(f"seed {seed}", flush=True)
    t0 = time.monotonic()
    opts = Options(nodes=args.nodes, image=str(small_image(args.image_mib)), slot=args.slot,
                   live=False)
    with rig(opts) as r:
        setup = time.monotonic() - t0
        print(f"rig up in {setup:.0f} s", flush=True)
        chaos = Chaos(r, seed, converge_timeout=args.converge_timeout,
                      say=lambda s: print(s, flush=True))
        schedule = kill_schedule(args.cycles, random.Random(seed),
                                 per_cycle=args.kills_per_cycle)
        t1 = time.monotonic()
        for i, victims in enumerate(schedule):
            chaos.cycle(i, victims)
        for i in range(args.aimed):
            chaos.aimed_cycle(len(schedule) + i)
        cycles_s = time.monotonic() - t1
        final = chaos.finish()
        s = chaos.summary()
        s.update(setup_s=round(setup, 1), cycles_s=round(cycles_s, 1))
        print("\n" + format_summary(s))
        print(f"setup {setup:.0f} s, {len(schedule)} cycles in {cycles_s:.0f} s")
        if args.json:
            args.json.write_text(json.dumps({"summary": s, "cycles": [
                {**vars(rec), "action": vars(rec.action), "kills": [vars(k) for k in rec.kills]}
                for rec in chaos.records]}, indent=1, default=str))
        if args.logs:
            save_logs(r, args.logs)
        ok = s["converged"] == s["cycles"] and not s["leaks"] and not final
        if not ok:
            print(r.logs(), file=sys.stderr)
        print("met" if ok else "NOT met")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
