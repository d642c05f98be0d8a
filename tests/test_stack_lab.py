"""The node's block stack in lab guests (Debian's kernel, dm-clone built out of tree).

Tree: O -> A -> {B, D, E}, B -> C (a chain of three under the origin and a fan-out of three
under A). O is a node guest standing in for the origin: the golden image read-only over LIO
with CHAP and an ACL. Every node's stack is built by the same code the agent runs
(stack.apply_image through `python -m vmthunder.node.local`). Image 32 MiB, 64 KiB regions,
a synthetic boot profile over ~12% of it. The tests share one lab and run in file order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmthunder.lab.lab import Guest, Lab
from vmthunder.node import dm, names
from vmthunder.node import labdrive as ld
from vmthunder.node.hydrate import Read, plan_prefetch

pytestmark = pytest.mark.lab

SIZE = 32 << 20
REGION = 65536
IMG = "golden"
CHAP = {"username": "vmthunder", "password": "labsecret1234"}


@dataclass
class Tree:
    lab: Lab
    image: Path
    sha: str
    loop: str
    parents: dict[str, str] = field(default_factory=dict)  # node -> parent node ("O")
    reads: list[tuple[int, int]] = field(default_factory=list)

    @property
    def o(self) -> Guest:
        return self.lab.nodes[0]

    def g(self, role: str) -> Guest:
        return self.lab.nodes["OABCDE".index(role)]

    @property
    def origin_iqn(self) -> str:
        return f"{names.IQN_BASE}:origin.{IMG}"

    def base(self) -> dict[str, Any]:
        return {"image": IMG, "size": SIZE, "region_bytes": REGION, "chap": CHAP,
                "origin_iqn": self.origin_iqn, "cache_dir": ld.CACHE_DIR}

    def children(self, role: str) -> list[str]:
        return [self.g(c).iqn for c, p in self.parents.items() if p == role]

    def export_origin(self) -> None:
        ld.local(self.o, "export", {"image": IMG, "iqn": self.origin_iqn, "device": self.loop,
                                    "ip": self.o.ip, "chap": CHAP,
                                    "initiators": self.children("O")})

    def apply(self, role: str, **extra: Any) -> list[str]:
        p = self.parents[role]
        parent = ({"portal": f"{self.o.ip}:3260", "iqn": self.origin_iqn} if p == "O" else
                  {"portal": f"{self.g(p).ip}:3260", "iqn": names.export_iqn(IMG, self.g(p).name)})
        g = self.g(role)
        out = ld.local(g, "apply", {**self.base(), "node": g.name, "export_ip": g.ip,
                                    "children": self.children(role), "parent": parent, **extra})
        return [s["step"] for s in out["steps"]]

    def status(self, role: str) -> dict[str, Any]:
        return ld.local(self.g(role), "status", self.base())

    def origin_bytes(self) -> int:
        name = self.loop.split("/")[-1]
        r = self.o.run(f"cat /sys/block/{name}/stat", check=True)
        return int(r.stdout.split()[2]) * 512


@pytest.fixture(scope="module")
def tree() -> Iterator[Tree]:
    image = ld.golden_image(SIZE)
    with Lab.up(nodes=6, origin=False) as lab:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(ld.prepare_node, lab.nodes))
        o = lab.nodes[0]
        loop = o.run(f"losetup -f --show -r {image}", check=True).stdout.strip()
        t = Tree(lab, image, ld.sha256_file(image), loop,
                 {"A": "O", "B": "A", "D": "A", "E": "A", "C": "B"},
                 ld.synthetic_profile(SIZE))
        t.export_origin()
        with ThreadPoolExecutor(5) as pool:
            # Every node builds and exports its stack before it has a parent to read from (as
            # the agents do), then all log in at once: the reads of a node whose parent has no
            # path yet (a parent moving to a new one of its own, too) wait, none fails.
            list(pool.map(lambda role: t.apply(role, parent=None), "ABDEC"))
            waiting = {role: pool.submit(t.apply, role) for role in "BDEC"}
            deadline = time.monotonic() + 120
            while not all(t.g(role).run("iscsiadm -m session").rc == 0 for role in "BDEC"):
                assert time.monotonic() < deadline, "children did not log in"
                time.sleep(1)
            # Logged in, their reads (the kernel's partition scan) wait in A's -src: no path.
            assert not any(f.done() for f in waiting.values()), {
                r: f.result() for r, f in waiting.items() if f.done()}
            assert t.apply("A") == ["Attach", "SetSource"]
            for role, f in waiting.items():
                assert f.result() == ["Attach", "SetSource"], role
        yield t


def test_stack_builds_and_a_second_apply_changes_nothing(tree: Tree) -> None:
    for role in "ABCDE":
        assert tree.apply(role) == [], role
        st = tree.status(role)
        assert st["cache"]["kind"] == "caching" and st["cache"]["total"] == SIZE // REGION


IOCTL_CHECK = """
import json, subprocess
from vmthunder.node import dm
def dmsetup(*args):
    return subprocess.run(["dmsetup", *args], capture_output=True, text=True, check=True).stdout
