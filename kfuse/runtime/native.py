"""The native runner: a program's C kernels called in order from generated C, not one by one from Python.

Between two C kernels the Python program spends a few microseconds in a warm loop (argument checks,
pointers, a ctypes call), but in a real call each kernel's Python runs cold, after the previous kernel
has streamed its weights through the caches: a 1280-value hardswish took 5 us called in a loop and 25-30
us in MobileNetV3's program, and the main thread spent ~20% of a call in the interpreter and torch
while the other OpenMP thread waited (perf, 2 threads). Replaying the recorded C calls from a generated
Python loop took MobileNetV3 from 6.45 to 5.33 ms.

At a program's second call (after computing it the usual way) `build` runs the kernels once more into
the call's arena, on copies of the inputs (the staging tensors), recording every C call their fast paths
make (kfuse/backends/c/record.py) with the tensors they were given. Each run of consecutive kernels that
recorded their calls becomes one generated C function calling the same functions with the same
arguments; it is valid for that arena, those staging tensors and those recorded outputs, which the
runner keeps. Other kernels (oneDNN's, torch's, a C kernel on a path that copies in Python) run from
Python between the runs, reading the recorded tensors; where a C run reads the result, the runs' pointers
into the recorded one are moved to it each call when it is a tensor of its own (a library's output: an
_Moved, as for an input), else it is copied into the recorded one. A call moves the recorded pointers
into each staging tensor to the caller's input where that has the staging tensor's shape, dtype and
strides (else copies the input into it), moves the pointers into a recorded output to a fresh tensor made
for the call where nothing else reads the recorded one, runs the steps and returns those fresh outputs
and copies of the others (the caller owns them; the runner reuses its buffers).

The runner is checked before it is used: on inputs made different from that call's (`_different`), its
outputs must equal the Python program's bit for bit; else the program stays on Python and the report
says why. It serves a call that took its arena from the program's pool (so one call at a time, and no
second arena resident for it), with the thread count it was recorded with; concurrent callers use the
Python program with other arenas. KFUSE_NATIVE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import re

import torch

from ..backends import POOL_MIN
from ..backends.c import record
from ..backends.c.compiler import CompileError, load


class _Arg(ctypes.Union):
    _fields_ = [("i", ctypes.c_int64), ("d", ctypes.c_double), ("f", ctypes.c_float), ("p", ctypes.c_void_p)]


_POINTERS = (ctypes.c_void_p, ctypes.c_char_p)
_C_TYPES = {ctypes.c_int: ("int", "i"), ctypes.c_uint: ("unsigned", "i"), ctypes.c_int64: ("int64_t", "i"),
            ctypes.c_uint64: ("uint64_t", "i"), ctypes.c_float: ("float", "f"), ctypes.c_double: ("double", "d")}


class NotNative(Exception):
    """Why a program (or one kernel's call) cannot run from the native runner."""


def _c_arg(t, v) -> tuple[str, str, object]:
    """(C type, _Arg member, value) of argument v passed as ctypes type t (None: no argtypes given)."""
    if t is None:           # ctypes' conversions without argtypes: its own objects, or a Python int as a C int
        t = type(v) if isinstance(v, ctypes._SimpleCData) else ctypes.c_int if isinstance(v, int) \
            else ctypes.c_void_p if isinstance(v, (ctypes.Array, ctypes.Structure, ctypes._Pointer)) else None
        v = v.value if isinstance(v, ctypes._SimpleCData) else v
    if t in _POINTERS or (isinstance(t, type) and issubclass(t, (ctypes._Pointer, ctypes.Array))):
        if v is None or isinstance(v, int):
            return "void *", "p", v or 0
        if isinstance(v, (ctypes.Array, ctypes.Structure, ctypes._Pointer)):
            return "void *", "p", ctypes.cast(v, ctypes.c_void_p).value if isinstance(v, ctypes._Pointer) \
                else ctypes.addressof(v)
        if isinstance(v, ctypes.c_void_p):
            return "void *", "p", v.value or 0
        raise NotNative(f"a pointer argument of type {type(v).__name__}")
    if t in _C_TYPES and isinstance(v, (int, float)):
        ctype, member = _C_TYPES[t]
        return ctype, member, v
    raise NotNative(f"an argument of type {getattr(t, '__name__', t)}")


def _call_source(index: int, fn, args, first_arg: int) -> tuple[str, list]:
    """The C statement calling recorded call `index` (fn(*args)) with its arguments at _Arg slots
    first_arg..., and the (member, value) of those slots."""
    types = fn.argtypes
    if types is not None and len(types) != len(args):
        raise NotNative("a call with more arguments than its argtypes")
    decls, uses, slots = [], [], []
    for k, v in enumerate(args):
        ctype, member, value = _c_arg(None if types is None else types[k], v)
        decls.append(ctype)
        uses.append(f"a[{first_arg + k}].{member}")
        slots.append((member, value))
    if fn.restype is None:
        ret = "void"
    elif fn.restype is ctypes.c_int:
        ret = "int"
    else:
        raise NotNative(f"a function returning {fn.restype.__name__}")
    call = f"(({ret} (*)({', '.join(decls) or 'void'}))fn[{index}])({', '.join(uses)})"
    return (f"    if ({call}) return {index + 1};" if ret == "int" else f"    {call};"), slots


class _Run:
    """One generated C function calling a run of kernels' recorded calls: call() -> 0, or 1 + the index of
    the call that failed (a kernel that could not allocate its buffers)."""

    def __init__(self, lib, name: str, calls: list, slots: list, kernels: list):
        self.kept = calls                  # the recorded arguments (ctypes arrays among them) stay alive
        self.fns = (ctypes.c_void_p * len(calls))(*[ctypes.cast(f, ctypes.c_void_p).value for f, _ in calls])
        self.args = (_Arg * max(1, len(slots)))()
        for a, (member, value) in zip(self.args, slots):
            setattr(a, member, value)
        self.slots = slots
        self.kernels = kernels             # the kernel index of each call, for the error
        self._fn = getattr(lib, name)
        self._fn.argtypes, self._fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
        self._a = (ctypes.addressof(self.fns), ctypes.addressof(self.args))

    def __call__(self):
        rc = self._fn(*self._a)
        if rc:
            raise MemoryError(f"kernel {self.kernels[rc - 1]}: cannot allocate its buffers")


def _pointer_sites(runs: list) -> list:
    """(object, key, address) of every pointer the runs pass: their _Arg slots, and the pointers inside the
    arrays and structures their calls pass by address (a row kernel's argument array, attention's struct)."""
    sites = [(a, "p", value or 0) for run in runs for a, (member, value) in zip(run.args, run.slots) if member == "p"]
    for run in runs:
        for _, args in run.kept:
            for v in args:
                if isinstance(v, ctypes.Array) and v._type_ in _POINTERS:
                    sites += [(v, i, x or 0) for i, x in enumerate(v)]
                elif isinstance(v, ctypes.Structure):
                    sites += [(v, n, getattr(v, n) or 0) for n, t, *_ in v._fields_ if t in _POINTERS]
    return sites


class _Moved:
    """A tensor the runs read or write where each call's is, not through a copy. An input: the pointers
    into its staging tensor (the runs' recorded calls) are moved to each call's tensor of the same shape,
    dtype and strides; another is copied into the staging tensor first, as every input was before (a 1x1
    convolution's 3.2 MB input, copied on every call: 0.04 ms beside the kernel's 0.29). An output
    (`fresh`): the pointers into its recorded tensor are moved to a new one each call, which is returned
    as the runs computed it, not copied out of the recorded one."""

    def __init__(self, staging: torch.Tensor, sites: list):
        base, size = staging.untyped_storage().data_ptr(), staging.untyped_storage().nbytes()
        self.staging, self.at = staging, staging.data_ptr()
        self.like = (staging.shape, staging.dtype, staging.stride())
        self.sites = [(obj, key, a - self.at) for obj, key, a in sites if base <= a < base + size]

    def __call__(self, t: torch.Tensor) -> None:
        if (t.shape, t.dtype, t.stride()) != self.like:
            self.staging.copy_(t)
            t = self.staging
        self._move(t.data_ptr())

    def _move(self, p: int) -> None:
        if p != self.at:
            for obj, key, offset in self.sites:
                if isinstance(key, str):
                    setattr(obj, key, p + offset)
                else:
                    obj[key] = p + offset
            self.at = p

    def among(self, sites: list) -> bool:
        """Whether any of these pointer sites is one of this tensor's."""
        mine = {(id(obj), key) for obj, key, _ in self.sites}
        return any((id(obj), key) in mine for obj, key, _ in sites)

    def fresh(self) -> torch.Tensor:
        """A new tensor like the recorded one, the runs' pointers moved to it."""
        shape, dtype, stride = self.like
        t = torch.empty_strided(shape, stride, dtype=dtype)
        self._move(t.data_ptr())
        return t


def _source(runs: list) -> tuple[str, list]:
    """C source of one function per run (kf_run<j>), and each run's _Arg slots."""
    lines = ["/* a program's native runner (kfuse/runtime/native.py) */", "#include <stdint.h>",
             "typedef union { int64_t i; double d; float f; void *p; } kf_arg;"]
    all_slots = []
    for j, calls in enumerate(runs):
        lines.append(f"int kf_run{j}(void *const *fn, const kf_arg *a) {{")
        slots: list = []
        for i, (fn, args) in enumerate(calls):
            stmt, s = _call_source(i, fn, args, len(slots))
            lines.append(stmt)
            slots.extend(s)
        lines += ["    return 0;", "}"]
        all_slots.append(slots)
    return "\n".join(lines) + "\n", all_slots


def _ours(program, gi: int) -> bool:
    """Whether kernel gi is one of our C kernels (backend c, c:*), not a view, torch's op or a library's."""
    return program.kernels[gi].inline is None and program.report.kernels[gi].backend.startswith("c")


def _large(graph, view_of: dict) -> set:
    """The values whose views the caller gets as outputs of 1 MiB or more (their kernels stay on Python,
    writing into the output pool)."""
    return {_root(o, view_of) for o in graph.outputs if o.numel * o.dtype.itemsize >= POOL_MIN}


def _whole(t: torch.Tensor) -> bool:
    """Whether t is all of its storage (no offset, nothing beside it): pointers into that storage are its."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _storage(t) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


def _root(n, view_of: dict):
    """The value n is a view of (through inline views), or n."""
    while n in view_of:
        n = view_of[n]
    return n


def _different(t: torch.Tensor) -> torch.Tensor:
    """An input unlike t, of its shape and dtype: its values in a random order (ids stay in range: a flip
    kept every other element's set, a reduction over them unchanged), and floats scaled and shifted (a
    reduction over all of them would not change with the order alone)."""
    flat = t.reshape(-1)
    f = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(flat.numel()))].reshape(t.shape)
    return f * 0.75 + 0.5 if t.is_floating_point() or t.is_complex() else f


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and (torch.equal(a, b) or (
            (a.is_floating_point() or a.is_complex()) and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())))
    return type(a) is type(b) and a == b


class Native:
    """A program's steps run with its C kernels called from generated C (see the module docstring).
    Call with the flat inputs; `threads`: the OpenMP count the calls were recorded with; `arena`: the
    program's arena its calls write into (a call holding it from the program's pool may use the runner)."""

    def __init__(self, fn, threads: int, arena: list, runs: int, native: int, python: int, keep):
        self._fn, self.threads, self.arena = fn, threads, arena
        self.runs, self.native_kernels, self.python_kernels = runs, native, python
        self._keep = keep
        self.parts: Parts | None = None     # set by _assemble

    def __call__(self, inputs):
        if torch.is_grad_enabled():     # the staging copies would otherwise join a caller's autograd graph
            with torch.no_grad():
                return list(self._fn(*inputs))
        return list(self._fn(*inputs))

    def describe(self) -> str:
        return (f"native: {self.native_kernels} kernels called from C in {self.runs} run(s), "
                f"{self.python_kernels} from Python between them")


def build(program, inputs, threads: int, arena: list) -> Native:
    """The native runner of `program` (a CPU Program) for inputs like `inputs`, its recorded calls writing
    into `arena` (one of the program's, which it then serves only); NotNative saying why not."""
    graph, groups, kernels, plan = program.graph, program.groups, program.kernels, program._plan
    if plan is None or program.reference:
        raise NotNative("a reference program")
    if graph.mutated:
        raise NotNative("the model writes into its inputs")
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in inputs):
        raise NotNative("an input that is not a CPU tensor")
    # before recording anything (it takes buffers from the output pool): any kernel it could replay
    views = {gr.outputs[0]: gr.inputs[0] for gr, k in zip(groups, kernels) if k.inline is not None}
    large = _large(graph, views)
    if not any(_ours(program, gi) and not large.intersection(gr.outputs) for gi, gr in enumerate(groups)):
        raise NotNative("no C kernel but for outputs of 1 MiB or more")
    # normal tensors, not inference ones, so that a call in or out of inference mode may copy into them
    # (the arena's are: memplan.new_arena)
    with torch.inference_mode(False):
        staging = [t.clone() for t in inputs]
    buffers = dict(zip(plan.planned, arena))
    with record.Recorder() as rec, torch.inference_mode(False), torch.no_grad():
        def recorded(gi, group, fn, args):
            rec.kernel = gi
            return fn(*args)
        env = program.kernel_calls(staging, buffers, recorded)      # every value's tensor in the recorded call
    # which kernels run from C: those whose every C call was recorded and can be written as a C call, but
    # for a large output the caller gets: the Python step writes it into a buffer of the output pool
    # (backends.POOL_MIN), where the runner would copy it out of its own
    # the views that share their input's memory (a reshape of strided memory copies instead: then it is a
    # step of its own, redone each call)
    view_of = {gr.outputs[0]: gr.inputs[0] for gr, k in zip(groups, kernels) if k.inline is not None
               and _storage(env[gr.outputs[0]]) == _storage(env[gr.inputs[0]])}
    large = _large(graph, view_of)
    native = set()
    for gi, calls in rec.calls.items():
        # our C kernels' wrappers only (their fast paths are what c_call records): not torch's ops or a
        # library's, whatever they call inside
        if _ours(program, gi) and not large.intersection(groups[gi].outputs):
            try:
                for fn, args in calls:
                    _call_source(0, fn, args, 0)
                native.add(gi)
            except NotNative:
                pass
    if not native:
        raise NotNative("no kernel with recorded C calls")
    return _assemble(program, env, buffers, view_of, native, rec, threads, arena)


