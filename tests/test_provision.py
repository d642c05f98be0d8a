"""The main job end to end, small: origin + 3 nodes, the real control plane, operator and CSI
controller on the host, the agent and CSI node plugin in every node, one volume and one
replayed VM boot per node (vmthunder.lab.provision, what `vmthunder demo` runs).

Cost: about 10 minutes of 2 cores under TCG (lab boot, services, boots, full hydration of
the 768 MiB golden image down a root and its two children), more when the machine is shared.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from vmthunder.lab.provision import (
    AGENT_METRICS_PORT,
    CSI_NODE_METRICS_PORT,
    ORIGIN,
    NodeRun,
    Options,
    Rig,
    Run,
    cpu_table,
    percentile,
    summarize,
    tree_problems,
)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([1, 2, 3, 4], 95) == 4
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(range(1, 101)), 95) == 95


def test_tree_problems_find_cycles_strangers_and_fanout() -> None:
    assert tree_problems({"a": ORIGIN, "b": "a", "c": "a"}, 2, 1) == []
    assert tree_problems({"a": ORIGIN, "b": ORIGIN}, 2, 1) == [
        f"{ORIGIN} has 2 children, more than 1"]
    assert any("cycle" in p for p in tree_problems({"a": "b", "b": "a"}, 2, 1))
    assert tree_problems({"a": "x"}, 2, 1) == ["a: parent x is not a node of the tree"]


def test_summary_counts_unbooted_and_mismatched_nodes() -> None:
    nodes = [NodeRun("a", published=1.0, booted=5.0, sha_ok=True),
             NodeRun("b", published=2.0, booted=9.0, sha_ok=True),
             NodeRun("c", read_error="EIO")]
    s = summarize(nodes)
    assert (s["booted"], s["read_errors"], s["sha_mismatches"]) == (2, 1, 1)
    assert s["all_booted"] == 9.0 and s["mean_boot"] == 5.5
    assert "all_hydrated" not in s


def test_a_cpu_table_since_a_mark_counts_what_each_process_spent_after_it() -> None:
    def stat(pid: int, name: str, user: int, system: int, started: int = 10,
             children: int = 0) -> str:
        fields = ["0"] * 10 + [str(user), str(system), str(children), "0"] + ["0"] * 4
        return f"{pid} ({name}) S " + " ".join([*fields, str(started), "0"])

    mark = "\n".join(["100", stat(7, "python3", 500, 100), stat(9, "sh", 50, 50),
                      "7 python -m vmthunder.cli agent"])
    now = "\n".join(["100", stat(7, "python3", 800, 150, children=20),
                     stat(9, "sh", 20, 10, started=99), stat(12, "iscsid", 40, 0),
                     "7 python -m vmthunder.cli agent"])
    rows = [line.split(None, 3) for line in cpu_table(now, since=mark).splitlines()[1:]]
    # the agent: its 3.5 s since the mark and 0.2 s of its children (dmsetup, ...); pid 9
    # is another sh since (started later), and iscsid is new: all theirs
    assert rows == [["3.2", "0.5", "7", "python -m vmthunder.cli agent"],
                    ["0.4", "0.0", "12", "iscsid"], ["0.2", "0.1", "9", "sh"]]
    assert cpu_table(now).splitlines()[1].split()[:2] == ["8.2", "1.5"]


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[Rig, Run]]:
    # Volumes wait for the prefetch however slow this machine is (the storm bound below).
    # Three nodes under origin fan-out 1 and fan-out 2: a chain (origin -> a) and a fan-out
    # (a -> b, c), so the storm's byte bound is shown on a node serving two children at once.
    rig = Rig.start(Options(nodes=3, live=False, hydrate_timeout=420, hold_seconds=600))
    try:
        yield rig, rig.provision("golden")
    finally:
        rig.close()


@pytest.mark.lab
@pytest.mark.apiserver
def test_every_vm_boots_reading_the_exact_image_through_a_valid_tree(
        run: tuple[Rig, Run]) -> None:
    rig, r = run
    s = r.summary()
    assert s["booted"] == 3 and s["read_errors"] == 0, [n.read_error for n in r.nodes]
    for n in r.nodes:  # the bytes of every boot read, in order, equal the image's
        assert n.sha_ok and n.reads == len(rig.profile.reads), n
        # kubelet's order of events held: volume, attach, stage, publish, first byte, booted
        assert n.created is not None and n.attached is not None
        assert n.staged is not None and n.published is not None and n.first_byte is not None
        assert n.booted is not None
        assert n.staged <= n.published <= n.first_byte <= n.booted
    assert r.tree_problems == []
    depths = sorted(n.depth for n in r.nodes)
    assert depths == [1, 2, 2]  # origin fan-out 1, fan-out 2: origin -> a -> b, c
    root = next(n.node for n in r.nodes if n.depth == 1)
    assert all(n.parent == root for n in r.nodes if n.depth == 2)


@pytest.mark.lab
@pytest.mark.apiserver
def test_origin_serves_about_one_image_and_every_cache_completes_and_detaches(
        run: tuple[Rig, Run]) -> None:
    rig, r = run
    size = rig.profile.image_size
    # One node reads from the origin: at most one image (plus protocol slack), at least the
    # boot's unique bytes.
    assert rig.profile.unique_bytes <= r.origin_bytes <= 1.05 * size, r.origin_bytes
    assert all(n.detached is not None for n in r.nodes), [(n.node, n.phase) for n in r.nodes]
    # The children read the image from their parent, not from the origin.
    for child in (n for n in r.nodes if n.depth == 2):
        assert child.bytes_from_parent >= 0.95 * size, child


@pytest.mark.lab
@pytest.mark.apiserver
def test_in_the_boot_storm_each_node_reads_from_its_parent_only_what_it_caches(
        run: tuple[Rig, Run]) -> None:
    rig, r = run
    # Volumes waited for their node's prefetch, so no boot read passed through a cache to the
    # parent uncached (dm-clone keeps no reads) to be fetched again by the hydration. The
    # slack is one hydration batch read but not yet written back when the status was taken.
    batch = 128 * 65536
    for n in r.nodes:
        assert n.storm_cached >= rig.profile.unique_bytes, n
        assert n.storm_from_parent <= 1.1 * n.storm_cached + batch, n


def _scrape(ip: str, port: int) -> dict[str, float]:
    """One Prometheus scrape over the lab network: series (name{labels}) -> value."""
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.lab
@pytest.mark.apiserver
def test_each_node_agent_and_csi_node_plugin_export_their_metrics(
        run: tuple[Rig, Run]) -> None:
    rig, r = run
    for g in rig.lab.nodes:
        agent = _scrape(g.ip, AGENT_METRICS_PORT)
        total = agent['vmthunder_agent_total_regions{image="golden"}']
        assert total > 0 and agent['vmthunder_agent_hydrated_regions{image="golden"}'] == total
        assert agent['vmthunder_agent_replica_phase{image="golden",phase="Detached"}'] == 1
        assert agent['vmthunder_agent_replica_phase{image="golden",phase="Failed"}'] == 0
        node = next(n for n in r.nodes if n.node == g.name)
        assert agent['vmthunder_agent_bytes_from_parent_total{image="golden"}'] >= (
            node.bytes_from_parent)
        assert agent["vmthunder_agent_round_seconds_count"] > 0
        csi = _scrape(g.ip, CSI_NODE_METRICS_PORT)
        for method in ("NodeStageVolume", "NodePublishVolume"):
            assert csi[f'vmthunder_csi_call_seconds_count{{code="OK",method="{method}"}}'] >= 1
