"""Draws a distribution tree as text, the way `vmthunder status` and the lab show it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from vmthunder.operator.planner import ORIGIN


def render_tree(parents: Mapping[str, str], notes: Mapping[str, str] | None = None,
                root_label: str = "origin") -> str:
    """One line per node under its parent, children sorted by name; `notes` follow the name."""
    notes = notes or {}
    children: dict[str, list[str]] = defaultdict(list)
    for node, parent in parents.items():
        children[parent].append(node)
    lines = [root_label]
    shown: set[str] = set()

    def walk(parent: str, prefix: str) -> None:
        kids = sorted(children.get(parent, ()))
        for i, node in enumerate(kids):
            last = i == len(kids) - 1
            note = f"  {notes[node]}" if node in notes else ""
            lines.append(f"{prefix}{'└── ' if last else '├── '}{node}{note}")
            shown.add(node)
            walk(node, prefix + ("    " if last else "│   "))

    walk(ORIGIN, "")
    # A node whose parent chain does not reach the origin (mid-repair) is listed apart.
    unreachable = sorted(set(parents) - shown)
    if unreachable:
        lines.append("(not attached: " + ", ".join(unreachable) + ")")
    return "\n".join(lines)
