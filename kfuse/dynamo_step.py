"""A decode step as one C call: a partitioned Dynamo graph's kfuse segments and KV-cache attention calls
composed into one sequence of C calls.

A decode step's graph (kfuse/dynamo.py, "partitioned") alternates kfuse segments (a layer's projections,
norms and MLP, each a native program: kfuse/runtime/native.py) with torch-run pieces that append the new
keys and values to the caches and attend (`sdpa_appending`). Each of those ~13 calls a step runs its
Python cold, after the weight-streaming GEMVs before it have flushed the caches: in a Llama-style step of
4.3 ms, ~1.1 ms went to that Python (segments' layers 0.44 ms, the attention calls' Python ~0.4, the split
graph's glue 0.25; bench/README.md). `Step` runs the same kernels from one generated call: the segments'
recorded runs and one attention kernel call per layer, their intermediate tensors (q, the new rows, the
attention's output, the residual stream) at fixed addresses owned by the step, the caches grown in place
for every layer before it (kvcache.grow), the outputs the caller gets (the logits) fresh each call.

It serves a graph made only of such pieces (placeholders, segments whose native programs are moves, runs
and fresh outputs, attention pieces that are one `sdpa_appending` call without a mask or causal frontier,
their getitems, the output), and a call only where everything is as the step was set up: each segment
still built as then with its weights unchanged, the inputs of the programs' shapes and dtypes on the CPU,
the thread count the runs were recorded with, every program's arena free (no concurrent caller) and every
cache the latest view of its buffer with a row to spare. Otherwise the call returns None and the graph
runs as partitioned (a cache's regrowth, once in a few hundred tokens; another thread's call).
"""
from __future__ import annotations

import ctypes
import operator
import threading

import torch

from . import config
from .backends import openmp
from .backends.c import attention as c_attention
from .backends.c.compiler import load
from .dynamo_graph import _val
from .runtime import kvcache
from .runtime.native import _same

_SOURCE = r"""/* a decode step's C calls in order (kfuse/dynamo_step.py) */
#include <stdint.h>
typedef int (*kf_run_fn)(void *const *, const void *);
typedef void (*kf_attn_fn)(const void *, int);
/* ops: n entries of 4 int64: kind (0: a native program's run, 1: an attention call), the function, its two
   arguments. 0, or 1 + the index of the run that could not allocate its buffers. */
int kf_step(const int64_t *ops, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t *op = ops + 4 * i;
        if (op[0] == 0) {
            if (((kf_run_fn)(intptr_t)op[1])((void *const *)(intptr_t)op[2], (const void *)(intptr_t)op[3]))
                return (int)i + 1;
        } else
            ((kf_attn_fn)(intptr_t)op[1])((const void *)(intptr_t)op[2], (int)op[3]);
    }
    return 0;
}
"""


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, new=None):
    """torch's scaled_dot_product_attention, by kfuse's attention kernel (split-KV for one query)
    where it computes the same: float32 4-D CPU tensors, no dropout, a causal frontier only where
    torch's top-left alignment is the kernel's bottom-right one (equal lengths). Sizes are read at
    the call, so it serves the symbolic KV length of a decode step. `new`: (k_new, v_new), rows to
    write into the last rows of k and v first (by the kernel where it runs, else copied)."""
    # shapes read once: this runs once per layer and decode step
    qs, ks, vs, f32 = q.shape, k.shape, v.shape, torch.float32
    kernel = (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and vs[:3] == ks[:3] and qs[3] == ks[3] and qs[0] == ks[0]
              and (ks[1] == qs[1] or (enable_gqa and ks[1] > 0 and qs[1] % ks[1] == 0))
              and not dropout_p and not (is_causal and qs[2] != ks[2]) and q.is_cpu
              and q.dtype == f32 and k.dtype == f32 and v.dtype == f32
              and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
              and (attn_mask is None or attn_mask.dtype in (f32, torch.bool)))
    if new is not None and not (kernel and all(t.dtype == f32 and t.dim() == 4 and t.stride(-1) == 1 for t in new)):
        for dst, t in zip((k, v), new):
            kvcache.write_rows(dst, t, -2)
        new = None
    if not kernel:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                                enable_gqa=enable_gqa)
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else scale
    # checked above (dtypes, ranks, last-dim strides, heads), and `new` holds rows of k and v (kvcache.reserve)
    return c_attention.attention(q, k, v, attn_mask, scale=scale, causal=is_causal, zero_masked=True, new=new,
                                 check=False)


