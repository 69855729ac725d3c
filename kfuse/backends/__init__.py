"""Backends turn a fused group into a callable kernel: `make_kernel(group, report, machine)`.

A kernel is called with the group's input tensors and returns a tuple of its output tensors.
  - views (reshape, transpose, slice, expand): torch views, no copy; consumers read them in place;
  - linear: oneDNN/MKL GEMM with the weight packed once and the activation as a post-op (library.py);
  - attention: the fused C attention kernel, reading strided q/k/v and writing [B, L, H, D] so the
    head merge that follows is a view;
  - groups of elementwise ops and row reductions: a generated C kernel (backends/c);
  - anything else, or a kernel that cannot be built: the reference functions (torch), reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .. import cost
from ..ir import VIEW_OPS, Group, Kind, Node
from ..kernels import NotFusable, lower
from ..kernels.conv import (POINTWISE_PAIRS, as_conv, as_depthwise_pointwise, as_pointwise_depthwise,
                            as_squeeze_excite_pointwise)
from ..kernels.linear import as_linear
from ..ops.reference import REFERENCE
from ..report import KernelInfo
from .c import CompileError, build, compiler
from .c import attention as c_attention
from .c import concat as c_concat
from .c import depthwise as c_depthwise
from .c import dwpw as c_dwpw
from .c import gemm as c_gemm
from .c import pool as c_pool
from .c import recurrent as c_recurrent
from .c import reduce_mid as c_reduce_mid
from .c import rope as c_rope
from .c import group_norm as c_group_norm
from .c import squeeze_excite as c_squeeze_excite
from .c import winograd as c_winograd
from .c.autotune import pick
from .c.autotune import problem as problem_key
from .conv import FrameConv, PointwiseConv, frame_wise, linear_supports, pack_conv, pointwise
from . import choice, linear, openmp
from .launch import group_runner
from .outputs import POOL_MIN, OutputPool  # noqa: F401  (POOL_MIN: the runtime and tests read it here)
from .constants import shared
from .reference import out_kernel, reference_kernel

def view_call(node) -> tuple[str, tuple] | None:
    """The torch method and its integer arguments that compute view `node` on its input without a
    copy (`("narrow", (2, 0, 384))`), or None for a slice with a step (the reference runs it). The
    view kernel calls it; the runtime writes the same call into the generated wrapper."""
    a = node.attrs
    if node.op == "reshape":
        return "reshape", (tuple(a["shape"]),)
    if node.op == "transpose":
        return "permute", (tuple(a["perm"]),)
    if node.op == "expand":
        return "expand", (tuple(a["shape"]),)
    if node.op == "slice" and a["step"] == 1:
        return "narrow", (a["axis"], a["start"], a["end"] - a["start"])
    return None


def _view_kernel(node):
    call = view_call(node)
    if call is None:
        return lambda x: (REFERENCE[node.op](x, **node.attrs),)
    method, args = call
    return lambda x: (getattr(x, method)(*args),)


def _library_name(k) -> str:
    """The report's backend for a library convolution: what runs inside the one call."""
    return f"library:{k.backend}" + ("+post-op" if k.post_op_fused else "") + ("+residual" if k.residual_fused else "")


def _ours(weight, bias, a: dict, act, residual: bool, x_shape) -> dict:
    """{backend name: kernel} of our kernels computing an NHWC 2-D convolution (x_shape [N, H, W, C], attrs
    a): the depthwise kernel; the implicit GEMM (any groups but depthwise); the Winograd kernel (3x3 stride
    1, one group)."""
    others = {}
    if not residual and c_depthwise.supported(weight.shape, a["groups"], x_shape[3]):
        try:
            others["c:depthwise"] = shared(c_depthwise.DepthwiseConv, weight, bias, a["stride"], a["padding"],
                                           a["dilation"], act)
        except (NotImplementedError, CompileError):
            pass
    if int(a["groups"]) == 1 or weight.shape[1] > 1:   # not depthwise
        try:
            others["c:gemm"] = shared(c_gemm.GemmConv, weight, bias, act, residual, a["stride"], a["padding"],
                                      a["dilation"], int(a["groups"]))
        except (NotImplementedError, CompileError):
            pass
        if c_winograd.supported(weight.shape, a["groups"], a["stride"], a["dilation"]):
            try:
                others["c:winograd"] = shared(c_winograd.WinogradConv, weight, bias, act, residual, a["stride"],
                                              a["padding"], a["dilation"])
            except (NotImplementedError, CompileError):
                pass
    return others


