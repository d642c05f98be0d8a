"""Lab benchmark: guest boot times, memory per guest, iSCSI throughput, boot profile size.

    python bench/lab_boot.py [--nodes 16] [--image small|large|PATH] [--skip-single]

Prints one table. Target: 16 node guests + the origin up in under 90 s on 2 cores under TCG,
at most 512 MiB each. Throughput is printed as measured and scaled to 1 Gbit/s links
(lab links run at --rate-mbit and stand for 1 Gbit/s).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))

from vmthunder.lab.cli import resolve_image
from vmthunder.lab.lab import CACHE, DEFAULT_RATE_MBIT, Guest, Lab
from vmthunder.lab.profile import load_profile

MIB = 1 << 20
rows: list[tuple[str, str]] = []


def row(what: str, value: str) -> None:
    rows.append((what, value))
    print(f"  {what:52} {value}", flush=True)


def rss_mib(g: Guest) -> float:
    text = Path(f"/proc/{g.pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m[1]) / 1024 if m else 0.0


def guest_used_mib(g: Guest) -> float:
    r = g.run("free -m | awk '/^Mem:/{print $3}'", timeout=30)
    return float(r.stdout.strip() or 0)


def read_lun(g: Guest, lab: Lab, mib: int) -> float:
    """MB/s of a direct sequential read of the origin's LUN by g."""
    t = lab.origin_target
    assert t is not None
    dev = g.iscsi_login(t)
    try:
        r = g.run(
            f"dd if={dev} of=/dev/null bs=1M count={mib} iflag=direct 2>&1 | tail -1",
            timeout=600,
            check=True,
        )
    finally:
        g.iscsi_logout(t)
    m = re.search(r"copied, ([\d.]+) s", r.stdout)
    assert m, r.stdout
    return mib * MIB / float(m[1]) / 1e6


def pair_stream(src: Guest, dst: Guest, mib: int, port: int) -> float:
    """MB/s of one TCP stream src -> dst (busybox nc listens, bash /dev/tcp sends)."""
    dst.start_background(f"busybox nc -l -p {port} > /dev/null", log="/dev/null")
    time.sleep(1.0)
    r = src.run(
        [
            "bash", "-c",
            f"s=$(date +%s.%N); head -c {mib}M /dev/zero > /dev/tcp/{dst.ip}/{port}; "
            f"e=$(date +%s.%N); echo $s $e",
        ],
        timeout=600,
        check=True,
    )  # fmt: skip
    s, e = (float(x) for x in r.stdout.split()[-2:])
    return mib * MIB / (e - s) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--image", default="small")
    ap.add_argument("--rate-mbit", type=int, default=DEFAULT_RATE_MBIT)
    ap.add_argument("--mem-mib", type=int, default=512)
    ap.add_argument("--read-mib", type=int, default=64)
    ap.add_argument("--skip-single", action="store_true")
    a = ap.parse_args()
    image = resolve_image(a.image)
    scale = 1000 / a.rate_mbit if a.rate_mbit else 1.0
    print(f"lab benchmark: image {image}, links {a.rate_mbit} Mbit/s (x{scale:g} = 1 Gbit/s)")

    if not a.skip_single:
        t0 = time.monotonic()
        with Lab.up(nodes=1, origin=False, mem_mib=a.mem_mib) as lab:
            row("boot 1 guest (qemu start -> exec agent ready)", f"{lab.boot_seconds:.1f} s")
            row("  incl. network + build-guest check", f"{time.monotonic() - t0:.1f} s")
            g = lab.nodes[0]
            row(
                "memory of 1 idle guest (qemu RSS / guest used)",
                f"{rss_mib(g):.0f} / {guest_used_mib(g):.0f} MiB of {a.mem_mib}",
            )

        t0 = time.monotonic()
        with Lab.up(nodes=1, image=image, rate_mbit=0, mem_mib=a.mem_mib) as lab:
            mbs = read_lun(lab.nodes[0], lab, a.read_mib)
            row("iSCSI read origin -> node, unshaped", f"{mbs:.1f} MB/s ({mbs * 8:.0f} Mbit/s)")

    t0 = time.monotonic()
    with Lab.up(nodes=a.nodes, image=image, rate_mbit=a.rate_mbit, mem_mib=a.mem_mib) as lab:
        total = time.monotonic() - t0
        row(f"boot origin + {a.nodes} nodes (in parallel)", f"{lab.boot_seconds:.1f} s")
        row("  incl. network and origin's iSCSI export", f"{total:.1f} s")
        with ThreadPoolExecutor(8) as pool:
            rss = list(pool.map(rss_mib, lab.guests))
            used = list(pool.map(guest_used_mib, lab.guests))
        row(
            "memory per guest, qemu RSS (mean / max)",
            f"{statistics.mean(rss):.0f} / {max(rss):.0f} MiB of {a.mem_mib}",
        )
        row(
            "memory per guest, used inside (mean / max)",
            f"{statistics.mean(used):.0f} / {max(used):.0f} MiB",
        )
        mbs = read_lun(lab.nodes[0], lab, a.read_mib)
        row(
            f"iSCSI read origin -> node, {a.rate_mbit} Mbit/s links",
            f"{mbs:.1f} MB/s = {mbs * 8 / a.rate_mbit * 100:.0f}% of link; "
            f"x{scale:g} = {mbs * scale:.0f} MB/s at 1 Gbit/s"
            if a.rate_mbit
            else f"{mbs:.1f} MB/s",
        )
        nodes = lab.nodes
        for k in (1, 2, 4, 8):
            if 2 * k > len(nodes):
                break
            pairs = [(nodes[2 * i], nodes[2 * i + 1]) for i in range(k)]
            with ThreadPoolExecutor(k) as pool:
                res = list(pool.map(lambda p: pair_stream(p[0], p[1], 32, 5001), pairs))
            agg = sum(res)
            link = a.rate_mbit / 8 if a.rate_mbit else 0
            note = f" ({agg / (k * link) * 100:.0f}% of {k} links)" if link else ""
            row(
                f"TCP, {k} node pair(s) at once: aggregate (min pair)",
                f"{agg:.1f} ({min(res):.1f}) MB/s{note}",
            )

    for variant in ("small", "large"):
        # only variants already built: the large one takes minutes to make
        prof_path = CACHE / f"golden-{variant}" / "boot.profile"
        if not prof_path.exists():
            continue
        p = load_profile(prof_path)
        row(
            f"boot profile ({variant}): file size",
            f"{prof_path.stat().st_size / 1024:.0f} KiB, {len(p.reads)} reads",
        )
        row(
            f"boot profile ({variant}): read during boot / image",
            f"{p.bytes_read / MIB:.0f} MiB ({p.unique_bytes / MIB:.0f} unique) / "
            f"{p.image_size / MIB:.0f} MiB = {100 * p.unique_bytes / p.image_size:.1f}%",
        )
        row(
            f"boot profile ({variant}): boot time, gaps",
            f"{p.boot_seconds:.1f} s under "
            f"{p.recorded_under}, gaps sum {p.total_gap_us / 1e6:.1f} s at scale {p.gap_scale:g}",
        )

    print()
    w = max(len(r[0]) for r in rows)
    print(f"| {'measure':{w}} | value |\n|{'-' * (w + 2)}|-------|")
    for what, value in rows:
        print(f"| {what:{w}} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
