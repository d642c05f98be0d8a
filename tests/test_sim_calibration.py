"""The simulator calibrated from the lab (issue 8): fitted to the lab's run at N = 4, it
forecasts the lab's all-booted time at N = 8 within 25%, using nothing measured at N = 8.

The lab's runs are stored in tests/data (bench/provision.py's records, trimmed, with the boot
recording they replayed): a lab run at N = 8 takes half an hour of the 2-core machine, too long
for every test run. Refresh them with `python bench/provision.py --nodes 4 8 --modes
vmthunder+prefetch local` and `python bench/sim_calibration.py RECORDS.json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmthunder.lab.profile import load_profile
from vmthunder.sim import labfit

DATA = Path(__file__).parent / "data"


def test_fitted_at_4_the_simulator_forecasts_the_labs_all_booted_time_at_8() -> None:
    records = json.loads((DATA / "lab-provision-n4-n8.json").read_text())["runs"]
    recording = load_profile(DATA / "golden-small.boot.profile")
    f = labfit.forecast(records, recording, fit_n=4, n=8)
    # The fit reproduces the run it was fitted to (the bisection converged).
    assert f.reproduced_s == pytest.approx(f.fit.all_booted_s, rel=0.01)
    lab = labfit.find_run(records, labfit.MODE, 8).all_booted_s
    print(f"forecast {f.forecast_s:.1f} s, lab {lab:.1f} s ({f.forecast_s / lab - 1:+.0%})")
    assert f.forecast_s == pytest.approx(lab, rel=0.25)
