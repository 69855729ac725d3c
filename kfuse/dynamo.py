"""`torch.compile(model, backend="kfuse")`: Dynamo hands us an FX graph per graph break, static or
with symbolic sizes; each becomes a `DynamoGraph`, which compiles it with kfuse.compile (torch.export
of the graph), so both entry points share one path.

The model's parameters and buffers (the inputs Dynamo marks as static) are compiled in as constants,
as torch.compile's freezing does: GEMM weights are packed once. A parameter object replaced or
changed in place (its version counter moves) is seen at the next call and compiles again.

A graph with symbolic sizes (torch.compile's automatic dynamic shapes after a size changed, or
dynamic=True) runs by one of three strategies, chosen from the share of its work on static shapes:
  partitioned   the graph split into runs of ops whose shapes are all static, each compiled once by
                kfuse, and the ops that touch a symbolic size between them run by torch with the
                sizes of the call (a decode step: every projection, norm and MLP static, only the
                KV-cache concatenation and the attention over it symbolic; the concatenation
                appends in place into a growable buffer, runtime/kvcache.py);
  specialised   one kfuse program per distinct set of sizes, compiled on first sight (a prefill whose
                every op depends on the prompt length);
  torch         no contraction at all (mask arithmetic between graph breaks): run as traced.
`compilations()` lists the graphs in use and how each runs; `DynamoGraph.summary()` says why.
"""
from __future__ import annotations

import operator
import time
import warnings
import weakref

import torch
import torch.fx

from . import dynamo_step, progress
from .api import _COMPILING, check_options, compile, warn_if_grad
from .errors import KfuseError
from .dynamo_graph import _adopt, _cache_appends, _cheap, _size_arithmetic, _symbols, _val
from .dynamo_step import sdpa, sdpa_appending
from .runtime import kvcache

# A partition is worth it when this share of the work (contraction flops, elementwise elements) runs
# in static kfuse programs; below it the graph is specialised per size.
PARTITION_MIN_STATIC = 0.5
MAX_SPECIALISED = 8        # distinct size sets one graph compiles before it partitions instead
# A partition's static run of less work (elements written, multiply-adds) runs by torch with the ops
# beside it: a decode step's position and mask arithmetic on a few hundred elements between graph pieces
SMALL_RUN = 8192
STEP_AFTER = 3             # a partitioned graph's calls before its calls are tried as one C call (dynamo_step)
STEP_TRIES = 3

_COMPILED: list = []     # weak references: Dynamo's cache owns the graphs (torch._dynamo.reset frees them)
# Compiled segments by what they compute (Segment._key): a graph recompiled by Dynamo (a decode graph
# again once the cache passes a sliding window, a guard on a new length) repeats the static segments
# of the one before, with the same weights; each is compiled once. Held by the Segments using them.
_BUILT: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_set_up = [0]       # segments compiled or found in _BUILT so far (a graph's call that moved it compiled)


def compilations(since: int = 0) -> list:
    """The DynamoGraphs still in use, in the order they were compiled, numbered from `since` on (each:
    .number, .strategy, .summary(), .programs(), .reports())."""
    live = [g for g in (r() for r in _COMPILED) if g is not None]
    _COMPILED[:] = [weakref.ref(g) for g in live]
    return [g for g in live if g.number >= since]


def compiled_count() -> int:
    """How many Dynamo graphs this process has compiled (the next graph's .number)."""
    return _next_number[0]


_next_number = [0]


def kfuse_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """The backend: torch.compile(..., options={...}) passes kfuse.compile's options (checked by name)."""
    options = {**(options or {}), **kwargs}
    mode = options.pop("mode", None)
    if mode not in (None, "default"):
        warnings.warn(f"kfuse: torch.compile's mode={mode!r} does not apply to backend='kfuse' (its kernel choices are "
                      f"timed at compile time; options={{'cuda_graphs': ...}} chooses CUDA graphs)", stacklevel=2)
    warn_if_grad(example_inputs, "a graph", stacklevel=2)
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    options = check_options(options.pop("backend", None) or ("triton" if cuda else "cpu"), options)
    graph = DynamoGraph(gm, list(example_inputs), options)
    graph.number, _next_number[0] = _next_number[0], _next_number[0] + 1
    _COMPILED.append(weakref.ref(graph))
    return graph


