"""The lab's origin: exports the golden image read-only over iSCSI with LIO (rtslib-fb), CHAP.

Host side: `export_image(origin_guest, image, user, password) -> OriginTarget`. It runs this same
file inside the origin guest with the guest's system python3 (which has Debian's rtslib-fb):
    python3 origin.py export --device /dev/vda --iqn IQN --ip IP --user U --password P

The origin's export lives here, in the lab, not in vmthunder.node.lio (the node agent's wrapper,
owned by the node engineer): the origin is lab scaffolding standing in for an image server. One
target, TPG 1 in demo mode (any initiator, write-protected) with TPG-level CHAP, one iblock LUN
over the read-only virtio disk that holds the image.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmthunder.lab.lab import Guest, OriginTarget

ORIGIN_DEVICE = "/dev/vda"
BACKSTORE = "golden"


def origin_iqn(slot: int) -> str:
    # rtslib-fb rejects some IQNs (e.g. a bare "lab:" suffix); this form passes its check.
    return f"iqn.2026-11.io.vmthunder.lab{slot}.origin:golden"


def export_image(origin: Guest, image: str, user: str, password: str) -> OriginTarget:
    from vmthunder.lab.lab import ISCSI_PORT, LabError, OriginTarget

    slot = int(origin.ip.split(".")[2])
    iqn = origin_iqn(slot)
    r = origin.run(
        [
            "/usr/bin/python3", str(Path(__file__).resolve()), "export",
            "--device", ORIGIN_DEVICE, "--iqn", iqn, "--ip", origin.ip,
            "--port", str(ISCSI_PORT), "--user", user, "--password", password,
        ],
        timeout=120,
    )  # fmt: skip
    if not r.ok:
        raise LabError(f"origin export failed: rc={r.rc}: {r.stderr.strip()[-2000:]}")
    return OriginTarget(
        iqn=iqn,
        ip=origin.ip,
        port=ISCSI_PORT,
        chap_user=user,
        chap_password=password,
        size=os.stat(image).st_size,
        image=image,
    )


def _guest_export(device: str, iqn: str, ip: str, port: int, user: str, password: str) -> None:
    """Runs inside the origin guest. Idempotent: an existing target of that name is replaced."""
    import subprocess

    subprocess.run(
        ["modprobe", "-a", "target_core_mod", "target_core_iblock", "iscsi_target_mod"],
        check=True,
    )
    import rtslib_fb as rts  # type: ignore[import-not-found, unused-ignore]  # guest only

    root = rts.RTSRoot()
    for t in list(root.targets):
        if t.wwn == iqn:
            t.delete()
    for so in list(root.storage_objects):
        if so.name == BACKSTORE:
            so.delete()
    so = rts.BlockStorageObject(BACKSTORE, dev=device, readonly=True)
    target = rts.Target(rts.FabricModule("iscsi"), iqn)
    tpg = rts.TPG(target, 1)
    rts.NetworkPortal(tpg, ip, port)
    rts.LUN(tpg, 0, so)
    tpg.set_attribute("generate_node_acls", "1")
    tpg.set_attribute("demo_mode_write_protect", "1")
    tpg.set_attribute("cache_dynamic_acls", "1")
    tpg.set_attribute("authentication", "1")
    tpg.chap_userid = user
    tpg.chap_password = password
    tpg.enable = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="origin export (runs inside the origin guest)")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--device", default=ORIGIN_DEVICE)
    e.add_argument("--iqn", required=True)
    e.add_argument("--ip", required=True)
    e.add_argument("--port", type=int, default=3260)
    e.add_argument("--user", required=True)
    e.add_argument("--password", required=True)
    a = p.parse_args(argv)
    _guest_export(a.device, a.iqn, a.ip, a.port, a.user, a.password)
    return 0


if __name__ == "__main__":
    sys.exit(main())