def _conv_candidates(spec) -> dict:
    """{backend name: kernel} of the kernels that compute `spec` (a kernels.conv.ConvEpilogue): ours (_ours)
    on channels-last 2-D convolutions, and on 3-D ones whose kernel spans one frame (as 2-D ones over the
    frames, backends.conv.FrameConv); oneDNN's GEMM on the [N*H*W, C] view of a 1x1; oneDNN's convolution,
    last (alone for a transposed one). kernel(x[, residual]) -> output."""
    residual = spec.residual is not None
    conv = shared(pack_conv, spec.weight, spec.bias, spec.attrs, spec.act, residual, spec.x.shape)
    backend = _library_name(conv)
    a = spec.attrs
    if spec.transposed:             # its weight is [Cin, Cout / groups, ...]
        return {backend: conv}
    if spec.weight.dim() == 5:
        frames = frame_wise(spec.weight, a)
        if frames is None:
            return {backend: conv}
        w2, a2 = frames
        n, c, d, h, w = spec.x.shape
        ours = _ours(w2, spec.bias, a2, spec.act, residual, (n * d, h, w, c))
        return {name: FrameConv(k) for name, k in ours.items()} | {backend: conv}
    others = _ours(spec.weight, spec.bias, a, spec.act, residual, spec.x.shape) if a.get("layout") == "nhwc" else {}
    if pointwise(a, spec.weight):
        if conv.backend == "onednn" and linear_supports(None, False):
            pw = shared(PointwiseConv, spec.weight, spec.bias, spec.act, residual, math.prod(spec.x.shape[:3]))
            others[_library_name(pw)] = pw
    return others | {backend: conv}        # the first is the choice when timing is off


def _best_conv(spec, cands: dict | None = None):
    """(kernel, backend name, schedule text) of the fastest here of `cands` (default: all the kernels that
    compute `spec`, _conv_candidates)."""
    cands = _conv_candidates(spec) if cands is None else cands
    if len(cands) == 1:
        (backend, conv), = cands.items()
        return conv, backend, ""
    problem, cold = _conv_problem(spec)
    best, schedule = pick(problem, choice.timed(cands), _conv_inputs(spec.x, spec.residual), cold=cold)
    return cands[best], best, schedule


def _conv_problem(spec) -> tuple[str, bool]:
    """(the name of the timed choice of `spec`'s kernel, whether it is timed cold)."""
    # the network's input (an NCHW view) reaches its convolution from memory, not from the cache where the
    # previous kernel left it: timed warm, oneDNN won MobileNetV3's stem by 6% at compile time and then took
    # twice as long in the program as in the timing
    cold = _nchw_view(spec.x)
    return problem_key("conv", tuple(spec.weight.shape), spec.x.shape, spec.attrs, spec.act, spec.residual is not None,
                       *(["nchw-view"] if cold else [])), cold


def _nchw_view(x) -> bool:
    """Whether the program gives a convolution its input x as an NHWC view of NCHW memory: the layout
    pass's transpose of a plain tensor (a network's input)."""
    return x.op == "transpose" and tuple(x.attrs.get("perm", ())) == (0, 2, 3, 1)


def _conv_inputs(x, residual):
    """() -> inputs to time a convolution's candidates on, laid out as the program's (an NCHW view costs
    oneDNN an internal reorder and our GEMM its reads across channel planes: timed on NHWC memory, both
    looked faster)."""
    def make():
        t = torch.randn(*(x.shape[i] for i in (0, 3, 1, 2))).permute(0, 2, 3, 1) if _nchw_view(x) \
            else torch.randn(x.shape)
        ts = [t] + ([torch.randn(residual.shape)] if residual is not None else [])
        # 3-D convolutions pass channels_last_3d tensors on (oneDNN's output, FrameConv's)
        return [t.contiguous(memory_format=torch.channels_last_3d) for t in ts] if len(x.shape) == 5 else ts
    return make


def _conv_call(group, spec, conv):
    """fn(*group inputs) -> (conv(x[, residual]),); where conv takes `out`, fn(bufs, *inputs) writing
    into the planned buffer, or where none is planned (an output the caller gets) into one from an
    OutputPool: a fresh output of a few MB per call is page-faulted in each time once glibc serves it by
    mmap (MobileNetV2 b8: 9,409 faults a call, 20.7 -> 30.3 ms), and our kernels' checked path (no `out`)
    cost a one-convolution program 0.4 -> 0.36 ms."""
    ix = group.inputs.index(spec.x)
    ir = None if spec.residual is None else group.inputs.index(spec.residual)
    run = conv.bound(tuple(spec.x.shape)) if hasattr(conv, "bound") else conv   # ours: checks done once
    pool = OutputPool(group.outputs[0].shape, group.outputs[0].dtype)
    if not choice.takes_out(conv):
        fn = (lambda *args: (run(args[ix]),)) if ir is None else (lambda *args: (run(args[ix], args[ir]),))
    elif ir is None:
        fn = lambda bufs, *args: (run(args[ix], out=pool.take() if bufs[0] is None else bufs[0]),)   # noqa: E731
    else:
        fn = lambda bufs, *args: (run(args[ix], args[ir], out=pool.take() if bufs[0] is None else bufs[0]),)   # noqa: E731
    fn.writes_into, fn.weights = choice.takes_out(conv), conv
    return fn


