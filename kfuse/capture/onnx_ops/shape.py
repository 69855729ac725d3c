"""ONNX handlers of constants and shapes (folded at load time), If on a constant (or specialised) condition, and
data movement: reshapes, slices, gathers and scatters, padding, tiling and Resize."""
from __future__ import annotations

import math

import numpy as np
import torch

from ...ir import Node
from ..common import reshape, wrap_index
from .common import _axis, _Node, _pad, _slice_axis, handler, inline_graph
from .sampling import resize_by_matrices

# -- constants and shapes -------------------------------------------------------------------------

@handler("Constant")
def _constant(n):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in n.attrs:
            v = n.attr(key)
            return n.const(v if isinstance(v, torch.Tensor) else torch.tensor(v))
    n.fail(f"constant of kind {sorted(n.attrs)} is not supported")


@handler("ConstantOfShape")
def _constant_of_shape(n, shape):
    fill = n.attr("value")
    fill = torch.zeros(1) if fill is None else fill
    return n.const(torch.full(n.ints(shape, "shape"), fill.reshape(-1)[0].item(), dtype=fill.dtype))


@handler("Shape")
def _shape(n, x):
    rank = len(x.shape)
    start = min(max(_axis(n.attr("start", 0), rank), 0), rank)
    end = min(max(_axis(n.attr("end", rank), rank), 0), rank)
    return n.const(torch.tensor(x.shape[start:end], dtype=torch.int64))


@handler("Size")
def _size(n, x):
    return n.const(torch.tensor(x.numel, dtype=torch.int64))


@handler("Range")
def _range(n, start, limit, delta):
    s, e, d = (n.value(v, what) for v, what in ((start, "start"), (limit, "limit"), (delta, "delta")))
    count = max(math.ceil((e.item() - s.item()) / d.item()), 0)  # ONNX's definition of the length
    return n.const((torch.arange(count) * d + s).to(s.dtype))


@handler("If")
def _if(n, cond):
    """The branch an If takes, inlined: its condition is a constant, or computed from inputs and
    specialised by value (n.value). Its nodes see the enclosing scope, and their names do not leak
    out of it."""
    if cond.numel != 1:
        n.fail(f"the condition has {cond.numel} elements, not one")
    branch = n.attr("then_branch" if bool(n.value(cond, "the condition").reshape(-1)[0]) else "else_branch")
    return inline_graph(n, branch)


# -- data movement --------------------------------------------------------------------------------

@handler("Reshape")
def _reshape_h(n, x, shape):
    target = n.ints(shape, "shape")
    allowzero = n.attr("allowzero", 0)
    target = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    return reshape(n, x, target)   # which infers a -1


