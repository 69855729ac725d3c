"""ONNX handlers of reductions, normalisations, contractions (MatMul, Gemm, Einsum) and window
ops (Conv, ConvTranspose, the pools)."""
from __future__ import annotations

import math

import torch

from ...ir import Node
from ..common import reshape
from ..einsum import EinsumError, einsum
from .common import HANDLERS, _axis, _Node, _pad, _slice_axis, handler
from .elementwise import _binary, _cast_like

# -- reductions -----------------------------------------------------------------------------------

def _reduce_axes(n, x, axes):
    """The sorted axes a Reduce* node reduces, or None when it is a no-op (empty axes and
    noop_with_empty_axes)."""
    axes = n.ints(axes, "axes", "axes")
    if not axes:  # empty or absent: all axes, unless the node asks for a no-op
        if n.attr("noop_with_empty_axes", 0):
            return None
        axes = range(len(x.shape))
    return sorted(_axis(a, len(x.shape)) for a in axes)


def _reduce(op, pre=None, post=None):
    """A Reduce* node as `post(op(pre(x)))`; a no-op node still applies `pre` and `post`, as ONNX's
    reference does (ReduceSumSquare with noop_with_empty_axes squares)."""
    def handler(n, x, axes=None):
        y = pre(n, x) if pre else x
        axes = _reduce_axes(n, x, axes)
        if axes is not None and op in _EMPTY and any(x.shape[a] == 0 for a in axes):
            return _empty_reduction(n, x, axes, _EMPTY[op])
        if axes is not None:
            y = n.add(op, y, axes=axes, keepdim=bool(n.attr("keepdims", 1)))
        y = post(n, y) if post else y
        return _cast_like(n, y, x)  # ReduceL2 and ReduceLogSum of integers keep the integer type
    return handler


# the value of a max or min over no elements (ONNX's reference: the identity of the reduction)
_EMPTY = {"reduce_max": -math.inf, "reduce_min": math.inf}


def _empty_reduction(n, x, axes, fill):
    keep = n.attr("keepdims", 1)
    shape = [1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes]
    if x.dtype == torch.bool:
        fill = fill > 0   # max of nothing is False, min True
    elif not x.dtype.is_floating_point:
        info = torch.iinfo(x.dtype)
        fill = info.min if fill < 0 else info.max
    return n.const(torch.full(shape, fill, dtype=x.dtype))


def _square(n, x):
    return n.add("mul", x, x)


handler("ReduceSum")(_reduce("reduce_sum"))
handler("ReduceMean")(_reduce("reduce_mean"))
handler("ReduceMax")(_reduce("reduce_max"))
handler("ReduceMin")(_reduce("reduce_min"))
handler("ReduceProd")(_reduce("reduce_prod"))
handler("ReduceL1")(_reduce("reduce_sum", pre=lambda n, x: n.add("abs", x)))
handler("ReduceL2")(_reduce("reduce_sum", pre=_square, post=lambda n, y: n.add("sqrt", y)))
handler("ReduceSumSquare")(_reduce("reduce_sum", pre=_square))
handler("ReduceLogSum")(_reduce("reduce_sum", post=lambda n, y: n.add("log", y)))


@handler("ReduceLogSumExp")
def _reduce_log_sum_exp(n, x, axes=None):
    """log(sum(exp(x - m))) + m with m the max over the axes, as ONNX Runtime computes it."""
    axes = _reduce_axes(n, x, axes)
    if axes is None:
        return x
    if any(x.shape[a] == 0 for a in axes):   # log(0)
        return _empty_reduction(n, x, axes, -math.inf)
    m = n.add("reduce_max", x, axes=axes, keepdim=True)
    s = n.add("reduce_sum", n.add("exp", n.add("sub", x, m)), axes=axes, keepdim=True)
    y = n.add("add", n.add("log", s), m)
    return y if n.attr("keepdims", 1) else reshape(n, y, [d for i, d in enumerate(x.shape) if i not in axes])


