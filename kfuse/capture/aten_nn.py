"""ATen builders of reductions, normalisations, scans, contractions, convolutions, pools and
attention, registered into aten.ATEN."""
from __future__ import annotations

import math

import torch

from ..ir import FOLD_LIMIT
from .aten import (
    ATEN,
    Unsupported,
    _axes,
    _permute,
    _slice,
    _t,
    aten,
    cast,
    handles,
    scalar,
    sig,
)
from .common import dim_axis, reshape
from .einsum import EinsumError, einsum

# -- reductions and normalisation --------------------------------------------------------------------------

def reduction(op):
    def handler(g, x, dims=None, keepdim=False, dtype=None):
        if dtype is not None:
            x = cast(g, x, dtype)
        y = g.add(op, x, axes=_axes(dims, len(x.shape)), keepdim=keepdim)
        # an integer sum or product is int64 unless `dtype` says otherwise (int32: wrapped as torch wraps)
        return y if dtype is None or y.dtype == dtype else cast(g, y, dtype)
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
    # a count of nonzero elements: exact for any dtype (a float32 cast made 1e-300 zero), and 0 (False)
    # over an empty dim, where a max has no identity
    nonzero = g.add("cast", g.add("ne", x, scalar(g, 0, x)), dtype=torch.int64)
    n = reduction("reduce_sum")(g, nonzero, dims, keepdim)
    return g.add("ne", n, scalar(g, 0, n))


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
    axis = dim_axis(dim, x)
    return (g.add("reduce_max", x, axes=(axis,), keepdim=keepdim),
            g.add("argmax", _ordered(g, x), axis=axis, keepdim=keepdim))


def _ordered(g, x):
    """x as argmax/argmin take it: bool as uint8 (same order; torch's argmax refuses bool)."""
    return g.add("cast", x, dtype=torch.uint8) if x.dtype == torch.bool else x


@handles(aten.min.dim)
def _min_dim(g, x, dim, keepdim=False):
    axis = dim_axis(dim, x)
    return (g.add("reduce_min", x, axes=(axis,), keepdim=keepdim),
            g.add("argmin", _ordered(g, x), axis=axis, keepdim=keepdim))


def _arg(op):
    def handler(g, x, dim=None, keepdim=False):
        if dim is None:
            return g.add(op, reshape(g, x, (x.numel,)), axis=0, keepdim=False)
        return g.add(op, x, axis=dim_axis(dim, x), keepdim=keepdim)
    return handler


_argmax = handles(aten.argmax.default)(_arg("argmax"))
handles(aten.argmin.default)(_arg("argmin"))


@handles(aten.topk.default)
def _topk(g, x, k, dim=-1, largest=True, sorted=True):
    attrs = {"k": k, "axis": dim_axis(dim, x), "largest": bool(largest), "sorted": bool(sorted)}
    return g.add("topk", x, **attrs, output="values"), g.add("topk", x, **attrs, output="indices")


@handles(aten.sort.default, aten.sort.stable)
def _sort(g, x, dim=-1, descending=False, *, stable=None):
    """Both overloads map onto the stable sort: without stable=True torch promises no order of
    ties, and the stable one is what its CPU sort returns."""
    attrs = {"axis": dim_axis(dim, x), "descending": bool(descending)}
    return g.add("sort", x, **attrs, output="values"), g.add("sort", x, **attrs, output="indices")


@handles(aten._softmax.default, aten.softmax.int)
def _softmax(g, x, dim, *_):
    return g.add("softmax", x, axis=dim_axis(dim, x))


@handles(aten._log_softmax.default, aten.log_softmax.int)
def _log_softmax(g, x, dim, *_):
    return g.add("log_softmax", x, axis=dim_axis(dim, x))


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
        y = g.add(op, x if dtype is None else cast(g, x, dtype), axis=dim_axis(dim, x))
        return y if dtype is None else cast(g, y, dtype)    # the IR's scan of int32 gives int64, as torch's
    return handler


_cumsum = handles(aten.cumsum.default)(_scan("cumsum"))
handles(aten.cumprod.default)(_scan("cumprod"))


# -- contractions ---------------------------------------------------------------------------------------------

