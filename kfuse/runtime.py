"""The lean runtime: a straight-line schedule of kernel launches, generated as Python source.

`build_program` runs the pass pipeline, turns each fused group into a kernel (C, library or the
torch reference as the fallback), then generates one Python function that calls the kernels in
order with every buffer bound to a local variable: no graph is interpreted per call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .backends import make_kernel
from .ir import Graph, Node
from .ops.reference import REFERENCE, run
from .report import Report


@dataclass
class Group:
    """Nodes (topologically ordered) that become one kernel; `outputs` are needed outside it."""
    nodes: list[Node]
    outputs: list[Node]
    rule: str = ""                      # the fusion that formed it, for the report
    inputs: list[Node] = field(default_factory=list)

    def __post_init__(self):
        inside = set(self.nodes)
        seen = set()
        for n in self.nodes:
            for i in n.inputs:
                if i not in inside and i not in seen:
                    seen.add(i)
                    self.inputs.append(i)


def reference_kernel(group: Group):
    """A group run op by op with the reference functions: the fallback that is always right."""
    nodes, ins, outs = group.nodes, group.inputs, group.outputs

    def fn(*args):
        env = dict(zip(ins, args))
        for n in nodes:
            env[n] = REFERENCE[n.op](*[env[i] for i in n.inputs], **n.attrs)
        return tuple(env[o] for o in outs)
    return fn


class Program:
    """One compiled signature: call with a flat list of input tensors, get the flat list of outputs."""

    def __init__(self, graph: Graph, groups: list, kernels: list, report: Report, source: str, fn):
        self.graph, self.groups, self.kernels, self.report = graph, groups, kernels, report
        self.source = source       # the generated call wrapper, for reading and debugging
        self._fn = fn

    def __call__(self, inputs):
        return list(self._fn(*inputs))


def generate(graph: Graph, groups: list[Group], kernels: list) -> tuple[str, object]:
    """Python source of the straight-line wrapper, and the function compiled from it. Every name in
    the source is made here (v<number>, k<number>, c<number>); nothing from the model reaches it."""
    names: dict[Node, str] = {}
    env: dict[str, object] = {}
    for i, n in enumerate(graph.inputs):
        names[n] = f"i{i}"
    lines = [f"def program({', '.join(names[n] for n in graph.inputs)}):"]
    for n in graph.nodes:
        if n.op == "const":
            names[n] = f"c{len(env)}"
            env[names[n]] = n.value
    for gi, (group, kernel) in enumerate(zip(groups, kernels)):
        for o in group.outputs:
            names[o] = f"v{len(names)}"
        env[f"k{gi}"] = kernel
        outs = ", ".join(names[o] for o in group.outputs) + ","
        lines.append(f"    {outs} = k{gi}({', '.join(names[i] for i in group.inputs)})")
    lines.append(f"    return ({', '.join(names[o] for o in graph.outputs)},)")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<kfuse program>", "exec"), env)
    return source, env["program"]


def build_program(graph: Graph, options: dict) -> Program:
    from .passes import run_pipeline
    report = Report()
    if options.get("backend") == "reference":
        groups = [Group([n], [n]) for n in graph.nodes if n.op not in ("input", "const")]
        kernels = [reference_kernel(g) for g in groups]
    else:
        graph, groups = run_pipeline(graph, options, report)
        kernels = [make_kernel(g, report, options) for g in groups]
    source, fn = generate(graph, groups, kernels)
    return Program(graph, groups, kernels, report, source, fn)