def _arg(op):
    def handler(n, x):
        axis = _axis(n.attr("axis", 0), len(x.shape))
        keep = bool(n.attr("keepdims", 1))
        if not n.attr("select_last_index", 0):
            return n.add(op, x, axis=axis, keepdim=keep)
        # the last extreme is the first one of the flipped tensor, counted from the end
        i = n.add(op, n.add("flip", x, dims=[axis]), axis=axis, keepdim=keep)
        return n.add("sub", n.const(x.shape[axis] - 1, dtype=torch.int64), i)
    return handler


handler("ArgMax")(_arg("argmax"))
handler("ArgMin")(_arg("argmin"))


@handler("TopK")
def _topk(n, x, k=None):
    kk = int(n.attr("k")) if k is None else int(n.value(k, "k").reshape(-1)[0])  # an attribute before opset 10
    axis = _axis(n.attr("axis", -1), len(x.shape))
    largest = bool(n.attr("largest", 1))
    # Values do not depend on the order of equal elements: torch's topk. Indices do: ONNX puts the
    # lower index first among equal values, which torch.topk does not promise and a stable sort does.
    # (sorted=0 leaves the order unspecified, so sorted order is as good as any; an output nobody
    # reads is pruned.)
    values = n.add("topk", x, k=kk, axis=axis, largest=largest, sorted=True)
    order = n.add("sort", x, axis=axis, descending=largest, output="indices")
    return [values, _slice_axis(n, order, axis, 0, kk, 1)]


def _cumulative(op):
    """CumSum / CumProd: `reverse` scans the axis flipped (a gather before and after); `exclusive`
    subtracts x from the sum, and for the product shifts x by one along the axis (a 1 first)."""
    def handler(n, x, axis):
        axis = _axis(int(n.value(axis, "axis").item()), len(x.shape))
        flip = torch.arange(x.shape[axis] - 1, -1, -1)
        reverse, exclusive = n.attr("reverse", 0), n.attr("exclusive", 0)
        if reverse:
            x = n.add("gather", x, n.const(flip), axis=axis)
        if exclusive and op == "cumprod" and x.shape[axis]:
            ones = n.const(torch.ones(x.shape[:axis] + (1,) + x.shape[axis + 1:], dtype=x.dtype))
            x = n.add("concat", ones, _slice_axis(n, x, axis, 0, x.shape[axis] - 1, 1), axis=axis)
        y = _cast_like(n, n.add(op, x, axis=axis), x)   # torch sums small integers as int64
        if exclusive and op == "cumsum":
            y = n.add("sub", y, x)
        return n.add("gather", y, n.const(flip), axis=axis) if reverse else y
    return handler


handler("CumSum")(_cumulative("cumsum"))
handler("CumProd")(_cumulative("cumprod"))


def _softmax(op):
    def handler(n, x):
        rank = len(x.shape)
        if n.opset >= 13:
            return n.add(op, x, axis=_axis(n.attr("axis", -1), rank))
        # Before opset 13 the input is flattened to 2-d at `axis` and normalised over the second part.
        axis = _axis(n.attr("axis", 1), rank)
        flat = reshape(n, x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))
        return reshape(n, n.add(op, flat, axis=1), x.shape)
    return handler


handler("Softmax")(_softmax("softmax"))
handler("LogSoftmax")(_softmax("log_softmax"))


# -- normalisations -------------------------------------------------------------------------------

def _norm_weight(n, w, shape):
    """A norm's scale or bias as the normalised shape (ONNX allows any broadcastable one)."""
    if w.shape == shape:
        return w
    return reshape(n, w, shape) if w.numel == math.prod(shape) else n.add("expand", w, shape=shape)