def _conv_kernel(group):
    pair = getattr(group, "pair", None) or _pair(group)
    if pair is not None:
        return _pair_kernel(group, pair)
    spec = as_conv(group.nodes)
    cands = _conv_candidates(spec)
    conv, backend, schedule = _best_conv(spec, cands)
    fn = _conv_call(group, spec, conv)
    problem, cold = _conv_problem(spec)
    fn.contest = choice.contest(problem, list(cands), backend,
                                lambda: {n: _conv_call(group, spec, k) for n, k in _conv_candidates(spec).items()}, cold)
    if spec.act is not None and backend.startswith("library") and not conv.post_op_fused:
        fn.note = f"{spec.act[0]} runs in place after the convolution: oneDNN's post-op failed the probe " \
                  f"(for relu, hardtanh and hardsigmoid it turns NaN into a number)"
    order = getattr(conv, "order_text", {}).get((*spec.x.shape[:3], openmp.threads()))
    fn.schedule = schedule + (f"; work order {order}" if order else "")
    fn.sources = lambda: choice.conv_sources(conv)
    return fn, backend


# the pairs of two convolutions one kernel computes: rule (kernels.conv.POINTWISE_PAIRS), the fused kernel
# (built from the first's and the second's kernels of ours), the timed choice's tag, the backend's name
_CONV_PAIRS = (("depthwise_pointwise", c_dwpw.DepthwisePointwise, "dw+pw", "c:depthwise+gemm"),
               ("pointwise_depthwise", c_dwpw.PointwiseDepthwise, "pw+dw", "c:gemm+depthwise"))


def _pair(group) -> _Pair | None:
    """The kernels of a pair group (passes/autofuse.pointwise_pairs: a depthwise convolution's kernel, or
    a squeeze-excitation, and the 1x1 convolution that alone reads it; a 1x1's kernel and the depthwise
    convolution that alone reads it), made (nothing timed: split_pairs times); None for other groups."""
    for rule, kernel, tag, name in _CONV_PAIRS:
        pair = POINTWISE_PAIRS[rule][0](group.nodes)
        if pair is None:
            continue
        a, b = pair                          # the first convolution's kernel, then the second's
        dw = a if tag == "dw+pw" else b
        ca, cb = _conv_candidates(a), _conv_candidates(b)
        ours = [c.get("c:depthwise" if spec is dw else "c:gemm") for spec, c in ((a, ca), (b, cb))]
        fused = None
        if None not in ours:          # the fused kernel from our two among the candidates
            try:
                fused = kernel(*ours)
            except (NotImplementedError, CompileError):
                pass
        problem = problem_key(tag, "first-into", tuple(a.weight.shape), tuple(b.weight.shape), a.x.shape,
                              dw.attrs, a.act, b.act, b.residual is not None)
        return _Pair(group.nodes.index(b.x) + 1, a, ca, b, cb, fused, name, problem, a.x, POINTWISE_PAIRS[rule][1])
    pair = as_squeeze_excite_pointwise(group.nodes)
    if pair is not None:
        node, pw = pair
        se, cp = _squeeze_excite(node), _conv_candidates(pw)
        fused = None if "c:gemm" not in cp else c_squeeze_excite.SqueezeExcitePointwise(se, cp["c:gemm"])
        problem = problem_key("se+pw", "first-into", tuple(node.inputs[1].shape), tuple(pw.weight.shape),
                              node.shape, node.attrs, pw.act, pw.residual is not None)
        return _Pair(1, None, {"c:squeeze_excite": se}, pw, cp, fused, "c:squeeze_excite+gemm", problem, node.inputs[0],
                     POINTWISE_PAIRS["squeeze_excite_pointwise"][1])
    return None


@dataclass
class _Pair:
    split: int              # group.nodes[split:] are the second convolution's kernel
    first: object           # kernels.conv.ConvEpilogue of the first (group.nodes[:split]; None for a
    first_cands: dict       # squeeze-excitation), and its candidates
    second: object          # kernels.conv.ConvEpilogue of the second convolution, and its candidates
    second_cands: dict
    fused: object           # the kernel computing both, or None, and its backend name
    fused_name: str
    problem: str            # the timed choice's name (autotune.pick)
    x: Node                 # the group's input
    what: str
    schedule: str = ""      # the timed choice, for the report


