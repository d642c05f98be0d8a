"""A flow-level simulator of VMThunder's boot storm, from 160 to 10,000 nodes.

Pure pieces: `fairshare` (max-min fair rates), `events` (the ordered event queue),
`profile` (boot profiles: loaded from the lab or synthetic), `calibration` (every measured
parameter in one place). `engine` runs one scenario; `scenarios` names the standard ones;
bench/sim.py prints the tables and draws the plots. The tree comes from the real planner,
vmthunder.operator.planner.plan_tree.
"""