@handler("LayerNormalization")
def _layer_norm(n, x, scale, bias=None):
    """The fused layer_norm; the optional Mean and InvStdDev outputs (kept dims, in stash_type for
    float16/bfloat16 inputs) beside it as reduce_mean and rsqrt(reduce_var + eps)."""
    axis = _axis(n.attr("axis", -1), len(x.shape))
    shape = x.shape[axis:]
    eps = float(n.attr("epsilon", 1e-5))
    bias = n.const(torch.zeros(shape, dtype=x.dtype)) if bias is None else _norm_weight(n, bias, shape)
    y = n.add("layer_norm", x, _norm_weight(n, scale, shape), bias, eps=eps, ndim=len(shape))
    if n.n_outputs() == 1 or not any(n.proto.output[1:]):
        return y
    stash = n.attr("stash_type", 1)
    if stash != 1:
        n.unsupported(f"stash_type {stash} (only 1, float32, is supported)")
    xs = x if x.dtype not in (torch.float16, torch.bfloat16) else n.add("cast", x, dtype=torch.float32)
    axes = list(range(axis, len(x.shape)))
    mean = n.add("reduce_mean", xs, axes=axes, keepdim=True)
    var = n.add("reduce_var", xs, axes=axes, correction=0, keepdim=True)
    inv = n.add("rsqrt", n.add("add", var, n.const(eps, dtype=xs.dtype)))
    return [y, mean, inv]


@handler("BatchNormalization")
def _batch_norm(n, x, scale, bias, mean, var):
    if n.attr("training_mode", 0) and n.opset >= 14:
        return _batch_norm_training(n, x, scale, bias, mean, var)
    if n.n_outputs() > 1 and any(n.proto.output[1:]):
        n.fail("training-mode outputs are not supported (inference only)")
    # y = x * s + t with s = scale / sqrt(var + eps), t = bias - mean * s; with constant
    # statistics s and t fold to constants here.
    s = n.add("mul", scale, n.add("rsqrt", n.add("add", var, n.const(n.attr("epsilon", 1e-5), dtype=var.dtype))))
    t = n.add("sub", bias, n.add("mul", mean, s))
    per_channel = (x.shape[1],) + (1,) * (len(x.shape) - 2)
    return n.add("add", n.add("mul", x, reshape(n, s, per_channel)), reshape(n, t, per_channel))


def _batch_norm_training(n, x, scale, bias, mean, var):
    """Training mode (opset 14+): normalised by the batch's own mean and (biased) variance per
    channel; the running statistics momentum-averaged with them (ONNX's reference)."""
    axes = [0] + list(range(2, len(x.shape)))
    per_channel = (x.shape[1],) + (1,) * (len(x.shape) - 2)
    m = n.add("reduce_mean", x, axes=axes)
    v = n.add("reduce_var", x, axes=axes, correction=0)
    eps = n.const(n.attr("epsilon", 1e-5), dtype=x.dtype)
    s = n.add("mul", scale, n.add("rsqrt", n.add("add", v, eps)))
    y = n.add("add", n.add("mul", n.add("sub", x, reshape(n, m, per_channel)), reshape(n, s, per_channel)),
              reshape(n, bias, per_channel))
    momentum = n.attr("momentum", 0.9)
    keep, new = n.const(momentum, dtype=x.dtype), n.const(1 - momentum, dtype=x.dtype)
    running = [n.add("add", n.add("mul", old, keep), n.add("mul", cur, new)) for old, cur in ((mean, m), (var, v))]
    return [y] + running[:n.n_outputs() - 1]


@handler("InstanceNormalization")
def _instance_norm(n, x, scale, bias):
    """Each (sample, channel) normalised over its spatial positions: a layer_norm over the flattened
    spatial dims, then the per-channel affine."""
    rank, (batch, channels) = len(x.shape), x.shape[:2]
    size = math.prod(x.shape[2:])
    flat = reshape(n, x, (batch, channels, size))
    y = n.add("layer_norm", flat, n.const(torch.ones(size, dtype=x.dtype)), n.const(torch.zeros(size, dtype=x.dtype)),
              eps=float(n.attr("epsilon", 1e-5)), ndim=1)
    per_channel = (channels,) + (1,) * (rank - 2)
    y = n.add("mul", reshape(n, y, x.shape), reshape(n, scale, per_channel))
    return n.add("add", y, reshape(n, bias, per_channel))