def register():
    from torch._dynamo import list_backends, register_backend
    if "kfuse" not in list_backends(exclude_tags=()):
        register_backend(name="kfuse")(kfuse_backend)


# -- what is static ------------------------------------------------------------------------------------------

def static_nodes(gm: torch.fx.GraphModule) -> dict:
    """node -> whether it runs on static shapes: its value and every value it reads have no symbolic size."""
    return {n: not _symbols(_val(n)) and not any(_symbols(_val(a)) for a in n.all_input_nodes)
            for n in gm.graph.nodes if n.op not in ("placeholder", "output")}


CONTRACTIONS = {operator.matmul, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.nn.functional.linear,
                torch._C._nn.linear, torch.nn.functional.conv1d, torch.nn.functional.conv2d, "matmul", "bmm", "mm"}
ATTENTION = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _hint(d) -> int:
    """A size at the example's value (a symbolic one by its hint; 64 where it has none)."""
    if isinstance(d, int):
        return d
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
        return int(optimization_hint(d, fallback=64))
    except Exception:    # noqa: BLE001 - no hint for this symbol
        return 64


def work(n: torch.fx.Node) -> int:
    """Rough work of a node at the example's sizes: multiply-adds for a contraction or attention, else
    the elements it writes (only the ratio between static and symbolic work is used)."""
    val = _val(n)
    if not isinstance(val, torch.Tensor):
        return 0
    out = 1
    for d in val.shape:
        out *= _hint(d)
    args = [_val(a) for a in n.all_input_nodes]
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim()]
    if n.target in CONTRACTIONS and tensors:
        x = tensors[1] if n.target in (torch.addmm, torch.baddbmm) and len(tensors) > 1 else tensors[0]
        return out * _hint(x.shape[-1] if n.target not in (torch.nn.functional.conv1d, torch.nn.functional.conv2d)
                           else x.shape[1])
    if n.target in ATTENTION and len(tensors) >= 2:
        return 2 * out * _hint(tensors[1].shape[-2])
    return out


# -- the compiled graph ---------------------------------------------------------------------------------------

class _Frozen(torch.nn.Module):
    """fn(*args) with the static inputs (parameters, buffers) held as buffers, so torch.export makes
    them constants, and ints and scalar tensors given by value: forward takes the other tensors.
    `sizes` maps an int argument to (tensor argument, dim) where it is that tensor's size: forward
    reads it there, so an export with symbolic sizes keeps it symbolic."""
    kfuse_label = "a Dynamo graph's segment"      # what a compile's progress calls it

    def __init__(self, fn, args: list, frozen: set, scalars: set, sizes: dict | None = None):
        super().__init__()
        self.fn = fn
        self.layout = []    # per argument: ("b", buffer name) | ("t", scalar) | ("v", int) | ("a", position in forward)
        #                     | ("s", (position in forward, dim))
        forward_pos = {}
        for i, a in enumerate(args):
            if i not in frozen and i not in scalars and isinstance(a, torch.Tensor):
                forward_pos[i] = len(forward_pos)
        n = 0
        for i, a in enumerate(args):
            if sizes and i in sizes:
                t, d = sizes[i]
                self.layout.append(("s", (forward_pos[t], d)))
            elif i in frozen:
                self.register_buffer(f"c{i}", a.detach(), persistent=False)
                self.layout.append(("b", f"c{i}"))
            elif i in scalars:
                self.layout.append(("t", a.item()))
            elif not isinstance(a, torch.Tensor):
                self.layout.append(("v", a))
            else:
                self.layout.append(("a", n))
                n += 1
        self.eval()     # Dynamo's graph holds its ops' modes itself (a train-mode BatchNorm is its own op)
        # where its values live by Dynamo's example values: a graph making tensors on the GPU from CPU
        # numbers alone (an arange of positions) has neither GPU inputs nor weights to tell (kfuse.api._gpu_of)
        graph = getattr(fn, "graph", None)
        vals = [_val(n) for n in graph.nodes] if graph is not None else []
        self.kfuse_device = next((v.device for v in vals if getattr(v, "is_cuda", False)), None)

    def forward(self, *live):
        # a scalar as torch.tensor(value): export reads such a constant's value (.item(), a size)
        return self.fn(*[getattr(self, v) if k == "b" else torch.tensor(v) if k == "t" else v if k == "v"
                         else live[v[0]].shape[v[1]] if k == "s" else live[v] for k, v in self.layout])


