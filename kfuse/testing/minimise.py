"""Shrinking a failing fuzz Case: outputs dropped and ops cut off into graph inputs while the
check still fails the same way (`python -m kfuse.testing.fuzz --minimize SEED`)."""
from __future__ import annotations

from ..ir import Graph, Node
from .check import check_graph
from .generate import Case


def _rebuild(g: Graph, outputs: list[Node], cut: Node | None) -> Graph:
    """g restricted to what `outputs` need, with `cut` (if given) turned into a fresh graph input."""
    out = Graph()
    m: dict[Node, Node] = {}
    live = set(outputs)
    for n in reversed(g.nodes):
        if n in live and n is not cut:
            live.update(n.inputs)
    for n in g.nodes:
        if n not in live:
            continue
        if n is cut or n.op == "input":
            m[n] = out.input(n.shape, n.dtype)
        elif n.op == "const":
            m[n] = out.const(n.value)
        else:
            c = Node(n.op, [m[i] for i in n.inputs], dict(n.attrs), n.shape, n.dtype)
            out.nodes.append(c)
            m[n] = c
    out.outputs = list(dict.fromkeys(m[o] for o in outputs))
    return out


def minimize(case: Case, fails=None) -> Case:
    """A smaller case that still fails the same way: outputs dropped, ops cut off into inputs."""
    if fails is None:
        first = check_graph(case)
        if first is None:
            return case
        fails = lambda c: (f := check_graph(c)) is not None and f.kind == first.kind
    g = case.graph
    changed = True
    while changed:
        changed = False
        for o in list(g.outputs):
            if len(g.outputs) > 1:
                trial = Case(case.seed, _rebuild(g, [x for x in g.outputs if x is not o], None), case.options, case.nonfinite)
                if fails(trial):
                    g, changed = trial.graph, True
                    break
        if changed:
            continue
        for n in g.nodes:
            if n.op in ("input", "const"):
                continue
            trial = Case(case.seed, _rebuild(g, g.outputs, n), case.options, case.nonfinite)
            if n not in g.outputs and fails(trial):
                g, changed = trial.graph, True
                break
    return Case(case.seed, g, case.options, case.nonfinite)