# -- contractions and windows ---------------------------------------------------------------------

handler("MatMul")(_binary("matmul"))


@handler("Gemm")
def _gemm(n, a, b, c=None):
    if n.attr("transA", 0):
        a = n.add("transpose", a, perm=[1, 0])
    if n.attr("transB", 0):
        b = n.add("transpose", b, perm=[1, 0])  # folds once for a constant weight
    y = n.add("matmul", a, b)
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    if alpha != 1.0:
        y = n.add("mul", y, n.const(alpha, dtype=y.dtype))
    if c is not None and beta != 0.0:
        y = n.add("add", y, c if beta == 1.0 else n.add("mul", c, n.const(beta, dtype=c.dtype)))
    return y


@handler("Einsum")
def _einsum(n, *xs):
    equation = n.attr("equation").replace(" ", "")
    if "->" in equation:
        lhs, rhs = equation.split("->")
        terms = lhs.split(",")
        if len(terms) == len(xs) and any(len(set(t.replace("...", ""))) < len(t.replace("...", "")) for t in terms):
            xs, terms = zip(*[_einsum_diagonals(n, x, t) for x, t in zip(xs, terms)])
            equation = ",".join(terms) + "->" + rhs
    try:
        return einsum(n, equation, xs)
    except EinsumError as e:
        n.unsupported(str(e)) if e.unsupported else n.fail(str(e))


def _einsum_diagonals(n, x, term):
    """An operand whose subscripts repeat a letter ('...ii'), with that diagonal taken: the letter
    kept once, where it first appears."""
    ell = term.find("...")
    letters = list(term.replace("...", ""))
    dims = list(range(len(x.shape) - len(letters), len(x.shape))) if ell >= 0 else list(range(len(letters)))
    if ell > 0 and ell < len(term) - 3:
        return x, term   # an ellipsis between subscripts: left to einsum (which reports it)
    while len(set(letters)) < len(letters):
        j = next(j for j in range(len(letters)) if letters[j] in letters[:j])
        i = letters.index(letters[j])
        p, q = dims[i], dims[j]
        perm = [d for d in range(len(x.shape)) if d != q]
        perm.insert(perm.index(p) + 1, q)   # the repeated axis just after the first one
        x = n.add("transpose", x, perm=perm)
        ar = n.const(torch.arange(x.shape[p]))
        x = n.add("index", x, ar, ar, dims=(p, p + 1))   # adjacent indices: the diagonal stays at p
        del letters[j]
        dims = [d if d < q else d - 1 for k, d in enumerate(dims) if k != j]
    return x, ("..." if ell == 0 else "") + "".join(letters) + ("..." if ell > 0 else "")


