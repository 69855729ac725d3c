"""ONNX handlers of sampling and image ops torch runs as they are (opaque IR ops, never fused):
GridSample, AffineGrid, Col2Im, Det, RoiAlign, DeformConv (by grid_sample); and Resize's variants with no
torch equivalent (cubic with other coefficients, antialias, tf_crop_and_resize) as one constant weight
matrix per resized axis."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..common import reshape
from .common import _axis, _slice_axis, handler

_GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest", "cubic": "bicubic",
               "bicubic": "bicubic"}


@handler("GridSample")
def _grid_sample(n, x, grid):
    """torch's grid_sample, which ONNX's GridSample follows (modes, padding modes, align_corners)."""
    mode = n.attr("mode", "linear" if n.opset >= 20 else "bilinear")
    padding = n.attr("padding_mode", "zeros")
    if mode not in _GRID_MODES or padding not in ("zeros", "border", "reflection"):
        n.unsupported(f"mode {mode!r}, padding_mode {padding!r}")
    if _GRID_MODES[mode] == "bicubic" and len(x.shape) != 4:
        n.unsupported(f"cubic sampling of a {len(x.shape)}-d input (torch has it for 4-d only)")
    if _GRID_MODES[mode] == "bicubic" and padding == "border":
        # torch clamps the sampling position to the border before taking the 4 x 4 taps, ONNX's
        # reference clamps each tap: they differ near the border
        n.unsupported("cubic sampling with border padding")
    if not x.dtype.is_floating_point or grid.dtype != x.dtype:
        n.unsupported(f"{x.dtype} input with a {grid.dtype} grid")
    return n.add("grid_sample", x, grid, mode=_GRID_MODES[mode], padding_mode=padding,
                 align_corners=bool(n.attr("align_corners", 0)))


@handler("AffineGrid")
def _affine_grid(n, theta, size):
    """torch's affine_grid: ONNX's AffineGrid is its definition (2-d and 3-d)."""
    shape = n.ints(size, "size")
    if not theta.dtype.is_floating_point:
        n.unsupported(f"{theta.dtype} theta")
    return n.add("affine_grid", theta, size=tuple(shape), align_corners=bool(n.attr("align_corners", 0)))


@handler("Col2Im")
def _col2im(n, cols, image_shape, block_shape):
    image, block = n.ints(image_shape, "image_shape"), n.ints(block_shape, "block_shape")
    nd = len(image)
    return n.add("col2im", cols, image=tuple(image), block=tuple(block),
                 dilations=tuple(n.attr("dilations", [1] * nd)), pads=tuple(n.attr("pads", [0] * 2 * nd)),
                 strides=tuple(n.attr("strides", [1] * nd)))


@handler("Det")
def _det(n, x):
    if not x.dtype.is_floating_point:
        n.unsupported(f"{x.dtype} input")
    return n.add("det", x)


@handler("RoiAlign")
def _roi_align(n, x, rois, batch_indices):
    """ONNX's RoiAlign (avg, and max by its rule: the largest weighted corner term of each sample) as
    one opaque op; opset 10's coordinates are output_half_pixel's (no half-pixel shift)."""
    mode = n.attr("mode", "avg")
    ctm = n.attr("coordinate_transformation_mode", "half_pixel" if n.opset >= 16 else "output_half_pixel")
    if mode not in ("avg", "max") or ctm not in ("half_pixel", "output_half_pixel"):
        n.unsupported(f"mode {mode!r}, coordinate_transformation_mode {ctm!r}")
    if x.dtype not in (torch.float32, torch.float64) or rois.dtype != x.dtype or len(x.shape) != 4:
        n.unsupported(f"X {x.dtype}{list(x.shape)}, rois {rois.dtype}: float32/float64 [N, C, H, W] and rois alike")
    if len(rois.shape) != 2 or rois.shape[1] != 4 or tuple(batch_indices.shape) != rois.shape[:1]:
        n.fail(f"rois {list(rois.shape)} and batch_indices {list(batch_indices.shape)}: want [R, 4] and [R]")
    height, width = int(n.attr("output_height", 1)), int(n.attr("output_width", 1))
    if height < 1 or width < 1:
        n.fail(f"output_height {height}, output_width {width}")
    return n.add("roi_align", x, rois, batch_indices, height=height, width=width,
                 ratio=int(n.attr("sampling_ratio", 0)), scale=float(n.attr("spatial_scale", 1.0)),
                 half_pixel=ctm == "half_pixel", mode=mode)


# -- Resize by weight matrices ----------------------------------------------------------------------

def _resize_matrix(n, size, out, scale, roi):
    """The linear map ONNX's Resize applies along one axis of `size` elements (its attributes, one
    axis's scale and roi), as ([out, size] weights, [out] offset): ONNX's reference Resize evaluated
    on the unit vectors and on zeros (the offset is nonzero only where tf_crop_and_resize
    extrapolates)."""
    keep = ("mode", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside", "antialias",
            "extrapolation_value", "nearest_mode")
    attrs = {k: n.attr(k) for k in keep if k in n.attrs}
    data = np.concatenate([np.eye(size), np.zeros((1, size))]).astype(np.float32)
    inits = [numpy_helper.from_array(data, "x"), numpy_helper.from_array(np.array([0, roi[0], 1, roi[1]], np.float32), "roi"),
             numpy_helper.from_array(np.array([size + 1, out], np.int64), "sizes")]
    if scale is not None:
        inits[2] = numpy_helper.from_array(np.array([1, scale], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "roi"] + (["scales"] if scale is not None else ["", "sizes"]), ["y"], **attrs)
    model = helper.make_model(helper.make_graph([node], "resize", [], [onnx.ValueInfoProto(name="y")], inits),
                              opset_imports=[helper.make_opsetid("", max(n.opset, 19))])
    from onnx.reference import ReferenceEvaluator
    y = np.asarray(ReferenceEvaluator(model).run(None, {})[0], dtype=np.float64)
    if y.shape != (size + 1, out):
        n.unsupported(f"ONNX's reference resizes an axis of {size} to {y.shape[1]}, not {out}")
    return (y[:size] - y[size]).T, y[size]


def resize_by_matrices(n, x, roi_in, out, scale, by_sizes):
    """x resized to `out` (per axis; `scale` per axis, used when not `by_sizes`) by one matmul with a
    constant weight matrix per moved axis (ONNX's resize is separable), plus tf_crop_and_resize's
    extrapolation value where it samples outside."""
    rank = len(x.shape)
    if by_sizes and n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        n.unsupported("keep_aspect_ratio_policy other than stretch with antialias, tf_crop_and_resize or cubic")
    roi = [0.0] * rank + [1.0] * rank
    if n.attr("coordinate_transformation_mode") == "tf_crop_and_resize":
        axes = [_axis(a, rank) for a in n.attr("axes", range(rank))]
        values = [float(v) for v in n.value(roi_in, "roi").reshape(-1).tolist()]
        k = len(axes)
        for j, a in enumerate(axes):
            roi[a], roi[rank + a] = values[j], values[k + j]
    for a in range(rank):
        if out[a] == x.shape[a] and scale[a] == 1.0 and (roi[a], roi[rank + a]) == (0.0, 1.0):
            continue
        w, offset = _resize_matrix(n, x.shape[a], out[a], None if by_sizes else scale[a], (roi[a], roi[rank + a]))
        perm = [i for i in range(rank) if i != a] + [a]
        inverse = [perm.index(i) for i in range(rank)]
        moved = n.add("transpose", x, perm=perm) if a != rank - 1 else x
        y = n.add("matmul", moved, n.const(torch.from_numpy(np.ascontiguousarray(w.T)).to(x.dtype)))
        if offset.any():
            y = n.add("add", y, n.const(torch.from_numpy(offset).to(x.dtype)))
        x = n.add("transpose", y, perm=inverse) if a != rank - 1 else y
    return reshape(n, x, tuple(out))


@handler("DeformConv")
def _deform_conv(n, x, w, offset, bias=None, mask=None):
    """ONNX's reference: each kernel tap samples x bilinearly (grid_sample, align_corners, zeros
    outside) at its position moved by the offset, scaled by the mask; then a grouped matmul by w."""
    if len(x.shape) != 4 or not x.dtype.is_floating_point:
        n.unsupported(f"a {x.dtype} input of shape {list(x.shape)} (2-d float inputs only)")
    batch, c, ih, iw = x.shape
    oc, _, kh, kw = w.shape
    oh, ow = offset.shape[2:]
    groups, og = n.attr("group", 1), n.attr("offset_group", 1)
    sh, sw = n.attr("strides", [1, 1])
    dh, dw = n.attr("dilations", [1, 1])
    pads = n.attr("pads", [0, 0, 0, 0])
    if ih < 2 or iw < 2:
        n.unsupported("an input of height or width 1")
    rows = np.arange(kh)[:, None, None, None] * dh + np.arange(oh)[None, None, :, None] * sh - pads[0]
    cols = np.arange(kw)[None, :, None, None] * dw + np.arange(ow)[None, None, None, :] * sw - pads[1]
    base = [torch.from_numpy(np.broadcast_to(v, (kh, kw, oh, ow)).astype(np.float64)).to(x.dtype) for v in (rows, cols)]
    off = reshape(n, offset, (batch, og, kh, kw, 2, oh, ow))
    coords = []
    for k, (b, size) in enumerate(zip(base, (ih, iw))):
        pos = n.add("add", reshape(n, _slice_axis(n, off, 4, k, k + 1, 1), (batch, og, kh, kw, oh, ow)), n.const(b))
        coords.append(n.add("sub", n.add("mul", pos, n.const(2.0 / (size - 1), dtype=x.dtype)), n.const(1.0, dtype=x.dtype)))
    grid = n.add("concat", *(reshape(n, v, (batch * og, kh * kw * oh, ow, 1)) for v in coords[::-1]), axis=3)
    s = n.add("grid_sample", reshape(n, x, (batch * og, c // og, ih, iw)), grid, mode="bilinear",
              padding_mode="zeros", align_corners=True)          # [batch * og, c / og, kh * kw * oh, ow]
    s = reshape(n, s, (batch, og, c // og, kh, kw, oh, ow))
    if mask is not None:
        s = n.add("mul", s, reshape(n, mask, (batch, og, 1, kh, kw, oh, ow)))
    s = reshape(n, s, (batch, groups, c // groups * kh * kw, oh * ow))
    y = n.add("matmul", reshape(n, w, (groups, oc // groups, c // groups * kh * kw)), s)
    y = reshape(n, y, (batch, oc, oh, ow))
    return y if bias is None else n.add("add", y, reshape(n, bias, (oc, 1, 1)))
