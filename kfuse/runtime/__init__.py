"""The lean runtime: a straight-line schedule of kernel launches, generated as Python source.

`build_program` runs the named steps of a compilation, in order (each printable with KFUSE_DUMP):
    fold, patterns, fold_again, layout, fission, schedule   the pass pipeline (kfuse/passes)
    kernels        each group built as a kernel (C, library, or the torch reference as the fallback)
    memory_plan    arena slots by liveness for kernels that write into given buffers (memplan.py)
    codegen        one Python function that calls the kernels in order with every value bound to a
                   local variable: no graph is interpreted per call.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import replace

import torch

from .. import config, progress
from ..backends import Kernel, make_kernel, prebuild, split_pairs
from ..backends import hugepages, openmp
from ..backends.c import autotune
from ..backends.calibrate import machine
from ..backends.constants import intern
from ..backends.reference import reference_kernel
from ..ir import Graph, Group, Node
from ..passes import dump, run_pipeline
from ..report import Report
from . import memplan, native, settle


NATIVE_AFTER = 2        # a program's calls before its native runner is made


class Program:
    """One compiled signature: call with a flat list of input tensors, get the flat list of outputs.

    Reentrant: each concurrent call takes an arena of intermediate buffers from a pool (a new one
    when all are in use), so threads never share a planned buffer; outputs never live in an arena.
    Thread policy: a call runs its kernels with threads // (calls in flight) OpenMP threads in the
    calling thread (kfuse.backends.openmp), so concurrent callers share the cores instead of each
    starting a full team; `threads` is KFUSE_NUM_THREADS, else the caller's torch setting."""

    def __init__(self, graph: Graph, groups: list, kernels: list, report: Report, source: str, fn, plan,
                 reference: bool, machine, backend: str = "cpu", cuda_graphs="auto"):
        self.graph, self.groups, self.kernels, self.report = graph, groups, kernels, report
        self.source = source       # the generated call wrapper, for reading and debugging
        self.reference, self.machine = reference, machine     # how it was built (kept by artifacts)
        self._fn = fn
        self._plan = plan
        # Triton kernels write into arena buffers on their inputs' device: made at the first call
        self._on_input_device = backend == "triton"
        self._arenas = [] if self._on_input_device else [plan.new_arena() if plan is not None else []]
        self._n_arenas = len(self._arenas)   # arenas made; those not in the pool are in use by a call
        self._grow = threading.Lock()
        self._graphed = None
        # the native runner (native.py): made after the second call of a CPU program (a program called
        # once never pays for its C compile), None until then or where it cannot be made (report.launch
        # says why); _native_after counts the calls left before it is made, 0: never
        self._native = None
        self._native_after = NATIVE_AFTER if backend == "cpu" and not reference and config.get().native else 0
        if backend == "cpu" and not reference and not config.get().native:
            report.launch = "Python, kernel by kernel (KFUSE_NATIVE=0)"
        if backend == "triton" and cuda_graphs and torch.cuda.is_available():
            if graph.mutated:       # replay reads and writes static copies of the inputs, not the caller's
                report.launch = "one launch per kernel (the model writes into its inputs: no CUDA graph)"
            else:
                from .cudagraph import Graphed
                self._graphed = Graphed(self._launch, report, always=cuda_graphs is True)

    def __call__(self, inputs):
        if self._graphed is not None:
            return self._graphed(inputs)
        return self._launch(inputs)

    def _new_arena(self, inputs) -> list:
        if self._plan is None:
            return []
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None) if self._on_input_device else None
        return self._plan.new_arena(device)

    def lone(self, inputs):
        """The outputs by the native runner where it can serve this call as the program's only caller (the
        runner's arena on top of the pool, no other call in flight, the runner's thread count wanted), else
        None (then the call goes the usual way). Tried first by every call: one that ends in the runner skips
        the general path's Python, run cold between programs in a decode step."""
        runner = self._native
        if runner is None or (config.get().threads or openmp.threads()) != runner.threads:
            return None
        arena = self.hold(runner)
        if arena is None:
            return None
        try:
            return runner(inputs)
        finally:
            self.release(arena, runner)

    def hold(self, runner):
        """The arena of native runner `runner` (this program's), taken from the pool where no other call is in
        flight: the runner writes into it, so its holder is the runner's only user; else None, nothing held.
        Give it back with `release`."""
        arenas = self._arenas
        if not arenas or arenas[-1] is not runner.arena or len(arenas) != self._n_arenas:
            return None
        try:
            arena = arenas.pop()        # atomic under the GIL: another caller may have taken it meanwhile
        except IndexError:
            return None
        if arena is runner.arena and self._n_arenas - len(arenas) == 1:
            return arena
        self.release(arena, runner)
        return None

    def release(self, arena, runner) -> None:
        """An arena back to the pool: the runner's on top, where the next lone caller takes it."""
        if arena is runner.arena:
            self._arenas.append(arena)
        else:
            self._arenas.insert(0, arena)

    def _launch(self, inputs):
        out = self.lone(inputs)
        if out is not None:
            return out
        arenas = self._arenas
        try:
            arena = arenas.pop()         # list.pop and append are atomic under the GIL
        except IndexError:
            with self._grow:
                self._n_arenas += 1
            arena = self._new_arena(inputs)
        try:
            in_flight = max(1, self._n_arenas - len(arenas))     # never drifts: counted from the pool
            before = openmp.threads()
            want = max(1, (config.get().threads or before) // in_flight)
            with openmp.using(want) if want != before else contextlib.nullcontext():
                out = list(self._fn(arena, *inputs))
                if self._native_after and in_flight == 1:
                    self._make_native(arena, inputs, want)
                return out
        finally:
            # the runner's arena on top, where the next lone caller takes it (after concurrent calls the
            # pool holds others)
            runner = self._native
            if runner is None or arena is runner.arena:
                arenas.append(arena)
            else:
                arenas.insert(0, arena)

    def _make_native(self, arena, inputs, threads: int) -> None:
        """Make and check the native runner at the NATIVE_AFTER-th call; the report's launch line says which
        way calls run."""
        with self._grow:
            if not self._native_after:
                return
            self._native_after -= 1
            if self._native_after:
                return
        try:
            runner = native.build(self, inputs, threads, arena)
            native.check(runner, self._fn, arena, inputs)
        except Exception as e:         # the call computed its outputs already: it never fails for this
            why = str(e) if isinstance(e, native.NotNative) else f"{type(e).__name__}: {str(e)[:200]}"
            self.report.launch = f"Python, kernel by kernel (no native runner: {why})"
            return
        self.report.launch = runner.describe()
        self._native = runner

    def profile(self, inputs, reps: int = 7) -> list[tuple[float, float]]:
        """Time every kernel (median of `reps` calls) and the same group run op by op in torch;
        stores them in report.kernels[i].measured_ms / .unfused_ms and returns the pairs. The two
        are called alternately, so a busy spell of the machine slows both alike rather than one."""
        buffers = dict(zip(self._plan.planned, self._plan.new_arena())) if self._plan is not None else {}
        times = []

        def timed(gi, group, fn, args):
            info = self.report.kernels[gi]
            fns = [fn, reference_kernel(group)] if info.fusion else [fn]
            meds = median_ms(fns, args, reps)
            fused, unfused = meds[0], meds[-1]
            info.measured_ms, info.unfused_ms = fused, unfused
            times.append((fused, unfused))
            return fn(*args)
        self.kernel_calls(inputs, buffers, timed)
        return times

    def arena_buffers(self) -> dict:
        """{value: buffer} of the arena on top of the pool, the one the next lone call takes (for
        kernel_calls outside a call, while none is in flight, on a CPU program, whose pool starts with
        one: settle.py)."""
        return dict(zip(self._plan.planned, self._arenas[-1])) if self._plan is not None else {}

    def kernel_calls(self, inputs, buffers: dict, call, drop: bool = False) -> dict:
        """Runs the program's kernels one by one outside its wrapper, for timing and recording:
        call(index, group, fn, args) returns fn(*args), the group's outputs, fn writing into `buffers`
        (value -> tensor: an arena) where the kernel writes into planned buffers. Returns every value's
        tensor (inputs and constants too); with `drop`, each is dropped after its last reader, as the program
        drops it (then only the outputs, inputs and constants are returned)."""
        env = dict(zip(self.graph.inputs, inputs))
        env.update({n: n.value for n in self.graph.nodes if n.op == "const"})
        dies_after = _dies_after(self.graph, self._plan.last_use) if drop and self._plan is not None else {}
        for gi, (group, kernel) in enumerate(zip(self.groups, self.kernels)):
            fn = kernel.fn
            if kernel.writes_into:
                fn = functools.partial(kernel.fn, tuple(buffers.get(o) for o in group.outputs))
            env.update(zip(group.outputs, call(gi, group, fn, [env[i] for i in group.inputs])))
            for n in dies_after.get(gi, ()):
                env.pop(n, None)
        return env


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


def constant_views(graph: Graph, groups: list[Group], kernels: list) -> set:
    """The values that may share a constant's storage: constants, and what views and aliasing kernels
    make of them (returned, they are copied, so that a caller writing into one changes no later call)."""
    views = {n for n in graph.nodes if n.op == "const"}
    for group, kernel in zip(groups, kernels):
        if (kernel.aliases or kernel.inline is not None) and views.intersection(group.inputs):
            views.update(group.outputs)
    return views


def _dies_after(graph: Graph, last_use: dict) -> dict[int, list[Node]]:
    """{group index: the values its call is the last to read}, but for the graph's inputs, constants and
    outputs."""
    keep = set(graph.outputs)
    dies_after: dict[int, list[Node]] = {}
    for n, gi in last_use.items():
        if n not in keep and n.op not in ("input", "const"):
            dies_after.setdefault(gi, []).append(n)
    return dies_after


def generate(graph: Graph, groups: list[Group], kernels: list, last_use: dict, planned: list) -> tuple[str, object]:
    """Python source of the straight-line wrapper, and the function compiled from it. Every name in
    the source is made here (i<n>, v<n>, k<n>, c<n>, b<n>); nothing from the model reaches it. Each
    value is dropped after its last reader, so memory is freed as early as in eager mode. The
    wrapper's first argument is the caller's arena: the buffers of the `planned` values, in order."""
    names: dict[Node, str] = {}
    env: dict[str, object] = {}
    for i, n in enumerate(graph.inputs):
        names[n] = f"i{i}"
    lines = [f"def program({', '.join(['arena'] + [names[n] for n in graph.inputs])}):"]
    buf = {n: f"b{k}" for k, n in enumerate(planned)}
    if planned:
        lines.append(f"    {', '.join(buf.values())}, = arena")
    for n in graph.nodes:
        if n.op == "const":
            names[n] = f"c{len(env)}"
            env[names[n]] = n.value
    dies_after = _dies_after(graph, last_use)
    const_views = constant_views(graph, groups, kernels)
    for gi, (group, kernel) in enumerate(zip(groups, kernels)):
        for o in group.outputs:
            names[o] = f"v{len(names)}"
        outs = ", ".join(names[o] for o in group.outputs) + ","
        args = [names[i] for i in group.inputs]
        if kernel.inline is not None:     # a view: a method call in place of a kernel call (~1 us less)
            lines.append(f"    {names[group.outputs[0]]} = {args[0]}.{kernel.inline}")
        else:
            env[f"k{gi}"] = kernel.fn
            if kernel.writes_into:
                args.insert(0, "(" + "".join(f"{buf.get(o, 'None')}, " for o in group.outputs) + ")")
            lines.append(f"    {outs} = k{gi}({', '.join(args)})")
        dead = [names[n] for n in dies_after.get(gi, ()) if n in names]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    n_user = len(graph.outputs) - len(graph.mutated)
    for i, o in zip(graph.mutated, graph.outputs[n_user:]):     # the model's writes into its inputs
        lines.append(f"    if {names[o]} is not i{i}: i{i}.copy_({names[o]})")
    # Copied: an output that is (a view of) a constant, so that a caller writing into it does not change
    # later calls; an input returned as an output (through an identity: ONNX's Identity, `x.detach()`), or
    # a value returned twice (a clone of a computed value folds away: `y, y.clone()`), so that writing into
    # one output changes neither the caller's input nor another output. (A clone of an input is captured
    # as a `copy` op.)
    seen = set(graph.inputs)
    returned = []
    for o in graph.outputs[:n_user]:
        returned.append(names[o] + (".clone()" if o in const_views or o in seen else ""))
        seen.add(o)
    lines.append(f"    return ({''.join(r + ', ' for r in returned)})")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<kfuse program>", "exec"), env)
    return source, env["program"]


def fuse(graph: Graph, options: dict, report, *, check: bool = False) -> tuple[Graph, list[Group]]:
    """The pass pipeline on this machine: the fused graph and its groups (one kernel each)."""
    return run_pipeline(graph, options, report, machine(), check=check)


def build_program(graph: Graph, options: dict) -> Program:
    """`options`: kfuse.compile's. A graph made inside `ir.on_device` (compiling for GPU inputs) has its
    constants on `graph.device` through `Graph.const`; any a pass set directly is moved there after the
    passes (a kernel reads one device)."""
    report = Report()
    if options.get("backend") == "reference":
        groups = [Group([n], [n]) for n in graph.nodes if n.op not in ("input", "const")]
        return assemble(graph, groups, report, True, None)
    m = machine()
    with progress.stage("fusion passes"):
        graph, groups = run_pipeline(graph, options, report, m)
    _constants_to(graph)
    return assemble(graph, groups, report, False, m, backend=options.get("backend", "cpu"),
                    cuda_graphs=options.get("cuda_graphs", "auto"), rounding=options.get("rounding", "outputs"))


def _constants_to(graph: Graph) -> None:
    if graph.device is None:
        return
    for n in graph.nodes:
        v = n.attrs.get("value") if n.op == "const" else None
        if isinstance(v, torch.Tensor) and v.device != graph.device:
            n.attrs["value"] = v.to(graph.device)


LOOKUPS = ("gather", "index", "gather_elements", "embedding_bag")     # ops that read a few rows of a table


def _weight_bytes(graph: Graph) -> int:
    """Bytes of the constants a call reads whole: every tensor constant but tables only looked up (an
    embedding's rows are gathered a few at a time)."""
    users = graph.users()
    return sum(n.attrs["value"].numel() * n.attrs["value"].element_size() for n in graph.nodes
               if n.op == "const" and isinstance(n.attrs.get("value"), torch.Tensor)
               and not all(u.op in LOOKUPS for u in users.get(n, ())))


def assemble(graph: Graph, groups: list[Group], report: Report, reference: bool, m, backend: str = "cpu",
             cuda_graphs="auto", rounding: str = "outputs", settle_choices: bool = True) -> Program:
    """The Program for a fused graph and its groups: kernels built (or, with `reference`, every group
    run by the reference functions), memory planned, the call wrapper generated. `backend`: the
    renderer of the fused kernels, "cpu" (C and oneDNN) or "triton" (kfuse.backends.make_kernel);
    `cuda_graphs`: a Triton program on a GPU may replay as a CUDA graph (runtime/cudagraph.py);
    `rounding`: where Triton kernels round float16/bfloat16 values (kfuse.compile's option);
    `settle_choices`: kernels chosen by timing alone are timed again in the program (settle.py; an
    artifact's program is loaded as it was compiled)."""
    if reference:
        kernels = [Kernel(reference_kernel(g), writes_into=False, aliases=True) for g in groups]
        program = _program(graph, groups, kernels, report, True, m, backend, cuda_graphs)
    else:
        for n in graph.nodes:       # weights other programs hold already: one copy, packed once
            if n.op == "const":
                n.attrs["value"] = intern(n.attrs["value"])
        with autotune.weights_from_memory(_weight_bytes(graph) > autotune.cache_bytes()):
            if backend == "cpu":
                prebuild(groups)
            with progress.stage(f"making {len(groups)} kernels (timing their choices)"):
                if backend == "cpu":
                    groups = split_pairs(groups, report)
                kernels = [make_kernel(g, report, m, backend, rounding) for g in groups]
            if backend == "cpu":
                with progress.stage("moving weights into 2 MB pages"):
                    for k in kernels:
                        hugepages.back_object(k.weights)
            program = _program(graph, groups, kernels, report, False, m, backend, cuda_graphs)
            changed = settle.propose(program) if backend == "cpu" and settle_choices else {}
            if changed:
                infos, kernels = list(report.kernels), list(kernels)    # the first program's, if it is kept
                for gi in changed:          # made again: the verdict is now the cached choice
                    kernels[gi] = make_kernel(groups[gi], made := Report(), m, backend, rounding)
                    report.kernels[gi] = replace(made.kernels[0], schedule=report.kernels[gi].schedule)
                    hugepages.back_object(kernels[gi].weights)
                new = _program(graph, groups, kernels, report, False, m, backend, cuda_graphs)
                with progress.stage("timing the program with the choices made in it"):
                    if not settle.faster(new, program):
                        kernels, report.kernels[:] = program.kernels, infos
                        settle.reject(changed, program)
        autotune.flush()       # the choices timed for these kernels, into the cache file at once
        if changed:         # a fresh program: both were called, and a program makes its runner at its own calls
            program = _program(graph, groups, kernels, report, False, m, backend, cuda_graphs)
        report.peak_bytes, report.unplanned_bytes = program._plan.peak_bytes, program._plan.unplanned_bytes
        dump("kernels", "\n".join(f"group {i}: {k.name} ({k.backend})" for i, k in enumerate(report.kernels)))
        plan = program._plan
        dump("memory_plan", f"{len(plan.slot_of)} planned values in {len(plan.slot_bytes)} slots, {plan.peak_bytes} bytes")
    dump("codegen", program.source)
    return program


def _program(graph: Graph, groups: list[Group], kernels: list, report: Report, reference: bool, m, backend: str,
             cuda_graphs) -> Program:
    """The Program of these kernels: memory planned (but for the reference), the wrapper generated."""
    if reference:
        plan, last_use = None, {i: gi for gi, g in enumerate(groups) for i in g.inputs}
    else:
        plan = memplan.plan(groups, graph, [k.writes_into for k in kernels], [k.aliases for k in kernels])
        last_use = plan.last_use
    source, fn = generate(graph, groups, kernels, last_use, plan.planned if plan is not None else [])
    return Program(graph, groups, kernels, report, source, fn, plan, reference, m, backend, cuda_graphs)