def prebuild(groups: list) -> int:
    """Build at once (compiler.build_all: a C compiler per CPU) the C libraries the kernels of `groups`
    will need that are not on disk yet: each group's candidate kernels are made with stand-ins for
    those libraries (compiler.collecting; nothing is timed), recording their sources. The kernels are
    then made and timed as before and find their libraries built. Nothing made here is held: a group's
    candidates are freed before the next group's are made, so the compile's peak memory stays one
    group's candidates above its weights (holding them all, to make them once, would hold every packed
    copy of every weight at once). The number built; a group whose candidates fail to make is left to
    make_kernel to report."""
    with compiler.collecting() as wanted:
        for g in groups:
            kind = kind_of(g)
            make = _CANDIDATES.get(kind) or _C_KERNELS.get(kind)
            try:
                if make is not None:
                    make(g)
            except Exception:       # make_kernel meets it again and reports it
                continue
    return compiler.build_all(wanted)


def split_pairs(groups: list, report) -> list:
    """`groups` with each pair group whose fused kernel measured slower here than its two kernels one
    after the other (the first writing into a buffer, as a group of its own does), or that has no
    fused kernel, split in two: the value between them then gets a planned buffer like any other, and
    a why-not record says why."""
    out = []
    for g in groups:
        pair = _pair(g) if kind_of(g) == "conv" else None
        why = None if pair is None else _pair_loses(pair)
        if why is None:
            if pair is not None:
                g.pair = pair        # its kernels, built: make_kernel takes the fused one
            out.append(g)
            continue
        i = pair.split
        out += [Group(g.nodes[:i], [g.nodes[i - 1]]), Group(g.nodes[i:], g.outputs)]
        report.refuse(why[0], g.nodes[0].label, g.nodes[i].label, why[1])
    return out


def _pair_loses(pair: _Pair) -> tuple[str, str] | None:
    """(why-not code, detail) where the pair runs better as two groups; None where the fused kernel wins."""
    if pair.fused is None:
        return "kernel_ir_cannot_express", f"{pair.what}: no fused kernel for this pair ({pair.fused_name})"
    first, first_name, _ = _best_conv(pair.first, pair.first_cands)
    kp, bp, _ = _best_conv(pair.second, pair.second_cands)
    two = f"{first_name} -> {bp}"

    held = []

    def two_kernels(x, *r, out=None):
        """the first kernel writing into a held buffer, as into its planned one, then the second"""
        if held and choice.takes_out(first):
            y = first(x, out=held[0])
        else:
            y = first(x)
            held[:] = [y]
        return kp(y, *r, out=out) if choice.takes_out(kp) else kp(y, *r)
    two_kernels.takes_out = True
    best, pair.schedule = pick(pair.problem, choice.timed({pair.fused_name: pair.fused, two: two_kernels}),
                               _conv_inputs(pair.x, pair.second.residual))
    if best == pair.fused_name:
        return None
    return "measured_slower", f"{pair.what}: the fused kernel ({pair.fused_name}) measured slower here than {two}; " \
                              f"{pair.schedule}"


def _pair_kernel(group, pair: _Pair):
    """The fused kernel of a pair group that split_pairs kept whole."""
    fn = _conv_call(group, replace(pair.second, x=pair.x), pair.fused)
    fn.sources = lambda: choice.conv_sources(pair.fused)
    fn.split, fn.schedule, fn.weights = pair.split, pair.schedule, pair.fused
    return fn, pair.fused_name


def _squeeze_excite(node):
    """The C kernel of a squeeze_excite node."""
    a = node.attrs
    w1, b1, w2, b2 = (i.value for i in node.inputs[1:])
    act1 = (a["act1"], (a["slope"],) if a["act1"] == "leaky_relu" else ())
    return c_squeeze_excite.SqueezeExcite(w1, b1, act1, w2, b2, (a["act2"], ()))


def _nhwc_kernel(node):
    """A squeeze_excite, group_norm, max_pool2d or avg_pool2d node as its C kernel, writing into its planned
    buffer."""
    a = node.attrs
    if node.op == "squeeze_excite":      # its checks done once, for the program's shape
        k, lib = _squeeze_excite(node).bound(tuple(node.inputs[0].shape)), c_squeeze_excite
    elif node.op == "max_pool2d":
        k, lib = c_pool.MaxPoolNHWC(a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]), c_pool
    elif node.op == "avg_pool2d":
        k, lib = c_pool.AvgPoolNHWC(a["kernel"], a["stride"], a["padding"], a.get("ceil_mode", False),
                                    a.get("count_include_pad", True)), c_pool
    else:
        w, b = (i.value for i in node.inputs[1:])
        k, lib = c_group_norm.GroupNormNHWC(a["groups"], node.shape[3], w, b, a["eps"], a["silu"]), c_group_norm
    run = lambda bufs, x, *_: (k(x, out=bufs[0]),)   # noqa: E731
    run.sources = lambda: [lib.SOURCE]
    return run, f"c:{node.op}"


