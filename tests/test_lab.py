"""The lab itself: guests with Debian's kernel, the modules the data path needs, the origin's
iSCSI export of the golden image byte for byte. Boots 1 origin + 3 nodes (about 1-2 min on 2
cores under TCG, most of it the first boot after a cold cache build)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from vmthunder.lab.cli import golden_image
from vmthunder.lab.lab import (
    Guest,
    GuestError,
    Lab,
    LabError,
    RunResult,
    host_if_name,
    netns_name,
    state_dir_of,
)
from vmthunder.lab.profile import load_profile

pytestmark = pytest.mark.lab

MODULES = ("dm_clone", "dm_thin_pool", "iscsi_tcp", "target_core_mod", "iscsi_target_mod")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def running(pid: int) -> bool:
    """Exists and is not a zombie (this machine's init may be slow to reap orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def image() -> Path:
    return golden_image("small")


@pytest.fixture(scope="module")
def lab(image: Path) -> Iterator[Lab]:
    # unshaped links: the sha256 of the whole LUN would take a minute at the default rate
    with Lab.up(nodes=3, image=image, rate_mbit=0) as lab:
        yield lab


def test_every_guest_runs_debians_kernel_with_the_data_path_modules(lab: Lab) -> None:
    def check(g: Guest) -> tuple[str, RunResult]:
        r = g.run(f"modprobe -a {' '.join(MODULES)} && cat /proc/modules && uname -r", timeout=120)
        return g.name, r

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(check, lab.guests))
    assert len(results) == 4
    for name, r in results:
        assert r.rc == 0, f"{name}: {r.stderr}"
        loaded = {line.split()[0] for line in r.stdout.splitlines() if " " in line}
        assert set(MODULES) <= loaded, f"{name}: missing {set(MODULES) - loaded}"
        assert re.search(r"^6\.1\.\d+-\d+-amd64$", r.stdout.strip().splitlines()[-1])


def test_guests_reach_each_other_and_the_host_side_of_the_bridge(lab: Lab) -> None:
    node = lab.nodes[1]
    # no ping on the host root: an iSCSI portal is a TCP port we can probe with bash
    assert lab.origin is not None
    r = node.run(["bash", "-c", f"exec 3<>/dev/tcp/{lab.origin.ip}/3260 && echo open"], timeout=30)
    assert r.stdout.strip() == "open", r.stderr
    r = node.run(f"ip route get {lab.host_ip}", timeout=30)
    assert "dev eth0" in r.stdout


def test_a_node_logs_in_to_the_origin_and_reads_the_golden_image_byte_for_byte(
    lab: Lab, image: Path
) -> None:
    t = lab.origin_target
    assert t is not None
    node = lab.nodes[0]
    dev = node.iscsi_login(t)
    try:
        r = node.run(f"blockdev --getsize64 {dev} && sha256sum {dev}", timeout=300, check=True)
        size, digest = r.stdout.split()[:2]
        assert int(size) == image.stat().st_size
        assert digest == sha256_of(image)
        # the export is read-only for nodes
        w = node.run(f"dd if=/dev/zero of={dev} bs=4096 count=1 oflag=direct", timeout=60)
        assert w.rc != 0
    finally:
        node.iscsi_logout(t)


def test_chap_with_a_wrong_secret_is_refused(lab: Lab) -> None:
    t = lab.origin_target
    assert t is not None
    with pytest.raises(GuestError, match="rc="):
        lab.nodes[2].iscsi_login(replace(t, chap_password="wrong-secret-123"), timeout=60)


def test_a_guest_waits_for_a_file_itself_and_says_which_one_came(lab: Lab) -> None:
    g = lab.nodes[1]
    g.run("rm -f /tmp/w-a /tmp/w-b")
    t0 = time.monotonic()
    assert g.wait_for_any(["/tmp/w-a", "/tmp/w-b"], timeout=1.0) is None
    assert time.monotonic() - t0 >= 1.0
    g.start_background("sleep 1; touch /tmp/w-b")
    assert g.wait_for_any(["/tmp/w-a", "/tmp/w-b"], timeout=30.0) == "/tmp/w-b"


def test_poweroff_ends_the_guest_and_its_qemu_process(lab: Lab) -> None:
    g = lab.nodes[2]
    g.poweroff(timeout=60)
    assert not g.alive()
    with pytest.raises(GuestError, match="not running"):
        g.run("true")


def test_the_golden_image_has_a_valid_recorded_boot_profile(image: Path) -> None:
    p = load_profile(image.parent / "boot.profile")
    assert p.image_size == image.stat().st_size
    assert p.image_sha256 == (image.parent / "disk.sha256").read_text().strip()
    assert p.reads and p.reads[0].offset == 0  # the BIOS reads the MBR first
    assert 0 < p.unique_bytes < p.image_size


def test_down_removes_guests_network_and_files_after_the_owner_crashed() -> None:
    # The process that brought the lab up dies (SIGKILL): its guests outlive it; `down` by slot
    # must still find and remove everything.
    code = (
        "import sys, time; from vmthunder.lab.lab import Lab; "
        "lab = Lab.up(nodes=1, origin=False); print(lab.slot, lab.guests[0].pid, flush=True); "
        "time.sleep(600)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "lab")},
    )
    try:
        assert child.stdout is not None
        slot_s, pid_s = child.stdout.readline().split()
    finally:
        child.kill()
        child.wait()
    slot, pid = int(slot_s), int(pid_s)
    assert running(pid), "the guest should outlive its owner"
    Lab.down_slot(slot)
    assert not state_dir_of(slot).exists()
    assert not running(pid)
    assert (
        netns_name(slot)
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    assert (
        subprocess.run(["ip", "link", "show", host_if_name(slot)], capture_output=True).returncode
        != 0
    )
    with pytest.raises(LabError):
        Lab.attach(slot)
