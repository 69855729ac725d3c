"""The meaning of every IR op, one plain torch function each: the specification and the oracle.

Written for clarity, not speed. `run(graph, inputs)` interprets a graph op by op, unfused.
The same functions run on meta tensors to infer shapes (kfuse.ir.infer).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ..errors import GraphError, KfuseError


def _attention(q, k, v, mask=None, *, scale, causal=False, zero_masked=False):
    """softmax(q kᵀ · scale + mask) v over [..., heads, seq, dim]; k and v may have fewer heads
    (grouped-query attention), each shared by heads // kv_heads query heads. A query row whose keys
    are all masked gives NaN (softmax's 0/0), or 0 with `zero_masked` (torch's SDPA since 2.5)."""
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if causal:
        lq, lk = s.shape[-2], s.shape[-1]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(lk - lq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if zero_masked:
        p = p.masked_fill((s == float("-inf")).all(-1, keepdim=True), 0.0)
    return torch.matmul(p, v)


def _linear(x, w, b=None, *, act="none"):
    """act(x @ w + b) with w stored [K, N]; the bias added before the product is rounded, as eager's
    nn.Linear does (addmm): in bfloat16/float16, a product rounded first is one more rounding off it."""
    if b is None:
        return ACTIVATIONS[act](torch.matmul(x, w))
    return ACTIVATIONS[act](torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1]))


def _gated_linear(x, w, b=None, *, act="none"):
    """act(gate) * up for [gate | up] = x @ w + b, w stored [K, 2F] (SwiGLU, GeGLU): -> [..., F]."""
    gate, up = _linear(x, w, b).chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


def _layer_norm(x, w, b, *, eps, ndim=1):
    return F.layer_norm(x, x.shape[-ndim:], w, b, eps)


def _rms_norm(x, w, *, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, cos, sin):
    """Rotary position embedding: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _recurrent(xw, r, *extra, cell, direction, acts, clip=None, lbr=False, input_forget=False, lens=None,
               optional=()):
    """ONNX's LSTM, GRU or RNN over a whole sequence (onnx/reference/ops/op_lstm.py, op_gru.py,
    op_rnn.py), its input projection already done: xw [seq, batch, dirs*G*H] is x W^T plus the
    biases (GRU with linear_before_reset: W's bias alone). r [dirs, G*H, H] is ONNX's R (gates i o f c,
    z r h, or one). `optional` names the extra inputs in order: "rb" (R's bias, [dirs, G*H], added to
    h R^T), "h0", "c0" ([dirs, batch, H]), "p" (peepholes i o f, [dirs, 3H]). acts: per direction the
    activation names (f, g, h). lens: per batch entry its length, an entry past it keeps its state
    and writes zeros. Returns [seq + 1 (+1 for LSTM), dirs, batch, H]: Y, then Y_h, then Y_c."""
    seq, batch, _ = xw.shape
    dirs, gh, hid = r.shape
    rows = seq + (2 if cell == "lstm" else 1)
    if xw.device.type == "meta":
        return xw.new_empty(rows, dirs, batch, hid)
    opt = dict(zip(optional, extra))
    fns = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
    out = xw.new_zeros(rows, dirs, batch, hid)
    live = None if lens is None else \
        torch.arange(seq, device=xw.device).reshape(seq, 1, 1) < torch.tensor(lens, device=xw.device).reshape(1, batch, 1)

    def cl(v):
        return v if clip is None else v.clamp(-clip, clip)

    for d in range(dirs):
        f, g, h_act = ([fns[a] for a in acts[d]] + [None, None])[:3]
        x = xw[:, :, d * gh:(d + 1) * gh]
        w = r[d]
        rb = opt["rb"][d] if "rb" in opt else xw.new_zeros(gh)
        h = opt["h0"][d] if "h0" in opt else xw.new_zeros(batch, hid)
        c = opt["c0"][d] if "c0" in opt else xw.new_zeros(batch, hid)
        steps = range(seq - 1, -1, -1) if direction == "reverse" or d == 1 else range(seq)
        for t in steps:
            xs = x[t].split(hid, -1)
            if cell == "lstm":
                gi, go, gf, gc = (h @ w.T + rb + x[t]).split(hid, -1)
                if "p" in opt:
                    p_i, p_o, p_f = opt["p"][d].split(hid)
                    gi, gf = gi + p_i * c, gf + p_f * c
                i = f(cl(gi))
                fg = 1 - i if input_forget else f(cl(gf))
                c_new = fg * c + i * g(cl(gc))
                if "p" in opt:
                    go = go + p_o * c_new
                h_new = f(cl(go)) * h_act(c_new)
            elif cell == "gru":
                wz, wr, wh = w.split(hid)
                bz, br, bh = rb.split(hid)
                z = f(cl(xs[0] + h @ wz.T + bz))
                rr = f(cl(xs[1] + h @ wr.T + br))
                hh = g(cl(xs[2] + (rr * (h @ wh.T + bh) if lbr else (rr * h) @ wh.T + bh)))
                h_new, c_new = (1 - z) * hh + z * h, c
            else:
                h_new, c_new = f(cl(xs[0] + h @ w.T + rb)), c
            if live is not None:
                h_new, c_new = torch.where(live[t], h_new, h), torch.where(live[t], c_new, c)
            out[t, d] = h_new if live is None else torch.where(live[t], h_new, 0.0)
            h, c = h_new, c_new
        out[seq, d] = h
        if cell == "lstm":
            out[seq + 1, d] = c
    return out


