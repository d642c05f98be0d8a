"""Drives one node's stack from JSON on stdin, without the API server: what the lab tests and
benchmarks run inside guests, through the same code the agent uses.

    python -m vmthunder.node.local apply|hydrate|background|status|remove|export < request.json

Answers are one JSON object on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

from vmthunder.node import blockdev, dm, lio, names, stack
from vmthunder.node.cache import make_backend
from vmthunder.node.iscsi import Chap, TargetAddress
from vmthunder.node.transport import IscsiTransport

MAX_ROUNDS = 3  # a round converges; one more shows it


def _chap(d: Any) -> Chap | None:
    return Chap(d["username"], d["password"]) if d else None


def _want(r: dict[str, Any]) -> stack.Want:
    p = r.get("parent")
    return stack.Want(
        image=r["image"], node=r["node"], size=int(r["size"]),
        region_bytes=int(r.get("region_bytes", 65536)),
        parent=TargetAddress(p["portal"], p["iqn"], int(p.get("lun", 0))) if p else None,
        parent_chap=_chap(r.get("chap")), export_ip=r["export_ip"],
        children=tuple(r.get("children", ())), children_chap=_chap(r.get("chap")),
        detach_when_hydrated=bool(r.get("detach", True)),
        multipath=bool(r.get("multipath", True)),
    )


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {"step": type(x).__name__, **{k: _jsonable(v) for k, v in vars(x).items()}}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0]
    r: dict[str, Any] = json.loads(sys.stdin.read() or "{}")
    backend = make_backend(r.get("backend", "dm-clone"), r.get("cache_dir", "/var/lib/vmthunder"))
    transport = IscsiTransport(int(r.get("replacement_timeout", 5 if r.get("multipath", True)
                                         else 600)))
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    if cmd == "apply":
        # Rounds until nothing is left to do, as the agent runs them.
        w = _want(r)
        steps: list[stack.Step] = []
        for _ in range(MAX_ROUNDS):
            _seen, taken = stack.apply_image(w, backend, transport, r.get("origin_iqn"))
            steps += taken
            if not taken:
                break
        out = {"steps": _jsonable(steps)}
    elif cmd == "hydrate":
        n = backend.hydrate(r["image"], [int(x) for x in r["regions"]],
                            int(r.get("region_bytes", 65536)), int(r["size"]),
                            int(r.get("queue_depth", 8)))
        out = {"bytes": n}
    elif cmd == "background":
        backend.start_background(r["image"], int(r.get("threshold", 64)))
    elif cmd == "status":
        st = backend.observe(r["image"])
        c = stack.counters(r["image"])
        out = {"cache": _jsonable(st), "complete": st.complete,
               "bytes_from_parent": c.bytes_from_parent, "bytes_served": c.bytes_served}
    elif cmd == "remove":
        stack.remove_image(r["image"], r["node"], backend, transport, r.get("origin_iqn"))
    elif cmd == "export":
        # Serve a plain device (the lab's stand-in origin) the way nodes serve their caches.
        lio.ensure_export(lio.ExportSpec(
            iqn=r["iqn"], backstore=names.backstore(r["image"]), device=r["device"],
            ip=r["ip"], chap=_chap(r.get("chap")), initiators=tuple(r.get("initiators", ()))))
        out = {"size": blockdev.size_bytes(r["device"])}
    elif cmd == "unexport":
        lio.remove_export(r["iqn"], names.backstore(r["image"]))
    elif cmd == "volume":
        # A copy-on-write volume over the image, as the CSI node plugin builds one (dm-snapshot).
        name = names.volume_dev(r["id"])
        if not dm.exists(name):
            cow_file = f"{r.get('cache_dir', '/var/lib/vmthunder')}/vol-{r['id']}.cow"
            blockdev.ensure_sparse_file(cow_file, int(r.get("cow_bytes", 64 << 20)))
            cow = blockdev.loop_attach(cow_file)
            dm.create(name, [dm.snapshot(int(r["size"]) // 512,
                                         dm.mapper_path(names.cache_dev(r["image"])), cow)])
        out = {"device": dm.mapper_path(name)}
    elif cmd == "unvolume":
        dm.remove(names.volume_dev(r["id"]))
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    out["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
