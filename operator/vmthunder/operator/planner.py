"""The tree planner: which parent each node of an image's tree fetches from.

Pure: data in, data out, no clock, no I/O. Given the nodes (readiness, topology domain,
current parent, hydration) and the fan-out, `plan_tree` returns a parent and depth for every
ready node. What it guarantees (each pinned by a property test in tests/test_planner.py):

- every ready node gets exactly one parent, a ready node of the plan or ORIGIN; following
  parents always reaches ORIGIN (no cycles, whatever the input says);
- no node has more than `fanout` children, the origin no more than `origin_fanout`, counting
  the nodes kept out of the plan that hold a slot of their parent (`holds_slot`);
- a fresh plan (no current parents) without topology domains is a breadth-first tree: its
  depth is the optimum for (N, fanout, origin_fanout), which is <= ceil(log_k N) + 1;
  hydrated nodes take the shallowest places, so they are the parents;
- topology: the nodes of one domain form one connected subtree under a single entry node
  (only the entry's parent is outside the domain); nodes of other domains and unlabelled
  nodes may hang below it. A fresh plan places every domain's entry first (largest domains
  first) at the shallowest slot with the most room, keeping ENTRY_RESERVE slots of each
  domain node for its own members, then fills each domain breadth-first: domains hang side
  by side near the top, and a fresh plan of zoned nodes (fan-out >= 2) is at most two levels
  deeper than the best tree without zones;
- stable: a ready node whose current parent is still ready, in the plan and not over its
  fan-out keeps that parent. One exception, forced by the topology rule: when a domain has
  no free slot left for a member that must (re-)join it, one child of a domain member that
  is not itself a member (an entry of another domain, or an unlabelled node) is moved out to
  make room ("eviction"); it is re-attached below the member that took its place if that
  member has room;
- orphans (current parent gone, not ready, or over fan-out) re-attach to their nearest
  healthy ancestor in the previous tree that has spare fan-out (walking at most
  MAX_ANCESTOR_WALK levels), else to the shallowest node with spare fan-out, hydrated
  parents first among equally shallow ones. Orphans are re-attached shallowest first, so an
  orphan's ancestors are back in the tree before it looks for them. Pass departed nodes as
  `ready=False` with their last parent to let their orphans find their grandparents;
- deterministic: the same nodes in any order give the same plan;
- a node that does not serve (`serves=False`: its cache disk is full and it only passes
  reads through to its parent, or its replica Failed) gets no children; its children are
  orphans. Where no serving node has room for a node, it goes under the origin beyond
  `origin_fanout` (at most one extra child per non-serving or slot-holding node). It is
  placed as if it had no topology domain.

Repairs keep subtrees intact, so a repaired tree can be deeper than a fresh plan would be;
a fresh plan of the same nodes is the way to rebalance.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

ORIGIN: Final = "@origin"  # parent value meaning the image's origin (not a valid k8s node name)

# Bounds the walk up the previous tree for an orphan's nearest healthy ancestor: only
# fan-out 1 chains get this deep, and the walk must not make a plan quadratic.
MAX_ANCESTOR_WALK: Final = 64

# Slots a domain member keeps for its own domain when other domains' entries look for room.
ENTRY_RESERVE: Final = 1

_NEVER: Final = 1 << 30  # sorts after every real depth


@dataclass(frozen=True)
class NodeState:
    name: str
    ready: bool = True
    topology: str | None = None  # value of the topology label (zone/rack); None = no domain
    parent: str | None = None  # current parent: node name, ORIGIN, or None if unplaced
    hydrated: bool = False  # its cache is complete (a preferred parent)
    serves: bool = True  # False: it cannot re-export the image (a pass-through, Failed): a leaf
    # Not ready, yet still reading from `parent` (a Failed replica whose agent reports): it is
    # not placed, but it takes one of that parent's slots.
    holds_slot: bool = False


@dataclass(frozen=True)
class Placement:
    parent: str  # node name or ORIGIN
    depth: int  # 1 = child of the origin


@dataclass(frozen=True)
class ParentChange:
    node: str
    old: str | None  # None: the node joined
    new: str | None  # None: the node left


def optimal_depth(n: int, fanout: int, origin_fanout: int | None = None) -> int:
    """The least depth of any tree holding n nodes under these fan-outs."""
    k0 = fanout if origin_fanout is None else origin_fanout
    depth, capacity, level = 0, 0, k0
    while capacity < n:
        depth += 1
        capacity += level
        level *= fanout
    return depth


def plan_depth(plan: Mapping[str, Placement]) -> int:
    """The depth of a plan: its deepest node's depth, 0 for an empty plan."""
    return max((p.depth for p in plan.values()), default=0)