def _assemble(program, env: dict, buffers: dict, view_of: dict, native: set, rec, threads: int, arena: list) -> Native:
    """The runner's Python: the staging copies, the runs and the Python steps in program order, the
    outputs; recorded tensors and kernels are its globals."""
    graph, groups, kernels = program.graph, program.groups, program.kernels
    g: dict = {}                 # the generated function's globals
    names: dict = {}
    fixed = set()                # values held in recorded tensors (what the runs read and write)

    def global_name(prefix: str, value) -> str:
        name = f"{prefix}{len(g)}"
        g[name] = value
        return name

    def fixed_name(n) -> str:
        fixed.add(n)
        names[n] = global_name("r", env[n])
        return names[n]

    for n in graph.nodes:
        if n.op == "const":
            names[n] = global_name("c", n.value)
    read = {_root(i, view_of) for gi in native for i in groups[gi].inputs}      # what the runs read, through views
    lines = [f"def program({', '.join(f'i{k}' for k in range(len(graph.inputs)))}):"]
    moved = {}                   # name -> tensor: the inputs the runs read, the outputs made fresh (_Moved)
    for k, n in enumerate(graph.inputs):
        # the runs read the caller's tensor through their moved pointers (or a staging copy); Python steps
        # and views (an output may be a view of an input, as in eager) the caller's tensor
        names[n] = f"i{k}"
        if n in read:
            name = global_name("m", None)
            moved[name] = env[n]
            lines.append(f"    {name}(i{k})")
    head = len(lines)            # where the fresh outputs are made (below)
    by_name = set()              # what Python steps read, through views: by the recorded tensors' names
    view_lines = set()           # the Python views' lines (dropped below where nothing reads them)
    runs: list = []
    pending: list = []

    def close_run():
        if pending:
            runs.append(list(pending))
            lines.append(f"    run{len(runs) - 1}()")
            pending.clear()

    for gi, (group, kernel) in enumerate(zip(groups, kernels)):
        if gi in native:
            pending.extend((gi, call) for call in rec.calls[gi])
            for o in group.outputs:
                fixed_name(o)
            continue
        if group.outputs[0] in view_of and group.inputs[0] in fixed:
            fixed_name(group.outputs[0])        # a view of a recorded tensor is one too
            continue
        close_run()
        by_name.update(_root(i, view_of) for i in group.inputs)
        args = [names[i] for i in group.inputs]
        outs = [f"v{gi}_{k}" for k in range(len(group.outputs))]
        if kernel.inline is not None:
            lines.append(f"    {outs[0]} = {args[0]}.{kernel.inline}")
            view_lines.add(lines[-1])
        else:
            if kernel.writes_into:
                args.insert(0, "(" + "".join((global_name("b", buffers[o]) if o in buffers else "None") + ", "
                                             for o in group.outputs) + ")")
            lines.append(f"    {', '.join(outs)}, = {global_name('k', kernel.fn)}({', '.join(args)})")
        for o, v in zip(group.outputs, outs):
            if o in read and not kernel.writes_into and not kernel.aliases and _whole(env[o]):
                # a tensor of its own each call (a library's output): the runs' pointers into the recorded
                # one are moved to it, as to an input (MiniLM b8's QKV output, 4.7 MB, had been copied)
                name = global_name("m", None)
                moved[name] = env[o]
                lines.append(f"    {name}({v})")
            elif o in read:            # a run reads it from the recorded tensor
                r = fixed_name(o)
                lines.append(f"    if {v}.data_ptr() != {r}.data_ptr() or {v}.stride() != {r}.stride(): {r}.copy_({v})")
            names[o] = v
    close_run()
    # the outputs as generate() returns them, and copies of recorded tensors (the runner reuses them)
    from . import constant_views     # the package imports this module
    const_views = constant_views(graph, groups, kernels)
    # An output a run writes (or a view of one), in a tensor of its own that no Python step reads and no
    # other output shares: a fresh one each call, the runs' pointers moved to it (_Moved.fresh), the view
    # made again on it
    by_runs = {o for gi in native for o in groups[gi].outputs}
    roots = [_root(o, view_of) for o in graph.outputs]
    fresh, fresh_of = {}, {}
    for out, b in zip(graph.outputs, roots):
        t = env[b]
        if b in by_runs and b not in by_name and b not in buffers and b not in const_views and roots.count(b) == 1 \
                and _whole(t):
            name, w = global_name("m", None), f"w{len(fresh)}"
            moved[name] = t
            lines.insert(head, f"    {w} = {name}.fresh()")
            # a view of it (the chain of views the program makes) as one as_strided: ~1 us where a chain
            # of three (narrow, reshape, permute) took ~4
            v = env[out]
            view = None if out is b else (tuple(v.shape), v.stride(), v.storage_offset() - t.storage_offset())
            fresh[out] = w if view is None else f"{w}.as_strided{view}"
            fresh_of[out] = (name, view)
    seen = set(graph.inputs)
    returned = []
    recorded = {}                # output -> the recorded tensor it is a copy of
    for o in graph.outputs:
        returned.append(fresh[o] if o in fresh else
                        names[o] + (".clone()" if o in fixed or o in const_views or o in seen else ""))
        if o not in fresh and o in fixed and o not in const_views and o not in seen:
            recorded[o] = names[o]
        seen.add(o)
    lines.append(f"    return ({''.join(r + ', ' for r in returned)})")
    lines, runs = _joined_runs(_read_views_only(lines, view_lines), runs)
    source, slots = _source([[call for _, call in run] for run in runs])
    try:
        lib = load(source)
    except CompileError as e:
        raise NotNative(f"its C did not compile: {str(e).splitlines()[0][:200]}") from e
    for j, (run, s) in enumerate(zip(runs, slots)):
        g[f"run{j}"] = _Run(lib, f"kf_run{j}", [call for _, call in run], s, [gi for gi, _ in run])
    run_sites = [_pointer_sites([g[f"run{j}"]]) for j in range(len(runs))]
    sites = [s for ss in run_sites for s in ss]
    for name, staging in moved.items():
        g[name] = _Moved(staging, sites)
    lines = _dropped(lines, {name: {j for j, ss in enumerate(run_sites) if g[name].among(ss)} for name in moved})
    py = "\n".join(lines) + "\n"
    exec(compile(py, "<kfuse native program>", "exec"), g)
    python_kernels = sum(1 for gi, (_, k) in enumerate(zip(groups, kernels)) if gi not in native and k.inline is None)
    # held: the library, the tensors the replayed calls were given (not the others': a Python step's output
    # goes back to the output pool; the globals hold the rest)
    kept = [t for gi in native for t in rec.kept.get(gi, ())]
    runner = Native(g["program"], threads, arena, len(runs), len(native), python_kernels, (lib, kept, py))
    runner.parts = _parts(lines, g, graph, fresh_of, recorded)
    return runner


