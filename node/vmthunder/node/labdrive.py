"""Host-side helpers that drive node stacks inside lab guests (tests and benchmarks).

A guest runs `python -m vmthunder.node.local` from this checkout and the project venv, both
visible over the guest's 9p root.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("VMT_CACHE", Path.home() / ".cache" / "vmthunder"))
VENV_PY = os.path.realpath(CACHE / "venv" / "bin" / "python")
CACHE_DIR = "/var/lib/vmthunder"


class RunResultLike(Protocol):
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool: ...


class GuestLike(Protocol):
    name: str
    ip: str
    iqn: str

    def run(self, cmd: str, timeout: float = 60, check: bool = False,
            input: str | bytes | None = None) -> Any: ...


def local(g: GuestLike, cmd: str, req: Mapping[str, Any], timeout: float = 300) -> dict[str, Any]:
    env = f"PYTHONPATH={REPO}/node:{REPO}/lab:{REPO}/operator"
    r = g.run(f"cd / && {env} {VENV_PY} -m vmthunder.node.local {cmd}", timeout=timeout,
              input=json.dumps(dict(req)))
    if not r.ok:
        raise RuntimeError(f"{g.name}: local {cmd} failed rc={r.rc}: {r.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def prepare_node(g: GuestLike) -> None:
    """Local cache filesystem on the node's cache disk, modules the stack needs."""
    g.run(f"mountpoint -q {CACHE_DIR} || {{ mkfs.ext4 -q -F /dev/vda && mkdir -p {CACHE_DIR} "
          f"&& mount /dev/vda {CACHE_DIR}; }}; modprobe -a dm-clone dm-multipath dm-round-robin "
          "dm-snapshot loop iscsi_tcp target_core_iblock iscsi_target_mod nbd; "
          "pidof iscsid >/dev/null || iscsid </dev/null >/dev/null 2>&1", timeout=60, check=True)


def golden_image(size: int, seed: int = 6) -> Path:
    """Deterministic incompressible test image, cached outside the repo."""
    path = CACHE / f"stack-test-image-{size >> 20}M-{seed}.raw"
    if not path.exists():
        rnd = random.Random(seed)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(size >> 20):
                f.write(rnd.randbytes(1 << 20))
        tmp.rename(path)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def synthetic_profile(size: int, seed: int = 7, fraction: float = 0.12) -> list[tuple[int, int]]:
    """A boot-like read list: clustered small reads over ~`fraction` of the image, not sorted."""
    rnd = random.Random(seed)
    reads: list[tuple[int, int]] = []
    budget = int(size * fraction)
    while budget > 0:
        base = rnd.randrange(0, size - (1 << 20)) & ~4095
        for _ in range(rnd.randint(2, 12)):
            length = rnd.choice([4096, 8192, 16384, 65536, 131072])
            off = min(size - length, base + rnd.randrange(0, 1 << 20) & ~4095)
            reads.append((off, length))
            budget -= length
    return reads


def guest_sha256(g: GuestLike, device: str, size: int, timeout: float = 600) -> str:
    r = g.run(f"head -c {size} {device} | sha256sum", timeout=timeout, check=True)
    return str(r.stdout.split()[0])


def replay(g: GuestLike, device: str, reads: list[tuple[int, int]], timeout: float = 600) -> float:
    """Replays reads (O_DIRECT, in order, one at a time like a booting VM); returns seconds."""
    script = (
        "import json,mmap,os,sys,time\n"
        "reads=json.load(sys.stdin)\n"
        f"fd=os.open({json.dumps(device)},os.O_RDONLY|os.O_DIRECT)\n"
        "buf=mmap.mmap(-1,1<<20)\n"
        "t=time.monotonic()\n"
        "for off,n in reads:\n"
        "    a=off//4096*4096; e=-(-(off+n)//4096)*4096\n"
        "    os.preadv(fd,[memoryview(buf)[:e-a]],a)\n"
        "print(time.monotonic()-t)\n"
    )
    r = g.run(f"{VENV_PY} -c '{script}'", timeout=timeout, input=json.dumps(reads), check=True)
    return float(r.stdout.strip())