def _concat_kernel(node):
    """A concat node as its C kernel (a copy of rows), writing into its planned buffer."""
    if any(i.dtype != node.dtype for i in node.inputs):
        raise NotFusable(f"concat of {sorted({str(i.dtype) for i in node.inputs})}: mixed dtypes promote")
    if any(len(i.shape) != len(node.shape) for i in node.inputs):      # torch.cat skips an empty 1-D input
        raise NotFusable(f"concat of ranks {[len(i.shape) for i in node.inputs]}: an empty 1-D input skipped")
    k = c_concat.Concat(node.attrs["axis"])
    run = lambda bufs, *xs: (k(*xs, out=bufs[0]),)   # noqa: E731
    run.sources = lambda: [c_concat.SOURCE]
    return run, "c:concat"


def _four_d(shape) -> tuple:
    """An attention operand's shape [*lead, H, L, D] as the kernel's [B, H, L, D] (B = prod(lead); 1 for a
    3-d [H, L, D])."""
    return (math.prod(shape[:-3]), *shape[-3:])


def _attention_kernel(node):
    q, k, v = node.inputs[:3]
    rank = len(q.shape)
    if rank < 3 or q.dtype != torch.float32:
        raise NotImplementedError("attention kernel takes float32 q, k, v of rank 3 or more")
    if len(k.shape) != rank or len(v.shape) != rank or k.shape[:-3] != q.shape[:-3] or v.shape[:-3] != q.shape[:-3]:
        raise NotFusable(f"attention of q {q.shape}, k {k.shape}, v {v.shape}: leading dims differ")
    c_attention.library(q.shape[-1], v_head_dim=v.shape[-1])   # compile now, so a missing compiler falls back at build time
    scale, causal, zero_masked = node.attrs["scale"], node.attrs["causal"], node.attrs.get("zero_masked", False)
    b, h, lq, d = _four_d(q.shape)
    dv = v.shape[-1]
    lead = q.shape[:-3]

    def four_d(t):
        """q, k, v or a mask broadcast to their leading dims (maxvit's windows: [B, G, H, L, D]) as 4-d"""
        if t.dim() < rank:
            t = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
        t = t.expand(*lead, *t.shape[-3:])
        return t.reshape(_four_d(t.shape))

    def run(bufs, q, k, v, mask=None):
        buf, given = bufs[0], (q, k, v, mask)
        if rank != 4:
            q, k, v, mask = (None if t is None else four_d(t) for t in (q, k, v, mask))
        # the kernel reads rows of q, k, v in place: a last dim that is not contiguous (a k
        # transposed back by an ONNX exporter's Transpose) is copied
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        # stored [B, Lq, H, D]: the head merge (transpose + reshape) that follows is then a view
        store = torch.empty(b, lq, h, dv) if buf is None else buf.view(b, lq, h, dv)
        out = store.permute(0, 2, 1, 3)
        # recorded for the native runner unless a reshape or the copy above made a new tensor
        same = all(t is None or t.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()
                   for t, g in zip((q, k, v, mask), given))
        c_attention.attention(q, k, v, mask, scale=scale, causal=causal, out=out, zero_masked=zero_masked,
                              check=False, record=same)
        return (out if rank == 4 else out.reshape(node.shape),)
    run.sources = lambda: [c_attention.source(d, dv)]
    return run, "c:attention"


def _rope_kernel(node):
    if node.dtype != torch.float32 or len(node.shape) > 4:
        raise NotImplementedError("rope kernel takes float32 tensors of rank <= 4")
    c_rope._lib()               # compile now, so a missing compiler falls back at build time
    run = lambda bufs, x, c, s: (c_rope.rope(x, c, s, out=bufs[0]),)   # noqa: E731
    run.sources = lambda: [c_rope.SOURCE]
    return run, "c:rope"


def _mid_reduction(nodes) -> bool:
    """A lone float32 sum/mean/max/min over consecutive axes before the last (an NHWC global average
    pool): the row kernels cannot express it, reduce_mid.c can."""
    n = nodes[0]
    return (len(nodes) == 1 and n.op in c_reduce_mid.OPS and n.dtype == torch.float32
            and n.inputs[0].dtype == torch.float32
            and c_reduce_mid.middle_block(n.inputs[0].shape, n.attrs["axes"]) is not None)