def sdpa_appending(q, keys, values, *args, dim: int, **kwargs):
    """(sdpa(q, k, v, ...), k, v) for k, v = kvcache.append(keys, dim), kvcache.append(values, dim): where
    both caches grow in place, their new rows are written by the attention kernel as it starts instead
    of copied by torch before it (a decode step's cache update, inside the kernel)."""
    k, k_pending = kvcache.reserve(keys, dim)
    v, v_pending = kvcache.reserve(values, dim)
    if k_pending and v_pending and keys[1].shape == values[1].shape:
        return sdpa(q, k, v, *args, new=(keys[1], values[1]), **kwargs), k, v
    for out, pending, t in ((k, k_pending, keys[1]), (v, v_pending, values[1])):
        if pending:
            kvcache.write_rows(out, t, dim)
    return sdpa(q, k, v, *args, **kwargs), k, v


class NotStepped(Exception):
    """Why a graph's calls do not run as one C call."""


class _Seg:
    """One segment of the graph, as the step set it up. A segment whose program runs anything from Python (a
    torch op: the embedding's gather) and reads only the graph's inputs is `pre`: it runs through its usual
    call before the C call, and what it computes is read where it is, each call."""

    def __init__(self, seg, node, source: dict, pre_ok):
        if seg.fallback or seg._built is None or seg._numbers:
            raise NotStepped("a segment that torch runs, not yet built, or returning ints")
        self.seg, self.built = seg, seg._built
        _, shared, live, _ = self.built
        cm = shared.cm
        prog = cm._last
        runner = prog._native
        args = node.args
        self.pre = runner is None or runner.parts is None or prog._graphed is not None
        if self.pre:
            if prog.graph.mutated:      # run again by the partitioned graph where the step declines a call
                raise NotStepped("a segment with Python steps that writes into its inputs")
            self._outputs(cm, prog)
            self.call = _pre_call(args, source, pre_ok)
            self.meta = [(tuple(o.shape), o.dtype) for o in prog.graph.outputs]
            return
        self._outputs(cm, prog)
        self.prog, self.runner, self.parts = prog, runner, runner.parts
        if not all(source.get(args[i], ("",))[0] == "arg" for i in (*seg.frozen, *seg.scalars)):
            raise NotStepped("a segment's weight or scalar that is not an input of the graph")
        self.frozen = [source[args[i]][1] for i in seg.frozen]
        self.scalars = [source[args[i]][1] for i in seg.scalars]
        if not all(isinstance(args[i], torch.fx.Node) and len(source.get(args[i], ())) in (2, 3) for i in live):
            raise NotStepped("a segment input that is not a tensor of the graph or of a piece")
        self.inputs = [(self.parts.inputs[k], source[args[i]]) for k, i in enumerate(live)]

    def _outputs(self, cm, prog) -> None:
        """single: the segment returns one tensor, not a tuple; NotStepped where it returns anything but tensors."""
        flat, spec = cm._flat_out, cm._out_spec
        self.single = spec is not None and spec.is_leaf()
        if cm._complex or prog.graph.literals or flat is None or flat[0] is not spec or not (flat[1] or self.single):
            raise NotStepped("a segment with complex inputs or non-tensor outputs")

    def current(self, args) -> bool:
        """Whether the segment is built as at setup, for these weights (identity and version) and scalars."""
        state = tuple((id(args[p]), args[p]._version) for p in self.frozen) + tuple(args[p].item() for p in self.scalars)
        return self.seg._built is self.built and state == self.built[0] and self.prog._native is self.runner

    def run(self, args, value: dict) -> tuple:
        """A pre segment's outputs for the graph's inputs `args` and the earlier pre pieces' outputs `value`."""
        outs = self.seg(*_pre_args(self.call, args, value))
        return (outs,) if self.single else outs


