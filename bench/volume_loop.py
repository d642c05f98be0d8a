"""Volume churn on one node (issue 10, load): volumes created, staged, published, written,
unpublished, unstaged and deleted in rounds, through the real CSI controller (host) and node
plugin (lab guest) over one image cache; after each round, what is left and how big the
processes are.

Per round of --batch volumes: CreateVolume on the host (as external-provisioner), then in the
node, per volume, NodeStage, NodePublish, a private 4 KiB write read back, NodeUnpublish,
NodeUnstage (as kubelet); then DeleteVolume. Leaks counted after every round: vmt-vol-*
dm devices, loop devices over COW files, COW files, staging and target paths, ImageVolume
objects. Targets: none left, plugin and agent RSS flat (< 10 % growth from round 2 on).

    python bench/volume_loop.py [--volumes 200] [--batch 20]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

sys.path += [str(Path(__file__).resolve().parents[1] / d) for d in ("operator", "csi", "node",
                                                                      "lab")]

from vmthunder.lab.provision import (
    CACHE_DIR,
    CSI_SOCKET,
    Options,
    Rig,
    guest_env,
    guest_python,
    run_detached,
    run_quick,
)
from vmthunder.operator.model import GROUP, VERSION

# The kubelet side of a round, run in the node: one Python start for the whole batch.
KUBELET = """
import json, mmap, os, sys
from vmthunder.csi.client import connect
from vmthunder.csi.proto import csi_pb2
vols = json.loads(sys.argv[1])
c = connect('unix://%(socket)s')
block = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
done = 0
for vid, ctx in vols:
    st = '/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/' + vid
    pod = '/var/lib/kubelet/pods/loop/volumeDevices/kubernetes.io~csi'
    os.makedirs(st, exist_ok=True); os.makedirs(pod, exist_ok=True)
    tgt = pod + '/' + vid
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(volume_id=vid,
        staging_target_path=st, volume_capability=block, volume_context=ctx), timeout=120)
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(volume_id=vid,
        staging_target_path=st, target_path=tgt, volume_capability=block,
        volume_context=ctx), timeout=60)
    buf = mmap.mmap(-1, 4096)
    buf.write(vid.encode().ljust(4096, b'.'))
    fd = os.open(tgt, os.O_RDWR | os.O_DIRECT)
    os.pwrite(fd, buf, 0)
    back = mmap.mmap(-1, 4096)
    os.preadv(fd, [back], 0)
    os.close(fd)
    assert back[:len(vid)] == vid.encode(), vid
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid,
        target_path=tgt), timeout=60)
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vid,
        staging_target_path=st), timeout=60)
    os.rmdir(st)  # kubelet's part; fails if the plugin left something in it
    done += 1
print(json.dumps({'done': done}))
"""

# What a round may leave behind in the node, and the processes' sizes (KiB).
CENSUS = (
    "echo dm=$(dmsetup ls | grep -c '^vmt-vol-');"
    "echo loops=$(losetup -a | grep -c '[.]cow');"
    f"echo cow=$(ls {CACHE_DIR}/volumes/*.cow 2>/dev/null | wc -l);"
    "echo staging=$(ls /var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging "
    "2>/dev/null | wc -l);"
    "echo targets=$(ls /var/lib/kubelet/pods/loop/volumeDevices/kubernetes.io~csi "
    "2>/dev/null | wc -l);"
    "for p in 'vmthunder.cli csi' 'vmthunder.cli agent'; do "
    "echo rss_${p##* }=$(awk '/VmRSS/{print $2}' /proc/$(pgrep -of \"$p\")/status);"
    "done"
)


def census(rig: Rig) -> dict[str, int]:
    g = rig.lab.nodes[0]
    out = dict(line.split("=", 1) for line in run_quick(g, CENSUS).split())
    found = {k: int(v or 0) for k, v in out.items()}
    found["imagevolumes"] = len(rig.custom().list_cluster_custom_object(
        GROUP, VERSION, "imagevolumes").get("items", []))
    return found


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=200)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()
    from vmthunder.csi.client import connect
    from vmthunder.csi.proto import csi_pb2

    rig = Rig.start(Options(nodes=1, live=False))
    try:
        g = rig.lab.nodes[0]
        rig.apply_image_cache("churn", prefetch=False)
        rows: list[dict[str, float]] = []
        made = 0
        t_start = time.monotonic()
        while made < args.volumes:
            t0 = time.monotonic()
            n = min(args.batch, args.volumes - made)
            vols = [rig.create_volume("churn", g.name, f"pvc-churn-{made + i}")
                    for i in range(n)]
            t_created = time.monotonic()
            payload = base64.b64encode(json.dumps(vols).encode()).decode()
            run_quick(g, f"cat > /tmp/vmt-churn.py <<'EOF'\n{KUBELET % {'socket': CSI_SOCKET}}EOF")
            out = run_detached(g, f"{guest_env()} {guest_python()} /tmp/vmt-churn.py "
                                  f"\"$(echo {payload} | base64 -d)\"", "vmt-churn", 1800)
            assert json.loads(out.strip().splitlines()[-1])["done"] == n, out
            t_node = time.monotonic()
            c = connect(f"unix://{rig.controller_socket}")
            for vid, _ in vols:
                c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid),
                                          timeout=60)
            c.close()
            made += n
            row = {"volumes": made, "create_s": t_created - t0, "node_s": t_node - t_created,
                   "delete_s": time.monotonic() - t_node, **census(rig)}
            rows.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
        # Deleted volumes go asynchronously: the node plugin removes a COW file once its
        # ImageVolume is deleting, then releases the object's finalizer.
        t_settle = time.monotonic()
        kinds = ("dm", "loops", "cow", "staging", "targets", "imagevolumes")
        while True:
            last = census(rig)
            if not any(last[k] for k in kinds) or time.monotonic() - t_settle >= 180:
                break
            time.sleep(2)
        leaks = {k: last[k] for k in kinds}
        print(f"settled {time.monotonic() - t_settle:.0f} s after the last DeleteVolume")
        growth = {p: rows[-1][p] / rows[1][p] - 1 if len(rows) > 1 and rows[1][p] else 0.0
                  for p in ("rss_csi", "rss_agent")}
        per_volume = (time.monotonic() - t_start) / made
        print(f"\n{made} volumes in {len(rows)} rounds, {per_volume:.1f} s per volume "
              f"(create + stage + publish + write + unpublish + unstage + delete)")
        print(f"left behind: {leaks}  (target: all 0)")
        print(f"RSS KiB: CSI node plugin {rows[0]['rss_csi']} -> {rows[-1]['rss_csi']} "
              f"({growth['rss_csi']:+.1%} from round 2), agent {rows[0]['rss_agent']} -> "
              f"{rows[-1]['rss_agent']} ({growth['rss_agent']:+.1%})  (target: < +10 %)")
        ok = not any(leaks.values()) and all(v < 0.10 for v in growth.values())
        print("met" if ok else "NOT met")
        return 0 if ok else 1
    finally:
        rig.close()


if __name__ == "__main__":
    sys.exit(main())