def _reduce_mid_kernel(node):
    k = c_reduce_mid.ReduceMiddle(node.op, node.attrs["axes"], node.attrs.get("keepdim", False))
    run = lambda bufs, x: (k(x, out=bufs[0]),)   # noqa: E731
    run.sources = lambda: [c_reduce_mid.SOURCE]
    return run, "c:reduce_mid"


def _by_node_inputs(fn, group, writes_into: bool):
    """fn, called with the group's inputs (each distinct input once), passed its node's inputs in
    the node's order: attention(x, x, x) reads one tensor three times."""
    idx = [group.inputs.index(i) for i in group.nodes[0].inputs]
    if idx == list(range(len(group.inputs))):
        return fn
    if writes_into:
        return lambda bufs, *args: fn(bufs, *[args[i] for i in idx])
    return lambda *args: fn(*[args[i] for i in idx])


def _c_kernel(group):
    fk = lower(group.nodes, group.outputs)
    shapes = [(o.shape, o.dtype) for o in fk.outputs]

    def build_for(layout):
        if not layout:
            return build(fk)
        try:                 # strided inputs: a kernel of their strides, built untuned on first sight
            return build(lower(group.nodes, group.outputs, layout), tune=False)
        except (NotFusable, CompileError):
            return None

    pools = [OutputPool(s, d) for s, d in shapes]

    def new_output(i, buf, args):
        return buf if buf is not None else pools[i].take()

    run = group_runner(group, fk, build_for, new_output)
    k = run.kernel
    run.sources = lambda: [k.source] + [s.source for s in list(run.strided.values()) if s is not None]
    if k.choice is not None:
        run.schedule = str(k.choice)
    return run, "c"


def _info(group, machine, backend: str, note: str = "", schedule: str = "") -> KernelInfo:
    nodes = group.nodes
    ops = [n.op for n in nodes]
    contraction = any(n.kind == Kind.CONTRACTION for n in nodes)
    before = sum(cost.op_bytes(n) for n in nodes)
    after = sum(i.nbytes for i in group.inputs) + sum(o.nbytes for o in group.outputs)
    if all(n.op in VIEW_OPS for n in nodes):
        after = 0   # a view moves nothing
    flops = sum(cost.flops(n) for n in nodes)
    rows = cost.rows_of(nodes)
    name = fusion_name(nodes)
    return KernelInfo(name=name or "+".join(ops), ops=ops, bytes_before=before, bytes_after=after, fusion=name is not None,
                      flops=flops, predicted_ms=0.0 if not after else cost.predicted_ms(machine, after, flops, contraction, rows),
                      backend=backend, note=note, schedule=schedule)


def fusion_name(nodes) -> str | None:
    """The name a fused kernel is reported under, from the ops inside it (None for a lone op)."""
    ops = {n.op for n in nodes}
    lin = as_linear(nodes, TRITON_FLOATS)
    if lin is not None:
        _, _, bias, act = lin
        return f"gemm_{act}" if act != "none" else ("gemm_bias" if bias is not None else None)
    if len(nodes) == 1 and nodes[0].op == "gated_linear":
        return "gemm_" + GATED_NAMES.get(nodes[0].attrs["act"], nodes[0].attrs["act"] + "_glu")
    pair = as_depthwise_pointwise(nodes)
    if pair is not None:
        return "dwconv_pwconv" + ("_add" if pair[1].residual is not None else "")
    if as_pointwise_depthwise(nodes) is not None:
        return "pwconv_dwconv"
    pair = as_squeeze_excite_pointwise(nodes)
    if pair is not None:
        return "se_pwconv" + ("_add" if pair[1].residual is not None else "")
    conv = as_conv(nodes)
    if conv is not None:
        head = "conv_transpose" if conv.transposed else "conv"
        parts = [head] + (["add"] if conv.residual is not None else []) + ([nodes[-1].op] if conv.act else [])
        return "_".join(parts) if len(parts) > 1 else (f"{head}_bias" if len(nodes) > 1 else None)
    if len(nodes) == 1:
        return nodes[0].op if nodes[0].op in COMPOSITE_OPS else None
    inside = set(nodes)
    if "layer_norm" in ops:     # a residual add into the norm; else the norm, its affine and a SiLU (GroupNorm)
        if any(i in inside and i.op in ("add", "sub") for n in nodes if n.op == "layer_norm" for i in n.inputs):
            return "add_layernorm"
        return "norm_silu" if "silu" in ops else "layernorm_chain"
    if "rms_norm" in ops:
        return "add_rmsnorm" if ops & {"add", "sub"} else "rmsnorm_chain"
    if ops & {"softmax", "log_softmax"}:
        return "scale_mask_softmax" if ops & {"add", "mul", "div", "where"} else "softmax_chain"
    # a gate: a product with an activation's output (silu(a) * b); not a scale and shift before a SiLU
    gated = {i.op for n in nodes if n.op == "mul" for i in n.inputs if i in inside}
    if gated & {"silu", "sigmoid"}:
        return "swiglu"
    if "gelu" in gated:
        return "geglu"
    if "silu" in ops and ops <= {"mul", "add", "sub", "silu"}:
        return "affine_silu"    # x * scale + shift, then SiLU (GroupNorm's affine when the norm is a kernel of its own)
    return "elementwise_chain" if ops <= {n.op for n in nodes if n.kind in (Kind.ELEMENTWISE, Kind.BROADCAST)} \
        else "reduction_chain"