def _slice(x, *, axis, start, end, step=1):
    return x[(slice(None),) * axis + (slice(start, end, step),)]


def _gather(x, idx, *, axis):
    """ONNX Gather: out.shape = x.shape[:axis] + idx.shape + x.shape[axis+1:]."""
    flat = torch.index_select(x, axis, idx.reshape(-1).long())
    return flat.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _index(x, *idx, dims):
    """x[key] with advanced (tensor) indices at `dims` and full slices elsewhere, as torch does it."""
    key = [slice(None)] * (max(dims) + 1)
    for d, i in zip(dims, idx):
        key[d] = i if i.dtype == torch.bool else i.long()
    return x[tuple(key)]


def _torch_op(*inputs, target, args, kwargs, tensors, output=None):
    """A registered op ("ns::name.overload") called with its non-tensor `args` and `kwargs` and `inputs`
    in the tensor slots: tensors = (positions in args, names in kwargs), in the order of inputs
    (capture/fx.py, _torch_run); of an op returning several tensors, its `output`-th."""
    name, _, overload = target.partition(".")
    ns, op = name.split("::")
    try:
        fn = getattr(getattr(getattr(torch.ops, ns), op), overload or "default")
    except (AttributeError, RuntimeError):
        raise KfuseError(f"custom op {target} is not registered in this process: import the library that "
                         f"defines it") from None
    slots, names = tensors
    args, kwargs = list(args), dict(kwargs)
    for i, t in zip(slots, inputs):
        args[i] = t
    kwargs.update(zip(names, inputs[len(slots):]))
    out = fn(*args, **kwargs)
    return out if output is None else out[output]


def _reduce(fn):
    return lambda x, *, axes, keepdim=False: fn(x, dim=axes, keepdim=keepdim)


def _scatter(x, index, src, *, axis, reduce="none", include_self=True):
    """x with src's elements written (or reduced: sum, prod, mean, amax, amin) at `index` along
    `axis`: torch.scatter / scatter_reduce."""
    if reduce == "none":
        return torch.scatter(x, axis, index.long(), src)
    return torch.scatter_reduce(x, axis, index.long(), src, reduce, include_self=include_self)


def _index_put(x, values, *idx, dims, accumulate=False, inplace=False):
    """x[key] = values (or += with accumulate), key holding the index tensors at `dims` and full
    slices elsewhere: the functional form of torch's item assignment. `inplace` writes into x (a
    graph input the model mutates and nothing else reads: a KV cache's new rows)."""
    key = [None] * (max(dims) + 1)
    for d, i in zip(dims, idx):
        key[d] = i if i.dtype == torch.bool else i.long()
    op = torch.ops.aten.index_put_.default if inplace else torch.ops.aten.index_put.default
    return op(x, key, values.to(x.dtype), accumulate)


def _embedding_bag(weight, indices, offsets, per_sample_weights=None, *, mode, include_last_offset=False,
                   padding_idx=None):
    """Bags of rows of `weight` (one bag per offset) reduced by mode "sum", "mean" or "max"; an empty
    bag gives zeros, as torch's does."""
    return F.embedding_bag(indices, weight, offsets, mode=mode, per_sample_weights=per_sample_weights,
                           include_last_offset=include_last_offset, padding_idx=padding_idx)


