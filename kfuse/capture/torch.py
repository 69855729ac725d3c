"""Capture from PyTorch: torch.export (core ATen after decompositions) -> kfuse IR.

One table maps each ATen overload onto IR ops. An overload missing from the table is an
UnsupportedOpError naming it and its node; nothing is guessed. Parameters and buffers become
constants, so everything computed from them alone folds at capture time.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.fx

from ..errors import GraphError, KfuseError, UnsupportedOpError
from ..ir import DTYPE_SHORT, FOLD_LIMIT, Graph, Node
from .common import reshape
from .einsum import EinsumError, einsum

aten = torch.ops.aten
ATEN: dict = {}


class Unsupported(KfuseError):
    """A handler met a form of its op that has no IR mapping; the converter turns this into an
    UnsupportedOpError naming the op and node, with this message as the detail."""


def sig(*nodes) -> str:
    """Types of handler arguments for error messages: f32[1, 3, 8, 8], ..."""
    return ", ".join(f"{DTYPE_SHORT.get(n.dtype, n.dtype)}{list(n.shape)}" if isinstance(n, Node) else repr(n)
                     for n in nodes)


def handles(*overloads):
    def register(fn):
        for o in overloads:
            ATEN[o] = fn
        return fn
    return register


# -- scalars and broadcasting helpers -----------------------------------------------------------------

def scalar(g: Graph, value, like: Node | None = None) -> Node:
    """A python number as a 0-d constant that promotes like torch's python scalars do."""
    if isinstance(value, Node):
        return value
    if isinstance(value, bool):
        return g.const(value, torch.bool)
    if isinstance(value, int):
        return g.const(value, torch.int64)
    floating = like is not None and like.dtype.is_floating_point
    return g.const(value, like.dtype if floating else torch.float32)


def cast(g: Graph, x: Node, dtype: torch.dtype) -> Node:
    return x if x.dtype == dtype else g.add("cast", x, dtype=dtype)


def filled(g: Graph, value, like: Node, shape) -> Node:
    """`value` (a python number or a node) in like's dtype, broadcast to `shape`."""
    v = cast(g, scalar(g, value, like), like.dtype)
    return v if v.shape == tuple(shape) else g.add("expand", v, shape=tuple(shape))


def binary(op):
    def handler(g, a, b, alpha=1, **_):
        a_node = scalar(g, a, b if isinstance(b, Node) else None)
        b_node = scalar(g, b, a_node)
        if alpha != 1:
            b_node = g.add("mul", b_node, scalar(g, alpha, b_node))
        return g.add(op, a_node, b_node)
    return handler


def unary(op, **attrs):
    return lambda g, x, *_, **__: g.add(op, x, **attrs)