class Parts:
    """A native program that is moves, runs and outputs only: what a caller composing several programs into
    one C call (kfuse/dynamo_step.py) wires together. inputs[k]: the _Moved of input k (None: the runs do not
    read it); runs: the _Run calls in order; outputs[j]: (the _Moved made fresh for output j, the (size,
    stride, offset) of the view returned on it or None, None), or (None, None, the recorded tensor a run
    writes it into, which the program returns a copy of)."""

    def __init__(self, inputs: list, runs: list, outputs: list):
        self.inputs, self.runs, self.outputs = inputs, runs, outputs


def _parts(lines: list, g: dict, graph, fresh_of: dict, recorded: dict) -> Parts | None:
    """The program as Parts, or None where it runs anything else from Python (a view, a torch op, a copy)."""
    inputs: list = [None] * len(graph.inputs)
    runs = []
    for ln in lines[1:-1]:
        move, run = re.fullmatch(r"    (m\d+)\(i(\d+)\)", ln), re.fullmatch(r"    (run\d+)\(\)", ln)
        if move:
            inputs[int(move.group(2))] = g[move.group(1)]
        elif run:
            runs.append(g[run.group(1)])
        elif not re.fullmatch(r"    w\d+ = m\d+\.fresh\(\)", ln):
            return None
    if not all(o in fresh_of or o in recorded for o in graph.outputs):
        return None
    return Parts(inputs, runs, [(g[fresh_of[o][0]], fresh_of[o][1], None) if o in fresh_of else (None, None, g[recorded[o]])
                                for o in graph.outputs])