def _avg_pool2d(x, *, kernel, stride, padding, ceil_mode=False, count_include_pad=True):
    return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)


def _nhwc(fn):
    """fn on NCHW tensors, also taking attr layout="nhwc": then x and the result are [N, H, W, C]
    (the channels-last pass, kfuse/passes/layout.py). torch runs it on the channels-last view of x,
    so the result's permute back is contiguous."""
    def run(x, *args, layout="nchw", **attrs):
        if layout == "nchw":
            return fn(x, *args, **attrs)
        return fn(x.permute(0, 3, 1, 2), *args, **attrs).permute(0, 2, 3, 1)
    return run


def _col2im(cols, *, image, block, dilations, pads, strides):
    """ONNX Col2Im: [N, C * prod(block), L] columns summed back into [N, C, *image] (any number of
    spatial dims; pads are ONNX's begins then ends)."""
    nd = len(image)
    padded = [image[i] + pads[i] + pads[nd + i] for i in range(nd)]
    counts = [(padded[i] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    n, c = cols.shape[0], cols.shape[1] // math.prod(block)
    cols = cols.reshape(n, c, math.prod(block), *counts)
    out = cols.new_zeros((n, c, *padded))
    for b, offset in enumerate(itertools.product(*(range(k) for k in block))):
        key = tuple(slice(o * d, o * d + (m - 1) * s + 1, s) for o, d, m, s in zip(offset, dilations, counts, strides))
        out[(slice(None), slice(None)) + key] += cols[:, :, b]
    return out[(slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + image[i]) for i in range(nd))]


def _fft(x, *, kind, dims, norm, forward=True, onesided=True, length=0):
    """aten's _fft_r2c, _fft_c2c and _fft_c2r over `dims`, with complex values carried as float [..., 2]
    pairs (capture/complex.py): "r2c" takes a real x and "c2r" returns a real tensor of `length` elements
    along the last of dims. norm: aten's code (0 none, 1 by 1/sqrt(n), 2 by 1/n)."""
    dims = list(dims)
    if kind == "r2c":
        return torch.view_as_real(torch.ops.aten._fft_r2c(x, dims, norm, onesided))
    z = torch.view_as_complex(x.contiguous())
    if kind == "c2r":
        return torch.ops.aten._fft_c2r(z, dims, norm, length)
    return torch.view_as_real(torch.ops.aten._fft_c2c(z, dims, norm, forward))


def _roi_points(start, bin_size, grid, bins: int, most: int):
    """One axis of RoiAlign's sample points for R ROIs ([R] float64 starts and bin sizes, [R] grid counts):
    bins x `most` points each, bin-major, and which are used (those within each ROI's own grid)."""
    k = torch.arange(most, dtype=torch.float64)
    t = (start[:, None, None] + torch.arange(bins, dtype=torch.float64)[:, None] * bin_size[:, None, None]
         + (k + 0.5) * bin_size[:, None, None] / grid.clamp(min=1)[:, None, None])
    return t.reshape(len(start), -1), (k < grid[:, None, None]).expand(t.shape).reshape(len(start), -1)


def _roi_inside(t, size: int):
    """Whether points t lie within a pixel of [0, size]: RoiAlign weights the others 0."""
    return (t >= -1.0) & (t <= size)


def _roi_corners(t, size: int):
    """The lower and upper input index of points t and their bilinear weights, zero where a point lies
    more than a pixel outside [0, size] (clamped to the edge within it)."""
    inside = _roi_inside(t, size)
    t = t.clamp(min=0.0)
    low = t.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    frac = torch.where(edge, 0.0, t - low)
    return low, torch.where(edge, low, low + 1), (1.0 - frac) * inside, frac * inside


def _roi_align(x, rois, batch, *, height, width, ratio, scale, half_pixel, mode):
    """ONNX RoiAlign: each ROI [x1, y1, x2, y2] (times scale, minus half a pixel with half_pixel) of image
    batch[r] cut into height x width bins, each the average (or, by ONNX's rule, the largest of the
    weighted corner terms) over a grid of bilinear samples: `ratio` per bin and axis, or ceil(bin size)
    where ratio is 0. ROIs of one image in chunks, each on the largest grid of its chunk with the extra
    points unused. The average's samples are grid_sample's (border padding clamps as ONNX does; points more
    than a pixel outside weighted 0), summed per bin by avg_pool2d: 1000 ROIs of a [2, 256, 50, 50] map
    took 1.3 s as gathers of every corner. The max, and a map with a NaN or Inf (where 0 x NaN must stay
    out), take the gathers."""
    r, c, h, w = rois.shape[0], x.shape[1], x.shape[2], x.shape[3]
    out = x.new_zeros((r, c, height, width))
    if x.is_meta or out.numel() == 0:
        return out
    if int(batch.min()) < 0 or int(batch.max()) >= x.shape[0]:
        raise ValueError(f"RoiAlign: batch index {int(batch.min())}..{int(batch.max())} outside a batch of {x.shape[0]}")
    box = rois.double() * scale - (0.5 if half_pixel else 0.0)
    size = box[:, 2:] - box[:, :2]                                  # [R, (width, height)]
    if not half_pixel:
        size = size.clamp(min=1.0)
    bins = size / torch.tensor([width, height], dtype=torch.float64)
    grid = torch.full_like(size, ratio, dtype=torch.long) if ratio > 0 else torch.ceil(bins).long()
    count = (grid[:, 0] * grid[:, 1]).clamp(min=1).to(x.dtype)[:, None, None, None]
    sampled = mode == "avg" and bool(torch.isfinite(x).all())
    step = max(1, (1 << 22) // max(1, height * width * int(grid[:, 0].max()) * int(grid[:, 1].max()) * c))
    rows = None if sampled else x.permute(0, 2, 3, 1).reshape(-1, c)     # the gathers' pixels, channels contiguous
    for n in batch.unique().tolist():
        ids = (batch == n).nonzero().reshape(-1)
        for k in ids.split(step):
            gw, gh = grid[k, 0], grid[k, 1]
            most_h, most_w = int(gh.max()), int(gw.max())
            if not most_h or not most_w:        # every ROI here empty: no sample, 0 (as ONNX's reference)
                continue
            ty, uy = _roi_points(box[k, 1], bins[k, 1], gh, height, most_h)
            tx, ux = _roi_points(box[k, 0], bins[k, 0], gw, width, most_w)
            if sampled:
                at = torch.stack(torch.broadcast_tensors((2 * tx[:, None, :] + 1) / w - 1, (2 * ty[:, :, None] + 1) / h - 1), -1)
                v = F.grid_sample(x[int(n)][None].expand(len(k), -1, -1, -1), at.to(x.dtype), mode="bilinear",
                                  padding_mode="border", align_corners=False)
                keep = (_roi_inside(ty, h) & uy)[:, :, None] & (_roi_inside(tx, w) & ux)[:, None, :]
                out[k] = F.avg_pool2d(v.mul_(keep[:, None].to(x.dtype)), (most_h, most_w)) * (most_h * most_w) / count[k]
                continue
            (yl, yh, wyl, wyh), (xl, xh, wxl, wxh) = _roi_corners(ty, h), _roi_corners(tx, w)
            terms = [rows[int(n) * h * w + ya[:, :, None] * w + xa[:, None, :]]
                     * (wa[:, :, None] * wb[:, None, :]).to(x.dtype)[..., None]
                     for ya, wa in ((yl, wyl), (yh, wyh)) for xa, wb in ((xl, wxl), (xh, wxh))]    # [k, A, B, C] each
            used = (uy[:, :, None] & ux[:, None, :])[..., None]
            shape = (len(k), height, most_h, width, most_w, c)
            if mode == "avg":
                v = torch.where(used, terms[0] + terms[1] + terms[2] + terms[3], 0.0).reshape(shape).sum((2, 4)) / count[k]
            else:
                v = torch.where(used, torch.stack(terms).amax(0), -math.inf).reshape(shape).amax((2, 4))
                v = torch.where((gh * gw > 0)[:, None, None, None], v, 0.0)        # no sample: 0, as ONNX's reference
            out[k] = v.permute(0, 3, 1, 2)
    return out

# Activations a linear/contraction epilogue may carry, by name.
ACTIVATIONS = {
    "none": lambda x: x,
    "relu": torch.relu,
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def _resize(x, *, size, mode="nearest", align_corners=None):
    if x.numel() == 0:          # torch's meta kernels reject an empty batch; the result is empty anyway
        return x.new_empty((*x.shape[:2], *size))
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=align_corners)


def _group_norm(x, w=None, b=None, *, groups, eps, silu=False):
    """GroupNorm (+ SiLU) on NCHW x; w, b [C] or absent."""
    y = F.group_norm(x, groups, w, b, eps)
    return F.silu(y) if silu else y


SE_ACTIVATIONS = {**ACTIVATIONS, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid}


def _squeeze_excite(x, w1, b1, w2, b2, *, act1, act2, slope=0.0):
    """A squeeze-excitation block (MobileNetV3, EfficientNet, RegNetY) on channels-last x [N, H, W, C]:
    x * act2(W2 act1(W1 mean_hw(x) + b1) + b2), w1 [R, C], w2 [C, R]; act1 "leaky_relu" takes `slope`."""
    h = F.linear(x.mean((1, 2)), w1, b1)
    h = F.leaky_relu(h, slope) if act1 == "leaky_relu" else SE_ACTIVATIONS[act1](h)
    return x * SE_ACTIVATIONS[act2](F.linear(h, w2, b2))[:, None, None, :]


def _reduce_prod(x, *, axes, keepdim=False):
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = torch.prod(x, a, keepdim=keepdim)
    return x


REFERENCE = {
    "copy": torch.clone, "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal, "sin": torch.sin, "cos": torch.cos,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf, "relu": torch.relu,
    "gelu": lambda x, *, approximate="none": F.gelu(x, approximate=approximate),
    "silu": F.silu, "floor": torch.floor, "ceil": torch.ceil, "logical_not": torch.logical_not,
    "cast": lambda x, *, dtype: x.to(dtype),
    "clamp": lambda x, *, min=None, max=None: torch.clamp(x, min, max),
    "leaky_relu": lambda x, *, alpha: F.leaky_relu(x, alpha),
    "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
    "isnan": torch.isnan, "sign": torch.sign, "log1p": torch.log1p, "expm1": torch.expm1,
    "softplus": lambda x, *, beta=1.0, threshold=20.0: F.softplus(x, beta, threshold),
    "elu": lambda x, *, alpha=1.0, scale=1.0, input_scale=1.0: torch.ops.aten.elu(x, alpha, scale, input_scale),
    "round": torch.round, "trunc": torch.trunc, "erfc": torch.erfc, "atan": torch.atan, "tan": torch.tan,
    **{op: getattr(torch, op) for op in ("asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh", "log2", "log10")},
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "eq": torch.eq, "ne": torch.ne,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or, "where": torch.where,
    "fmod": torch.fmod, "remainder": torch.remainder, "atan2": torch.atan2,
    "floor_div": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "trunc_div": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
    "reshape": lambda x, *, shape: x.reshape(shape),
    "transpose": lambda x, *, perm: x.permute(perm),
    "expand": lambda x, *, shape: x.expand(shape),
    "slice": _slice,
    "concat": lambda *xs, axis: torch.cat(xs, axis),
    "gather": _gather,
    "index": _index,
    "gather_elements": lambda x, idx, *, axis: torch.gather(x, axis, idx.long()),
    "pad": lambda x, *, pads, value=0.0, mode="constant":
        F.pad(x, pads, value=value) if mode == "constant" else F.pad(x, pads, mode=mode),
    "flip": lambda x, *, dims: torch.flip(x, dims),
    "repeat": lambda x, *, repeats: x.repeat(repeats),
    "triu": lambda x, *, diagonal=0: torch.triu(x, diagonal),
    "tril": lambda x, *, diagonal=0: torch.tril(x, diagonal),
    "reduce_sum": _reduce(torch.sum), "reduce_mean": _reduce(torch.mean),
    "reduce_max": _reduce(torch.amax), "reduce_min": _reduce(torch.amin),
    "reduce_var": lambda x, *, axes, correction=1, keepdim=False: torch.var(x, axes, correction=correction, keepdim=keepdim),
    "argmax": lambda x, *, axis, keepdim=False: torch.argmax(x, axis, keepdim),
    "argmin": lambda x, *, axis, keepdim=False: torch.argmin(x, axis, keepdim),
    "reduce_prod": _reduce_prod,
    "softmax": lambda x, *, axis: torch.softmax(x, axis),
    "log_softmax": lambda x, *, axis: torch.log_softmax(x, axis),
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "matmul": torch.matmul,
    "linear": _linear,
    "gated_linear": _gated_linear,
    "conv2d": _nhwc(lambda x, w, b=None, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1:
                    F.conv2d(x, w, b, stride, padding, dilation, groups)),
    "attention": _attention,
    "max_pool2d": _nhwc(lambda x, *, kernel, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False:
                        F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)),
    "avg_pool2d": _nhwc(_avg_pool2d),
    "cumsum": lambda x, *, axis: torch.cumsum(x, axis),
    "cumprod": lambda x, *, axis: torch.cumprod(x, axis),
    "topk": lambda x, *, k, axis=-1, largest=True, sorted=True, output="values":
        torch.topk(x, k, axis, largest, sorted)[output == "indices"],
    "sort": lambda x, *, axis=-1, descending=False, output="values":
        torch.sort(x, dim=axis, descending=descending, stable=True)[output == "indices"],
    "resize": _resize,
    "conv_transpose2d": _nhwc(lambda x, w, b=None, *, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), groups=1,
                              dilation=(1, 1): F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups,
                                                                  dilation)),
    "rope": _rope,
    "recurrent": _recurrent,
    "squeeze_excite": _squeeze_excite,
    "group_norm": _nhwc(_group_norm),
    "conv3d": lambda x, w, b=None, *, stride, padding, dilation, groups=1:
        F.conv3d(x, w, b, stride, padding, dilation, groups),
    "conv_transpose3d": lambda x, w, b=None, *, stride, padding, output_padding, groups=1, dilation:
        F.conv_transpose3d(x, w, b, stride, padding, output_padding, groups, dilation),
    # run by torch as they are (opaque to fusion)
    "max_pool3d": lambda x, *, kernel, stride, padding, dilation, ceil_mode=False:
        F.max_pool3d(x, kernel, stride, padding, dilation, ceil_mode),
    "avg_pool3d": lambda x, *, kernel, stride, padding, ceil_mode=False, count_include_pad=True:
        F.avg_pool3d(x, kernel, stride, padding, ceil_mode, count_include_pad),
    "adaptive_avg_pool2d": _nhwc(lambda x, *, size: F.adaptive_avg_pool2d(x, size)),
    "adaptive_max_pool2d": _nhwc(lambda x, *, size: F.adaptive_max_pool2d(x, size)),
    "adaptive_avg_pool3d": lambda x, *, size: F.adaptive_avg_pool3d(x, size),
    "adaptive_max_pool3d": lambda x, *, size: F.adaptive_max_pool3d(x, size),
    "embedding_bag": _embedding_bag,
    "scatter": _scatter,
    "index_put": _index_put,
    "bitcast": lambda x, *, dtype: x.view(dtype),
    "grid_sample": lambda x, grid, *, mode, padding_mode, align_corners:
        F.grid_sample(x, grid, mode, padding_mode, align_corners),
    "affine_grid": lambda theta, *, size, align_corners: F.affine_grid(theta, list(size), align_corners),
    "col2im": _col2im,
    "det": torch.linalg.det,
    "fft": _fft,
    "roi_align": _roi_align,
    "torch_op": _torch_op,
    "histc": lambda x, *, bins, min, max: torch.histc(x, bins, min, max),
    "grouped_mm": lambda a, b, offs: torch._grouped_mm(a, b, offs=offs),
    "max_pool_indices": lambda x, *, kernel, stride, padding, dilation, ceil_mode=False:
        getattr(F, f"max_pool{len(kernel)}d")(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)[1],
}


def run(graph, inputs, *, keep=None):
    """Interpret `graph` op by op on `inputs` (torch tensors); returns the list of outputs.
    With `keep` (a set of nodes), also returns a dict of those nodes' values."""
    if len(inputs) != len(graph.inputs):
        raise GraphError(f"graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env = {}
    for n in graph.nodes:
        if n.op == "input":
            env[n] = inputs[n.attrs["index"]]
        elif n.op == "const":
            env[n] = n.value
        else:
            env[n] = REFERENCE[n.op](*[env[i] for i in n.inputs], **n.attrs)
    outs = [env[o] for o in graph.outputs]
    if graph.mutated:           # the model's in-place writes into its inputs
        n = len(outs) - len(graph.mutated)
        for i, new in zip(graph.mutated, outs[n:]):
            if new is not inputs[i]:
                inputs[i].copy_(new)
        outs = outs[:n]
    return (outs, {n: env[n] for n in keep}) if keep is not None else outs