def _axes(dims, ndim):
    if dims is None or dims == []:
        return tuple(range(ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return tuple(sorted(d % ndim for d in dims))


for name, op in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"), ("pow", "pow"),
                 ("fmod", "fmod"), ("remainder", "remainder"), ("atan2", "atan2"), ("floor_divide", "floor_div"),
                 ("maximum", "maximum"), ("minimum", "minimum"), ("eq", "eq"), ("ne", "ne"),
                 ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
                 ("logical_and", "logical_and"), ("logical_or", "logical_or"),
                 ("bitwise_and", "logical_and"), ("bitwise_or", "logical_or")]:
    packet = getattr(aten, name)
    handles(*[getattr(packet, o) for o in packet.overloads()
              if o in ("Tensor", "Scalar", "default", "Tensor_Scalar", "Tensor_Tensor", "Scalar_Tensor")])(binary(op))

for name, op in [("neg", "neg"), ("abs", "abs"), ("exp", "exp"), ("log", "log"), ("sqrt", "sqrt"),
                 ("rsqrt", "rsqrt"), ("reciprocal", "reciprocal"), ("sin", "sin"), ("cos", "cos"),
                 ("tanh", "tanh"), ("sigmoid", "sigmoid"), ("erf", "erf"), ("relu", "relu"),
                 ("silu", "silu"), ("floor", "floor"), ("ceil", "ceil"), ("logical_not", "logical_not"),
                 ("isnan", "isnan"), ("sign", "sign"), ("log1p", "log1p"), ("expm1", "expm1"),
                 ("round", "round"), ("trunc", "trunc"), ("fix", "trunc"), ("erfc", "erfc"), ("atan", "atan"),
                 ("tan", "tan"), *((f, f) for f in ("asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh",
                                                     "log2", "log10"))]:
    handles(getattr(aten, name).default)(unary(op))


@handles(aten.bitwise_not.default)
def _bitwise_not(g, x):
    if x.dtype != torch.bool:
        raise Unsupported(f"bitwise_not of {sig(x)}: only bool masks are supported")
    return g.add("logical_not", x)


@handles(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(g, a, b, alpha=1):
    return binary("sub")(g, b, a if alpha == 1 else binary("mul")(g, a, alpha))


@handles(aten.pow.Scalar)
def _pow_scalar(g, base, exp):
    return g.add("pow", scalar(g, base, exp), exp)


@handles(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(g, a, b, rounding_mode=None):
    """torch.div with rounding: floor_div / trunc_div keep integer dtypes and are exact (a float
    divide then floor is wrong above 2^24 and returns float)."""
    op = {None: "div", "floor": "floor_div", "trunc": "trunc_div"}[rounding_mode]
    return binary(op)(g, a, b)


@handles(aten.elu.default)
def _elu(g, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return g.add("elu", x, alpha=float(alpha), scale=float(scale), input_scale=float(input_scale))


@handles(aten.round.decimals)
def _round_decimals(g, x, decimals=0):
    """round(x * 10^d) / 10^d (x / 10^-d, then times, for d < 0): the kernel's own formula."""
    if decimals == 0:
        return g.add("round", x)
    if not x.dtype.is_floating_point:
        raise Unsupported(f"round of {sig(x)} with decimals={decimals}: only floating inputs are supported")
    ten = scalar(g, 10.0 ** abs(decimals), x)
    if decimals > 0:
        return g.add("div", g.add("round", g.add("mul", x, ten)), ten)
    return g.add("mul", g.add("round", g.add("div", x, ten)), ten)


@handles(aten.exp2.default)
def _exp2(g, x):
    return g.add("pow", scalar(g, 2.0, x), x)


@handles(aten.isinf.default)
def _isinf(g, x):
    if not x.dtype.is_floating_point:
        return g.add("ne", x, x)                      # all false, in x's shape
    return g.add("eq", g.add("abs", x), scalar(g, math.inf, x))


@handles(aten.gelu.default)
def _gelu(g, x, approximate="none"):
    return g.add("gelu", x, approximate=approximate)


@handles(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.hardtanh.default)
def _clamp(g, x, lo=None, hi=None):
    return g.add("clamp", x, min=lo, max=hi)


@handles(aten.leaky_relu.default)
def _leaky_relu(g, x, alpha=0.01):
    return g.add("leaky_relu", x, alpha=alpha)


@handles(aten.softplus.default)
def _softplus(g, x, beta=1, threshold=20):
    return g.add("softplus", x, beta=beta, threshold=threshold)


@handles(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(g, c, a, b):
    like = a if isinstance(a, Node) else b if isinstance(b, Node) else None
    return g.add("where", c, scalar(g, a, like), scalar(g, b, like))


@handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(g, x, mask, value):
    return g.add("where", mask, scalar(g, value, x) if not isinstance(value, Node) else cast(g, value, x.dtype), x)


@handles(aten.copy.default)
def _copy(g, dst, src, non_blocking=False):
    """Functional copy (from `y[:, 0] = v` after functionalisation): src cast to dst's dtype and
    broadcast to its shape; dst's values are not read."""
    return filled(g, src, dst, dst.shape)


@handles(aten.index_put.default)
def _index_put(g, x, indices, values, accumulate=False):
    """x[mask] = v (or += v) with one boolean mask over x's leading dims and one value: a where, which
    fuses. Anything else (integer indices: a scatter; value lists) is one index_put op run by torch."""
    values = scalar(g, values, x)
    if len(indices) != 1 or not isinstance(indices[0], Node) or indices[0].dtype != torch.bool \
            or values.numel != 1 or tuple(x.shape[:len(indices[0].shape)]) != tuple(indices[0].shape):
        dims = [d for d, i in enumerate(indices) if i is not None]
        return g.add("index_put", x, values, *[indices[d] for d in dims], dims=tuple(dims), accumulate=bool(accumulate))
    mask = indices[0]
    if len(mask.shape) < len(x.shape):
        mask = g.add("reshape", mask, shape=tuple(mask.shape) + (1,) * (len(x.shape) - len(mask.shape)))
    v = cast(g, values, x.dtype)
    if len(v.shape) > len(x.shape):
        v = g.add("reshape", v, shape=())
    return g.add("where", mask, g.add("add", x, v) if accumulate else v, x)


@handles(aten.scatter_add.default)
def _scatter_add(g, x, dim, index, src):
    return _scatter(g, x, dim, index, src, "sum")


@handles(aten.scatter.src, aten.scatter.value, aten.scatter_reduce.two)
def _scatter(g, x, dim, index, src, reduce=None, include_self=True):
    """torch.scatter / scatter_add / scatter_reduce: one op, run by torch (a value src is broadcast
    to the index's shape first; a tensor src may be larger than the index, as torch allows)."""
    src = cast(g, src, x.dtype) if isinstance(src, Node) else filled(g, src, x, index.shape)
    return g.add("scatter", x, index, src, axis=dim % len(x.shape), reduce=reduce or "none", include_self=include_self)


@handles(aten._to_copy.default, aten.to.dtype)
def _to_copy(g, x, *args, dtype=None, **_):
    if args and isinstance(args[0], torch.dtype):
        dtype = args[0]
    return x if dtype is None else cast(g, x, dtype)


@handles(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default,
         aten.contiguous.default, aten.dropout.default)
def _identity(g, x, *_, **__):
    return x


# -- shapes ----------------------------------------------------------------------------------------------

@handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(g, x, shape):
    return reshape(g, x, shape)


@handles(aten.permute.default)
def _permute(g, x, dims):
    perm = tuple(d % len(x.shape) for d in dims)
    return x if perm == tuple(range(len(perm))) else g.add("transpose", x, perm=perm)


@handles(aten.transpose.int)
def _transpose(g, x, a, b):
    perm = list(range(len(x.shape)))
    perm[a], perm[b] = perm[b], perm[a]
    return _permute(g, x, perm)


@handles(aten.t.default)
def _t(g, x):
    return _transpose(g, x, 0, 1) if len(x.shape) == 2 else x


@handles(aten.unsqueeze.default)
def _unsqueeze(g, x, dim):
    dim = dim % (len(x.shape) + 1)
    return reshape(g, x, x.shape[:dim] + (1,) + x.shape[dim:])


@handles(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(g, x, dims=None):
    axes = _axes(dims, len(x.shape)) if x.shape else ()
    return reshape(g, x, tuple(d for i, d in enumerate(x.shape) if not (i in axes and d == 1)))


@handles(aten.expand.default)
def _expand(g, x, shape, implicit=False):
    shape = tuple(x.shape[i - (len(shape) - len(x.shape))] if d == -1 else d for i, d in enumerate(shape))
    return x if shape == x.shape else g.add("expand", x, shape=shape)


@handles(aten.slice.Tensor)
def _slice(g, x, dim=0, start=None, end=None, step=1):
    n = x.shape[dim % len(x.shape)]
    start, end, _ = slice(start, end, step).indices(n)
    end = max(end, start)
    if (start, end, step) == (0, n, 1):
        return x
    return g.add("slice", x, axis=dim % len(x.shape), start=start, end=end, step=step)


@handles(aten.select.int)
def _select(g, x, dim, index):
    dim = dim % len(x.shape)
    index = index % x.shape[dim]
    s = g.add("slice", x, axis=dim, start=index, end=index + 1, step=1)
    return reshape(g, s, x.shape[:dim] + x.shape[dim + 1:])


@handles(aten.split_with_sizes.default, aten.split.Tensor)
def _split(g, x, sizes, dim=0):
    dim = dim % len(x.shape)
    n = x.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, n - s) for s in range(0, n, sizes)]
    outs, start = [], 0
    for s in sizes:
        outs.append(_slice(g, x, dim, start, start + s))
        start += s
    return tuple(outs)


@handles(aten.cat.default)
def _cat(g, xs, dim=0):
    xs = [x for x in xs if x.numel > 0 or len(x.shape) > 1]
    return xs[0] if len(xs) == 1 else g.add("concat", *xs, axis=dim % len(xs[0].shape))


@handles(aten.slice_scatter.default)
def _slice_scatter(g, x, src, dim=0, start=None, end=None, step=1):
    """x with x[start:end] along dim replaced by src (`y[:, 2:4] = v`): the kept parts and src
    concatenated. Strided slices are not supported."""
    dim = dim % len(x.shape)
    start, end, step = slice(start, end, step).indices(x.shape[dim])
    if step != 1:
        raise Unsupported(f"slice_scatter of {sig(x)} with step {step}: only step 1 is supported")
    src = cast(g, src, x.dtype)
    parts = [_slice(g, x, dim, 0, start), src, _slice(g, x, dim, end, x.shape[dim])]
    return _cat(g, [p for p in parts if p.shape[dim] > 0], dim)


@handles(aten.select_scatter.default)
def _select_scatter(g, x, src, dim, index):
    """x with x.select(dim, index) replaced by src (`y[:, 0] = v` when not decomposed to a where)."""
    dim = dim % len(x.shape)
    index = index % x.shape[dim]
    return _slice_scatter(g, x, _unsqueeze(g, src, dim), dim, index, index + 1)


@handles(aten.embedding.default)
def _embedding(g, w, idx, *_):
    return g.add("gather", w, idx, axis=0)


@handles(aten.index_select.default)
def _index_select(g, x, dim, idx):
    return g.add("gather", x, idx, axis=dim % len(x.shape))


@handles(aten.gather.default)
def _gather_elements(g, x, dim, idx, sparse_grad=False):
    return g.add("gather_elements", x, idx, axis=dim % len(x.shape))


@handles(aten.index.Tensor)
def _index(g, x, indices):
    used = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(used) == 1 and used[0][1].dtype != torch.bool:
        return g.add("gather", x, used[0][1], axis=used[0][0])
    return g.add("index", x, *(i for _, i in used), dims=tuple(d for d, _ in used))


@handles(aten.constant_pad_nd.default)
def _pad(g, x, pads, value=0.0):
    return g.add("pad", x, pads=tuple(pads), value=float(value))


@handles(aten.pad.default)
def _pad_mode(g, x, pads, mode="constant", value=None):
    """F.pad kept whole (export() keeps aten.pad out of the decompositions): constant, reflect,
    replicate and circular map onto one pad op instead of index gathers or scatters into empty."""
    if mode == "constant":
        return _pad(g, x, pads, 0.0 if value is None else value)
    if mode not in ("reflect", "replicate", "circular"):
        raise Unsupported(f"pad mode {mode!r} of {sig(x)}")
    return g.add("pad", x, pads=tuple(pads), mode=mode)


@handles(aten.flip.default)
def _flip(g, x, dims):
    return g.add("flip", x, dims=tuple(sorted(d % len(x.shape) for d in dims))) if dims else x


@handles(aten.repeat.default)
def _repeat(g, x, repeats):
    return g.add("repeat", x, repeats=tuple(repeats))


@handles(aten.triu.default)
def _triu(g, x, diagonal=0):
    return g.add("triu", x, diagonal=diagonal)


@handles(aten.tril.default)
def _tril(g, x, diagonal=0):
    return g.add("tril", x, diagonal=diagonal)


# -- creation (folds to constants) -------------------------------------------------------------------------

@handles(aten.arange.start_step, aten.arange.default, aten.arange.start)
def _arange(g, *args, dtype=None, **_):
    return g.const(torch.arange(*args, dtype=dtype))


@handles(aten.full.default)
def _full(g, size, value, dtype=None, **_):
    return g.const(torch.full(tuple(size), value, dtype=dtype))


@handles(aten.scalar_tensor.default)
def _scalar_tensor(g, value, dtype=None, **_):
    return g.const(torch.scalar_tensor(value, dtype=dtype))


def _filled(fill):
    def handler(g, size, dtype=None, **_):
        return g.const(torch.full(tuple(size), fill, dtype=dtype or torch.float32))
    return handler


ATEN[aten.zeros.default], ATEN[aten.ones.default] = _filled(0), _filled(1)


@handles(aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default)
def _like(g, x, value=0, dtype=None, **_):
    return g.const(torch.full(x.shape, value, dtype=dtype or x.dtype))


# -- reductions and normalisation --------------------------------------------------------------------------

def reduction(op):
    def handler(g, x, dims=None, keepdim=False, dtype=None):
        if dtype is not None:
            x = cast(g, x, dtype)
        return g.add(op, x, axes=_axes(dims, len(x.shape)), keepdim=keepdim)
    return handler


handles(aten.mean.dim)(reduction("reduce_mean"))
handles(aten.sum.dim_IntList)(reduction("reduce_sum"))
handles(aten.amax.default)(reduction("reduce_max"))
handles(aten.amin.default)(reduction("reduce_min"))
handles(aten.prod.dim_int)(reduction("reduce_prod"))


ATEN[aten.mean.default] = lambda g, x, dtype=None: reduction("reduce_mean")(g, x, None, False, dtype)
ATEN[aten.sum.default] = lambda g, x, dtype=None: reduction("reduce_sum")(g, x, None, False, dtype)
ATEN[aten.prod.default] = lambda g, x, dtype=None: reduction("reduce_prod")(g, x, None, False, dtype)
ATEN[aten.max.default] = lambda g, x: reduction("reduce_max")(g, x)
ATEN[aten.min.default] = lambda g, x: reduction("reduce_min")(g, x)


@handles(aten.linalg_vector_norm.default)
def _vector_norm(g, x, ord=2, dims=None, keepdim=False, dtype=None):
    """torch.linalg.vector_norm from sums and maxima; half types are computed in f32 as torch does."""
    out_dtype = dtype or x.dtype
    if not out_dtype.is_floating_point:
        raise Unsupported(f"vector_norm of {sig(x)} to {out_dtype}: only floating results are supported")
    work = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    x = cast(g, x, work)
    axes = _axes(dims, len(x.shape))
    ord = float(ord)
    if ord == 0:
        nonzero = g.add("cast", g.add("ne", x, scalar(g, 0.0, x)), dtype=work)
        y = g.add("reduce_sum", nonzero, axes=axes, keepdim=keepdim)
    elif math.isinf(ord):
        y = g.add("reduce_max" if ord > 0 else "reduce_min", g.add("abs", x), axes=axes, keepdim=keepdim)
    elif ord == 1:
        y = g.add("reduce_sum", g.add("abs", x), axes=axes, keepdim=keepdim)
    elif ord == 2:
        y = g.add("sqrt", g.add("reduce_sum", g.add("mul", x, x), axes=axes, keepdim=keepdim))
    else:
        s = g.add("reduce_sum", g.add("pow", g.add("abs", x), scalar(g, ord, x)), axes=axes, keepdim=keepdim)
        y = g.add("pow", s, scalar(g, 1.0 / ord, s))
    return cast(g, y, out_dtype)


@handles(aten.any.dim, aten.any.dims, aten.any.default)
def _any(g, x, dims=None, keepdim=False):
    m = reduction("reduce_max")(g, g.add("cast", x, dtype=torch.float32), dims, keepdim)
    return g.add("ne", m, scalar(g, 0.0, m))


@handles(aten.var.correction)
def _var(g, x, dims=None, correction=None, keepdim=False):
    return g.add("reduce_var", x, axes=_axes(dims, len(x.shape)),
                 correction=1 if correction is None else correction, keepdim=keepdim)


@handles(aten.var_mean.correction)
def _var_mean(g, x, dims=None, correction=None, keepdim=False):
    return (_var(g, x, dims, correction=correction, keepdim=keepdim),
            g.add("reduce_mean", x, axes=_axes(dims, len(x.shape)), keepdim=keepdim))


@handles(aten.max.dim)
def _max_dim(g, x, dim, keepdim=False):
    axis = dim % len(x.shape)
    return (g.add("reduce_max", x, axes=(axis,), keepdim=keepdim), g.add("argmax", x, axis=axis, keepdim=keepdim))


@handles(aten.min.dim)
def _min_dim(g, x, dim, keepdim=False):
    axis = dim % len(x.shape)
    return (g.add("reduce_min", x, axes=(axis,), keepdim=keepdim), g.add("argmin", x, axis=axis, keepdim=keepdim))


def _arg(op):
    def handler(g, x, dim=None, keepdim=False):
        if dim is None:
            return g.add(op, reshape(g, x, (x.numel,)), axis=0, keepdim=False)
        return g.add(op, x, axis=dim % len(x.shape), keepdim=keepdim)
    return handler


_argmax = handles(aten.argmax.default)(_arg("argmax"))
handles(aten.argmin.default)(_arg("argmin"))


@handles(aten.topk.default)
def _topk(g, x, k, dim=-1, largest=True, sorted=True):
    attrs = {"k": k, "axis": dim % len(x.shape), "largest": bool(largest), "sorted": bool(sorted)}
    return g.add("topk", x, **attrs, output="values"), g.add("topk", x, **attrs, output="indices")


@handles(aten.sort.default, aten.sort.stable)
def _sort(g, x, dim=-1, descending=False, *, stable=None):
    """Both overloads map onto the stable sort: without stable=True torch promises no order of
    ties, and the stable one is what its CPU sort returns."""
    attrs = {"axis": dim % len(x.shape), "descending": bool(descending)}
    return g.add("sort", x, **attrs, output="values"), g.add("sort", x, **attrs, output="indices")


@handles(aten._softmax.default, aten.softmax.int)
def _softmax(g, x, dim, *_):
    return g.add("softmax", x, axis=dim % len(x.shape))


@handles(aten._log_softmax.default, aten.log_softmax.int)
def _log_softmax(g, x, dim, *_):
    return g.add("log_softmax", x, axis=dim % len(x.shape))


@handles(aten.native_layer_norm.default)
def _native_layer_norm(g, x, shape, w, b, eps):
    ndim = len(shape)
    norm = tuple(shape)
    w = w if w is not None else g.const(torch.ones(norm, dtype=x.dtype))
    b = b if b is not None else g.const(torch.zeros(norm, dtype=x.dtype))
    out = g.add("layer_norm", x, w, b, eps=eps, ndim=ndim)
    axes = tuple(range(len(x.shape) - ndim, len(x.shape)))
    mean = g.add("reduce_mean", x, axes=axes, keepdim=True)
    var = g.add("reduce_var", x, axes=axes, correction=0, keepdim=True)
    rstd = g.add("rsqrt", g.add("add", var, scalar(g, eps, var)))
    return out, mean, rstd   # mean and rstd are pruned unless used


@handles(aten._native_batch_norm_legit_no_training.default)
def _batch_norm(g, x, w, b, mean, var, momentum, eps):
    """Inference BatchNorm as x * scale + shift; scale and shift fold to constants at capture."""
    c = x.shape[1]
    bshape = (c,) + (1,) * (len(x.shape) - 2)
    scale = g.add("rsqrt", g.add("add", var, scalar(g, eps, var)))
    if w is not None:
        scale = g.add("mul", scale, w)
    shift = g.add("neg", g.add("mul", mean, scale))
    if b is not None:
        shift = g.add("add", shift, b)
    y = g.add("add", g.add("mul", x, reshape(g, scale, bshape)), reshape(g, shift, bshape))
    return y, mean, var


def _normalize_rows(g, x, eps):
    """(x - mean) * rsqrt(var + eps) along the last axis, biased variance by two passes: the form
    the layer_norm pattern recognises, so it runs as one row kernel. mean and rstd keep the axis."""
    axis = (len(x.shape) - 1,)
    mean = g.add("reduce_mean", x, axes=axis, keepdim=True)
    d = g.add("sub", x, mean)
    var = g.add("reduce_mean", g.add("mul", d, d), axes=axis, keepdim=True)
    rstd = g.add("rsqrt", g.add("add", var, scalar(g, eps, var)))
    return g.add("mul", d, rstd), mean, rstd


def _affine(g, y, w, b, shape):
    """y * w + b with w and b (either may be None) reshaped to `shape`."""
    if w is not None:
        y = g.add("mul", y, reshape(g, w, shape))
    if b is not None:
        y = g.add("add", y, reshape(g, b, shape))
    return y


@handles(aten.native_group_norm.default)
def _group_norm(g, x, w, b, n, c, hw, groups, eps):
    """GroupNorm as a row normalisation over [N, G, C/G * HxW]. The per-channel scale and shift are
    applied in that layout when they fold to constants of the row shape (then norm, scale and shift
    are one kernel), else after reshaping back (one more elementwise kernel)."""
    rows = (n, groups, (c // groups) * hw)
    y, mean, rstd = _normalize_rows(g, reshape(g, x, rows), eps)

    def along_rows(p):        # [C] -> [G, C/G * HxW], each channel's value repeated HxW times
        p = g.add("expand", reshape(g, p, (groups, c // groups, 1)), shape=(groups, c // groups, hw))
        return reshape(g, p, rows[1:])

    if all(p is None or p.op == "const" for p in (w, b)) and c * hw <= FOLD_LIMIT:
        y = _affine(g, y, w and along_rows(w), b and along_rows(b), rows[1:])
        y = reshape(g, y, x.shape)
    else:
        y = _affine(g, reshape(g, y, x.shape), w, b, (c,) + (1,) * (len(x.shape) - 2))
    return y, reshape(g, mean, (n, groups)), reshape(g, rstd, (n, groups))


@handles(aten._native_batch_norm_legit.no_stats)
def _batch_norm_batch_stats(g, x, w, b, training=True, momentum=0.1, eps=1e-5):
    """BatchNorm with the batch's own statistics (instance norm reaches this as a batch of one over
    [1, N*C, H, W]): a row normalisation over [C, N*H*W], transposed there when N > 1."""
    n, c = x.shape[:2]
    swap = (1, 0) + tuple(range(2, len(x.shape)))          # [N, C, ...] <-> [C, N, ...]
    y, mean, rstd = _normalize_rows(g, reshape(g, x if n == 1 else _permute(g, x, swap), (c, -1)), eps)
    y = _affine(g, y, w, b, (c, 1))
    y = reshape(g, y, x.shape) if n == 1 else _permute(g, reshape(g, y, (c, n) + x.shape[2:]), swap)
    return y, reshape(g, mean, (c,)), reshape(g, rstd, (c,))


@handles(aten._native_batch_norm_legit.default)
def _batch_norm_legit(g, x, w, b, running_mean, running_var, training, momentum, eps):
    if training:      # batch statistics; the running-stat update is a side effect inference drops
        return _batch_norm_batch_stats(g, x, w, b, training, momentum, eps)
    return _batch_norm(g, x, w, b, running_mean, running_var, momentum, eps)


def _scan(op):
    def handler(g, x, dim, dtype=None):
        if dtype is not None:
            x = cast(g, x, dtype)
        return g.add(op, x, axis=dim % len(x.shape))
    return handler


_cumsum = handles(aten.cumsum.default)(_scan("cumsum"))
handles(aten.cumprod.default)(_scan("cumprod"))


# -- contractions ---------------------------------------------------------------------------------------------

@handles(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(g, a, b):
    return g.add("matmul", a, b)


@handles(aten.addmm.default)
def _addmm(g, bias, a, b, beta=1, alpha=1):
    y = g.add("matmul", a, b)
    if alpha != 1:
        y = g.add("mul", y, scalar(g, alpha, y))
    if beta != 1:
        bias = g.add("mul", bias, scalar(g, beta, bias))
    return g.add("add", y, bias)


@handles(aten.linear.default)
def _linear(g, x, w, b=None):
    y = g.add("matmul", x, _t(g, w))
    return y if b is None else g.add("add", y, b)


@handles(aten.convolution.default)
def _convolution(g, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    """2-D convolutions map onto conv2d / conv_transpose2d; 1-D ones onto the same with an inserted
    H of 1 (the weight's reshape folds, being a constant)."""
    nd = len(x.shape) - 2
    if nd not in (1, 2, 3):
        raise Unsupported(f"{nd}-D {'transposed ' if transposed else ''}convolution of {sig(x, w)}: "
                          "only 1-D, 2-D and 3-D convolutions are supported")
    if nd == 1:
        x4 = reshape(g, x, x.shape[:2] + (1,) + x.shape[2:])
        w4 = reshape(g, w, w.shape[:2] + (1,) + w.shape[2:])
        y = _convolution(g, x4, w4, b, (1, *stride), (0, *padding), (1, *dilation), transposed,
                         (0, *output_padding), groups)
        return reshape(g, y, y.shape[:2] + y.shape[3:])
    args = (x, w) if b is None else (x, w, b)
    attrs = {"stride": tuple(stride), "padding": tuple(padding), "dilation": tuple(dilation), "groups": groups}
    if transposed:
        return g.add(f"conv_transpose{nd}d", *args, output_padding=tuple(output_padding), **attrs)
    return g.add(f"conv{nd}d", *args, **attrs)   # conv3d runs on torch as it is


def _per_dim(v, nd, default):
    """A window attribute as one value per spatial dim (aten leaves defaults out)."""
    return (default,) * nd if v is None else tuple(v) if isinstance(v, (list, tuple)) else (v,) * nd


@handles(aten.max_pool2d_with_indices.default, aten.max_pool2d.default,
         aten.max_pool3d_with_indices.default, aten.max_pool3d.default)
def _max_pool(g, x, kernel, stride=(), padding=None, dilation=None, ceil_mode=False):
    kernel = tuple(kernel)
    nd = len(kernel)
    y = g.add(f"max_pool{nd}d", x, kernel=kernel, stride=tuple(stride) or kernel, padding=_per_dim(padding, nd, 0),
              dilation=_per_dim(dilation, nd, 1), ceil_mode=ceil_mode)
    return y, None


@handles(aten.avg_pool2d.default, aten.avg_pool3d.default)
def _avg_pool(g, x, kernel, stride=(), padding=None, ceil_mode=False, count_include_pad=True, divisor=None):
    kernel = tuple(kernel)
    nd = len(kernel)
    if divisor is not None:
        raise Unsupported(f"avg_pool{nd}d of {sig(x)} with divisor_override={divisor}")
    return g.add(f"avg_pool{nd}d", x, kernel=kernel, stride=tuple(stride) or kernel, padding=_per_dim(padding, nd, 0),
                 ceil_mode=ceil_mode, count_include_pad=count_include_pad)


@handles(aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def _adaptive_max_pool(g, x, size):
    return g.add(f"adaptive_max_pool{len(size)}d", x, size=tuple(size)), None


@handles(aten._adaptive_avg_pool3d.default, aten.adaptive_avg_pool3d.default)
def _adaptive_avg_pool3d(g, x, size):
    return g.add("adaptive_avg_pool3d", x, size=tuple(size))


@handles(aten._trilinear.default)
def _trilinear(g, i1, i2, i3, expand1, expand2, expand3, sumdim, unroll_dim=1):
    """sum over `sumdim` of i1 * i2 * i3, each unsqueezed at its `expand` dims (nn.Bilinear is
    x1 W x2 this way): an einsum, lowered to two matmul-shaped contractions."""
    rank = len(i1.shape) + len(expand1)
    letters = "abcdefghijklmnopqrstuvwxyz"[:rank]
    subs = ["".join(c for d, c in enumerate(letters) if d not in e) for e in (expand1, expand2, expand3)]
    out = "".join(c for d, c in enumerate(letters) if d not in sumdim)
    try:
        return einsum(g, f"{','.join(subs)}->{out}", (i1, i2, i3))
    except EinsumError as e:
        raise Unsupported(f"_trilinear of {sig(i1, i2, i3)}: {e}") from None


@handles(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def _embedding_bag(g, w, idx, offsets, scale_grad_by_freq=False, mode=0, sparse=False, per_sample_weights=None,
                   include_last_offset=False, padding_idx=-1):
    """nn.EmbeddingBag: the bags' output only (offset2bag, bag_size and max_indices serve backward)."""
    args = (w, idx, offsets) + ((per_sample_weights,) if per_sample_weights is not None else ())
    y = g.add("embedding_bag", *args, mode=("sum", "mean", "max")[mode], include_last_offset=bool(include_last_offset),
              padding_idx=None if padding_idx is None or padding_idx < 0 else padding_idx)
    return y, None, None, None


@handles(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool2d.default)
def _adaptive_avg_pool(g, x, size):
    h, w = x.shape[-2:]
    oh, ow = size
    nd = len(x.shape)
    if (oh, ow) == (1, 1):
        return g.add("reduce_mean", x, axes=(nd - 2, nd - 1), keepdim=True)
    if h % oh == 0 and w % ow == 0:
        k = (h // oh, w // ow)
        return g.add("avg_pool2d", x, kernel=k, stride=k, padding=(0, 0))
    if oh + ow > 64:      # too many slices to write out: torch runs it
        return g.add("adaptive_avg_pool2d", x, size=(oh, ow))
    return _adaptive_mean(g, _adaptive_mean(g, x, nd - 2, oh), nd - 1, ow)


def _adaptive_mean(g, x, axis, out):
    """Adaptive average along one axis: cell i averages [floor(i*n/out), ceil((i+1)*n/out)), as
    torch's windows do; uneven windows become one slice and mean each."""
    n = x.shape[axis]
    cells = [g.add("reduce_mean", _slice(g, x, axis, i * n // out, -(-(i + 1) * n // out)), axes=(axis,), keepdim=True)
             for i in range(out)]
    return cells[0] if out == 1 else g.add("concat", *cells, axis=axis)


UPSAMPLE = {aten.upsample_nearest1d.vec: "nearest", aten.upsample_nearest2d.vec: "nearest",
            aten.upsample_nearest3d.vec: "nearest", aten._upsample_nearest_exact1d.vec: "nearest-exact",
            aten._upsample_nearest_exact2d.vec: "nearest-exact", aten._upsample_nearest_exact3d.vec: "nearest-exact",
            aten.upsample_linear1d.vec: "linear", aten.upsample_bilinear2d.vec: "bilinear",
            aten.upsample_trilinear3d.vec: "trilinear", aten.upsample_bicubic2d.vec: "bicubic"}


def _upsample(op, mode):
    def handler(g, x, size, *rest):
        """F.interpolate -> resize with the output size. A scale factor is used by torch as the
        coordinate scale in place of in/out; when the two differ (x1.5 of 5 is 7, and 1/1.5 != 5/7)
        the op is written out by torch's own decomposition instead (gathers and lerps)."""
        align, scales = (None, rest[0]) if mode.startswith("nearest") else rest
        out = op(torch.empty(x.shape, dtype=x.dtype, device="meta"), size, *rest).shape[2:]
        if scales is not None and not align and not all(map(_same_scale, scales, x.shape[2:], out)):
            return _decomposed(g, op, (x, size, *rest))
        return g.add("resize", x, size=tuple(out), mode=mode, align_corners=align)
    return handler


def _same_scale(scale, n_in, n_out):
    """Whether torch's coordinate scale 1/scale equals n_in/n_out, in double and in float."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return 1.0 / scale == n_in / n_out and bool(f32(1.0 / scale) == f32(float(n_in)) / f32(float(n_out)))


for _op, _mode in UPSAMPLE.items():
    ATEN[_op] = _upsample(_op, _mode)


def _sdpa(g, q, k, v, mask=None, dropout=0.0, causal=False, *_, scale=None, enable_gqa=False, **__):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    args = (q, k, v) if mask is None else (q, k, v, mask)
    return g.add("attention", *args, scale=scale, causal=bool(causal))


handles(aten.scaled_dot_product_attention.default)(_sdpa)


@handles(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_flash_cpu(g, q, k, v, dropout=0.0, causal=False, *, attn_mask=None, scale=None):
    return _sdpa(g, q, k, v, attn_mask, dropout, causal, scale=scale), None


def _overloads(*names):
    """The overloads named "op.overload" that this torch version has."""
    found = set()
    for name in names:
        packet, overload = name.split(".")
        if hasattr(aten, packet) and overload in getattr(aten, packet).overloads():
            found.add(getattr(getattr(aten, packet), overload))
    return found


SKIP = _overloads("_assert_tensor_metadata.default", "_assert_scalar.default", "_assert_async.default",
                  "_assert_async.msg", "_functional_assert_async.msg", "_functional_assert_scalar.default",
                  "sym_constrain_range.default", "sym_constrain_range_for_size.default",
                  "_functional_sym_constrain_range.default", "_functional_sym_constrain_range_for_size.default",
                  "_make_dep_token.default")
"""Runtime checks (one_hot's range asserts, export's shape asserts): they produce no value an output
uses, and inputs of another shape recompile anyway."""


# -- the converter --------------------------------------------------------------------------------------------

def from_fx(graph: torch.fx.Graph, values: dict[str, torch.Tensor], input_names: list[str]) -> Graph:
    """Convert an ATen-level FX graph. Placeholders named in `values` become constants; the others,
    in `input_names` order, become graph inputs (their shapes come from node.meta['val'])."""
    g = Graph()
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    inputs = {}
    for name in input_names:
        val = placeholders[name].meta["val"]
        inputs[name] = g.input(tuple(val.shape), val.dtype, name)
    outs = _convert(g, graph, values, inputs)
    g.outputs = [env if isinstance(env, Node) else g.const(env) for env, _ in outs]
    g.output_names = [name for _, name in outs]
    g.prune()
    return g


def _convert(g: Graph, graph: torch.fx.Graph, values: dict, inputs: dict) -> list[tuple[object, str]]:
    """Add the nodes of an FX graph to g; `inputs` maps placeholder names to nodes of g, `values`
    maps the other placeholders and attributes to tensors. Returns (value, name) per graph output."""
    env: dict[torch.fx.Node, object] = {}
    outs = []
    for n in graph.nodes:
        if n.op == "placeholder":
            env[n] = inputs[n.name] if n.name in inputs else g.const(values[n.name], name=n.name)
        elif n.op == "get_attr":
            env[n] = g.const(values[n.target], name=n.name)
        elif n.op == "call_function":
            env[n] = _call(g, n, env)
        elif n.op == "output":
            outs = [(env[o], o.name) if isinstance(o, torch.fx.Node) else (o, "const")
                    for o in torch.utils._pytree.tree_leaves(n.args[0])]
    return outs


def _call(g, n: torch.fx.Node, env):
    if n.target is __import__("operator").getitem:
        return env[n.args[0]][n.args[1]]
    if n.target in SKIP:
        return None
    handler = ATEN.get(n.target)
    if handler is None:
        raise UnsupportedOpError(str(n.target), n.name, "PyTorch")
    conv = lambda a: env[a] if isinstance(a, torch.fx.Node) else a  # noqa: E731
    args = torch.fx.node.map_aggregate(n.args, conv)
    kwargs = torch.fx.node.map_aggregate(n.kwargs, conv)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("layout", "device", "pin_memory", "memory_format", "non_blocking")}
    try:
        out = handler(g, *args, **kwargs)
    except Unsupported as e:
        raise UnsupportedOpError(str(n.target), n.name, "PyTorch", str(e)) from None
    except GraphError as e:
        raise GraphError(f"{n.target} at node {n.name!r}: {e}") from e
    for node in out if isinstance(out, tuple) else (out,):
        if isinstance(node, Node) and node.op != "const" and not node.name:
            node.name = n.name
    return out


def _decomposed(g: Graph, op, args: tuple) -> Node:
    """op(*args) written out in ops this table maps, by exporting torch's own decomposition of it
    (a zero tensor stands for each Node argument: the decompositions used here depend on shapes only)."""
    from torch._decomp import decomposition_table
    nodes = [a for a in args if isinstance(a, Node)]

    class Apply(torch.nn.Module):
        def forward(self, *ts):
            it = iter(ts)
            return op(*[next(it) if isinstance(a, Node) else a for a in args])

    examples = tuple(torch.zeros(n.shape, dtype=n.dtype) for n in nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(Apply(), examples, strict=False)
        table = torch.export.default_decompositions()
        if op not in table:
            table[op] = decomposition_table[op]
        ep = ep.run_decompositions(table)
    from torch.export.graph_signature import InputKind
    specs = ep.graph_signature.input_specs
    user = [s.arg.name for s in specs if s.kind == InputKind.USER_INPUT]
    consts = {s.arg.name: ep.constants[s.target] for s in specs if s.kind != InputKind.USER_INPUT}
    (out, _), = _convert(g, ep.graph, consts, dict(zip(user, nodes)))
    return out


# Composite ops kept out of the decompositions because one IR op says them whole: SDPA (its
# decomposition also breaks on some strided inputs, e.g. transformers' GPT-2 with
# attn_implementation="sdpa"), F.pad in every mode (reflect/replicate would become index gathers,
# circular a scatter into aten.empty) and the upsamplings the default table would write out.
KEEP_WHOLE = (aten.scaled_dot_product_attention.default, aten.pad.default, *UPSAMPLE)


def export(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> tuple[Graph, object]:
    """torch.export + core ATen decompositions -> (Graph, output pytree spec)."""
    from torch.export.graph_signature import InputKind
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, tuple(example_inputs), dict(example_kwargs or {}), strict=False)
        except Exception as e:
            raise KfuseError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {e}") from e
        table = torch.export.default_decompositions()
        for op in KEEP_WHOLE:
            table.pop(op, None)
        ep = ep.run_decompositions(table)
    values, user = {}, []
    state = {**ep.state_dict, **ep.constants}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            user.append(spec.arg.name)
        elif hasattr(spec.arg, "name"):
            values[spec.arg.name] = state[spec.target].detach()
    for name, attr in ep.graph_module.named_buffers():
        values.setdefault(name, attr)
    return from_fx(ep.graph, values, user), ep.call_spec.out_spec
