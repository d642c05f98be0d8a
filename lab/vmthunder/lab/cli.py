"""`vmthunder lab ...`: bring the qemu lab up and down from a shell.

vmthunder lab up 16                 origin (exporting the small golden image) + 16 nodes
vmthunder lab up 3 --image large    the 2 GiB golden image; --image PATH or --image none
vmthunder lab status                guests, addresses, the origin's iSCSI target
vmthunder lab exec node-00 -- lsmod run a command in a guest
vmthunder lab down                  slot 0; --slot S, or --all (every lab, by name prefix)
vmthunder lab profile show PATH     validate and summarize a boot profile
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from vmthunder.lab.lab import DEFAULT_RATE_MBIT, REPO, Lab, LabError


def golden_image(variant: str) -> Path:
    """Path of the cached golden image of that variant (small, large), built if missing."""
    p = subprocess.run(
        [str(REPO / "scripts" / "build-golden.sh"), variant], capture_output=True, text=True
    )
    if p.returncode != 0:
        raise LabError(f"build-golden.sh {variant} failed: {p.stderr[-3000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def resolve_image(arg: str) -> Path | None:
    if arg == "none":
        return None
    if arg in ("small", "large"):
        return golden_image(arg)
    return Path(arg)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lab_command", required=True)
    up = sub.add_parser("up", help="boot an origin and N nodes")
    up.add_argument("nodes", type=int)
    up.add_argument("--image", default="small", help="small, large, none or a raw image path")
    up.add_argument("--mem-mib", type=int, default=512)
    up.add_argument(
        "--rate-mbit",
        type=int,
        default=DEFAULT_RATE_MBIT,
        help="link rate standing for 1 Gbit/s (0: unshaped)",
    )
    up.add_argument("--cache-gib", type=float, default=4)
    up.add_argument("--slot", type=int, default=0)
    down = sub.add_parser("down", help="remove a lab's guests, network and files")
    down.add_argument("--slot", type=int, default=0)
    down.add_argument("--all", action="store_true", help="every lab on this host")
    st = sub.add_parser("status", help="show a lab")
    st.add_argument("--slot", type=int, default=0)
    ex = sub.add_parser("exec", help="run a command in a guest")
    ex.add_argument("--slot", type=int, default=0)
    ex.add_argument("--timeout", type=float, default=300)
    ex.add_argument("guest")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    pr = sub.add_parser("profile", help="boot profiles (record, show)")
    pr.add_argument("args", nargs=argparse.REMAINDER)


def _status(lab: Lab) -> None:
    print(
        f"lab slot {lab.slot}: netns {lab.netns}, host {lab.host_ip} on {lab.host_if}, "
        f"links {lab.rate_mbit} Mbit/s (x{lab.scale_to_gbit:g} = 1 Gbit/s), "
        f"booted in {lab.boot_seconds:.1f}s"
    )
    for g in lab.guests:
        state = "running" if g.alive() else "DOWN"
        print(f"  {g.name:10} {g.ip:15} {state:8} pid {g.pid:<8} {g.mem_mib} MiB  {g.disk}")
    t = lab.origin_target
    if t:
        print(
            f"  origin target {t.iqn} at {t.portal}, CHAP {t.chap_user}/{t.chap_password}, "
            f"{t.size} bytes from {t.image}"
        )


def run(args: argparse.Namespace) -> int:
    try:
        cmd = args.lab_command
        if cmd == "up":
            t0 = time.monotonic()
            lab = Lab.up(
                args.nodes,
                image=resolve_image(args.image),
                mem_mib=args.mem_mib,
                rate_mbit=args.rate_mbit,
                cache_gib=args.cache_gib,
                slot=args.slot,
            )
            _status(lab)
            print(f"up in {time.monotonic() - t0:.1f}s; `vmthunder lab down --slot {lab.slot}`")
        elif cmd == "down":
            slots = Lab.sweep_all() if args.all else (Lab.down_slot(args.slot) or [args.slot])
            print(f"removed lab slot(s) {slots}")
        elif cmd == "status":
            _status(Lab.attach(args.slot))
        elif cmd == "exec":
            argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            r = Lab.attach(args.slot).guest(args.guest).run(" ".join(argv), timeout=args.timeout)
            sys.stdout.write(r.stdout)
            sys.stderr.write(r.stderr)
            return r.rc
        elif cmd == "profile":
            from vmthunder.lab.profile import main as profile_main

            return profile_main(args.args)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
