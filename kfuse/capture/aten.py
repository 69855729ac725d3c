"""The ATen table: ATEN maps each ATen overload onto a builder of IR ops. Here: the table, the
helpers builders share, and the elementwise, shape and creation builders; aten_nn.py and fx.py
(upsampling) register the rest, and fx.py imports both. An overload missing from the table is an
UnsupportedOpError naming it and its node; nothing is guessed.
"""
from __future__ import annotations

import math

import torch

from ..errors import KfuseError
from ..ir import DTYPE_SHORT, VIEW_OPS, Graph, Node
from .common import dim_axis, nibble_op, reshape, wrap_index

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


# Eager (on CPU) multiplies and divides a float16/bfloat16 tensor by a python float in float32, the
# float unrounded, and rounds the product once; its other ops round the float to the tensor's dtype
# first, as scalar() does.
UNROUNDED_SCALAR = ("mul", "div", "floor_div", "trunc_div")


def _reduced_float(a, b) -> torch.dtype | None:
    """The float16/bfloat16 dtype of the tensor among a and b when the other is a python float that
    dtype cannot hold exactly (rounding it would change the result), else None."""
    x, s = (a, b) if isinstance(a, Node) else (b, a)
    if (isinstance(x, Node) and isinstance(s, float) and x.dtype in (torch.float16, torch.bfloat16)
            and torch.tensor(s, dtype=x.dtype).item() != s):
        return x.dtype
    return None


def binary(op):
    def handler(g, a, b, alpha=1, **_):
        half = _reduced_float(a, b) if op in UNROUNDED_SCALAR else None
        if half:
            up = lambda v: cast(g, v, torch.float32) if isinstance(v, Node) else v
            return cast(g, handler(g, up(a), up(b), alpha), half)
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
    return tuple(sorted(d % max(ndim, 1) for d in dims))


for name, op in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"), ("pow", "pow"),
                 ("fmod", "fmod"), ("remainder", "remainder"), ("atan2", "atan2"), ("floor_divide", "floor_div"),
                 ("maximum", "maximum"), ("minimum", "minimum"), ("eq", "eq"), ("ne", "ne"),
                 ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
                 ("logical_and", "logical_and"), ("logical_or", "logical_or")]:
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
                                                     "log2", "log10", "hardswish", "hardsigmoid"))]:
    handles(getattr(aten, name).default)(unary(op))


def bitwise(logical, fn):
    """Bools: the logical op. Integers: fn on the bits, in the dtype torch promotes to (the IR's
    logical ops would give a bool of "both nonzero")."""
    def handler(g, a, b):
        a = scalar(g, a, b if isinstance(b, Node) else None)
        b = scalar(g, b, a)
        if a.dtype == b.dtype == torch.bool:
            return g.add(logical, a, b)
        meta = lambda n: torch.empty(n.shape, dtype=n.dtype, device="meta")
        dtype = torch.result_type(meta(a), meta(b))
        i64 = torch.int64
        return cast(g, nibble_op(g, cast(g, a, i64), cast(g, b, i64), fn, torch.iinfo(dtype).bits), dtype)
    return handler


for name, logical, fn in [("bitwise_and", "logical_and", lambda x, y: x & y),
                          ("bitwise_or", "logical_or", lambda x, y: x | y),
                          ("bitwise_xor", "ne", lambda x, y: x ^ y)]:
    packet = getattr(aten, name)
    handles(*[getattr(packet, o) for o in ("Tensor", "Scalar", "Scalar_Tensor")])(bitwise(logical, fn))


@handles(aten.bitwise_not.default)
def _bitwise_not(g, x):
    if x.dtype == torch.bool:
        return g.add("logical_not", x)
    ones = -1 if x.dtype.is_signed else torch.iinfo(x.dtype).max
    return g.add("sub", g.const(ones, x.dtype), x)       # all ones minus x flips every bit, never overflows


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


@handles(aten.clamp.default, aten.hardtanh.default)
def _clamp(g, x, lo=None, hi=None):
    return g.add("clamp", x, min=lo, max=hi)


handles(aten.clamp_min.default)(lambda g, x, lo: g.add("clamp", x, min=lo))
handles(aten.clamp_max.default)(lambda g, x, hi: g.add("clamp", x, max=hi))