@handles(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(g, a, b):
    return g.add("matmul", a, b)


@handles(aten.addmm.default)
def _addmm(g, bias, a, b, beta=1, alpha=1):
    # torch ignores the product when alpha is 0 and the bias when beta is 0: their NaN and Inf too
    y = g.add("matmul", a, b)
    if alpha == 0:
        y = g.add("where", g.const(False), y, scalar(g, 0, y))
    elif alpha != 1:
        y = g.add("mul", y, scalar(g, alpha, y))
    if beta == 0:
        return y
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
    return g.add(f"conv{nd}d", *args, **attrs)


def _per_dim(v, nd, default):
    """A window attribute as one value per spatial dim (aten leaves defaults out)."""
    return (default,) * nd if v is None else tuple(v) if isinstance(v, (list, tuple)) else (v,) * nd


@handles(aten.max_pool2d_with_indices.default, aten.max_pool2d.default,
         aten.max_pool3d_with_indices.default, aten.max_pool3d.default)
def _max_pool(g, x, kernel, stride=(), padding=None, dilation=None, ceil_mode=False):
    """The values and torch's indices (flat positions within each plane, run on torch); capture
    prunes the indices when only the values are used."""
    kernel = tuple(kernel)
    nd = len(kernel)
    attrs = dict(kernel=kernel, stride=tuple(stride) or kernel, padding=_per_dim(padding, nd, 0),
                 dilation=_per_dim(dilation, nd, 1), ceil_mode=ceil_mode)
    return g.add(f"max_pool{nd}d", x, **attrs), g.add("max_pool_indices", x, **attrs)


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


@handles(aten.grid_sampler_2d.default, aten.grid_sampler_3d.default, aten.grid_sampler.default)
def _grid_sampler(g, x, grid, mode, padding_mode, align_corners):
    """F.grid_sample (optical flow, spatial transformers): the op torch runs, its integer codes named."""
    if not x.dtype.is_floating_point or grid.dtype != x.dtype:
        raise Unsupported(f"grid_sample of a {x.dtype} input with a {grid.dtype} grid")
    if mode not in (0, 1, 2) or padding_mode not in (0, 1, 2):
        raise Unsupported(f"grid_sample with interpolation code {mode}, padding code {padding_mode}")
    return g.add("grid_sample", x, grid, mode=("bilinear", "nearest", "bicubic")[mode],
                 padding_mode=("zeros", "border", "reflection")[padding_mode], align_corners=bool(align_corners))


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


@handles(aten.histc.default)
def _histc(g, x, bins=100, min=0, max=0):
    return g.add("histc", x, bins=int(bins), min=float(min), max=float(max))


@handles(aten._grouped_mm.default)
def _grouped_mm(g, a, b, offs=None, bias=None, out_dtype=None):
    """Mixture-of-experts GEMMs (transformers' grouped_mm experts): rows of `a` in groups ending at
    `offs`, each times its own matrix of `b`; torch runs it."""
    if offs is None or bias is not None or out_dtype not in (None, a.dtype):
        raise Unsupported(f"_grouped_mm without offsets, with a bias or an out_dtype: {sig(a)}")
    return g.add("grouped_mm", a, b, offs)


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


def _sdpa(g, q, k, v, mask=None, dropout=0.0, causal=False, *_, scale=None, enable_gqa=False, **__):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    lq, lk = q.shape[-2], k.shape[-2]
    if causal and lq != lk and mask is None:
        # torch aligns is_causal top-left (query i sees keys j <= i); kfuse's attention aligns its
        # causal frontier bottom-right (j <= i + lk - lq, a KV cache's): the mask says torch's
        mask, causal = g.const(torch.ones(lq, lk, dtype=torch.bool).tril()), False
    args = (q, k, v) if mask is None else (q, k, v, mask)
    # torch's SDPA gives 0, not NaN, for a query whose keys are all masked (a padding row)
    return g.add("attention", *args, scale=scale, causal=bool(causal), zero_masked=True)


handles(aten.scaled_dot_product_attention.default)(_sdpa)


@handles(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_flash_cpu(g, q, k, v, dropout=0.0, causal=False, *, attn_mask=None, scale=None):
    return _sdpa(g, q, k, v, attn_mask, dropout, causal, scale=scale), None
