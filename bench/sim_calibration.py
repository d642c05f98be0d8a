"""The simulator calibrated from the lab at one N, its forecast for another N against the lab.

    python bench/sim_calibration.py RECORDS.json [RECORDS.json ...] [--fit-n 4] [--check-n 8]

RECORDS: what `python bench/provision.py` wrote (every run's record). The calibration reads the
fit-N runs only (vmthunder+prefetch and the local floor: link rate, attach time, each read's
cost on the node; the host's throughput fitted to the all-booted time, vmthunder.sim.labfit);
the forecast for check-N uses nothing measured at check-N. Issue 8 asks for 25%.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d)
                for d in ("lab", "operator", "csi", "node")]

from vmthunder.lab.profile import load_profile  # noqa: E402
from vmthunder.lab.provision import golden  # noqa: E402
from vmthunder.sim import labfit  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records", type=Path, nargs="+")
    p.add_argument("--fit-n", type=int, default=4)
    p.add_argument("--check-n", type=int, default=8)
    p.add_argument("--profile", type=Path, default=None, help="default: the small golden's")
    a = p.parse_args()
    records = [r for f in a.records for r in json.loads(f.read_text())["runs"]]
    f = labfit.forecast(records, load_profile(a.profile or golden("small")[1]), a.fit_n,
                        a.check_n)
    cal = f.calibration
    print(f"fitted at N={a.fit_n}: attach {cal.attach_s:.1f} s, per read on the node "
          f"{cal.local_request_s * 1e3:.1f} ms, host {cal.host_bps / 1e6:.2f} MB/s; "
          f"reproduces {f.reproduced_s:.1f} s (lab {f.fit.all_booted_s:.1f} s)")
    try:
        lab = labfit.find_run(records, labfit.MODE, a.check_n).all_booted_s
        verdict = f"lab {lab:.1f} s: {f.forecast_s / lab - 1:+.0%} (issue 8 asks within 25%)"
    except (LookupError, ValueError) as e:  # not every VM booted: the lab's time is unknown
        verdict = f"no complete lab run to compare: {e}"
    print(f"forecast for N={a.check_n}: all booted {f.forecast_s:.1f} s; {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