@handles(aten.clamp.Tensor)
def _clamp_tensor(g, x, lo=None, hi=None):
    """Tensor bounds (broadcast, promoted): max(x, lo) then min(., hi), NaN-propagating as torch's;
    where lo > hi that gives hi, as torch does."""
    if lo is not None:
        x = g.add("maximum", x, lo)
    return x if hi is None else g.add("minimum", x, hi)


handles(aten.clamp_min.Tensor)(lambda g, x, lo: g.add("maximum", x, lo))
handles(aten.clamp_max.Tensor)(lambda g, x, hi: g.add("minimum", x, hi))


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
    return g.add("scatter", x, index, src, axis=dim_axis(dim, x), reduce=reduce or "none", include_self=include_self)


@handles(aten._to_copy.default, aten.to.dtype)
def _to_copy(g, x, *args, dtype=None, **_):
    if args and isinstance(args[0], torch.dtype):
        dtype = args[0]
    return x if dtype is None else cast(g, x, dtype)


@handles(aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default, aten.contiguous.default,
         aten.dropout.default)
def _identity(g, x, *_, **__):
    return x


@handles(aten.clone.default)
def _clone(g, x, *_, **__):
    """A clone of a graph input, or of a view of one, is a copy (returned, it must not share the caller's
    memory: `x.reshape(-1).clone()`); of any other value, nothing (a kernel's output is fresh anyway)."""
    v = x
    while v.op in VIEW_OPS:
        v = v.inputs[0]
    return g.add("copy", x) if v.op == "input" else x


# -- shapes ----------------------------------------------------------------------------------------------

@handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(g, x, shape):
    return reshape(g, x, shape)


@handles(aten.permute.default)
def _permute(g, x, dims):
    perm = tuple(dim_axis(d, x) for d in dims)
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
    n = x.shape[dim_axis(dim, x)]
    start, end, _ = slice(start, end, step).indices(n)
    end = max(end, start)
    if (start, end, step) == (0, n, 1):
        return x
    return g.add("slice", x, axis=dim_axis(dim, x), start=start, end=end, step=step)


@handles(aten.select.int)
def _select(g, x, dim, index):
    dim = dim_axis(dim, x)
    index = index % x.shape[dim]
    s = g.add("slice", x, axis=dim, start=index, end=index + 1, step=1)
    return reshape(g, s, x.shape[:dim] + x.shape[dim + 1:])


@handles(aten.split_with_sizes.default, aten.split.Tensor)
def _split(g, x, sizes, dim=0):
    dim = dim_axis(dim, x)
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
    return xs[0] if len(xs) == 1 else g.add("concat", *xs, axis=dim_axis(dim, xs[0]))


@handles(aten.slice_scatter.default)
def _slice_scatter(g, x, src, dim=0, start=None, end=None, step=1):
    """x with x[start:end] along dim replaced by src (`y[:, 2:4] = v`): the kept parts and src
    concatenated. Strided slices are not supported."""
    dim = dim_axis(dim, x)
    start, end, step = slice(start, end, step).indices(x.shape[dim])
    if step != 1:
        raise Unsupported(f"slice_scatter of {sig(x)} with step {step}: only step 1 is supported")
    src = cast(g, src, x.dtype)
    parts = [_slice(g, x, dim, 0, start), src, _slice(g, x, dim, end, x.shape[dim])]
    return _cat(g, [p for p in parts if p.shape[dim] > 0], dim)


@handles(aten.select_scatter.default)
def _select_scatter(g, x, src, dim, index):
    """x with x.select(dim, index) replaced by src (`y[:, 0] = v` when not decomposed to a where)."""
    dim = dim_axis(dim, x)
    index = index % x.shape[dim]
    return _slice_scatter(g, x, _unsqueeze(g, src, dim), dim, index, index + 1)