name = "vmt-ioctl-check"
dm.create(name, [dm.Target(0, 2048, "zero"), dm.Target(2048, 2048, "error"),
                 dm.Target(4096, 8, "zero")])
try:
    rid = dm.stats_create(name, 8, "ioctl-check")  # 513 areas: more than the first buffer
    out = {"status": [[t.start, t.length, t.type, list(t.fields)] for t in dm.status(name)],
           "status_dmsetup": dmsetup("status", name),
           "list": dm.stats_list(name, "ioctl-check"),
           "print": dm.message(name, ["@stats_print", str(rid)]),
           "print_dmsetup": dmsetup("message", name, "0", "@stats_print", str(rid)).strip(),
           "clone": [[t.type, list(t.fields)] for t in dm.status("vmt-golden", noflush=True)],
           "clone_dmsetup": dmsetup("status", "--noflush", "vmt-golden"),
           "absent": dm.status_if_exists("vmt-no-such-device")}
    try:
        dm.message(name, ["no_such_message"])
    except dm.DmError as e:
        out["bad_message"] = str(e)
finally:
    dm.remove(name)
print(json.dumps(out))
"""


def test_polled_status_and_messages_by_ioctl_read_as_dmsetup_prints_them(tree: Tree) -> None:
    import json

    from vmthunder.lab.provision import guest_env, guest_python

    a = tree.g("A")
    a.run("cat > /tmp/ioctl_check.py", input=IOCTL_CHECK, check=True)
    out = json.loads(a.run(f"{guest_env()} {guest_python()} /tmp/ioctl_check.py",
                           timeout=120, check=True).stdout)
    assert out["status"] == [[0, 2048, "zero", []], [2048, 2048, "error", []],
                             [4096, 8, "zero", []]]
    assert [line.split() for line in out["status_dmsetup"].splitlines()] == [
        [str(x) for x in t[:2]] + [t[2]] for t in out["status"]]
    assert len(out["list"]) == 1 and out["list"][0][1] == "ioctl-check"
    assert len(out["print"].splitlines()) == 513 and out["print"] == out["print_dmsetup"]
    (kind, fields), = out["clone"]
    words = out["clone_dmsetup"].split()
    assert kind == words[2] == "clone"
    clone = dm.CloneStatus.parse(fields)
    assert clone.total == SIZE // REGION and clone.region_sectors == REGION // 512
    assert dm.CloneStatus.parse(words[3:]).total == clone.total
    assert out["absent"] is None
    assert "Invalid argument" in out["bad_message"]  # the kernel's EINVAL, as a DmError


def test_prefetch_hydrates_the_profile_and_origin_serves_about_the_read_set(tree: Tree) -> None:
    order = plan_prefetch([Read(o, n) for o, n in tree.reads], REGION, SIZE)
    before = tree.origin_bytes()

    def prefetch(role: str) -> None:
        ld.local(tree.g(role), "hydrate", {**tree.base(), "regions": order, "queue_depth": 8})

    # dm-clone does not keep what it reads, so a child prefetches only what its parent already
    # has (the agent paces by the parent's hydratedInOrder; here a level at a time).
    for level in ("A", "BDE", "C"):
        with ThreadPoolExecutor(len(level)) as pool:
            list(pool.map(prefetch, level))
    read_set = len(order) * REGION
    served = tree.origin_bytes() - before
    print(f"read set {read_set} B, origin served {served} B ({served / read_set:.3f}x)")
    assert served <= 1.1 * read_set
    for role in "ABCDE":
        st = tree.status(role)
        assert st["cache"]["hydrated"] >= len(order), role
        assert st["bytes_from_parent"] <= 1.1 * read_set, (role, st)


def test_volume_on_c_reads_the_exact_image_while_a_and_b_still_hydrate(tree: Tree) -> None:
    for role in "AB":
        st = tree.status(role)
        assert not st["complete"], (role, st)
    c = tree.g("C")
    dev = ld.local(c, "volume", {**tree.base(), "id": "c1"})["device"]
    assert ld.guest_sha256(c, dev, SIZE) == tree.sha
    for role in "AB":
        assert not tree.status(role)["complete"], role
    ld.local(c, "unvolume", {"id": "c1"})


def test_two_volumes_on_one_node_diverge_and_the_image_is_untouched(tree: Tree) -> None:
    d = tree.g("D")
    v1 = ld.local(d, "volume", {**tree.base(), "id": "d1"})["device"]
    v2 = ld.local(d, "volume", {**tree.base(), "id": "d2"})["device"]
    for v, word in ((v1, "one"), (v2, "two")):
        d.run(f"(printf {word}; head -c 4093 /dev/zero) | "
              f"dd of={v} bs=4096 seek=1 count=1 oflag=direct conv=notrunc", check=True)
    r1, r2 = (d.run(f"dd if={v} bs=4096 skip=1 count=1 iflag=direct 2>/dev/null | head -c 3",
                    check=True) for v in (v1, v2))
    assert r1.stdout[:3] == "one" and r2.stdout[:3] == "two"
    image_dev = f"/dev/mapper/{names.cache_dev(IMG)}"
    assert ld.guest_sha256(d, image_dev, SIZE) == tree.sha
    for v in ("d1", "d2"):
        ld.local(d, "unvolume", {"id": v})


def test_reparent_b_to_the_origin_while_c_streams_the_image(tree: Tree) -> None:
    c = tree.g("C")
    dev = f"/dev/mapper/{names.cache_dev(IMG)}"
    c.run("rm -f /tmp/stream.out /tmp/stream.done")
    # The stream reads with O_DIRECT in small blocks so it spans the re-parenting.
    c.start_background(f"(dd if={dev} bs=64k iflag=direct 2>/tmp/stream.err | sha256sum "
                       f"> /tmp/stream.out; echo $? > /tmp/stream.done)", log="/tmp/stream.log")
    time.sleep(1.0)
    tree.parents["B"] = "O"
    tree.export_origin()  # B may now log in to the origin
    steps = tree.apply("B")
    assert steps[:2] == ["Attach", "SetSource"] and steps[-1] == "Logout", steps
    deadline = time.monotonic() + 600
    while c.run("test -e /tmp/stream.done").rc != 0:
        assert time.monotonic() < deadline, "stream did not finish"
        time.sleep(2)
    err = c.run("cat /tmp/stream.err").stdout
    assert "error" not in err.lower(), err
    assert c.run("cat /tmp/stream.out").stdout.split()[0] == tree.sha
    assert tree.apply("B") == []  # converged: A's session is gone, -src reads the origin


def test_a_restarted_driver_converges_with_no_duplicate_devices_or_sessions(tree: Tree) -> None:
    b = tree.g("B")
    look = "dmsetup ls | sort; iscsiadm -m session 2>/dev/null | sort; ls /dev/mapper"
    before = b.run(look, check=True)
    ld.local(b, "background", {**tree.base(), "threshold": 1})
    # An agent killed between a device's creation and its node's leaves no /dev/mapper path.
    b.run(f"rm /dev/mapper/{names.cache_dev(IMG)}*", check=True)
    # A fresh process (the agent after a restart) sees the kernel's stack and plans nothing
    # (detach held back, so a hydration that finishes meanwhile changes nothing either).
    assert tree.apply("B", detach=False) == []
    after = b.run(look, check=True)
    assert before.stdout == after.stdout
    # Hydration goes on in the kernel with no process of ours running, to the end.
    deadline = time.monotonic() + 600
    while not tree.status("B")["complete"]:
        assert time.monotonic() < deadline, tree.status("B")
        time.sleep(2)


def test_full_hydration_detaches_every_node_and_each_still_serves(tree: Tree) -> None:
    start = {role: tree.status(role) for role in "ABCDE"}
    # Background hydration starts once the parent is complete, as the agent does for dm-clone
    # (which does not keep what it reads): every region then crosses every link once.
    for level in ("A", "BDE", "C"):
        for role in level:
            ld.local(tree.g(role), "background", {**tree.base(), "threshold": 8})
        deadline = time.monotonic() + 900
        pending = set(level)
        while pending:
            assert time.monotonic() < deadline, f"not hydrated: {pending}"
            pending = {role for role in pending if not tree.status(role)["complete"]}
            time.sleep(2)
    finals = {role: tree.status(role) for role in "ABCDE"}  # counters before -src goes away
    for role in "ABDEC":
        steps = tree.apply(role)
        assert "DetachCache" in steps and "RemoveSource" in steps, (role, steps)
    for role in "ABCDE":
        g = tree.g(role)
        assert g.run("iscsiadm -m session").rc != 0, f"{role} still has a session"
        assert tree.status(role)["cache"]["kind"] == "detached"
    # C reads through B (detached), D through A (detached): served from their caches.
    dev = f"/dev/mapper/{names.cache_dev(IMG)}"
    assert ld.guest_sha256(tree.g("C"), dev, SIZE) == tree.sha
    assert ld.guest_sha256(tree.g("D"), dev, SIZE) == tree.sha
    for role in "ABCDE":
        moved = finals[role]["bytes_from_parent"] - start[role]["bytes_from_parent"]
        cached = (finals[role]["cache"]["hydrated"] - start[role]["cache"]["hydrated"]) * REGION
        print(f"{role}: hydration read {moved} B from its parent to cache {cached} B")
        assert moved <= 1.1 * cached, (role, moved, cached)