def _dropped(lines: list, readers: dict) -> list:
    """lines with each value of the call (v<group>_<k>) deleted after its last reader, as the Python program
    does: a library's output had lived to the end of the call (ConvNeXt-Tiny b1: 35 MB of oneDNN outputs at
    once, 3.3x eager's peak). A value moved to (`m<n>(v)`, see _Moved) is read by the runs through their
    pointers: it lives until the last run among `readers[m<n>]` (their indices)."""
    last: dict = {}
    run_line = {}
    for i, ln in enumerate(lines[:-1]):         # not the return: what it names is returned
        run = re.fullmatch(r"    run(\d+)\(\)", ln)
        if run:
            run_line[int(run.group(1))] = i
        for v in re.findall(r"\bv\d+_\d+\b", ln):
            last[v] = i
    returned = set(re.findall(r"\bv\d+_\d+\b", lines[-1]))
    for ln in lines:
        move = re.fullmatch(r"    (m\d+)\((v\d+_\d+)\)", ln)
        if move:
            last[move.group(2)] = max([last[move.group(2)], *(run_line[j] for j in readers[move.group(1)])])
    dead: dict = {}
    for v, i in last.items():
        if v not in returned:
            dead.setdefault(i, []).append(v)
    out = []
    for i, ln in enumerate(lines):
        out.append(ln)
        if i in dead:
            out.append(f"    del {', '.join(sorted(dead[i]))}")
    return out


