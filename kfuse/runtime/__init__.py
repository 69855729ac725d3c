"""The lean runtime: a straight-line schedule of kernel launches, generated as Python source.

`build_program` runs the pass pipeline, turns each fused group into a kernel (C, library or the
torch reference as the fallback), then generates one Python function that calls the kernels in
order with every buffer bound to a local variable: no graph is interpreted per call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .backends import ALIASES, WRITES_INTO, kind_of, make_kernel
from .ir import Graph, Node
from .ops.reference import REFERENCE
from .report import Report


@dataclass
class Group:
    """Nodes (topologically ordered) that become one kernel; `outputs` are needed outside it."""
    nodes: list[Node]
    outputs: list[Node]
    inputs: list[Node] = field(init=False, default_factory=list)   # derived: read from outside

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

    def profile(self, inputs, reps: int = 7) -> list[tuple[float, float]]:
        """Time every kernel (median of `reps` calls) and the same group run op by op in torch;
        stores them in report.kernels[i].measured_ms / .unfused_ms and returns the pairs. The two
        are called alternately, so a busy spell of the machine slows both alike rather than one."""
        env = dict(zip(self.graph.inputs, inputs))
        env.update({n: n.value for n in self.graph.nodes if n.op == "const"})
        times = []
        for group, kernel, info in zip(self.groups, self.kernels, self.report.kernels):
            args = [env[i] for i in group.inputs]
            fns = [kernel, reference_kernel(group)] if info.fusion else [kernel]
            meds = median_ms(fns, args, reps)
            fused, unfused = meds[0], meds[-1]
            info.measured_ms, info.unfused_ms = fused, unfused
            times.append((fused, unfused))
            env.update(zip(group.outputs, kernel(*args)))
        return times


def median_ms(fns: list, args, reps: int = 20) -> list[float]:
    """Median milliseconds of `reps` calls f(*args) for each f in `fns`, after one untimed call
    each; the functions are called in turn each round, so a busy spell slows all of them alike."""
    ts = [[] for _ in fns]
    for f in fns:
        f(*args)
    for _ in range(reps):
        for f, t_f in zip(fns, ts):
            t = time.perf_counter()
            f(*args)
            t_f.append(time.perf_counter() - t)
    return [sorted(t_f)[len(t_f) // 2] * 1e3 for t_f in ts]


def generate(graph: Graph, groups: list[Group], kernels: list, last_use: dict) -> tuple[str, object]:
    """Python source of the straight-line wrapper, and the function compiled from it. Every name in
    the source is made here (i<n>, v<n>, k<n>, c<n>); nothing from the model reaches it. Each value
    is dropped after its last reader, so memory is freed as early as in eager mode."""
    names: dict[Node, str] = {}
    env: dict[str, object] = {}
    for i, n in enumerate(graph.inputs):
        names[n] = f"i{i}"
    lines = [f"def program({', '.join(names[n] for n in graph.inputs)}):"]
    for n in graph.nodes:
        if n.op == "const":
            names[n] = f"c{len(env)}"
            env[names[n]] = n.value
    keep = set(graph.outputs)
    dies_after: dict[int, list[Node]] = {}
    for n, gi in last_use.items():
        if n not in keep and n.op not in ("input", "const"):
            dies_after.setdefault(gi, []).append(n)
    for gi, (group, kernel) in enumerate(zip(groups, kernels)):
        for o in group.outputs:
            names[o] = f"v{len(names)}"
        env[f"k{gi}"] = kernel
        outs = ", ".join(names[o] for o in group.outputs) + ","
        lines.append(f"    {outs} = k{gi}({', '.join(names[i] for i in group.inputs)})")
        dead = [names[n] for n in dies_after.get(gi, ()) if n in names]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    lines.append(f"    return ({', '.join(names[o] for o in graph.outputs)},)")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<kfuse program>", "exec"), env)
    return source, env["program"]


def build_program(graph: Graph, options: dict) -> Program:
    from .passes import memplan, run_pipeline
    report = Report()
    if options.get("backend") == "reference":
        groups = [Group([n], [n]) for n in graph.nodes if n.op not in ("input", "const")]
        kernels = [reference_kernel(g) for g in groups]
        last_use = {i: gi for gi, g in enumerate(groups) for i in g.inputs}
    else:
        graph, groups = run_pipeline(graph, options, report)
        kinds = [kind_of(g) for g in groups]
        plan = memplan.plan(groups, graph, [k in WRITES_INTO for k in kinds], [k in ALIASES for k in kinds])
        report.peak_bytes, report.unplanned_bytes = plan.peak_bytes, plan.unplanned_bytes
        kernels = [make_kernel(g, report, options, [plan.buffers.get(o) for o in g.outputs]) for g in groups]
        last_use = plan.last_use
    source, fn = generate(graph, groups, kernels, last_use)
    return Program(graph, groups, kernels, report, source, fn)