@handles(aten.as_strided.default, aten.as_strided_copy.default)
def _as_strided(g, x, size, stride, storage_offset=None, *, storage=None):
    """x.as_strided(size, stride, offset): a read of x's memory, whose layout the converter passes as
    `storage` = (x's strides, its storage offset), traced by export. x must be dense (one block of
    memory, its elements in stride order); the read is then an index table into that block, matched
    against a reshape + transpose of it (an adaptive pool's channels-last restride of [N, C, 1, 1] is
    one), else a gather by the table (overlapping windows, a strided subset). A read outside the block
    (into a larger base x is a view of) or of gapped memory is an error, as is an input traced in other
    than contiguous strides (compiled code reads inputs by index, whatever their strides)."""
    size, stride = tuple(size), tuple(stride)
    what = f"as_strided of {sig(x)} to size {list(size)}, stride {list(stride)}, offset {storage_offset}"
    if storage is None:
        raise Unsupported(f"{what}: the input's memory layout is unknown")
    if math.prod(size) == 0:
        return g.const(torch.zeros(size, dtype=x.dtype))
    x_stride, x_offset = storage
    n = x.numel
    dims = sorted((d for d in range(len(x.shape)) if x.shape[d] != 1), key=lambda d: -x_stride[d])
    if n == 0 or any(x_stride[d] != math.prod(x.shape[e] for e in dims[i + 1:]) for i, d in enumerate(dims)):
        raise Unsupported(f"{what}: the input's strides {list(x_stride)} are not one dense block of memory")
    if x.op == "input" and dims != sorted(dims):
        raise Unsupported(f"{what}: a model input traced in strides {list(x_stride)}; as_strided of an input "
                          "is supported for contiguous examples only")
    if math.prod(size) > 1 << 24:
        raise Unsupported(f"{what}: a gather of {math.prod(size)} elements (the limit is {1 << 24})")
    index = torch.full(size, (x_offset if storage_offset is None else storage_offset) - x_offset, dtype=torch.int64)
    for d, (k, st) in enumerate(zip(size, stride)):
        index = index + (torch.arange(k) * st).reshape((k,) + (1,) * (len(size) - d - 1))
    if int(index.min()) < 0 or int(index.max()) >= n:
        raise Unsupported(f"{what}: reads outside the input's {n} elements (at storage offset {x_offset})")
    rest = [d for d in range(len(x.shape)) if x.shape[d] == 1]
    flat = reshape(g, _permute(g, x, rest + dims), (n,))         # x's elements in memory order
    if index.numel() == n:
        order = sorted(range(len(size)), key=lambda d: -stride[d])
        back = [order.index(d) for d in range(len(size))]
        if torch.equal(torch.arange(n).reshape([size[d] for d in order]).permute(back), index):
            return _permute(g, reshape(g, flat, [size[d] for d in order]), back)
    return g.add("gather", flat, g.const(index), axis=0)


@handles(aten.embedding.default)
def _embedding(g, w, idx, *_):
    return g.add("gather", w, idx, axis=0)


@handles(aten.index_select.default)
def _index_select(g, x, dim, idx):
    return g.add("gather", x, idx, axis=dim_axis(dim, x))


@handles(aten.unfold.default)
def _unfold(g, x, dim, size, step):
    """Tensor.unfold: the windows x[..., i step : i step + size, ...] along dim, each as a new last
    dimension (PatchTST's patches, sliding frames): non-overlapping windows are a view, others a gather."""
    d = dim_axis(dim, x)
    length = x.shape[d] if x.shape else 1
    if step < 1 or size < 0 or size > length:
        raise Unsupported(f"unfold of {length} elements by windows of {size}, step {step}")
    if not x.shape:             # a 0-d tensor's one window
        return reshape(g, x, (size,))
    n = (length - size) // step + 1
    if step == size:
        y = _slice(g, x, d, 0, n * size)
        y = reshape(g, y, y.shape[:d] + (n, size) + y.shape[d + 1:])
    else:
        index = torch.arange(n)[:, None] * step + torch.arange(size)
        y = g.add("gather", x, g.const(index), axis=d)
    return _permute(g, y, [a for a in range(len(y.shape)) if a != d + 1] + [d + 1])


@handles(aten.gather.default)
def _gather_elements(g, x, dim, idx, sparse_grad=False):
    return g.add("gather_elements", x, idx, axis=dim_axis(dim, x))


@handles(aten.index.Tensor)
def _index(g, x, indices):
    used = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(used) == 1 and used[0][1].dtype != torch.bool:
        d, i = used[0]
        return g.add("gather", x, wrap_index(g, i, x.shape[d]), axis=d)
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
    return g.add("flip", x, dims=tuple(sorted(dim_axis(d, x) for d in dims))) if dims else x


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


@handles(aten.empty.memory_format, aten.empty_permuted.default, aten.empty_strided.default)
def _empty(g, size, _order_or_strides=None, dtype=None, **_):
    """An uninitialised tensor (written into after, e.g. an inverse permutation by index_put): zeros,
    one of the values it may hold, so runs are deterministic."""
    return _filled(0)(g, size, dtype)


@handles(aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default)
def _like(g, x, value=0, dtype=None, **_):
    return g.const(torch.full(x.shape, value, dtype=dtype or x.dtype))
