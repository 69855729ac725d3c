"""The pass pipeline: one ordered list of named steps, each checked in tests after it runs.

run_pipeline(graph, options, report) -> (graph, groups). Each step takes and returns the graph
and records what it did in the report; `schedule` then partitions it into kernels.
"""
from __future__ import annotations

from ..ir import Graph
from . import autofuse, fission, fold, patterns

PIPELINE = [
    ("fold", fold.run),
    ("patterns", patterns.run),
    ("fold_again", fold.run),
    ("fission", fission.run),
]


def run_pipeline(graph: Graph, options: dict, report, *, check: bool = False):
    for name, step in PIPELINE:
        if name == "patterns" and options.get("patterns") is False:
            continue
        graph = step(graph, options, report)
        if check:
            graph.check()
    return graph, autofuse.schedule(graph, options, report)