class _TorchPre:
    """A piece torch runs (not an attention call) before the first attention call, reading only the graph's
    inputs and earlier pre pieces' outputs (Mistral's embedding, positions and window arithmetic): it runs as
    it is before the C call, and what it computes is read where it is."""
    pre = True

    def __init__(self, sub, node, source: dict, pre_ok):
        # run again by the partitioned graph where the step declines a call: nothing it does may write
        if any(n.op in ("call_function", "call_method") and (n.target is operator.setitem
                                                              or getattr(n.target, "__name__", str(n.target)).endswith("_"))
               for n in sub.graph.nodes):
            raise NotStepped("a piece torch runs that writes into a tensor, before the attention")
        self.sub, self.call = sub, _pre_call(node.args, source, pre_ok)
        out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
        self.single = not isinstance(out, (tuple, list))
        vals = [_val(o) if isinstance(o, torch.fx.Node) else o for o in ((out,) if self.single else out)]
        self.meta = [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (None, None) for v in vals]

    def run(self, args, value: dict) -> tuple:
        outs = self.sub(*_pre_args(self.call, args, value))
        return (outs,) if self.single else outs


def _pre_call(args, source: dict, pre_ok) -> list:
    """The sources of a pre piece's arguments: ("arg", i), a pre piece's output, or ("literal", value)."""
    call = [source.get(a) if isinstance(a, torch.fx.Node) else ("literal", a) for a in args]
    if not all(c and (c[0] == "literal" or pre_ok(c)) for c in call):
        raise NotStepped("a segment with Python steps, or a piece torch runs, after a piece of the C call")
    return call


def _pre_args(call: list, args, value: dict) -> list:
    return [c[1] if c[0] == "literal" else args[c[1]] if c[0] == "arg" else value[c] for c in call]


