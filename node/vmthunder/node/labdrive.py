"""Host-side helpers that drive node stacks inside lab guests (tests and benchmarks).

A guest runs `python -m vmthunder.node.local` from this checkout and the project venv, both
visible over the guest's 9p root.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import time
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

    def start_background(self, cmd: str | list[str], log: str | None = None) -> int: ...


def local(g: GuestLike, cmd: str, req: Mapping[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Runs `python -m vmthunder.node.local cmd` in the guest and returns its answer."""
    tag = f"vmt-local-{cmd}-{os.getpid()}-{time.monotonic_ns()}"
    start_local(g, cmd, req, tag)
    return wait_local(g, tag, timeout)


def retry_run(g: GuestLike, cmd: str, timeout: float = 90, attempts: int = 4) -> Any:
    """Runs a quick, idempotent command, again if the exec channel lost the answer."""
    for i in range(attempts):
        try:
            return g.run(cmd, timeout=timeout)
        except Exception:  # the lab's GuestError: no answer
            if i == attempts - 1:
                raise
    raise AssertionError("unreachable")


def start_shell(g: GuestLike, script: str, tag: str, stdin: str = "") -> None:
    """Runs `script` (sh) detached in the guest, `stdin` on its standard input; wait_shell()
    collects its output. Long commands run this way so that a lost answer on the exec
    channel costs nothing."""
    data = base64.b64encode(stdin.encode()).decode()
    retry_run(g, f"rm -f /tmp/{tag}.rc /tmp/{tag}.out /tmp/{tag}.err; "
                 f"echo {data} | base64 -d > /tmp/{tag}.in")
    g.start_background(["/bin/sh", "-c", f"( {script} ) < /tmp/{tag}.in > /tmp/{tag}.out "
                        f"2> /tmp/{tag}.err; echo $? > /tmp/{tag}.rc"], log=f"/tmp/{tag}.log")


def wait_shell(g: GuestLike, tag: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while True:
        rc = retry_run(g, f"cat /tmp/{tag}.rc 2>/dev/null").stdout.strip()
        if rc.isdigit():
            out = retry_run(g, f"cat /tmp/{tag}.out").stdout
            if rc != "0":
                err = retry_run(g, f"tail -c 3000 /tmp/{tag}.err").stdout
                raise RuntimeError(f"{g.name}: {tag} failed rc={rc}: {err}")
            return str(out)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{g.name}: {tag} still running after {timeout}s")
        time.sleep(4)


def local_command(cmd: str) -> str:
    env = f"PYTHONPATH={REPO}/node:{REPO}/lab:{REPO}/operator"
    return f"cd / && {env} {VENV_PY} -m vmthunder.node.local {cmd}"


def start_local(g: GuestLike, cmd: str, req: Mapping[str, Any], tag: str) -> None:
    start_shell(g, local_command(cmd), tag, json.dumps(dict(req)))


def wait_local(g: GuestLike, tag: str, timeout: float = 900) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(wait_shell(g, tag, timeout).strip().splitlines()[-1])
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
    tag = f"vmt-sha-{os.getpid()}-{time.monotonic_ns()}"
    start_shell(g, f"head -c {size} {device} | sha256sum", tag)
    return wait_shell(g, tag, timeout).split()[0]


REPLAY = (
    "import json,mmap,os,sys,time\n"
    "dev=sys.argv[1]\n"
    "reads=json.load(sys.stdin)\n"
    "fd=os.open(dev,os.O_RDONLY|os.O_DIRECT)\n"
    "buf=mmap.mmap(-1,1<<20)\n"
    "t=time.monotonic()\n"
    "for off,n in reads:\n"
    "    a=off//4096*4096; e=-(-(off+n)//4096)*4096\n"
    "    with memoryview(buf) as mv, mv[:e-a] as v:\n"
    "        os.preadv(fd,[v],a)\n"
    "print(time.monotonic()-t)\n"
)


def start_replay(g: GuestLike, device: str, reads: list[tuple[int, int]], tag: str) -> None:
    """Replays reads (O_DIRECT, in order, one at a time like a booting VM), detached."""
    retry_run(g, f"echo {base64.b64encode(REPLAY.encode()).decode()} | base64 -d "
                 f"> /tmp/{tag}.py")
    start_shell(g, f"{VENV_PY} /tmp/{tag}.py {device}", tag, json.dumps(reads))


def replay(g: GuestLike, device: str, reads: list[tuple[int, int]], timeout: float = 600) -> float:
    """Replays reads and returns the seconds they took."""
    tag = f"vmt-replay-{os.getpid()}-{time.monotonic_ns()}"
    start_replay(g, device, reads, tag)
    return float(wait_shell(g, tag, timeout).strip())
