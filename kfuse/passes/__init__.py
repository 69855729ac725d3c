"""The pass pipeline: one ordered list of named steps, each checked in tests after it runs.

run_pipeline(graph, options, report) -> (graph, groups). Each step takes and returns the graph
(rewriting it in place is fine) and records what it did in the report.
"""
from __future__ import annotations

from ..ir import Graph


def schedule(graph: Graph, options, report):
    """Partition the graph's compute nodes into groups, one kernel each."""
    from ..runtime import Group
    return [Group([n], [n]) for n in graph.nodes if n.op not in ("input", "const")]


PIPELINE = []


def run_pipeline(graph: Graph, options: dict, report, *, check: bool = False):
    for name, step in PIPELINE:
        graph = step(graph, options, report)
        if check:
            graph.check()
    return graph, schedule(graph, options, report)