def _read_views_only(lines: list, view_lines: set) -> list:
    """lines without the views nothing reads (a view of an input that only the runs read, through their
    moved pointers): a reshape is ~1.5 us of Python a call."""
    while True:
        text = "\n".join(lines)
        dead = [ln for ln in lines if ln in view_lines
                and len(re.findall(rf"\b{ln.split()[0]}\b", text)) == 1]
        if not dead:
            return lines
        lines = [ln for ln in lines if ln not in dead]


def _joined_runs(lines: list, runs: list) -> tuple[list, list]:
    """(lines, runs) with runs that follow each other with nothing between (a view between them dropped)
    made one: one C call instead of two."""
    out, joined = [], []
    for ln in lines:
        m = re.fullmatch(r"    run(\d+)\(\)", ln)
        if m is None:
            out.append(ln)
        elif out and re.fullmatch(r"    run\d+\(\)", out[-1]):
            joined[-1].extend(runs[int(m.group(1))])
        else:
            joined.append(list(runs[int(m.group(1))]))
            out.append(f"    run{len(joined) - 1}()")
    return out, joined


def check(runner: Native, program_fn, arena, inputs) -> None:
    """NotNative unless the runner's outputs equal the Python program's, bit for bit, on inputs unlike
    those it was recorded with."""
    other = [_different(t) for t in inputs]
    with torch.no_grad():
        # copies: the runner writes into the same arena, and the comparison must not see its own writes
        want = [t.clone() if isinstance(t, torch.Tensor) else t for t in program_fn(arena, *other)]
        got = runner(other)
    if len(want) != len(got) or not all(_same(a, b) for a, b in zip(want, got)):
        raise NotNative("its outputs differed from the Python program's")