def kind_of(group, backend: str = "cpu") -> str:
    """Which kind of kernel runs the group: view, linear, conv, attention, rope, a one-node C kernel
    (recurrent, squeeze_excite, group_norm, the pools, concat, reduce_mid), c or torch. With backend "triton", linear,
    attention and rope take float16/bfloat16 too, and conv runs on torch."""
    nodes = group.nodes
    floats = TRITON_FLOATS if backend == "triton" else (torch.float32,)
    if len(nodes) == 1 and nodes[0].op in VIEW_OPS:
        return "view"
    if as_linear(nodes, floats) is not None:
        return "linear"
    if len(nodes) == 1 and nodes[0].op == "gated_linear" and nodes[0].dtype == torch.float32 and backend == "cpu":
        return "gated_linear"
    conv = as_conv(nodes) is not None or any(match(nodes) is not None for match, _ in POINTWISE_PAIRS.values())
    if conv:
        return "torch" if backend == "triton" else "conv"
    if len(nodes) == 1 and nodes[0].op in ("attention", "rope") and nodes[0].dtype in floats:
        return nodes[0].op
    # (the pools' default layout is NCHW, the others' NHWC)
    if len(nodes) == 1 and nodes[0].op in ("recurrent", "squeeze_excite", "group_norm", *POOL_KERNELS) \
            and nodes[0].dtype == torch.float32 and backend == "cpu" \
            and nodes[0].attrs.get("layout", "nchw" if nodes[0].op in POOL_KERNELS else "nhwc") == "nhwc":
        return nodes[0].op
    if len(nodes) == 1 and nodes[0].op == "concat" and backend == "cpu":
        return "concat"
    if backend == "cpu" and _mid_reduction(nodes):
        return "reduce_mid"
    if all(n.kind in (Kind.ELEMENTWISE, Kind.BROADCAST, Kind.REDUCTION) for n in nodes):
        return "c"
    return "torch"


# a gated linear's report name by its activation (gemm_swiglu, ...)
GATED_NAMES = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu", "sigmoid": "glu",
               "none": "bilinear"}

# kernels of one node (a composite op) that run its inputs in the node's order
COMPOSITE_OPS = ("attention", "rope", "recurrent", "squeeze_excite", "group_norm")   # one op, a fusion's work
POOL_KERNELS = ("max_pool2d", "avg_pool2d")      # NHWC pools on our C kernels
NODE_KERNELS = (*COMPOSITE_OPS, *POOL_KERNELS, "concat")
WRITES_INTO = ("c", "reduce_mid", *NODE_KERNELS)      # kernels that write into buffers they are given
BACKENDS = ("cpu", "triton")                  # the renderers make_kernel chooses between
TRITON_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Kernel:
    """A built kernel. fn(*inputs) -> outputs; when `writes_into`, fn(bufs, *inputs) with one buffer
    (or None: allocate) per group output. `aliases`: its outputs may be views of its inputs."""
    fn: object
    writes_into: bool
    aliases: bool
    sources: object = list     # () -> the C sources of the libraries it has loaded so far (for artifacts)
    inline: str | None = None  # a view as a method call on its input ("reshape((2, 3))"): the runtime
                               # writes it into the generated wrapper instead of calling fn
    weights: object = None     # the packed kernel object it reads its weights from (a chosen GEMM or
                               # convolution; hugepages.back_object)
    contest: object = None     # choice.Contest: a choice timed alone, to be timed in the program (settle.py)


def inline_view(node) -> str | None:
    """view_call(node) as source text: the method name (ours) and numbers only, so nothing from the
    model reaches generated code; None where the view runs through its kernel."""
    call = view_call(node)
    if call is None:
        return None
    method, args = call
    lit = [f"({''.join(f'{int(v)}, ' for v in a)})" if isinstance(a, tuple) else str(int(a)) for a in args]
    return f"{method}({', '.join(lit)})"


