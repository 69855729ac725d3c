"""The pass pipeline: one ordered list of named steps, each checked in tests after it runs.

run_pipeline(graph, options, report, machine) -> (graph, groups). Each graph step takes and returns
the graph and records what it did in the report; `schedule` then partitions it into kernels, priced
by the cost model on `machine` (kfuse.cost.Machine). The runtime continues with the steps that need
a backend (kernels, memory_plan, codegen: kfuse/runtime). KFUSE_DUMP=step,... prints any step's result.
"""
from __future__ import annotations

import sys

from .. import config
from ..ir import Graph
from . import autofuse, fission, fold, layout, patterns

PIPELINE = [
    ("fold", fold.run),
    ("patterns", patterns.run),
    ("fold_again", fold.run),
    ("layout", layout.run),
    ("fission", fission.run),
]


def dump(step: str, what):
    """Print a step's result to stderr when KFUSE_DUMP names the step (or is "all")."""
    names = config.get().dump
    if step in names or "all" in names:
        print(f"--- kfuse: after {step} ---\n{what}", file=sys.stderr)


def run_pipeline(graph: Graph, options: dict, report, machine, *, check: bool = False):
    for name, step in PIPELINE:
        if name == "patterns" and options.get("patterns") is False:
            continue
        graph = step(graph, options, report)
        if check:
            graph.check()
        dump(name, graph)
    groups = autofuse.schedule(graph, options, report, machine)
    dump("schedule", "\n".join(f"group {i}: " + " ".join(f"{n}:{n.op}" for n in g.nodes) for i, g in enumerate(groups)))
    return graph, groups
