"""Rewrites as data: a rule is (name, fn) where fn(graph, node, report) returns the node's replacement
or None (a rule that nearly matched may record why not in the report).

`apply(graph, rules, report)` visits nodes in order, replaces each match, records how often each
rule fired, and leaves the graph pruned and topologically sorted. Rules read like the math through
the small matching helpers below.
"""
from __future__ import annotations

from .ir import Graph, Node


def is_op(n: Node, *ops: str) -> bool:
    return n.op in ops


def const_scalar(n: Node) -> float | None:
    """The value of a constant whose elements are all one number, else None."""
    if n.op != "const" or n.numel == 0 or n.numel > 1 and n.value.unique().numel() != 1:
        return None
    return float(n.value.reshape(-1)[0])


def uses(g: Graph, n: Node) -> int:
    """How many times n is read (as an input or a graph output)."""
    return sum(i is n for m in g.nodes for i in m.inputs) + sum(o is n for o in g.outputs)


def apply(graph: Graph, rules, report=None) -> int:
    """Apply `rules` until none fires; returns the number of rewrites."""
    total = 0
    while True:
        fired = 0
        live = set(graph.nodes)
        for node in list(graph.nodes):
            if node.op in ("input", "const") or node not in live:
                continue
            for rule_name, rule in rules:
                new = rule(graph, node, report)
                if new is not None and new is not node:
                    graph.replace_uses(node, new)
                    graph.toposort()       # new nodes were appended; prune needs topological order
                    graph.prune()          # so no later rule matches a node that just died
                    live = set(graph.nodes)
                    fired += 1
                    if report is not None:
                        report.fired(rule_name)
                    break
        if not fired:
            break
        total += fired
    return total