def _frozen_inputs(args) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and getattr(a, "_dynamo_static_input_type", None)]


def _scalar_inputs(gm: torch.fx.GraphModule, names: set | None = None) -> list[int]:
    """Positions of the inputs that Dynamo passes as 0-d tensors for Python numbers (a float module
    attribute, a length after a graph break): compiled in by value, like a shape."""
    out = []
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        arg = n.meta.get("grapharg")
        if (arg is not None and getattr(arg, "pass_arg_as_tensor", False)) or (names and n.name in names):
            out.append(i)
    return out


class Segment:
    """A callable compiled by kfuse on first call: fn with its frozen inputs as constants and its
    scalar inputs by value. Further calls check the frozen inputs are the same tensors, unchanged
    (identity and version counter), and the scalars the same numbers; if not, it compiles again.
    A graph kfuse cannot capture or compile runs by torch, with a warning and the reason kept."""

    def __init__(self, fn, options: dict, frozen: list[int] | None = None, scalars: list[int] = (),
                 symbolic: tuple[dict, dict] | None = None, exports: dict | None = None):
        self.fn, self.options = fn, options
        # exports shared by the segments of one graph that compute the same over other weights (its
        # layers): capture.fx.export's cache, keyed by _structure
        self.exports = exports
        self.frozen = frozen      # positions of frozen inputs; None: found on the first call's tensors
        self.scalars = list(scalars)
        # (tensor argument -> its symbolic dims, int argument -> (tensor argument, dim)): compile with
        # one export keeping those sizes symbolic, each size set converted from it (kfuse.compile's
        # dynamic_shapes); None: the sizes of the first call
        self.symbolic = symbolic
        self.builds = 0           # compilations by this segment (not counting those it found in _BUILT)
        self.reused = 0           # compiled models it took from another segment computing the same
        self._past_programs = 0   # programs of the compiled models this one replaced
        self.fallback = ""        # why torch runs this graph, if it does
        self._built = None        # (state, _Built, positions of the tensors it takes, whether it compiled
        #                           it), swapped whole
        self._numbers = _number_outputs(fn)

    def _build(self, args, state):
        fixed = set(self.frozen) | set(self.scalars)
        live = [i for i, a in enumerate(args) if i not in fixed and isinstance(a, torch.Tensor)]
        key, held = self._key(args)
        built, own = _BUILT.get(key) if key is not None else None, False
        if built is not None and built.holds(held):
            self.reused += 1
        else:
            cm = self._compile(args, live)
            if cm is None:
                return None
            self.builds, own = self.builds + 1, True
            built = _Built(cm, held)
            if key is not None:
                _BUILT[key] = built
        self._past_programs = self.programs
        self._built = (state, built, live, own)
        _set_up[0] += 1
        return self._built

    def _compile(self, args, live):
        dims, sizes = self.symbolic or ({}, None)
        dynamic = None
        if self.symbolic:
            from torch.export import Dim
            dynamic = (tuple({d: Dim.AUTO for d in dims.get(i, ())} for i in live),)
        frozen = _Frozen(self.fn, list(args), set(self.frozen), set(self.scalars), sizes)
        structure = _structure(self.fn) if self.exports is not None and not self.symbolic else None
        if structure is not None:
            frozen.kfuse_export = (self.exports, (structure, self._setting(args)))
        try:
            return compile(frozen, tuple(args[i] for i in live), dynamic_shapes=dynamic, **self.options)
        except KfuseError as e:
            self.fallback = str(e).splitlines()[0][:300]
            warnings.warn(f"kfuse: a graph of {len(self.fn.graph.nodes)} nodes runs by torch: {self.fallback}")
            return None

    def _key(self, args) -> tuple[tuple | None, list]:
        """(what the compiled model depends on, the tensors in it by identity): the graph's code, the
        tensors it holds and the frozen inputs (identity and version), and _setting. None: not shared
        (the graph reads an attribute that is not a tensor)."""
        attrs = [getattr(self.fn, n.target, None) for n in self.fn.graph.nodes if n.op == "get_attr"]
        if not all(isinstance(t, torch.Tensor) for t in attrs):
            return None, []
        held = [*self.fn.parameters(), *self.fn.buffers(), *attrs, *(args[i] for i in self.frozen)]
        return (self.fn.code, tuple((id(t), t._version) for t in held), self._setting(args)), held

    def _setting(self, args) -> tuple:
        """What a compile depends on besides the graph and the weights' values: every argument's shape,
        dtype, strides and device (other values by repr), which are frozen and which scalars, the
        scalars' values, the options, the symbolic sizes."""
        return (tuple((a.shape, a.dtype, a.stride(), a.device) if isinstance(a, torch.Tensor) else repr(a) for a in args),
                tuple(self.frozen), tuple(self.scalars), tuple(args[i].item() for i in self.scalars),
                repr(sorted(self.options.items())), repr(self.symbolic))

    @property
    def programs(self) -> int:
        """kfuse programs compiled by this segment (one per size set where it has symbolic sizes; none
        for a compiled model found in _BUILT)."""
        own = self._built is not None and self._built[3]
        return self._past_programs + (len(self.cm.signatures) if own else 0)

    @property
    def cm(self):
        """The compiled model of the latest build, or None."""
        return None if self._built is None else self._built[1].cm

    def _state(self, args):
        return tuple((id(args[i]), args[i]._version) for i in self.frozen) + tuple(args[i].item() for i in self.scalars)

    def __call__(self, *args):
        if self.fallback:
            return self.fn(*args)
        if self.frozen is None:
            self.frozen = _frozen_inputs(args)
        state = self._state(args)
        built = self._built
        if built is None or built[0] != state:
            with _COMPILING:      # one compilation at a time (api._COMPILING): two first calls compile once
                built = self._built
                if built is None or built[0] != state:
                    built = self._build(args, state)
                    if built is None:
                        return self.fn(*args)
        _, shared, live, _ = built
        outs = shared.cm(*[args[i] for i in live])
        if self._numbers:        # an int the graph returns (a cache length): a 0-d tensor where computed
            outs = list(outs)
            for i in self._numbers:
                if isinstance(outs[i], torch.Tensor):
                    outs[i] = outs[i].item()
            outs = tuple(outs)
        return outs