def plan_changes(old: Mapping[str, Placement], new: Mapping[str, Placement]) -> list[ParentChange]:
    """The nodes whose parent differs between two plans (joins and leaves included), by name."""
    changes = []
    for name in sorted(old.keys() | new.keys()):
        before = old[name].parent if name in old else None
        after = new[name].parent if name in new else None
        if before != after:
            changes.append(ParentChange(name, before, after))
    return changes


def plan_tree(
    nodes: Sequence[NodeState], fanout: int, origin_fanout: int | None = None
) -> dict[str, Placement]:
    """A parent and depth for every ready node; see the module docstring for the guarantees."""
    if fanout < 1:
        raise ValueError(f"fanout must be at least 1, got {fanout}")
    k0 = fanout if origin_fanout is None else origin_fanout
    if k0 < 1:
        raise ValueError(f"origin_fanout must be at least 1, got {k0}")
    by_name: dict[str, NodeState] = {}
    for node in nodes:
        if node.name == ORIGIN:
            raise ValueError(f"{ORIGIN!r} is reserved for the origin")
        if node.name in by_name:
            raise ValueError(f"node {node.name!r} is listed twice")
        by_name[node.name] = node
    return _Planner(by_name, fanout, k0).run()


class _Planner:
    def __init__(self, by_name: dict[str, NodeState], fanout: int, origin_fanout: int) -> None:
        self.all = by_name
        self.fanout = fanout
        self.origin_fanout = origin_fanout
        self.ready = {name: n for name, n in by_name.items() if n.ready}
        self.held: dict[str, int] = defaultdict(int)  # slots taken by nodes out of the plan
        for n in by_name.values():
            if not n.ready and n.holds_slot and n.parent is not None and n.parent != n.name:
                self.held[n.parent] += 1
        self.names = sorted(self.ready)
        # A node that does not serve has no subtree to keep in its domain: it is placed as if it
        # had none (as a domain member it would be cut as a second entry wherever its full
        # domain left it, and plans would swap such nodes for ever).
        self.dom: dict[str, str | None] = {name: n.topology if n.serves else None
                                           for name, n in self.ready.items()}
        self.dom[ORIGIN] = None
        self.parent: dict[str, str] = {}  # the edges kept so far, child -> parent
        self.children: dict[str, list[str]] = defaultdict(list)
        self.depth: dict[str, int] = {ORIGIN: 0}  # only nodes attached to the origin
        self.entry: dict[str, str] = {}  # domain -> its attached entry node
        self.pending: dict[str, set[str]] = defaultdict(set)  # unattached would-be entries
        self.waiting: dict[str, list[str]] = defaultdict(list)  # orphans waiting for them
        self.heap: list[tuple[int, int, str]] = []  # attached nodes with spare fan-out
        self.dom_heap: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
        self.queue: list[tuple[tuple[int, int, int, int, int, int, str], str]] = []  # to place
        self.old_depth = self._old_depths()
        sizes: dict[str, int] = defaultdict(int)
        for d in self.dom.values():
            if d is not None:
                sizes[d] += 1
        # Largest domains first: their subtrees are the tallest, so they get the shallowest
        # slots; unlabelled nodes last.
        ranked = sorted(sizes, key=lambda d: (-sizes[d], d))
        self.rank = {d: i for i, d in enumerate(ranked)}
        self.unlabelled_rank = len(ranked)

    # --- helpers -------------------------------------------------------------------------

    def cap(self, name: str) -> int:
        if name == ORIGIN:
            base = self.origin_fanout
        else:
            base = self.fanout if self.ready[name].serves else 0
        return max(0, base - self.held.get(name, 0))

    def spare(self, name: str) -> int:
        return self.cap(name) - len(self.children.get(name, ()))

    def hydrated(self, name: str) -> bool:
        return name != ORIGIN and self.ready[name].hydrated

    def _old_depths(self) -> dict[str, int]:
        """Depth of each listed node in the previous tree, where its parents reach ORIGIN."""
        known: dict[str, int] = {}
        for start in self.all:
            path: list[str] = []
            seen: set[str] = set()
            at: str | None = start
            base = -1
            while at is not None:
                if at == ORIGIN:
                    base = 0
                    break
                if at in known:
                    base = known[at]
                    break
                if at in seen or at not in self.all:
                    break
                seen.add(at)
                path.append(at)
                at = self.all[at].parent
            if base < 0:
                continue
            for name in reversed(path):
                base += 1
                known[name] = base
        return known

    def _link(self, child: str, parent: str) -> None:
        self.parent[child] = parent
        self.children[parent].append(child)

    def _unlink(self, child: str) -> None:
        self.children[self.parent.pop(child)].remove(child)

    def _fragment(self, root: str) -> list[str]:
        out, todo = [], [root]
        while todo:
            at = todo.pop()
            out.append(at)
            todo.extend(self.children.get(at, ()))
        return out

    # --- the plan --------------------------------------------------------------------------

    def run(self) -> dict[str, Placement]:
        self._keep_current_edges()
        for name in self.names:
            d = self.dom[name]
            if d is not None and name in self.parent and self.dom[self.parent[name]] != d:
                self.pending[d].add(name)
        self._attach_below(ORIGIN)
        for name in self.names:
            if name not in self.parent:
                self._enqueue(name)
        self._place_orphans()
        missing = [n for n in self.names if n not in self.depth]
        assert not missing, f"planner left nodes unplaced: {missing[:5]}"
        return {n: Placement(self.parent[n], self.depth[n]) for n in self.names}

    def _keep_current_edges(self) -> None:
        for name in self.names:
            p = self.ready[name].parent
            if p is not None and p != name and (p == ORIGIN or p in self.ready):
                self._link(name, p)
        for p, kids in self.children.items():  # over fan-out: the first by name stay
            if len(kids) > self.cap(p):
                # serving children first: a slot kept for a leaf adds no room below it
                kids.sort(key=lambda k: (not self.ready[k].serves, k))
                for child in kids[self.cap(p) :]:
                    del self.parent[child]
                del kids[self.cap(p) :]
        self._break_cycles()

    def _break_cycles(self) -> None:
        reached: set[str] = set()
        todo = [ORIGIN] + [n for n in self.names if n not in self.parent]
        while todo:
            at = todo.pop()
            reached.add(at)
            todo.extend(self.children.get(at, ()))
        for start in self.names:
            if start in reached:
                continue
            path: list[str] = []
            at = start
            while at not in reached and at not in path:
                path.append(at)
                at = self.parent[at]
            if at in path:  # a cycle: cut it at its first node by name
                cut = min(path[path.index(at) :])
                self._unlink(cut)
                todo = [cut]
                while todo:
                    at = todo.pop()
                    reached.add(at)
                    todo.extend(self.children.get(at, ()))

    def _attach_below(self, top: str) -> None:
        """Gives depths to the kept subtree below `top` (already attached), top-down, cutting
        members that would become a second entry of an attached domain."""
        level = deque([top])
        while level:
            at = level.popleft()
            kids = self.children.get(at, [])
            kids.sort()
            for child in list(kids):
                d = self.dom[child]
                if d is not None and self.dom[at] != d:
                    self.pending[d].discard(child)
                    if d in self.entry:
                        self._unlink(child)
                        self._enqueue(child)
                        continue
                    self._set_entry(d, child)
                self.depth[child] = self.depth[at] + 1
                level.append(child)
            self._offer(at)

    def _set_entry(self, d: str, name: str) -> None:
        self.entry[d] = name
        for orphan in self.waiting.pop(d, ()):
            self._enqueue(orphan)

    def _offer(self, name: str) -> None:
        """Makes an attached node with spare fan-out a candidate parent."""
        if self.spare(name) <= 0:
            return
        key = (self.depth[name], 0 if name == ORIGIN or self.hydrated(name) else 1, name)
        heapq.heappush(self.heap, key)
        d = self.dom[name]
        if d is not None:
            heapq.heappush(self.dom_heap[d], key)

    def _best(self, heap: list[tuple[int, int, str]]) -> str | None:
        while heap:
            depth, _, name = heap[0]
            if self.depth.get(name) == depth and self.spare(name) > 0:
                return name
            heapq.heappop(heap)
        return None

    def _enqueue(self, root: str) -> None:
        d = self.dom[root]
        spare = 0
        if d is not None:
            spare = sum(self.spare(n) for n in self._fragment(root) if self.dom[n] == d)
        key = (
            0 if self._would_be_entry(root) else 1,
            self.unlabelled_rank if d is None else self.rank[d],
            0 if self.ready[root].serves else 1,  # leaves last: they add no room
            self.old_depth.get(root, _NEVER),
            -spare,
            0 if self.hydrated(root) else 1,
            root,
        )
        heapq.heappush(self.queue, (key, root))

    def _place_orphans(self) -> None:
        while self.queue or self.waiting:
            if not self.queue:
                # Only inconsistent input gets here (domains waiting on each other's
                # entries): let the best waiting orphan become its domain's entry.
                d = min(self.waiting, key=lambda w: self.rank[w])
                first, *rest = sorted(self.waiting.pop(d))
                self._place(first, force=True)
                for orphan in rest:
                    self._enqueue(orphan)
                continue
            key, root = heapq.heappop(self.queue)
            if root in self.parent:
                continue
            if key[0] == 0 and not self._would_be_entry(root):
                self._enqueue(root)  # its domain got an entry meanwhile: a member now
                continue
            self._place(root, force=False)

    def _would_be_entry(self, root: str) -> bool:
        d = self.dom[root]
        return d is not None and d not in self.entry and not self.pending.get(d)

    def _entry_parent(self, root: str) -> str:
        """Where a domain's new entry goes: the shallowest room, most of it first, keeping
        ENTRY_RESERVE slots of a domain node for its own members. Entries are placed before
        members, so domains hang side by side near the top instead of below each other."""
        ancestor = self._ancestor(root, lambda a: True)
        if ancestor is not None:
            return ancestor
        best: tuple[int, int, int, str] | None = None
        for depth, hydrated, name in self.heap:
            if self.depth.get(name) != depth:
                continue
            room = self.spare(name) - (0 if self.dom[name] is None else ENTRY_RESERVE)
            if room > 0 and (best is None or (depth, -room, hydrated, name) < best):
                best = (depth, -room, hydrated, name)
        return best[3] if best is not None else self._global_parent(root)

    def _place(self, root: str, force: bool) -> None:
        d = self.dom[root]
        if d is None:
            self._attach(root, self._global_parent(root))
        elif d in self.entry:
            parent = self._ancestor(root, lambda a: a != ORIGIN and self.dom[a] == d)
            parent = parent or self._best(self.dom_heap[d])
            if parent is not None:
                self._attach(root, parent)
            elif not self._evict_for(root, d):  # no room in the domain at all (leaves)
                self._attach(root, self._global_parent(root))
        elif self.pending.get(d) and not force:
            self.waiting[d].append(root)  # its domain's current entry is on its way back
        else:
            self._attach(root, self._entry_parent(root))

    def _global_parent(self, root: str) -> str:
        # Only nodes that do not serve use up room without adding any: with none, the origin
        # or some node always has a free slot; else the origin takes one more child.
        parent = self._ancestor(root, lambda a: True)
        if parent is None:
            parent = self._best(self.heap)
        return ORIGIN if parent is None else parent

    def _ancestor(self, root: str, allowed: Callable[[str], bool]) -> str | None:
        """The nearest ancestor in the previous tree that is attached and has room."""
        at = self.all[root].parent
        for _ in range(MAX_ANCESTOR_WALK):
            if at is None:
                return None
            if at in self.depth and self.spare(at) > 0 and allowed(at):
                return at
            if at == ORIGIN or at not in self.all:
                return None
            at = self.all[at].parent
        return None

    def _attach(self, root: str, parent: str) -> None:
        d = self.dom[root]
        if d is not None and self.dom[parent] != d:
            self.pending[d].discard(root)
            self._set_entry(d, root)
        self._link(root, parent)
        self.depth[root] = self.depth[parent] + 1
        self._attach_below(root)

    def _evict_for(self, root: str, d: str) -> bool:
        """Domain d is full: moves out one non-member child of its shallowest member to make
        room for `root` there; False (nothing done) when no member has such a child."""
        members = sorted(
            (n for n in self.depth if n != ORIGIN and self.dom[n] == d),
            key=lambda n: (self.depth[n], 0 if self.hydrated(n) else 1, n),
        )
        for member in members:
            outsiders = sorted(c for c in self.children.get(member, ()) if self.dom[c] != d)
            if outsiders:
                victim = outsiders[0]
                break
        else:
            return False
        self._unlink(victim)
        for n in self._fragment(victim):
            del self.depth[n]
            dn = self.dom[n]
            if dn is not None and self.entry.get(dn) == n:
                del self.entry[dn]
                if n != victim:
                    self.pending[dn].add(n)
        self._attach(root, member)
        if self.spare(root) > 0:  # splice: the victim goes right below its replacement
            self._attach(victim, root)
        else:
            self._enqueue(victim)
        return True
