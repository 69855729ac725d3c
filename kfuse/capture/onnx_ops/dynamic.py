"""ONNX handlers of ops whose output shape depends on input values (NonZero, Unique,
NonMaxSuppression, MelWeightMatrix) and of a few scatter-like ops (TensorScatter, MaxUnpool, Upsample).

kfuse's shapes are static, so an op whose output length is decided by its input values is computed
at load time from those values, like a shape tensor: the inputs are specialised by value (each
graph input they read is recorded in `graph.specialised`, and a call with other values compiles
again) and the op is evaluated by ONNX's reference evaluator. Inputs of over SPECIALISE_LIMIT elements
stay a clear error."""
from __future__ import annotations

import math

import torch

from ..common import reshape
from .common import HANDLERS, _axis, _evaluate, _pad, handler


@handler("NonZero", "Unique", "NonMaxSuppression", "MelWeightMatrix")
def _by_value(n, *ins):
    what = f"{n.proto.op_type}'s input (its output shape depends on the values)"
    consts = [None if x is None else x if x.op == "const" else n.const(n.value(x, what)) for x in ins]
    return _evaluate(n, consts)


@handler("TensorScatter")
def _tensor_scatter(n, past, update, write_indices=None):
    """present = past with update written along `axis` from write_indices[b] of each batch entry b
    (modulo the cache length in circular mode): one scatter at run-time positions."""
    rank = len(past.shape)
    axis = _axis(n.attr("axis", -2), rank)
    if axis == 0:
        n.fail("axis 0 is the batch axis")
    batch, seq, cap = past.shape[0], update.shape[axis], past.shape[axis]
    steps = n.const(torch.arange(seq, dtype=torch.int64).reshape(1, seq))
    if write_indices is None:
        pos = n.add("expand", steps, shape=(batch, seq))
    else:
        pos = n.add("add", reshape(n, n.add("cast", write_indices, dtype=torch.int64), (batch, 1)), steps)
    if n.attr("mode", "linear") == "circular":
        pos = n.add("remainder", pos, n.const(cap, dtype=torch.int64))
    shape = [1] * rank
    shape[0], shape[axis] = batch, seq
    index = n.add("expand", reshape(n, pos, tuple(shape)), shape=update.shape)
    return n.add("scatter", past, index, update, axis=axis)


@handler("MaxUnpool")
def _max_unpool(n, x, indices, output_shape=None):
    """Zeros with x's values written at `indices` (flat positions in the whole output, as MaxPool's
    Indices count them)."""
    kernel = n.attr("kernel_shape")
    nd = len(kernel)
    strides, pads = n.attr("strides", [1] * nd), n.attr("pads", [0] * 2 * nd)
    out = x.shape[:2] + tuple((i - 1) * s - pads[k] - pads[nd + k] + kk
                              for k, (i, s, kk) in enumerate(zip(x.shape[2:], strides, kernel)))
    zeros = n.const(torch.zeros(math.prod(out), dtype=x.dtype))
    flat = n.add("scatter", zeros, reshape(n, n.add("cast", indices, dtype=torch.int64), (x.numel,)),
                 reshape(n, x, (x.numel,)), axis=0)
    y = reshape(n, flat, out)
    if output_shape is None:
        return y
    # a given output_shape: the unpooled values in its first corner, zeros elsewhere (ONNX's reference)
    wanted = n.ints(output_shape, "output_shape")
    if len(wanted) != len(out) or any(w < o for w, o in zip(wanted, out)):
        n.fail(f"output_shape {wanted} is smaller than the unpooled shape {list(out)}")
    return _pad(n, y, [0] * len(out), [w - o for w, o in zip(wanted, out)])


@handler("Upsample")
def _upsample(n, x, scales=None):
    """Resize-10 (scales, asymmetric coordinates); Upsample-7 takes the scales as an attribute."""
    if scales is None:
        scales = n.const(torch.tensor(n.attr("scales"), dtype=torch.float32))
    if n.opset >= 11:
        n.fail("Upsample is deprecated from opset 10")
    return HANDLERS["Resize"](n, x, scales)