class _Built:
    """A segment's compiled model, kept in _BUILT for segments computing the same (weakly: the
    segments hold it), with weak references to the tensors its key names by identity: an id alone
    could be a new tensor's at the address of a freed one."""

    def __init__(self, cm, held: list):
        self.cm = cm
        self._held = [weakref.ref(t) for t in held]

    def holds(self, held: list) -> bool:
        return len(held) == len(self._held) and all(r() is t for r, t in zip(self._held, held))


class DynamoGraph:
    """What kfuse_backend returns for one Dynamo graph: called with the graph's inputs (tensors, and
    ints for its symbolic sizes)."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list, options: dict):
        self.gm, self.options = gm, options
        self.frozen, self.scalars = _frozen_inputs(example_inputs), _scalar_inputs(gm)
        static = static_nodes(gm)
        self.n_ops = sum(1 for n in static if n.op != "get_attr")
        total = sum(work(n) for n in static) or 1
        self.static_share = sum(work(n) for n, s in static.items() if s) / total
        symbolic = not all(static.values()) or any(not isinstance(a, torch.Tensor) for a in example_inputs)
        if not symbolic:
            self.strategy, self.why = "static", "every size is static"
        elif self.static_share >= PARTITION_MIN_STATIC:
            self.strategy = "partitioned"
            self.why = f"{self.static_share:.0%} of the work is on static shapes"
        elif not any(n.target in CONTRACTIONS or n.target in ATTENTION for n in static):
            # mask or position arithmetic between graph breaks: nothing for fusion to save, and its
            # sizes change every call
            self.strategy, self.why = "torch", "symbolic sizes and no contraction: torch runs it as traced"
        else:
            self.strategy = "specialised"
            self.why = f"only {self.static_share:.0%} of the work is on static shapes: one program per size set"
        # KV-cache concatenations the graph returns: handed out as views of growable buffers
        # (runtime/kvcache.py); where torch runs them (symbolic sizes) they append in place
        self._appends = _cache_appends(gm)
        self._specialised: dict[tuple, Segment] = {}
        self._segments: list[Segment] = []
        self._exports: dict = {}      # one torch.export per distinct static segment (Segment.exports)
        self._run = None
        # specialised: one segment for every size set, exported once with symbolic sizes, where
        # every int input is a tensor's size (else a segment, and an export, per size set)
        self._shared = None
        if self.strategy == "specialised":
            symbolic = _symbolic_inputs(gm, self.frozen)
            if symbolic is not None:
                self._shared = Segment(gm, options, self.frozen, self.scalars, symbolic)
            else:
                self.why += "; traced per size set (an int input is not the size of a tensor input)"
        self.n_symbolic_ops = 0
        # a partitioned graph's calls as one C call (dynamo_step.Step), tried at its STEP_AFTER-th call (its
        # segments have native runners by then); step_why: why not, where it was tried and is not
        self._step, self._step_after, self._step_tries, self.step_why = None, STEP_AFTER, STEP_TRIES, ""
        if self.strategy == "static":
            self._run = Segment(gm, options, self.frozen, self.scalars)
            self._segments.append(self._run)
        elif self.strategy == "partitioned":
            self._run = self._partition(static)
        elif self.strategy == "torch":
            self._run = gm
        self._strides = _output_strides(gm)

    def __call__(self, *args):
        set_up, t = _set_up[0], time.perf_counter()
        outs = self._call(*args)
        if _set_up[0] != set_up:       # this call compiled segments: a first call shows what it took
            progress.finished(f"compiled Dynamo graph {self.number} ({self.strategy}, {len(self._segments)} kfuse "
                              f"segment(s)) and ran it", time.perf_counter() - t)
        strides = self._strides
        if self._appends:
            outs, adopted = _adopt(outs, self._appends, args)
            strides = {i: st for i, st in strides.items() if i not in adopted}    # a growable cache's view
        if strides:
            outs = _restride(outs, strides)
        return outs

    def _call(self, *args):
        if self._run is None:       # specialised: one Segment per size set
            key = tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)
            seg = self._specialised.get(key)
            if seg is None:
                if len(self._specialised) >= MAX_SPECIALISED:
                    self.strategy = "partitioned"
                    self.why += f"; partitioned after {MAX_SPECIALISED} size sets"
                    self._run = self._partition(static_nodes(self.gm))
                    return self._run(*args)
                seg = self._specialised[key] = self._shared or Segment(self.gm, self.options, self.frozen, self.scalars)
                if seg not in self._segments:
                    self._segments.append(seg)
            return seg(*args)
        step = self._step
        if step is not None:
            outs = step(args)
            if outs is not None:
                return outs
        elif self._step_after and self.strategy == "partitioned":
            self._step_after -= 1
            if not self._step_after:
                return self._first_step(args)
        return self._run(*args)

    def _first_step(self, args):
        """This call's outputs, with the graph's calls tried as one C call (dynamo_step.setup)."""
        outs, self._step, why = dynamo_step.setup(self._run, Segment, args)
        if self._step is None and why.startswith("its first call"):
            self._step_tries -= 1
            self._step_after = STEP_AFTER if self._step_tries else 0
        self.step_why = why
        return outs

    def _partition(self, static: dict):
        """gm split into runs of static ops (each a Segment compiled by kfuse) and the ops between."""
        from torch.fx.passes.split_module import split_module
        _erase_unused(self.gm)      # a size read and dropped (a cache's numel) would split a static run
        # size arithmetic (a cache length plus one) between static ops would split their run too: each
        # moves to the first op torch runs after its inputs, else to its first reader
        for n in reversed(list(self.gm.graph.nodes)):
            if _size_arithmetic(n) and n.users:
                nodes = list(self.gm.graph.nodes)
                first = min(nodes.index(u) for u in n.users)
                after = max((nodes.index(a) for a in n.all_input_nodes), default=-1)
                to = next((m for m in nodes[after + 1:first] if m is not n and m.op not in ("placeholder", "get_attr")
                           and not static.get(m, True) and not _size_arithmetic(m)), nodes[first])
                to.prepend(n)
        live = set(self.gm.graph.nodes)
        static = {n: s for n, s in static.items() if n in live}
        kind_of = dict(static)      # True: in a kfuse segment
        out = next(n for n in self.gm.graph.nodes if n.op == "output").args[0]
        for i, c in self._appends.items():
            node = c.cat
            if node.target is not kvcache.append and not static[node] and node.all_input_nodes[0].op == "placeholder":
                node.target, node.args, node.kwargs = kvcache.append, node.args[:1], {"dim": c.axis}
            if c.rows is not None and node.target is kvcache.append:    # the window stays a view of the buffer
                out[i].target, out[i].args, out[i].kwargs = kvcache.window, (node, c.rows), {"dim": c.axis}
                kind_of[out[i]] = False
        self.gm.recompile()
        runs = []       # [static, nodes] in graph order
        for n in self.gm.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if runs and runs[-1][0] == kind_of[n]:
                runs[-1][1].append(n)
            else:
                runs.append([kind_of[n], [n]])
        # a static run of views and size arithmetic alone, or of less work than SMALL_RUN, joins the torch
        # runs beside it: torch runs such ops in a few us, a kfuse program's call costs ~20-40 us
        part, pid, prev = {}, 0, None
        for kind, nodes in runs:
            kind = kind and not all(_cheap(n) for n in nodes) and sum(work(n) for n in nodes) >= SMALL_RUN
            if prev is not None and kind != prev:
                pid += 1
            for n in nodes:
                part[n], kind_of[n] = pid, kind
            prev = kind
        split = split_module(self.gm, None, lambda n: part[n], keep_original_order=True)
        kinds = {f"submod_{pid}": kind_of[n] for n, pid in part.items()}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        scalar_names = {placeholders[i].name for i in self.scalars}
        for n in split.graph.nodes:     # each static run's call becomes a call of its Segment
            if n.op == "call_module" and kinds.get(n.target) and _computes(getattr(split, n.target)):
                sub = getattr(split, n.target)
                seg = Segment(sub, self.options, None, _scalar_inputs(sub, scalar_names), exports=self._exports)
                seg.__name__, seg.__module__ = f"kfuse_{n.target}", __name__
                self._segments.append(seg)
                n.op, n.target = "call_function", seg
            elif n.op == "call_module" and not kinds.get(n.target):
                _attention_by_kfuse(getattr(split, n.target))
        split.recompile()
        self.n_symbolic_ops = sum(1 for n, s in static.items() if not s and n.op != "get_attr")
        return split

    def programs(self) -> int:
        """kfuse programs compiled so far for this graph."""
        return sum(s.programs for s in self._segments)

    def reports(self) -> list:
        return [s.cm.report() for s in self._segments if s.cm is not None]

    def summary(self) -> str:
        line = f"kfuse on a Dynamo graph of {self.n_ops} ops: {self.strategy} ({self.why}); {self.programs()} kfuse program(s)"
        if self.strategy == "partitioned":
            line += f", {len(self._segments)} static segment(s), {self.n_symbolic_ops} op(s) run by torch on symbolic sizes"
            reused = sum(1 for s in self._segments if s.reused)
            if reused:
                line += f"; {reused} segment(s) run a program compiled for an identical segment of another graph"
        elif self.strategy == "specialised":
            line += f" for {len(self._specialised)} size set(s)"
            cm = self._shared.cm if self._shared is not None else None
            if cm is not None:
                line += ("; each converted from one export with symbolic sizes" if not cm.symbolic_why
                         else f"; traced per size set where needed: {cm.symbolic_why}")
        if self._step is not None:
            line += f"; {self._step.describe()}"
        elif self.step_why:
            line += f"; steps not one C call: {self.step_why}"
        fallbacks = [s.fallback for s in self._segments if s.fallback]
        if fallbacks:
            line += f"; {len(fallbacks)} graph(s) run by torch: {fallbacks[0]}"
        return line


def _symbolic_inputs(gm: torch.fx.GraphModule, frozen: list[int]) -> tuple[dict, dict] | None:
    """(tensor input -> its symbolic dims, int input -> (tensor input, dim) holding that size) from
    Dynamo's example values, or None where an int input is a size no tensor input has as a dim (a
    sum of sizes, a position): such a graph is traced per size set."""
    values = [_val(n) for n in gm.graph.nodes if n.op == "placeholder"]
    dims, where = {}, {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and i not in frozen:
            for d, size in enumerate(v.shape):
                if isinstance(size, torch.SymInt):
                    dims.setdefault(i, []).append(d)
                    where.setdefault(size.node.expr, (i, d))
    sizes = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.SymInt):
            if v.node.expr not in where:
                return None
            sizes[i] = where[v.node.expr]
        elif isinstance(v, torch.SymFloat):
            return None
    return dims, sizes


def _structure(gm: torch.fx.GraphModule) -> tuple | None:
    """What a graph computes, without its names: each node's op, target, arguments (nodes by their
    position, literals as they are) and traced shape and dtype. Segments of equal structure over
    equal shapes export to one ATen graph; None where the graph reads attributes or submodules of
    its own (their values are not in it)."""
    index, out = {}, []
    for i, n in enumerate(gm.graph.nodes):
        if n.op in ("get_attr", "call_module"):
            return None
        index[n] = i
        args = torch.fx.node.map_aggregate((n.args, n.kwargs), lambda a: ("node", index[a]) if isinstance(a, torch.fx.Node)
                                           else a)
        val = _val(n)
        meta = (tuple(map(int, val.shape)), val.dtype, tuple(map(int, val.stride()))) \
            if isinstance(val, torch.Tensor) and not _symbols(val) else repr(val) if n.op == "placeholder" else None
        target = None if n.op == "placeholder" else n.target if isinstance(n.target, str) else \
            (getattr(n.target, "__module__", None), getattr(n.target, "__qualname__", repr(n.target)))
        out.append((n.op, target, repr(args), meta))
    return tuple(out)


def _attention_by_kfuse(gm: torch.fx.GraphModule) -> None:
    """The SDPA calls of a graph that runs by torch on symbolic sizes, made calls of `sdpa`: keys and
    values repeated per query head (Hugging Face's repeat_kv, used where a mask rules out torch's GQA)
    read unrepeated with enable_gqa; one whose keys and values are KV-cache appends (along the sequence
    axis, read by nothing else but the graph's outputs and windows of them it returns) a call of
    `sdpa_appending`, which writes the new rows inside the attention kernel."""
    hit = False
    outputs = set(_outputs(gm))
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in ATTENTION:
            continue
        n.target, hit = sdpa, True
        if len(n.args) < 3:
            continue
        repeated = [_repeated_kv(a) for a in n.args[1:3]]
        if repeated[0] and repeated[1] and repeated[0][1] == repeated[1][1]:
            n.args = (n.args[0], repeated[0][0], repeated[1][0], *n.args[3:])
            n.kwargs = {**n.kwargs, "enable_gqa": True}
            _erase_unused(gm)       # the repeats, so the caches' readers are the attention's own
        k, v = n.args[1:3]
        windows = [u for a in (k, v) if isinstance(a, torch.fx.Node) for u in a.users if u.target is kvcache.window]
        if not (all(isinstance(a, torch.fx.Node) and a.target is kvcache.append and len(a.args) == 1
                    and a.kwargs.get("dim") in (-2, 2) and set(a.users) <= {n, *outputs, *windows} for a in (k, v))
                and all(set(w.users) <= outputs for w in windows)):
            continue
        with gm.graph.inserting_before(n):
            fused = gm.graph.call_function(sdpa_appending, (n.args[0], k.args[0], v.args[0], *n.args[3:]),
                                           {**n.kwargs, "dim": -2})
            parts = [gm.graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
        for old, new in zip((n, k, v), parts):
            old.replace_all_uses_with(new)
            gm.graph.erase_node(old)
        for w in windows:       # views of the caches, returned: after the call that makes them
            next(iter(outputs)).prepend(w)
    if hit:
        gm.recompile()


def _repeated_kv(n) -> tuple[torch.fx.Node, int] | None:
    """(x, r) where n is x's heads each repeated r times: x[:, :, None].expand(b, h, r, s, d).reshape(b, h * r,
    s, d), as Hugging Face's repeat_kv writes it (query head i reads key head i // r, as SDPA's enable_gqa)."""
    if not (isinstance(n, torch.fx.Node) and n.target in ("reshape", torch.reshape) and n.args
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].target == "expand"):
        return None
    e = n.args[0]
    g = e.args[0]
    whole = slice(None, None, None)
    if not (isinstance(g, torch.fx.Node) and g.target is operator.getitem and isinstance(g.args[0], torch.fx.Node)
            and isinstance(g.args[1], tuple) and len(g.args[1]) == 5 and g.args[1][2] is None
            and all(isinstance(a, slice) and a == whole for j, a in enumerate(g.args[1]) if j != 2)):
        return None
    x, ve, vn = _val(g.args[0]), _val(e), _val(n)
    if not all(isinstance(t, torch.Tensor) for t in (x, ve, vn)) or x.dim() != 4 or ve.dim() != 5 or vn.dim() != 4:
        return None
    r = ve.shape[2]
    same = [str(a) for a in ve.shape] == [str(a) for a in (*x.shape[:2], r, *x.shape[2:])] and \
        [str(a) for a in vn.shape] == [str(a) for a in (x.shape[0], x.shape[1] * r, *x.shape[2:])]
    return (g.args[0], r) if isinstance(r, int) and same else None


def _erase_unused(gm: torch.fx.GraphModule) -> None:
    """Remove the views, getitems and size arithmetic no one reads any more (a repeat_kv folded away)."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if not n.users and n.op in ("call_function", "call_method") and _cheap(n):
                gm.graph.erase_node(n)
                changed = True


