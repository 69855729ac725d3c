"""The fuzzer's check: a Case compiled by kfuse against the unfused reference interpreter.

`check_graph(case)` runs the pass pipeline on a copy of the graph with `check=True` (graph.check()
after every pass), checks that the schedule covers every op once, builds the program with
`build_program(graph, {"backend": "cpu", ...})` on another copy (the passes edit graphs in place),
then compares each output with `kfuse.ops.reference.run` on fresh random inputs by
`kfuse.verify.mismatch`, kfuse's one comparison policy, with the float64 evaluation of the graph
(`reference64`) for float32 outputs: kfuse may be as inexact as the float32 reference, a few times
over, and no more.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch

from ..ir import Graph, Node
from ..ops.reference import REFERENCE
from ..ops.reference import run as reference_run
from ..verify import mismatch
from .generate import F32, Case


@dataclass
class Failure:
    seed: int
    kind: str           # "crash", "check", "mismatch", "fallback"
    message: str
    case: Case | None = None

    def __str__(self):
        s = f"seed {self.seed} [{self.kind}] options={self.case.options if self.case else None}: {self.message}"
        if self.case is not None:
            s += "\n" + str(self.case.graph)
        return s


def copy_graph(g: Graph) -> Graph:
    """A deep copy of the graph structure (constants share their tensors; nothing edits them)."""
    out = Graph()
    m: dict[Node, Node] = {}
    for n in g.nodes:
        c = Node(n.op, [m[i] for i in n.inputs], dict(n.attrs), n.shape, n.dtype, n.name)
        m[n] = c
        out.nodes.append(c)
    out.inputs = [m[n] for n in g.inputs]
    out.outputs = [m[n] for n in g.outputs]
    out.input_names, out.output_names = list(g.input_names), list(g.output_names)
    out.mutated = list(g.mutated)
    return out


def reference64(g: Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reference interpreter with every float32 value computed in float64 instead."""
    def up(t):
        return t.double() if t.dtype == F32 else t
    env = {}
    for n in g.nodes:
        if n.op == "input":
            env[n] = up(inputs[n.attrs["index"]])
        elif n.op == "const":
            env[n] = up(n.value)
        else:
            attrs = dict(n.attrs)
            if n.op == "cast" and attrs["dtype"] == F32:
                attrs["dtype"] = torch.float64
            env[n] = REFERENCE[n.op](*[env[i] for i in n.inputs], **attrs)
    return [env[o] for o in g.outputs]


def check_graph(case: Case, *, n_inputs: int = 1, fallbacks_fail: bool = True) -> Failure | None:
    """Build `case` with kfuse and compare it with the reference on fresh inputs."""
    from ..report import Report
    from ..runtime import build_program, fuse
    g = case.graph
    options = {"backend": "cpu", **case.options}
    try:
        checked, groups = fuse(copy_graph(g), options, Report(), check=True)
        checked.check()
        covered = [n for grp in groups for n in grp.nodes]
        compute = [n for n in checked.nodes if n.op not in ("input", "const")]
        if len(covered) != len(set(covered)) or set(covered) != set(compute):
            return Failure(case.seed, "check", "the schedule does not cover every op exactly once", case)
        prog = build_program(copy_graph(g), options)
    except Exception as e:          # any crash of the compiler is a finding
        return Failure(case.seed, "crash", f"building: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}", case)
    if fallbacks_fail and prog.report.fallbacks:
        return Failure(case.seed, "fallback", "; ".join(prog.report.fallbacks), case)
    for k in range(n_inputs):
        inputs = case.inputs(case.seed * 1000 + k)
        try:
            got = prog([t.clone() for t in inputs])
        except Exception as e:      # any crash of the program is a finding
            return Failure(case.seed, "crash", f"running: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}", case)
        want = reference_run(g, inputs)
        want64 = reference64(g, inputs)
        if len(got) != len(want):
            return Failure(case.seed, "mismatch", f"{len(got)} outputs, want {len(want)}", case)
        for o, (a, b, c) in enumerate(zip(got, want, want64)):
            why = mismatch(a, b, c if b.dtype == F32 else None)
            if why:
                return Failure(case.seed, "mismatch", f"output {o} ({g.outputs[o]}): {why}", case)
    return None