def _triton_kernel(kind, group, rounding: str):
    """The Triton backend's builder for a kind (kfuse/backends/triton), imported on first use."""
    from . import triton as tr
    if kind == "linear":
        x, w, b, act = as_linear(group.nodes, TRITON_FLOATS)
        return tr.linear_kernel(x, w, b, act)
    if kind == "attention":
        return tr.attention_kernel(group.nodes[0])
    if kind == "rope":
        return tr.rope_kernel(group.nodes[0])
    return tr.fused_kernel(group, rounding)


# a group's kernel on the CPU by its kind: (fn, backend name) = _C_KERNELS[kind](group)
_C_KERNELS = {
    "linear": lambda g: linear.linear_kernel(g.nodes),
    "gated_linear": lambda g: linear.gated_linear_kernel(g.nodes[0]),
    "conv": _conv_kernel,
    "attention": lambda g: _attention_kernel(g.nodes[0]),
    "rope": lambda g: _rope_kernel(g.nodes[0]),
    "recurrent": lambda g: c_recurrent.kernel(g.nodes[0]),
    "squeeze_excite": lambda g: _nhwc_kernel(g.nodes[0]),
    "group_norm": lambda g: _nhwc_kernel(g.nodes[0]),
    "max_pool2d": lambda g: _nhwc_kernel(g.nodes[0]),
    "avg_pool2d": lambda g: _nhwc_kernel(g.nodes[0]),
    "concat": lambda g: _concat_kernel(g.nodes[0]),
    "reduce_mid": lambda g: _reduce_mid_kernel(g.nodes[0]),
    "c": _c_kernel,
}
# the kinds whose kernel is the fastest of candidates timed at compile: their candidates, untimed (prebuild)
_CANDIDATES = {
    "conv": lambda g: _pair(g) or _conv_candidates(as_conv(g.nodes)),
    "linear": lambda g: linear.linear_candidates(*as_linear(g.nodes)),
    "gated_linear": lambda g: linear.gated_linear_candidates(*linear.gated_parts(g.nodes[0])),
}


def make_kernel(group, report, machine, backend: str = "cpu", rounding: str = "outputs") -> Kernel:
    """The kernel for `group`, priced on `machine` (kfuse.cost.Machine) for the report. `backend`
    ("cpu" or "triton", BACKENDS) picks the renderer of the fused kinds: C and oneDNN, or Triton;
    `rounding`: where a Triton kernel rounds float16/bfloat16 values ("outputs" or "eager": every op)."""
    nodes = group.nodes
    kind = kind_of(group, backend)
    note, fn, backend_name = "", None, "torch"
    try:
        if kind == "view":
            fn, backend_name = _view_kernel(nodes[0]), "view"
        elif backend == "triton" and kind in ("linear", "attention", "rope", "c"):
            fn, backend_name = _triton_kernel(kind, group, rounding)
        elif kind in _C_KERNELS:
            fn, backend_name = _C_KERNELS[kind](group)
    except Exception as e:          # any failure to build a kernel falls back, reported
        if isinstance(e, NotFusable):     # an op our kernel IR does not cover: torch runs it
            note = f"runs on torch: {e.reason}"
        else:
            note = f"fell back to the reference path: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            report.fallbacks.append(f"{'+'.join(n.op for n in nodes)}: {note}")
        fn = None
    writes_into = fn is not None and (kind in WRITES_INTO or getattr(fn, "writes_into", False))
    note = getattr(fn, "note", note)
    weights = getattr(fn, "weights", None)
    sources = getattr(fn, "sources", list)
    if fn is None:          # torch runs it, into its planned buffer where the op has an out= form
        into = out_kernel(nodes[0]) if len(nodes) == 1 else None
        writes_into, kind = into is not None, "torch:out" if into is not None else "torch"
        fn = _by_node_inputs(into, group, True) if into is not None else reference_kernel(group)
    elif kind == "view" or kind in NODE_KERNELS:
        fn = _by_node_inputs(fn, group, writes_into)
    info = _info(group, machine, backend_name, note, getattr(fn, "schedule", ""))
    if getattr(fn, "split", None):
        info.parts = tuple(fusion_name(h) for h in (nodes[:fn.split], nodes[fn.split:]))
    report.kernels.append(info)
    name = fusion_name(nodes)
    if name:
        report.fused(name)
    inline = inline_view(nodes[0]) if kind == "view" and len(group.inputs) == 1 else None
    return Kernel(fn, writes_into, aliases=kind in ("view", "torch"), sources=sources, inline=inline, weights=weights,
                  contest=getattr(fn, "contest", None))