def _outputs(gm: torch.fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "output"]


def _traced_outputs(gm: torch.fx.GraphModule) -> list:
    """The value Dynamo traced for each output of the graph (None for a literal), in order."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, (tuple, list)):
        return []
    return [_val(a) if isinstance(a, torch.fx.Node) else None for a in out]


def _number_outputs(gm: torch.fx.GraphModule) -> list[int]:
    """Positions of the outputs the graph returns as Python numbers (SymInts, ints, floats)."""
    return [i for i, v in enumerate(_traced_outputs(gm))
            if isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool)]


def _output_strides(gm: torch.fx.GraphModule) -> dict[int, tuple]:
    """Output position -> the strides Dynamo traced for it, where they are static numbers. Dynamo's
    guards on the next call check them (a KV cache fed back in): kfuse's outputs must match."""
    return {i: tuple(v.stride()) for i, v in enumerate(_traced_outputs(gm))
            if isinstance(v, torch.Tensor) and not _symbols(v)}


def _restride(outs, strides: dict):
    """outs with each output that kfuse laid out differently copied into the traced strides."""
    fixed = None
    for i, want in strides.items():
        t = outs[i]
        if isinstance(t, torch.Tensor) and t.stride() != want:
            fixed = fixed or list(outs)
            fixed[i] = torch.empty_strided(t.shape, want, dtype=t.dtype, device=t.device).copy_(t)
    return outs if fixed is None else type(outs)(fixed) if isinstance(outs, tuple) else fixed


def _computes(gm: torch.fx.GraphModule) -> bool:
    """Whether a segment does work worth a kfuse call (not only views, getitems and size arithmetic)."""
    return not all(_cheap(n) for n in gm.graph.nodes)