def _spatial_pads(n: _Node, x: Node, kernel, strides, dilations):
    """(begins, ends) of the spatial dims, from `pads` or `auto_pad`."""
    k = len(kernel)
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        pads = n.attr("pads", [0] * 2 * k) if auto == "NOTSET" else [0] * 2 * k
        return list(pads[:k]), list(pads[k:])
    begins, ends = [], []
    for size, kk, s, d in zip(x.shape[2:], kernel, strides, dilations):  # SAME_UPPER / SAME_LOWER
        total = max((math.ceil(size / s) - 1) * s + (kk - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins, ends


def _window_args(n: _Node, x: Node, kernel, pad_value, max_pad=None):
    """Shared by Conv and the pools: strides, dilations and padding. Asymmetric padding (or more
    than torch's pools accept) becomes an explicit pad op before the window op."""
    nd = len(x.shape) - 2
    if nd not in (2, 3):
        n.fail(f"only 1-d, 2-d and 3-d spatial inputs (rank 3 to 5) are supported, got shape {list(x.shape)}")
    strides = list(n.attr("strides", [1] * nd))
    dilations = list(n.attr("dilations", [1] * nd))
    begins, ends = _spatial_pads(n, x, kernel, strides, dilations)
    symmetric = begins == ends and (max_pad is None or all(b <= m for b, m in zip(begins, max_pad)))
    if symmetric:
        return x, strides, dilations, tuple(begins)
    if pad_value is None:
        n.fail(f"asymmetric pads {begins + ends} are not supported here")
    return _pad(n, x, [0, 0] + begins, [0, 0] + ends, pad_value), strides, dilations, (0,) * nd


def _conv(n, x, w, b=None):
    x, strides, dilations, padding = _window_args(n, x, w.shape[2:], pad_value=0.0)
    extra = (b,) if b is not None else ()
    return n.add(f"conv{len(strides)}d", x, w, *extra, stride=tuple(strides), padding=padding,
                 dilation=tuple(dilations), groups=n.attr("group", 1))


def _max_pool(n, x):
    kernel = n.attr("kernel_shape")
    src = x
    x, strides, dilations, padding = _window_args(n, x, kernel, pad_value=-math.inf,
                                                  max_pad=[k // 2 for k in kernel])
    if n.n_outputs() > 1 and n.proto.output[1]:
        if x is not src:
            n.fail("the Indices output with asymmetric or large pads is not supported")
        return [_max_pool(_NoIndices(n), src), _max_pool_indices(n, x, kernel, strides, padding, dilations)]
    return n.add(f"max_pool{len(kernel)}d", x, kernel=tuple(kernel), stride=tuple(strides), padding=padding,
                 dilation=tuple(dilations), ceil_mode=bool(n.attr("ceil_mode", 0)))


class _NoIndices:
    """The node as a MaxPool with only its values output."""
    def __init__(self, n):
        self._n = n

    def __getattr__(self, key):
        return getattr(self._n, key)

    def n_outputs(self):
        return 1


def _max_pool_indices(n, x, kernel, strides, padding, dilations):
    """MaxPool's Indices: flat positions in the whole input (batch and channel included), in row-major
    order, or column-major over the spatial dims with storage_order 1 (2-d)."""
    i = n.add("max_pool_indices", x, kernel=tuple(kernel), stride=tuple(strides), padding=padding,
              dilation=tuple(dilations), ceil_mode=bool(n.attr("ceil_mode", 0)))
    spatial = x.shape[2:]
    plane = math.prod(spatial)
    if n.attr("storage_order", 0):
        if len(spatial) != 2:
            n.fail("storage_order 1 of a pool that is not 2-d")
        h, w = spatial
        i = n.add("add", n.add("mul", n.add("remainder", i, n.const(w)), n.const(h)), n.add("floor_div", i, n.const(w)))
    base = torch.arange(x.shape[0] * x.shape[1], dtype=torch.int64).reshape(x.shape[:2] + (1,) * len(spatial)) * plane
    return n.add("add", i, n.const(base))


def _avg_pool(n, x):
    kernel = n.attr("kernel_shape")
    include = bool(n.attr("count_include_pad", 0))
    nd = len(kernel)
    strides, dilations = list(n.attr("strides", [1] * nd)), list(n.attr("dilations", [1] * nd))
    begins, ends = _spatial_pads(n, x, kernel, strides, dilations)
    if any(d != 1 for d in dilations) or (not include and (begins != ends or any(b > k // 2 for b, k in zip(begins, kernel)))):
        return _avg_pool_by_conv(n, x, kernel, strides, dilations, begins, ends, include)
    # Explicit zero padding is only right when the padded zeros count in the average.
    x, strides, dilations, padding = _window_args(n, x, kernel, pad_value=0.0 if include else None,
                                                  max_pad=[k // 2 for k in kernel])
    return n.add(f"avg_pool{len(kernel)}d", x, kernel=tuple(kernel), stride=tuple(strides), padding=padding,
                 ceil_mode=bool(n.attr("ceil_mode", 0)), count_include_pad=include)


def _avg_pool_by_conv(n, x, kernel, strides, dilations, begins, ends, include):
    """AveragePool with dilations or pads torch's pools lack: the window sums (a depthwise
    convolution by ones) over the window counts (the same convolution of the mask of the cells that
    count: the input, and the pads with count_include_pad), a constant. ceil_mode extends the end so
    the last window starts inside the input or its begin pad, as ONNX's reference does."""
    nd, c = len(kernel), x.shape[1]
    spatial = x.shape[2:]
    ceil = bool(n.attr("ceil_mode", 0))
    extra = []
    for size, k, s, d, b, e in zip(spatial, kernel, strides, dilations, begins, ends):
        span = size + b + e - (k - 1) * d - 1
        out = -(-span // s) + 1 if ceil else span // s + 1
        if ceil and (out - 1) * s >= size + b:
            out -= 1
        extra.append(max((out - 1) * s + (k - 1) * d + 1 - (size + b + e), 0))
    ends_all = [e + x_ for e, x_ in zip(ends, extra)]
    mask = torch.ones((1, 1) + tuple(spatial), dtype=x.dtype)
    mask = torch.nn.functional.pad(mask, [p for b, e in zip(begins[::-1], ends[::-1]) for p in (b, e)],
                                   value=1.0 if include else 0.0)
    mask = torch.nn.functional.pad(mask, [p for x_ in extra[::-1] for p in (0, x_)], value=0.0)
    ones = torch.ones((1, 1) + tuple(kernel), dtype=x.dtype)
    conv = getattr(torch.nn.functional, f"conv{nd}d")
    count = conv(mask, ones, stride=strides, dilation=dilations)
    padded = _pad(n, x, [0, 0] + begins, [0, 0] + ends_all)
    sums = n.add(f"conv{nd}d", padded, n.const(torch.ones((c, 1) + tuple(kernel), dtype=x.dtype)), stride=tuple(strides),
                 padding=(0,) * nd, dilation=tuple(dilations), groups=c)
    return n.add("div", sums, n.const(count))


def _global_pool(op):
    return lambda n, x: n.add(op, x, axes=list(range(2, len(x.shape))), keepdim=True)


handler("GlobalAveragePool")(_global_pool("reduce_mean"))
handler("GlobalMaxPool")(_global_pool("reduce_max"))


def _conv_transpose(n, x, w, b=None):
    nd = len(x.shape) - 2
    if nd not in (2, 3):
        n.unsupported(f"only 1-d, 2-d and 3-d spatial inputs are supported, got shape {list(x.shape)}")
    spatial, kernel = x.shape[2:], w.shape[2:]
    strides, dilations = list(n.attr("strides", [1] * nd)), list(n.attr("dilations", [1] * nd))
    out_pad = list(n.attr("output_padding", [0] * nd))
    # the output before any padding is removed ("full"), then the pads removed from its ends
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(spatial, strides, kernel, dilations)]
    auto, target = n.attr("auto_pad", "NOTSET"), n.attr("output_shape")
    if target is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        # pads follow from the output size; SAME_UPPER puts the odd one at the end, otherwise the start;
        # an output_shape beyond the full output gives negative pads: zeros (and the bias) there
        target = list(target)[-nd:] if target is not None else [i * s for i, s in zip(spatial, strides)]
        total = [f + p - t for f, p, t in zip(full, out_pad, target)]
        begins = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        ends = [t - b for t, b in zip(total, begins)]
    elif auto == "VALID":
        begins = ends = [0] * nd
    else:
        pads = list(n.attr("pads", [0] * 2 * nd))
        begins, ends = pads[:nd], pads[nd:]
    if any(p < 0 for p in begins + ends) and target is None:
        n.unsupported(f"negative pads {begins + ends}")
    if any(p >= max(s, d) for p, s, d in zip(out_pad, strides, dilations)):
        n.unsupported(f"output_padding {out_pad} not below the stride or dilation")
    grow = any(p < 0 for p in begins + ends)
    cut_b, cut_e = [max(p, 0) for p in begins], [max(p, 0) for p in ends]
    # torch pads both ends alike: remove the smaller pad there and slice off the rest
    common = [min(bb, e) for bb, e in zip(cut_b, cut_e)]
    extra = (b,) if b is not None and not grow else ()
    y = n.add(f"conv_transpose{nd}d", x, w, *extra, stride=tuple(strides), padding=tuple(common),
              output_padding=tuple(out_pad), groups=n.attr("group", 1), dilation=tuple(dilations))
    for i in range(nd):
        start = cut_b[i] - common[i]
        y = _slice_axis(n, y, 2 + i, start, start + full[i] + out_pad[i] - cut_b[i] - cut_e[i], 1)
    if grow:
        y = _pad(n, y, [0, 0] + [max(-p, 0) for p in begins], [0, 0] + [max(-p, 0) for p in ends])
        if b is not None:
            y = n.add("add", y, reshape(n, b, (b.shape[0],) + (1,) * nd))
    return y


# 1-d window attributes as 2-d ones with a height of 1
_LIFT_1D = {"kernel_shape": lambda v: [1] + v, "strides": lambda v: [1] + v, "dilations": lambda v: [1] + v,
            "output_padding": lambda v: [0] + v, "output_shape": lambda v: [1] + v[-1:],
            "pads": lambda v: [0, v[0], 0, v[1]]}


def _windows_1d(handler):
    """Conv, ConvTranspose and the pools on rank-3 inputs [N, C, L]: run as 2-d on [N, C, 1, L]."""
    def wrapped(n, x, w=None, *rest):
        if len(x.shape) != 3:
            return handler(n, x, *([w] if w is not None or rest else []), *rest)
        for key, lift in _LIFT_1D.items():
            if key in n.attrs:
                n.overrides[key] = lift(list(n.attr(key)))
        x = reshape(n, x, x.shape[:2] + (1,) + x.shape[2:])
        if w is not None:  # the weight of a convolution: [O, I, k] -> [O, I, 1, k]
            w = reshape(n, w, w.shape[:2] + (1,) + w.shape[2:])
        y = handler(n, x, *([w] if w is not None or rest else []), *rest)
        if isinstance(y, list):   # MaxPool's values and Indices (flat positions: the same in 1-d)
            return [reshape(n, v, v.shape[:2] + v.shape[3:]) for v in y]
        return reshape(n, y, y.shape[:2] + y.shape[3:])
    return wrapped


handler("Conv")(_windows_1d(_conv))
handler("ConvTranspose")(_windows_1d(_conv_transpose))
handler("MaxPool")(_windows_1d(_max_pool))
handler("AveragePool")(_windows_1d(_avg_pool))


@handler("Hardmax")
def _hardmax(n, x):
    """1 at the first maximum along the axis, 0 elsewhere (before opset 13: of x flattened to 2-d)."""
    shape, rank = x.shape, len(x.shape)
    axis = _axis(n.attr("axis", -1 if n.opset >= 13 else 1), rank)
    if n.opset < 13:
        x, axis = reshape(n, x, (math.prod(shape[:axis]), math.prod(shape[axis:]))), 1
    i = n.add("argmax", x, axis=axis, keepdim=True)
    iota = n.const(torch.arange(x.shape[axis]).reshape([-1] + [1] * (len(x.shape) - axis - 1)))
    return reshape(n, n.add("cast", n.add("eq", iota, i), dtype=x.dtype), shape)


@handler("LpNormalization")
def _lp_normalization(n, x):
    axis, p = _axis(n.attr("axis", -1), len(x.shape)), n.attr("p", 2)
    if p not in (1, 2):
        n.unsupported(f"p = {p} (ONNX allows 1 and 2)")
    a = n.add("abs", x) if p == 1 else n.add("mul", x, x)
    norm = n.add("reduce_sum", a, axes=[axis], keepdim=True)
    norm = norm if p == 1 else n.add("sqrt", norm)
    zero = n.add("eq", norm, n.const(0, dtype=x.dtype))   # a zero norm divides by 1 (ONNX's reference): 0
    return n.add("div", x, n.add("where", zero, n.const(1, dtype=x.dtype), norm))


@handler("MeanVarianceNormalization")
def _mean_variance_normalization(n, x):
    """(x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9) over `axes`, as ONNX's function body computes it."""
    axes = sorted(_axis(a, len(x.shape)) for a in n.attr("axes", [0, 2, 3]))
    mean = n.add("reduce_mean", x, axes=axes, keepdim=True)
    var = n.add("sub", n.add("reduce_mean", n.add("mul", x, x), axes=axes, keepdim=True), n.add("mul", mean, mean))
    std = n.add("add", n.add("sqrt", var), n.const(1e-9, dtype=x.dtype))
    return n.add("div", n.add("sub", x, mean), std)


@handler("EyeLike")
def _eye_like(n, x):
    from .common import DTYPES
    dtype = DTYPES.get(n.attr("dtype"), None) if n.attr("dtype") is not None else x.dtype
    if dtype is None or len(x.shape) != 2:
        n.unsupported("a dtype kfuse has no tensor for, or an input that is not 2-d")
    rows, cols = x.shape
    k = n.attr("k", 0)
    eye = torch.arange(rows).reshape(-1, 1) + k == torch.arange(cols).reshape(1, -1)
    return n.const(eye.to(dtype))


@handler("LpPool")
def _lp_pool(n, x):
    """(sum over the window of |x|^p)^(1/p): AveragePool of |x|^p counting the pads, times the window size."""
    p = float(n.attr("p", 2))
    kernel = list(n.attr("kernel_shape"))
    n.overrides["count_include_pad"] = 1
    y = HANDLERS["AveragePool"](n, n.add("pow", n.add("abs", x), n.const(p, dtype=x.dtype)))
    y = n.add("mul", y, n.const(float(math.prod(kernel)), dtype=x.dtype))
    return n.add("pow", y, n.const(1.0 / p, dtype=x.dtype))


@handler("GroupNormalization")
def _group_normalization(n, x, scale, bias):
    """(x - mean) / sqrt(var + eps) over each group of channels (and all spatial positions), then a
    per-channel scale and bias (per group before opset 21)."""
    groups, eps = n.attr("num_groups"), float(n.attr("epsilon", 1e-5))
    shape, c = x.shape, x.shape[1]
    g = reshape(n, x, (shape[0], groups, -1))
    mean = n.add("reduce_mean", g, axes=[2], keepdim=True)
    d = n.add("sub", g, mean)
    var = n.add("reduce_mean", n.add("mul", d, d), axes=[2], keepdim=True)
    y = reshape(n, n.add("mul", d, n.add("rsqrt", n.add("add", var, n.const(eps, dtype=x.dtype)))), shape)
    per_channel = [1, c] + [1] * (len(shape) - 2)
    if scale.shape[0] != c:   # opset 18: one scale and bias per group, repeated over its channels
        idx = n.const(torch.arange(c) // (c // groups))
        scale, bias = n.add("gather", scale, idx, axis=0), n.add("gather", bias, idx, axis=0)
    return n.add("add", n.add("mul", y, reshape(n, scale, per_channel)), reshape(n, bias, per_channel))


@handler("LRN")
def _lrn(n, x):
    """x / (bias + alpha / size * (sum of x^2 over the `size` channels around))^beta."""
    size = n.attr("size")
    alpha, beta, bias = float(n.attr("alpha", 1e-4)), float(n.attr("beta", 0.75)), float(n.attr("bias", 1.0))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = _pad(n, n.add("mul", x, x), [0, before] + [0] * (len(x.shape) - 2), [0, after] + [0] * (len(x.shape) - 2))
    c = x.shape[1]
    total = None
    for k in range(size):
        part = _slice_axis(n, sq, 1, k, k + c, 1)
        total = part if total is None else n.add("add", total, part)
    den = n.add("add", n.add("mul", total, n.const(alpha / size, dtype=x.dtype)), n.const(bias, dtype=x.dtype))
    return n.add("div", x, n.add("pow", den, n.const(beta, dtype=x.dtype)))