def _attention_call(sub) -> tuple:
    """(the sdpa_appending node, sub's placeholders, what each of its outputs is: ("result", i) for result i
    of the call, ("window", i, rows) for kvcache.window(result i, rows), ("int", node) for size arithmetic on
    its int inputs) of a torch-run piece that is one such call and those; NotStepped where it is anything else."""
    calls = [n for n in sub.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    appending = [n for n in calls if n.target is sdpa_appending]
    if len(appending) != 1:
        raise NotStepped("a piece torch runs that is not one cache append and attention")
    call = appending[0]
    kw = call.kwargs
    mask = kw.get("attn_mask")
    if len(call.args) != 3 or not (mask is None or (isinstance(mask, torch.fx.Node) and mask.op == "placeholder")) \
            or kw.get("dropout_p", 0.0) or kw.get("is_causal") or kw.get("dim") not in (-2, 2) \
            or set(kw) - {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "dim"}:
        raise NotStepped("an attention call with dropout, a causal frontier or a mask computed in its piece")
    ints = set()                # size arithmetic: ints from the piece's int inputs
    for n in sub.graph.nodes:
        if n.op == "placeholder" and isinstance(_val(n), (int, torch.SymInt)):
            ints.add(n)
        elif n.op == "call_function" and n is not call and n.target is not kvcache.window and n.target is not operator.getitem:
            if not (isinstance(_val(n), (int, torch.SymInt)) and all(i in ints for i in n.all_input_nodes)):
                raise NotStepped("a piece torch runs that is not one cache append and attention")
            ints.add(n)
    out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    what = []
    for o in out if isinstance(out, (tuple, list)) else (out,):
        result = lambda x: x.args[1] if isinstance(x, torch.fx.Node) and x.target is operator.getitem \
            and x.args[0] is call else None    # noqa: E731
        if result(o) is not None:
            what.append(("result", result(o)))
        elif isinstance(o, torch.fx.Node) and o.target is kvcache.window and result(o.args[0]) in (1, 2) \
                and isinstance(o.args[1], int) and o.kwargs.get("dim", o.args[2] if len(o.args) > 2 else None) in (2, -2):
            what.append(("window", result(o.args[0]), o.args[1]))
        elif o in ints:
            what.append(("int", o))
        else:
            raise NotStepped("an attention piece returning something else")
    return call, [n for n in sub.graph.nodes if n.op == "placeholder"], what


def _appends(sub) -> bool:
    return any(n.target is sdpa_appending for n in sub.graph.nodes)


def _ints(n: torch.fx.Node, bound: dict, args):
    """The int a piece's size-arithmetic node computes, for the graph's inputs `args` (bound: the piece's
    placeholders -> the graph's input positions)."""
    if n.op == "placeholder":
        return args[bound[n]]
    get = lambda a: _ints(a, bound, args) if isinstance(a, torch.fx.Node) else a   # noqa: E731
    return n.target(*torch.fx.node.map_aggregate(n.args, get), **torch.fx.node.map_aggregate(n.kwargs, get))


def _attention_fits(q, kn, vn, gqa: bool) -> bool:
    """Whether the kernel computes torch's SDPA for q and new rows kn, vn (the caches' layout along heads and dims)."""
    return q.dim() == 4 and kn.dim() == 4 and vn.dim() == 4 and vn.shape[:3] == kn.shape[:3] and q.shape[0] == kn.shape[0] \
        and q.shape[3] == kn.shape[3] and (q.shape[1] == kn.shape[1] or (gqa and q.shape[1] % kn.shape[1] == 0)) \
        and all(t.dtype == torch.float32 and t.stride(-1) == 1 and t.is_cpu for t in (q, kn, vn))


class Step:
    """The graph's calls as one C call (see the module docstring); `step(args)` -> the graph's outputs, or
    None where this call must run as partitioned."""

    def __init__(self, split: torch.fx.GraphModule, segment_type):
        source: dict = {}           # fx node -> ("arg", i) | ("seg", s, j) | ("attn", a, which) | a Python value
        self.segs: list[_Seg] = []
        self.layers: list[dict] = []
        order: list = []            # ("seg", s) | ("attn", a), in graph order
        placeholders = 0
        outputs = None
        pre_ok = lambda src: src[0] == "arg" or (src[0] == "seg" and self.segs[src[1]].pre)  # noqa: E731
        for n in split.graph.nodes:
            if n.op == "placeholder":
                source[n], placeholders = ("arg", placeholders), placeholders + 1
            elif n.op == "call_function" and isinstance(n.target, segment_type):
                self.segs.append(_Seg(n.target, n, source, pre_ok))
                order.append(("seg", len(self.segs) - 1))
                source[n] = (*order[-1], 0) if self.segs[-1].single else order[-1]
            elif n.op == "call_module" and not self.layers and not _appends(getattr(split, n.target)):
                self.segs.append(_TorchPre(getattr(split, n.target), n, source, pre_ok))
                order.append(("seg", len(self.segs) - 1))
                source[n] = (*order[-1], 0) if self.segs[-1].single else order[-1]
            elif n.op == "call_module":
                call, params, what = _attention_call(getattr(split, n.target))
                bound = dict(zip(params, n.args))
                arg = lambda a: source.get(bound.get(a, a), None) if isinstance(a, torch.fx.Node) else None  # noqa: E731
                (kc, kn), (vc, vn) = call.args[1], call.args[2]
                layer = dict(q=arg(call.args[0]), kc=arg(kc), kn=arg(kn), vc=arg(vc), vn=arg(vn), what=what,
                             scale=call.kwargs.get("scale"), gqa=call.kwargs.get("enable_gqa", False),
                             mask=arg(call.kwargs.get("attn_mask")))
                if call.kwargs.get("attn_mask") is not None and not (layer["mask"] and len(layer["mask"]) in (2, 3)
                                                                      and layer["mask"][0] in ("arg", "seg")):
                    raise NotStepped("an attention mask that is not the graph's or a segment's tensor")
                ints = {p: source.get(a, ("",))[1] for p, a in bound.items() if source.get(a, ("",))[0] == "arg"}
                if any(w[0] == "int" for w in what) and any(isinstance(_val(p), (int, torch.SymInt)) and p not in ints
                                                             for p in params):
                    raise NotStepped("size arithmetic on an int that is not an input of the graph")
                layer["ints"] = ints
                if not all(layer[x] and layer[x][0] == "seg" and len(layer[x]) == 3 for x in ("q", "kn", "vn")) \
                        or not all(layer[x] and layer[x][0] == "arg" for x in ("kc", "vc")):
                    raise NotStepped("an attention call whose tensors are not a segment's and the graph's caches")
                self.layers.append(layer)
                source[n] = ("attn", len(self.layers) - 1)
                order.append(source[n])
            elif n.op == "call_function" and n.target is operator.getitem and source.get(n.args[0], ("",))[0] in ("seg", "attn") \
                    and len(source[n.args[0]]) == 2:
                kind, i = source[n.args[0]]
                w = ("result", n.args[1]) if kind == "seg" else self.layers[i]["what"][n.args[1]]
                # a result i of layer a: ("attn", a, i); its window: ("window", a, i, rows); an int: ("int", a, node)
                source[n] = (kind, i, n.args[1]) if kind == "seg" else ("attn", i, w[1]) if w[0] == "result" \
                    else ("window", i, *w[1:]) if w[0] == "window" else ("int", i, w[1])
            elif n.op == "output":
                outputs = [source.get(o) if isinstance(o, torch.fx.Node) else None for o in n.args[0]]
            else:
                raise NotStepped(f"a {n.op} of {getattr(n.target, '__name__', n.target)}")
        if not self.layers or outputs is None or not all(o and (o[0] == "arg" or len(o) >= 3) for o in outputs):
            raise NotStepped("no attention call, or an output that is not a tensor the pieces compute")
        if any(o[0] == "attn" and o[2] == 0 for o in outputs):
            raise NotStepped("an attention output returned by the graph")
        self.outputs = outputs
        self._wire(order, outputs)
        stepped = [s for s in self.segs if not s.pre]
        if not stepped:
            raise NotStepped("no segment with a native program of runs only")
        self.threads = stepped[0].runner.threads
        if any(s.runner.threads != self.threads for s in stepped):
            raise NotStepped("segments recorded with different thread counts")
        self._lib = load(_SOURCE)
        self._fn = self._lib.kf_step
        self._fn.argtypes, self._fn.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int
        self._order = order
        self._decs = None           # the attention calls' argument structs: made at the first call (c_attention.Decode)
        self._ops = None
        self._busy = threading.Lock()

    def _wire(self, order: list, outputs: list) -> None:
        """The fixed tensors between the pieces, which moved pointers read them, and what is read where it is
        each call (the graph's inputs, a pre segment's outputs)."""
        pre = {si for si, s in enumerate(self.segs) if s.pre}
        if any(kind == "seg" and i in pre and any(k == "attn" for k, _ in order[:n]) for n, (kind, i) in enumerate(order)):
            raise NotStepped("a segment with Python steps after an attention call")
        for s in self.segs:
            if not s.pre and any(src[0] not in ("arg", "seg") and src[:1] + src[2:] != ("attn", 0) for _, src in s.inputs):
                raise NotStepped("a segment reading a cache or an int a torch piece computes")
        returned = {o for o in outputs if o[0] == "seg"}
        readers: dict = {}
        for s in self.segs:
            for m, src in () if s.pre else s.inputs:
                if m is not None and src[0] != "arg":
                    readers.setdefault(src, []).append(m)
        for layer in self.layers:
            for x in ("q", "kn", "vn", "mask"):
                if layer[x] is not None:
                    readers.setdefault(layer[x], []).append(None)      # read through the attention struct
        self.fixed: dict = {}       # ("seg", s, j) | ("attn", a, 0) -> (its tensor, the _Moved writing it, the view read)
        self.fresh, self.copied = [], []
        for si, s in enumerate(self.segs):
            for j, (m, view, recorded) in enumerate(() if s.pre else s.parts.outputs):
                key = ("seg", si, j)
                if key in returned:
                    if key in readers:
                        raise NotStepped("a segment's output both returned and read by a later piece")
                    # made fresh each call, or copied out of the tensor the run writes (as the program does)
                    (self.copied if m is None else self.fresh).append((key, m, view, recorded))
                elif m is None:     # read where the run writes it, in the program's arena (held in a step)
                    self.fixed[key] = (recorded, None, recorded)
                else:
                    t = m.fresh()
                    self.fixed[key] = (t, m, t if view is None else t.as_strided(*view))
        for a, layer in enumerate(self.layers):
            fixed = [self.fixed[layer[x]][2] for x in ("q", "kn", "vn") if layer[x][1] not in pre]
            if len(fixed) not in (0, 3) or (fixed and not _attention_fits(*fixed, gqa=layer["gqa"])):
                raise NotStepped("an attention call the kernel does not compute as torch does")
            layer["pre"] = not fixed
            q, vn = (self._meta(layer[x], pre) for x in ("q", "vn"))
            self.fixed[("attn", a, 0)] = (None, None, torch.empty(*q[0][:3], vn[0][-1]))
        # a segment reading a fixed tensor: its pointers moved there (no copy: the layouts must be the same);
        # one reading the graph's or a pre segment's tensor: moved (or copied) each call
        self.moves, self.feeds = [], []
        for s in self.segs:
            for m, src in () if s.pre else s.inputs:
                if m is None:
                    continue
                if src[0] == "arg" or (src[0] == "seg" and src[1] in pre):
                    self.feeds.append((m, src))
                    continue
                t = self.fixed[src][2]
                if (t.shape, t.dtype, t.stride()) != m.like:
                    raise NotStepped("a tensor between pieces in a layout the next program copies")
                self.moves.append((m, t.data_ptr()))

    def _meta(self, key, pre) -> tuple:
        """(shape, dtype) of a segment's output."""
        if key[1] in pre:
            return self.segs[key[1]].meta[key[2]]
        t = self.fixed[key][2]
        return tuple(t.shape), t.dtype

    def describe(self) -> str:
        stepped = [s for s in self.segs if not s.pre]
        runs = sum(len(s.parts.runs) for s in stepped)
        return (f"decode steps as one C call ({runs} native run(s) of {len(stepped)} program(s), "
                f"{len(self.layers)} attention call(s); {len(self.segs) - len(stepped)} piece(s) run before it)")

    def __call__(self, args):
        if not self._busy.acquire(blocking=False):      # another thread in a step: that call as partitioned
            return None
        try:
            if torch.is_grad_enabled():
                with torch.no_grad():
                    return self._call(args)
            return self._call(args)
        finally:
            self._busy.release()

    def _call(self, args):
        if not all(s.pre or s.current(args) for s in self.segs):
            return None
        value = {}                  # the pre segments' outputs, this call
        for si, s in enumerate(self.segs):
            if s.pre:
                value.update((("seg", si, j), t) for j, t in enumerate(s.run(args, value)))
        for m, src in self.feeds:
            t = args[src[1]] if src[0] == "arg" else value[src]
            if type(t) is not torch.Tensor or not t.is_cpu or t.shape != m.like[0] or t.dtype != m.like[1]:
                return None
        if (config.get().threads or openmp.threads()) != self.threads:
            return None
        held = []
        try:
            for s in self.segs:          # every program's arena, held as a lone caller holds it (Program.lone)
                if s.pre:
                    continue
                arena = s.prog.hold(s.runner)
                if arena is None:
                    return None
                held.append((s, arena))
            if self._decs is None:
                self._build(args, value)
            caches, masks = [], []
            for layer in self.layers:
                if layer["pre"]:        # q and the new rows where a pre piece put them: the first call's shapes
                    qkv = [value[layer[x]] for x in ("q", "kn", "vn")]
                    if [t.shape for t in qkv] != layer["shapes"] or not _attention_fits(*qkv, gqa=layer["gqa"]):
                        return None
                for c, new in (("kc", "kn"), ("vc", "vn")):
                    t = value[layer[new]] if layer["pre"] else self.fixed[layer[new]][2]
                    caches.append((args[layer[c][1]], t.shape, t.dtype))
                m = self._mask(layer, args, value)
                if m is not None:       # broadcastable to [B, H, Lq, Lk] of this step, of the first call's dtype
                    q = value[layer["q"]] if layer["pre"] else self.fixed[layer["q"]][2]
                    full = (*q.shape[:3], caches[-1][0].shape[2] + t.shape[2])
                    if type(m) is not torch.Tensor or m.dtype != layer["mask_dtype"] or not m.is_cpu or m.dim() > 4 \
                            or any(n not in (1, f) for n, f in zip(reversed(m.shape), reversed(full))):
                        return None
                masks.append(m)
            views = kvcache.grow(caches, 2)
            if views is None:
                return None
            for m, src in self.feeds:
                m(args[src[1]] if src[0] == "arg" else value[src])
            for m, p in self.moves:
                m._move(p)
            for t, m, _ in self.fixed.values():
                if m is not None:
                    m._move(t.data_ptr())
            for key, m, view, _ in self.fresh:
                t = m.fresh()
                value[key] = t if view is None else t.as_strided(*view)
            for a, (layer, dec) in enumerate(zip(self.layers, self._decs)):
                dec.keys(views[2 * a], views[2 * a + 1])
                if masks[a] is not None:
                    dec.mask(masks[a])
                if layer["pre"]:
                    dec.rows(*(value[layer[x]] for x in ("q", "kn", "vn")))
            rc = self._fn(self._ops_address, self._n_ops)
            if rc:
                raise MemoryError(f"a decode step's native run {rc - 1}: cannot allocate its buffers")
            for key, _, _, recorded in self.copied:
                value[key] = recorded.clone()
            for a in range(len(self.layers)):
                value[("attn", a, 1)], value[("attn", a, 2)] = views[2 * a], views[2 * a + 1]
            return tuple(self._output(o, args, value, views) for o in self.outputs)
        finally:
            for s, arena in reversed(held):
                s.prog.release(arena, s.runner)

    def _mask(self, layer: dict, args, value: dict):
        src = layer["mask"]
        if src is None:
            return None
        return args[src[1]] if src[0] == "arg" else self.fixed[src][2] if src in self.fixed else value[src]

    def _output(self, o, args, value: dict, views: list):
        if o[0] == "arg":
            return args[o[1]]
        if o[0] == "window":
            return kvcache.window(views[2 * o[1] + o[2] - 1], o[3], 2)
        if o[0] == "int":
            return _ints(o[2], self.layers[o[1]]["ints"], args)
        return value[o]

    def _build(self, args, value: dict) -> None:
        """The attention calls' argument structs and the op list, at the first call (before any cache grows:
        NotStepped where a layer's attention is not the kernel's)."""
        decs = []
        for a, layer in enumerate(self.layers):
            q, kn, vn = (value[layer[x]] if layer["pre"] else self.fixed[layer[x]][2] for x in ("q", "kn", "vn"))
            if not _attention_fits(q, kn, vn, gqa=layer["gqa"]):
                raise NotStepped("an attention call the kernel does not compute as torch does")
            layer["shapes"] = [q.shape, kn.shape, vn.shape]
            scale = layer["scale"] if layer["scale"] is not None else 1.0 / q.shape[-1] ** 0.5     # as sdpa computes it
            # the struct is made for this step's key length (the caches one row longer, as `keys` sets them)
            k, v = (torch.empty(*c.shape[:2], c.shape[2] + kn.shape[2], c.shape[3]) for c in (args[layer["kc"][1]],
                                                                                             args[layer["vc"][1]]))
            mask = self._mask(layer, args, value)
            layer["mask_dtype"] = None if mask is None else mask.dtype
            try:
                decs.append(c_attention.Decode(q, k, v, kn, vn, self.fixed[("attn", a, 0)][2], scale=float(scale),
                                               mask=mask))
            except ValueError as e:
                raise NotStepped(str(e)) from None
        ops = []
        for kind, i in self._order:
            if kind == "attn":
                ops.append((1, decs[i].function, decs[i].address, decs[i].kernel))
            elif not self.segs[i].pre:
                ops += [(0, ctypes.cast(run._fn, ctypes.c_void_p).value, *run._a) for run in self.segs[i].parts.runs]
        self._ops = (ctypes.c_int64 * (4 * len(ops)))(*[int(x or 0) for op in ops for x in op])
        self._ops_address, self._n_ops = ctypes.addressof(self._ops), len(ops)
        self._decs = decs


def setup(split: torch.fx.GraphModule, segment_type, args) -> tuple:
    """(the outputs of the graph's call `args`, its Step or None, why not): the Step is set up and checked on
    this call: the graph runs as partitioned on copies of its caches (plain tensors: torch.cat appends to
    them), then the step on the caches themselves, kept where its outputs equal those bit for bit; else the
    partitioned outputs are returned. A why starting "its first call" may be tried again."""
    try:
        step = Step(split, segment_type)
    except NotStepped as e:
        return split(*args), None, str(e)
    except Exception as e:     # noqa: BLE001 - the call runs as partitioned: it never fails for this
        return split(*args), None, f"{type(e).__name__}: {str(e)[:200]}"
    caches = {layer[c][1] for layer in step.layers for c in ("kc", "vc")}
    want = split(*[a.clone() if i in caches else a for i, a in enumerate(args)])
    try:
        got = step(args)
    except NotStepped as e:
        return want, None, str(e)
    except Exception as e:     # noqa: BLE001 - want is this call's outputs, from the caches' copies
        return want, None, f"its first call failed: {type(e).__name__}: {str(e)[:200]}"
    if got is None or len(got) != len(want) or not all(_same(g, w) for g, w in zip(got, want)):
        return want, None, "its first call differed from the partitioned graph's, or could not run"
    return got, step, ""