@handler("Flatten")
def _flatten(n, x):
    axis = _axis(n.attr("axis", 1), len(x.shape))
    return reshape(n, x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@handler("Squeeze")
def _squeeze(n, x, axes=None):
    axes = n.ints(axes, "axes", "axes")
    rank = len(x.shape)
    axes = [i for i, d in enumerate(x.shape) if d == 1] if axes is None else [_axis(a, rank) for a in axes]
    if any(x.shape[a] != 1 for a in axes):
        n.fail(f"squeezes axes {axes} of shape {list(x.shape)}, which are not all of size 1")
    return reshape(n, x, [d for i, d in enumerate(x.shape) if i not in axes])


@handler("Unsqueeze")
def _unsqueeze(n, x, axes=None):
    axes = n.ints(axes, "axes", "axes")
    rank = len(x.shape) + len(axes)
    shape = list(x.shape)
    for a in sorted(_axis(a, rank) for a in axes):
        shape.insert(a, 1)
    return reshape(n, x, shape)


@handler("Transpose")
def _transpose(n, x):
    perm = list(n.attr("perm", reversed(range(len(x.shape)))))
    return x if perm == sorted(perm) else n.add("transpose", x, perm=perm)


@handler("Concat")
def _concat(n, *xs):
    xs = [x for x in xs if x is not None]
    return xs[0] if len(xs) == 1 else n.add("concat", *xs, axis=_axis(n.attr("axis"), len(xs[0].shape)))


@handler("Slice")
def _slice(n, x, starts=None, ends=None, axes=None, steps=None):
    starts, ends = n.ints(starts, "starts", "starts"), n.ints(ends, "ends", "ends")
    axes = n.ints(axes, "axes", "axes") or list(range(len(starts)))
    steps = n.ints(steps, "steps") or [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps):
        x = _slice_axis(n, x, _axis(a, len(x.shape)), s, e, st)
    return x


@handler("Split")
def _split(n, x, split=None):
    axis = _axis(n.attr("axis", 0), len(x.shape))
    dim, count = x.shape[axis], n.n_outputs()
    sizes = n.ints(split, "split", "split")
    if sizes is None:  # equal parts; with num_outputs (opset 18) the last part may be smaller
        part = math.ceil(dim / n.attr("num_outputs", count))
        sizes = [min(part, dim - i * part) for i in range(count)]
    if sum(sizes) != dim:
        n.fail(f"split sizes {sizes} do not add up to dim {dim}")
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    return [_slice_axis(n, x, axis, s, s + size, 1) for s, size in zip(starts, sizes)]


def _positions(shape) -> torch.Tensor:
    """Each element's position in the row-major flattening of `shape` (torch indexing on this
    tensor turns constant ONNX indices into flat positions, negative ones included)."""
    return torch.arange(math.prod(shape)).reshape(shape)


def _flat_gather(n: _Node, x: Node, flat_index: torch.Tensor) -> Node:
    """Elements of x at constant positions of its flattened form; the result has flat_index's shape."""
    return n.add("gather", reshape(n, x, (x.numel,)), n.const(flat_index), axis=0)


@handler("Gather")
def _gather(n, x, idx):
    axis = _axis(n.attr("axis", 0), len(x.shape))
    return n.add("gather", x, wrap_index(n, idx, x.shape[axis]), axis=axis)


@handler("GatherElements")
def _gather_elements(n, x, idx):
    """out[i][j][k] = x[i][idx[i][j][k]][k] (axis 1): a gather of x's elements at constant positions,
    or a gather_elements when the indices are computed at run time."""
    axis = _axis(n.attr("axis", 0), len(x.shape))
    if idx.op != "const":   # indices are data: a gather_elements at run time
        return n.add("gather_elements", x, wrap_index(n, idx, x.shape[axis]), axis=axis)
    index = idx.value.long()
    index = torch.where(index < 0, index + x.shape[axis], index)
    return _flat_gather(n, x, _positions(x.shape).gather(axis, index))


@handler("GatherND")
def _gather_nd(n, x, idx):
    """x indexed by the last dim of `indices` (per batch entry with batch_dims): a gather at constant positions, or an
    index op with one index tensor per leading dim when the indices are computed at run time."""
    b, k = n.attr("batch_dims", 0), idx.shape[-1]
    if b:   # the batch dims as one, indexed by an arange beside the k index tensors
        nb, m = math.prod(x.shape[:b]), math.prod(idx.shape[b:-1])
        xb, ib = reshape(n, x, (nb,) + x.shape[b:]), reshape(n, idx, (nb, m, k))
        parts = [wrap_index(n, reshape(n, _slice_axis(n, ib, 2, j, j + 1, 1), (nb, m)), x.shape[b + j])
                 for j in range(k)]
        rows = n.const(torch.arange(nb, dtype=torch.int64).reshape(nb, 1))
        y = n.add("index", xb, rows, *parts, dims=tuple(range(k + 1)))
        return reshape(n, y, idx.shape[:-1] + x.shape[b + k:])
    if idx.op != "const":   # indices are data: x[idx[..., 0], ..., idx[..., k-1]] at run time
        parts = [wrap_index(n, reshape(n, _slice_axis(n, idx, len(idx.shape) - 1, j, j + 1, 1), idx.shape[:-1]),
                                  x.shape[j]) for j in range(k)]
        return n.add("index", x, *parts, dims=tuple(range(k)))
    index = idx.value.long()
    rows = reshape(n, x, (math.prod(x.shape[:k]),) + x.shape[k:])  # the first k dims as one
    return n.add("gather", rows, n.const(_positions(x.shape[:k])[index.unbind(-1)]), axis=0)


_SCATTER_REDUCE = {"none": "none", "add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_reduction(n):
    red = n.attr("reduction", "none")
    if red not in _SCATTER_REDUCE:
        n.unsupported(f"reduction {red!r}")
    return red


@handler("ScatterElements", "Scatter")
def _scatter_elements(n, x, idx, updates):
    """ScatterElements (and the old Scatter): one scatter op along `axis`, run by torch; negative
    indices count from the end, as ONNX allows."""
    axis = _axis(n.attr("axis", 0), len(x.shape))
    red = _SCATTER_REDUCE[_scatter_reduction(n)]
    return n.add("scatter", x, wrap_index(n, idx, x.shape[axis]), updates, axis=axis, reduce=red)


@handler("ScatterND")
def _scatter_nd(n, x, idx, updates):
    """ScatterND: x[idx[..., 0], ..., idx[..., k-1]] = updates (or += / *= ... by `reduction`): an
    index_put with one index tensor per leading dim of x; add is its accumulate, the others are not
    mapped."""
    red = _scatter_reduction(n)
    k = idx.shape[-1]
    parts = [wrap_index(n, reshape(n, _slice_axis(n, idx, len(idx.shape) - 1, j, j + 1, 1), idx.shape[:-1]),
                              x.shape[j]) for j in range(k)]
    if red in ("none", "add"):
        return n.add("index_put", x, updates, *parts, dims=tuple(range(k)), accumulate=red == "add")
    # mul, max, min: a scatter_reduce along the first axis of x viewed [prod(x.shape[:k]), rest], at
    # the row numbers the k indices name
    rows, rest = math.prod(x.shape[:k]), math.prod(x.shape[k:])
    flat = None
    for j, p in enumerate(parts):
        term = n.add("mul", p, n.const(math.prod(x.shape[j + 1:k]), dtype=p.dtype)) if j < k - 1 else p
        flat = term if flat is None else n.add("add", flat, term)
    m = math.prod(idx.shape[:-1])
    index = n.add("expand", reshape(n, n.add("cast", flat, dtype=torch.int64), (m, 1)), shape=(m, rest))
    y = n.add("scatter", reshape(n, x, (rows, rest)), index, reshape(n, updates, (m, rest)), axis=0,
              reduce=_SCATTER_REDUCE[red])
    return reshape(n, y, x.shape)


@handler("Expand")
def _expand(n, x, shape):
    out = tuple(torch.broadcast_shapes(x.shape, tuple(n.ints(shape, "shape"))))
    return x if out == x.shape else n.add("expand", x, shape=out)


@handler("Tile")
def _tile(n, x, repeats):
    reps = n.ints(repeats, "repeats")
    if all(r == 1 for r in reps):
        return x
    # Tile repeats the whole tensor along each dim: [r0, d0, r1, d1, ...] flattened pairwise.
    inter = [v for d in x.shape for v in (1, d)]
    wide = [v for r, d in zip(reps, x.shape) for v in (r, d)]
    y = n.add("expand", reshape(n, x, inter), shape=tuple(wide))
    return reshape(n, y, [r * d for r, d in zip(reps, x.shape)])


@handler("Trilu")
def _trilu(n, x, k=None):
    diagonal = 0 if k is None else int(n.value(k, "k").item())
    return n.add("triu" if n.attr("upper", 1) else "tril", x, diagonal=diagonal)


@handler("Pad")
def _pad_h(n, x, pads=None, value=None, axes=None):
    mode = n.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        n.unsupported(f"pad mode {mode!r}")
    pads = n.ints(pads, "pads", "pads")
    fill = n.attr("value", 0.0) if value is None else n.value(value, "constant_value").item()
    rank = len(x.shape)
    axes = [_axis(a, rank) for a in (n.ints(axes, "axes") or range(rank))]
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begins[a], ends[a] = pads[i], pads[i + len(axes)]
    return _pad(n, x, begins, ends, fill) if mode == "constant" else _pad_mode(n, x, begins, ends, mode)


_TORCH_PAD = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad_mode(n, x, begins, ends, mode):
    """reflect / edge / wrap padding. torch pads the last 1 to 3 dims of a tensor with one or two
    more in these modes: more dims before the first padded one are flattened into one. Pads that do
    not fit (padding a dim further than torch wraps or reflects, more dims, negative pads) become one
    gather per dim of the positions numpy's pad reads, which is how ONNX defines the modes."""
    rank = len(x.shape)
    padded = [a for a in range(rank) if begins[a] or ends[a]]
    if not padded:
        return x
    first = padded[0]
    limit = {"reflect": lambda d: d - 1, "edge": lambda d: math.inf, "wrap": lambda d: d}[mode]
    if rank - first <= 3 and all(0 <= p <= limit(x.shape[a]) for a in padded for p in (begins[a], ends[a])):
        y = x if first in (1, 2) else reshape(n, x, (math.prod(x.shape[:first]),) + x.shape[first:])
        pads = [int(p) for a in reversed(range(first, rank)) for p in (begins[a], ends[a])]
        y = n.add("pad", y, pads=pads, mode=_TORCH_PAD[mode])
        return reshape(n, y, [d + b + e for d, b, e in zip(x.shape, begins, ends)])
    for a in padded:
        dim, b, e = x.shape[a], begins[a], ends[a]
        keep = np.arange(max(-b, 0), dim - max(-e, 0))  # negative pads remove elements
        index = np.pad(keep, (max(b, 0), max(e, 0)), mode={"edge": "edge"}.get(mode, mode))
        x = n.add("gather", x, n.const(torch.from_numpy(index).long()), axis=a)
    return x


@handler("DepthToSpace")
def _depth_to_space(n, x):
    if len(x.shape) != 4:
        n.fail(f"the input must be [N, C, H, W], got shape {list(x.shape)}")
    b = n.attr("blocksize")
    batch, c, h, w = x.shape
    if n.attr("mode", "DCR") == "DCR":  # depth ordered (block row, block column, channel)
        y = n.add("transpose", reshape(n, x, (batch, b, b, c // (b * b), h, w)), perm=[0, 3, 4, 1, 5, 2])
    else:  # CRD: (channel, block row, block column)
        y = n.add("transpose", reshape(n, x, (batch, c // (b * b), b, b, h, w)), perm=[0, 1, 4, 2, 5, 3])
    return reshape(n, y, (batch, c // (b * b), h * b, w * b))


@handler("SpaceToDepth")
def _space_to_depth(n, x):
    if len(x.shape) != 4:
        n.fail(f"the input must be [N, C, H, W], got shape {list(x.shape)}")
    b = n.attr("blocksize")
    batch, c, h, w = x.shape
    mode = n.attr("mode", "DCR")   # an attribute since opset 28; before it, always DCR
    if mode not in ("DCR", "CRD"):
        n.fail(f"mode {mode!r} is neither DCR nor CRD")
    # DCR: output channels ordered (block row, block column, channel); CRD: (channel, block row, block column)
    perm = [0, 3, 5, 1, 2, 4] if mode == "DCR" else [0, 1, 3, 5, 2, 4]
    y = n.add("transpose", reshape(n, x, (batch, c, h // b, b, w // b, b)), perm=perm)
    return reshape(n, y, (batch, c * b * b, h // b, w // b))


@handler("OneHot")
def _one_hot(n, indices, depth, values):
    """where(indices[..., None] == arange(depth), on, off), the class axis placed at `axis`."""
    d = int(n.value(depth, "depth").reshape(-1)[0].item())
    if values.op == "const":
        off, on = (n.const(v) for v in values.value.reshape(-1))
    else:   # [off, on] given at run time: data, not specialised
        flat = reshape(n, values, (2,))
        off, on = (n.add("gather", flat, n.const(torch.tensor(i)), axis=0) for i in (0, 1))
    if indices.dtype.is_floating_point:  # non-integer indices are cast to int64 first
        indices = n.add("cast", indices, dtype=torch.int64)
    rank = len(indices.shape) + 1
    axis = _axis(n.attr("axis", -1), rank)
    indices = wrap_index(n, indices, d)  # -depth..-1 count from the end; others match nothing
    classes = torch.arange(d, dtype=indices.dtype).reshape([d if i == axis else 1 for i in range(rank)])
    hit = n.add("eq", reshape(n, indices, indices.shape[:axis] + (1,) + indices.shape[axis:]), n.const(classes))
    return n.add("where", hit, on, off)


# -- Resize ---------------------------------------------------------------------------------------

def _resize_source(coord, out, size, scale):
    """Where each of `out` output positions samples the input (size `size`) along one axis, by
    ONNX's coordinate transformation, in float32 as ONNX Runtime computes it."""
    x, s, f32 = np.arange(out, dtype=np.float32), np.float32(scale), np.float32
    if coord in ("half_pixel", "pytorch_half_pixel"):
        if coord == "pytorch_half_pixel" and out == 1:
            return np.zeros(1, np.float32)
        return (x + f32(0.5)) / s - f32(0.5)
    if coord == "align_corners":
        return x * f32(size - 1) / f32(out - 1) if out > 1 else np.zeros(out, np.float32)
    if coord == "asymmetric":
        return x / s
    if coord == "half_pixel_symmetric":
        adjustment = f32(out) / (s * f32(size))
        offset = f32(size) / f32(2) * (f32(1) - adjustment)
        return offset + (x + f32(0.5)) / s - f32(0.5)
    return None


_NEAREST = {"round_prefer_floor": lambda x, s: np.ceil(x - np.float32(0.5)),
            "round_prefer_ceil": lambda x, s: np.floor(x + np.float32(0.5)),
            "floor": lambda x, s: np.floor(x), "ceil": lambda x, s: np.ceil(x),
            # opset 10: ceil when downsampling, floor otherwise (ONNX Runtime's behaviour)
            "simple": lambda x, s: np.ceil(x) if s < 1 else np.floor(x)}


def _torch_map(size, out, mode, align_corners=None):
    """Where torch's F.interpolate samples along one axis: it interpolates positions 0..size-1."""
    ramp = torch.arange(size, dtype=torch.float64).reshape(1, 1, size)
    return torch.nn.functional.interpolate(ramp, size=out, mode=mode, align_corners=align_corners).reshape(-1).numpy()


@handler("Resize")
def _resize(n, x, roi=None, scales=None, sizes=None):
    """Resize as torch's F.interpolate mode where that samples exactly where ONNX does (checked per
    axis at load time), else nearest as a gather per axis and linear as two gathers and weights per
    axis (ONNX's linear is separable); cubic only where torch's bicubic matches."""
    if n.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        roi, scales = None, roi
    rank = len(x.shape)
    mode = n.attr("mode", "nearest")
    coord = n.attr("coordinate_transformation_mode", "half_pixel") if n.opset >= 11 else "asymmetric"
    nearest = n.attr("nearest_mode", "round_prefer_floor") if n.opset >= 11 else "simple"
    described = f"mode={mode!r}, coordinate_transformation_mode={coord!r}" + (
        f", nearest_mode={nearest!r}" if mode == "nearest" else "")
    by_matrices = bool(n.attr("antialias", 0)) or coord == "tf_crop_and_resize"
    if mode not in ("nearest", "linear", "cubic") or (_resize_source(coord, 1, 1, 1.0) is None and not by_matrices) \
            or (mode == "nearest" and nearest not in _NEAREST):
        n.unsupported(described)
    if by_matrices and (mode == "nearest" or not x.dtype.is_floating_point):
        n.unsupported(f"{described}, antialias={n.attr('antialias', 0)} on {x.dtype} input")
    axes = [_axis(a, rank) for a in n.attr("axes", range(rank))]
    out, scale = list(x.shape), [1.0] * rank
    if sizes is not None and sizes.numel:
        wanted = n.ints(sizes, "sizes")
        policy = n.attr("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for a, o in zip(axes, wanted):
                out[a], scale[a] = o, float(np.float32(o) / np.float32(x.shape[a]))
        else:  # one scale for all the axes, the largest (or smallest) that fits the sizes
            r = (min if policy == "not_larger" else max)(o / x.shape[a] for a, o in zip(axes, wanted))
            for a in axes:
                out[a], scale[a] = math.floor(r * x.shape[a] + 0.5), r
    elif scales is not None and scales.numel:
        for a, sc in zip(axes, n.value(scales, "scales").reshape(-1).tolist()):
            width = np.float32(sc) * np.float32(x.shape[a])
            # align_corners maps x to x * (size - 1) / (out - 1) with the integer output length `out`, as
            # ONNX Runtime, PyTorch (whose exports carry such scales) and the spec's wording have it;
            # ONNX's reference takes the fractional width there (docs/ONNX.md)
            out[a], scale[a] = int(width), sc
    else:
        n.fail("neither scales nor sizes is given")
    if by_matrices:   # antialias, tf_crop_and_resize: ONNX's reference per axis, as a weight matrix
        return resize_by_matrices(n, x, roi, out, scale, sizes is not None and sizes.numel > 0)
    src = {a: _resize_source(coord, out[a], x.shape[a], scale[a]) for a in range(rank)}
    if mode == "nearest":
        index = {a: np.clip(_NEAREST[nearest](src[a], scale[a]), 0, x.shape[a] - 1).astype(np.int64)
                 for a in range(rank)}
        moved = [a for a in range(rank) if out[a] != x.shape[a] or (index[a] != np.arange(out[a])).any()]
    else:  # linear samples clamped positions; cubic only goes to torch, which checks its own way
        pos = {a: np.clip(src[a], 0, x.shape[a] - 1) for a in range(rank)}
        moved = [a for a in range(rank) if out[a] != x.shape[a] or np.abs(pos[a] - np.arange(out[a])).max(initial=0) > 0]
    if not moved:
        return x
    spatial = 3 <= rank <= 5 and moved[0] >= 2 and x.dtype.is_floating_point

    def torch_resize(tmode, align_corners=None):
        return n.add("resize", x, size=out[2:], mode=tmode, align_corners=align_corners)

    if mode == "nearest":
        if spatial:
            for tmode in ("nearest", "nearest-exact"):
                if all((_torch_map(x.shape[a], out[a], tmode) == index[a]).all() for a in moved):
                    return torch_resize(tmode)
        for a in moved:  # the exact positions, one gather per axis
            x = n.add("gather", x, n.const(torch.from_numpy(index[a])), axis=a)
        return x
    if not x.dtype.is_floating_point:
        n.unsupported(f"{described} on {x.dtype} input")
    if mode == "cubic":
        consistent = all(np.float32(scale[a]) == np.float32(out[a]) / np.float32(x.shape[a]) for a in moved)
        exact = n.attr("cubic_coeff_a", -0.75) == -0.75 and not n.attr("exclude_outside", 0)
        if spatial and rank == 4 and exact and (coord == "align_corners" or consistent and (
                coord == "half_pixel" or coord == "pytorch_half_pixel" and min(out[2:]) > 1)):
            return torch_resize("bicubic", coord == "align_corners")
        if n.attr("keep_aspect_ratio_policy", "stretch") == "stretch":   # ONNX's reference per axis
            return resize_by_matrices(n, x, roi, out, scale, sizes is not None and sizes.numel > 0)
        n.unsupported(f"{described}, cubic_coeff_a={n.attr('cubic_coeff_a', -0.75)}, "
                      f"exclude_outside={n.attr('exclude_outside', 0)} with scales {[scale[a] for a in moved]}")
    if spatial:
        tmode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
        for align_corners in (False, True):
            if all(np.abs(_torch_map(x.shape[a], out[a], "linear", align_corners) - pos[a]).max(initial=0) < 1e-4
                   for a in moved):
                return torch_resize(tmode, align_corners)
    for a in moved:  # x[i0] (1 - w) + x[i1] w along each axis, i0 = floor(pos), i1 = i0 + 1 (clamped)
        i0 = np.minimum(np.floor(pos[a]), x.shape[a] - 1).astype(np.int64)
        i1 = np.minimum(i0 + 1, x.shape[a] - 1)
        w = torch.from_numpy(pos[a] - i0).to(x.dtype).reshape([-1] + [1] * (rank - 1 - a))
        lo, hi = (n.add("gather", x, n.const(torch.from_numpy(i)), axis=a) for i in (i0, i1))
        x = n.add("add", n.add("mul", lo, n.const(1 - w)), n.add("mul", hi, n.const(w)))
    return x


@handler("CenterCropPad")
def _center_crop_pad(n, x, shape):
    """Each of `axes` cropped (from (dim - size) // 2) or zero-padded ((size - dim) // 2 first) to its size."""
    sizes = n.ints(shape, "shape")
    axes = [_axis(a, len(x.shape)) for a in n.attr("axes", list(range(len(sizes))))]
    for axis, size in zip(axes, sizes):
        dim = x.shape[axis]
        if size < dim:
            start = (dim - size) // 2
            x = _slice_axis(n, x, axis, start, start + size, 1)
        elif size > dim:
            begins, ends = [0] * len(x.shape), [0] * len(x.shape)
            begins[axis] = (size - dim) // 2
            ends[axis] = size - dim - begins[axis]
            x = _pad(n, x, begins, ends)
    return x


def _window(fn):
    def window(n, size):
        from .common import DTYPES
        count = int(n.value(size, "size").reshape(-1)[0])
        denom = count if n.attr("periodic", 1) else count - 1
        k = torch.arange(count, dtype=torch.float64)
        dtype = DTYPES.get(n.attr("output_datatype", 1))
        if dtype is None:
            n.unsupported("its output_datatype has no kfuse dtype")
        return n.const(fn(2 * math.pi * k / denom).to(dtype))
    return window


handler("HannWindow")(_window(lambda a: 0.5 - 0.5 * torch.cos(a)))
handler("HammingWindow")(_window(lambda a: 25 / 46 - 21 / 46 * torch.cos(a)))
handler("BlackmanWindow")(_window(lambda a: 0.42 - 0.5 * torch.cos(a) + 0.08 * torch.cos(2 * a)))


@handler("Compress")
def _compress(n, x, condition):
    """The slices of x along `axis` (of x flattened without one) where the condition is true; the
    condition is read like a shape tensor (a constant, or specialised on the example's value)."""
    keep = n.value(condition, "Compress's condition").reshape(-1).to(torch.bool)
    axis = n.attr("axis")
    if axis is None:
        x, axis = n.add("reshape", x, shape=(x.numel,)), 0
    axis = _axis(axis, len(x.shape))
    idx = torch.nonzero(keep[:x.shape[axis]]).reshape(-1)
    return n.add("gather", x, n.const(idx), axis=axis)


@handler("ReverseSequence")
def _reverse_sequence(n, x, lens):
    """The first lens[b] steps along time_axis of each batch entry b reversed, the rest as they are;
    lens is read like a shape tensor (a constant, or specialised on the example's value)."""
    lens = [int(v) for v in n.value(lens, "ReverseSequence's sequence_lens").reshape(-1).tolist()]
    t_axis, b_axis = _axis(n.attr("time_axis", 0), len(x.shape)), _axis(n.attr("batch_axis", 1), len(x.shape))
    steps = x.shape[t_axis]
    idx = torch.tensor([[min(k, steps) - 1 - t if t < k else t for k in lens] for t in range(steps)])  # [time, batch]
    if t_axis > b_axis:
        idx = idx.T
    view = [1] * len(x.shape)
    view[t_axis], view[b_axis] = steps, len(lens)
    idx = idx.reshape(view).expand(x.shape).contiguous()
    return n.add("gather_elements", x, n.const(idx), axis=t_axis)
