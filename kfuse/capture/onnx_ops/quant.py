"""ONNX handlers of the integer quantization ops, as ONNX's reference computes them
(onnx/reference/ops/op_quantize_linear.py, op_qlinear_matmul.py, ...): QuantizeLinear,
DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv; and
ONNX Runtime's QOperator-format com.microsoft ops (QLinearAdd, QLinearMul, QLinearConcat, QLinearLeakyRelu,
QLinearSigmoid, QLinearAveragePool, QLinearGlobalAveragePool, QGemm).

Rounding is half to even (np.rint, torch.round) and results saturate to the integer type's range.
Integer matrix products and convolutions run in float64, exact for these sizes (every partial sum
is an integer below 2^53), and are cast to int32.
"""
from __future__ import annotations

import torch
from onnx import TensorProto

from ..common import reshape
from .common import DTYPES, HANDLERS, _axis, handler

F64 = torch.float64
_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767)}


def _along(n, v, shape, axis, block=0):
    """A scale or zero point broadcast against a tensor of `shape`: a scalar as it is, a 1-d value
    along `axis` (per-axis), a blocked one repeated `block` times along `axis` (the last block cut)."""
    if v is None or not v.shape:
        return v
    if v.numel == 1:
        return reshape(n, v, ())
    axis = _axis(axis, len(shape))
    if not block:
        if len(v.shape) != 1 or v.shape[0] != shape[axis]:
            n.fail(f"a scale or zero point of shape {list(v.shape)} for an input of shape {list(shape)} on axis {axis}")
        return reshape(n, v, tuple(shape[axis] if i == axis else 1 for i in range(len(shape))))
    index = torch.arange(shape[axis]) // block
    return n.add("gather", v, n.const(index), axis=axis)


def _saturate(n, q, dtype):
    """round(q) clamped to dtype's range and cast (NaN goes to the low end, as numpy's int cast then clip)."""
    lo, hi = _RANGE[dtype]
    q = n.add("clamp", n.add("round", q), min=lo, max=hi)
    q = n.add("where", n.add("isnan", q), n.const(float(lo), dtype=q.dtype), q)
    return n.add("cast", q, dtype=dtype)


def _out_type(n, zero_point):
    dtype = zero_point.dtype if zero_point is not None else DTYPES.get(n.attr("output_dtype", 0) or TensorProto.UINT8)
    if dtype not in _RANGE:
        n.unsupported(f"quantization to {dtype} (uint8, int8 and int16 are supported)")
    return dtype


@handler("QuantizeLinear")
def _quantize_linear(n, x, scale, zero_point=None):
    """saturate(round(x / scale) + zero_point), scale and zero point per tensor, per axis or per block."""
    dtype = _out_type(n, zero_point)
    if not x.dtype.is_floating_point:
        n.unsupported(f"{x.dtype} input")
    axis, block = n.attr("axis", 1), n.attr("block_size", 0)
    q = n.add("round", n.add("div", x, _along(n, scale, x.shape, axis, block)))
    if q.dtype != torch.float32 and q.dtype != F64:
        q = n.add("cast", q, dtype=torch.float32)
    if zero_point is not None:
        q = n.add("add", q, n.add("cast", _along(n, zero_point, x.shape, axis, block), dtype=q.dtype))
    return _saturate(n, q, dtype)


@handler("DequantizeLinear")
def _dequantize_linear(n, x, scale, zero_point=None):
    """(float32(x) - zero_point) * scale, in the scale's type (or output_dtype)."""
    if x.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32):
        n.unsupported(f"{x.dtype} input")
    axis, block = n.attr("axis", 1), n.attr("block_size", 0)
    dx = n.add("cast", x, dtype=torch.float32)
    if zero_point is not None:
        dx = n.add("sub", dx, n.add("cast", _along(n, zero_point, x.shape, axis, block), dtype=torch.float32))
    y = n.add("mul", dx, n.add("cast", _along(n, scale, x.shape, axis, block), dtype=torch.float32))
    out = DTYPES.get(n.attr("output_dtype", 0)) or scale.dtype
    return y if out == y.dtype else n.add("cast", y, dtype=out)


@handler("DynamicQuantizeLinear")
def _dynamic_quantize_linear(n, x):
    """uint8 quantization with the scale and zero point of x's range widened to hold 0."""
    if x.dtype != torch.float32:
        n.unsupported(f"{x.dtype} input")
    axes = list(range(len(x.shape)))
    zero = n.const(0.0)
    hi = n.add("maximum", n.add("reduce_max", x, axes=axes), zero)
    lo = n.add("minimum", n.add("reduce_min", x, axes=axes), zero)
    span = n.add("sub", hi, lo)
    scale = n.add("div", n.add("where", n.add("eq", span, zero), n.const(1.0), span), n.const(255.0))
    zp = n.add("round", n.add("clamp", n.add("sub", zero, n.add("div", lo, scale)), min=0.0, max=255.0))
    y = _saturate(n, n.add("add", n.add("round", n.add("div", x, scale)), zp), torch.uint8)
    return [y, scale, n.add("cast", zp, dtype=torch.uint8)]


def _shifted(n, v, zero_point, per_row=False):
    """float64(v) - zero_point; a 1-d zero point of an [M, K] left operand is per row."""
    v64 = n.add("cast", v, dtype=F64)
    if zero_point is None:
        return v64
    zp = n.add("cast", zero_point, dtype=F64)
    if per_row and zp.numel > 1 and len(zp.shape) == 1:
        zp = reshape(n, zp, (zp.shape[0], 1))
    return n.add("sub", v64, zp)


@handler("MatMulInteger")
def _matmul_integer(n, a, b, a_zero_point=None, b_zero_point=None):
    c = n.add("matmul", _shifted(n, a, a_zero_point, True), _shifted(n, b, b_zero_point))
    return n.add("cast", c, dtype=torch.int32)


def _requantize(n, c, scales, y_scale, y_zero_point, like):
    """saturate(c * (scales / y_scale) + y_zero_point) in y_zero_point's type (else `like`'s)."""
    factor = n.add("cast", n.add("div", scales, y_scale), dtype=F64)
    d = n.add("mul", c, factor)
    if y_zero_point is not None:
        d = n.add("add", d, n.add("cast", y_zero_point, dtype=F64))
    dtype = y_zero_point.dtype if y_zero_point is not None else like.dtype
    if dtype not in _RANGE:
        n.unsupported(f"{dtype} output")
    return _saturate(n, d, dtype)


@handler("QLinearMatMul")
def _qlinear_matmul(n, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point=None):
    c = n.add("matmul", _shifted(n, a, a_zero_point, True), _shifted(n, b, b_zero_point))
    return _requantize(n, c, n.add("mul", a_scale, b_scale), y_scale, y_zero_point, a)


def _integer_conv(n, x, w, x_zero_point, w_zero_point):
    """The convolution of (x - x_zero_point) by (w - w_zero_point) in float64 (a 1-d zero point of w
    is per output channel); the Conv handler reads the node's attributes."""
    if w_zero_point is not None and len(w_zero_point.shape) == 1 and w_zero_point.shape[0] == w.shape[0] > 1:
        w_zero_point = reshape(n, w_zero_point, (w.shape[0],) + (1,) * (len(w.shape) - 1))
    return HANDLERS["Conv"](n, _shifted(n, x, x_zero_point), _shifted(n, w, w_zero_point))


@handler("ConvInteger")
def _conv_integer(n, x, w, x_zero_point=None, w_zero_point=None):
    return n.add("cast", _integer_conv(n, x, w, x_zero_point, w_zero_point), dtype=torch.int32)


@handler("QLinearConv")
def _qlinear_conv(n, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point=None, bias=None):
    c = _integer_conv(n, x, w, x_zero_point, w_zero_point)
    if bias is not None:
        c = n.add("add", c, reshape(n, n.add("cast", bias, dtype=F64), (bias.shape[0],) + (1,) * (len(c.shape) - 2)))
    if w_scale.numel > 1:
        w_scale = reshape(n, w_scale, (w_scale.shape[0],) + (1,) * (len(c.shape) - 2))
    return _requantize(n, c, n.add("mul", x_scale, w_scale), y_scale, y_zero_point, x)


# -- ONNX Runtime's QOperator-format ops (com.microsoft; onnxruntime.quantization, QuantFormat.QOperator) --
# Each is its float op between a dequantization of its inputs and a quantization of its output, as ONNX
# Runtime's reference for them reads (per-tensor scales and zero points; a per-column weight scale in QGemm).

MS = "com.microsoft"


def _dequantized(n, xs, what: str) -> list:
    """The float values of (X, X_scale, X_zero_point) triples."""
    if len(xs) % 3:
        n.fail(f"{len(xs)} inputs {what}: want (X, scale, zero point) triples")
    return [_dequantize_linear(n, *xs[i:i + 3]) for i in range(0, len(xs), 3)]


def _channels_first(n):
    if n.attr("channels_last", 0):
        n.unsupported("channels_last=1")


def _float_op(op_type, check=None):
    """A QLinear op whose inputs are (X, X_scale, X_zero_point)..., then (Y_scale, Y_zero_point): the
    ONNX op `op_type` (with the node's attributes) on the dequantized inputs, quantized."""
    def convert(n, *ins):
        if check is not None:
            check(n)
        *xs, y_scale, y_zero_point = ins
        floats = _dequantized(n, xs, "before Y_scale, Y_zero_point")
        return _quantize_linear(n, HANDLERS[op_type](n, *floats), y_scale, y_zero_point)
    return convert


for _name, _op, _check in (("QLinearAdd", "Add", None), ("QLinearMul", "Mul", None),
                           ("QLinearLeakyRelu", "LeakyRelu", None), ("QLinearSigmoid", "Sigmoid", None),
                           ("QLinearAveragePool", "AveragePool", _channels_first),
                           ("QLinearGlobalAveragePool", "GlobalAveragePool", _channels_first)):
    handler((MS, _name))(_float_op(_op, _check))


@handler((MS, "QLinearConcat"))
def _qlinear_concat(n, y_scale, y_zero_point, *xs):
    """Concat of the dequantized (X, X_scale, X_zero_point) triples, quantized."""
    floats = _dequantized(n, xs, "after Y_scale, Y_zero_point")
    return _quantize_linear(n, HANDLERS["Concat"](n, *floats), y_scale, y_zero_point)


@handler((MS, "QGemm"))
def _qgemm(n, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c=None, y_scale=None, y_zero_point=None):
    """alpha ((A - a_zp)(B - b_zp) + C) a_scale b_scale, as ONNX Runtime computes it (C an int32 bias of
    scale a_scale b_scale; transA/transB as Gemm's; b's scale and zero point per tensor or per output
    column), quantized where y_scale is given, else float32."""
    if n.attr("transA", 0):
        a = n.add("transpose", a, perm=[1, 0])
    if n.attr("transB", 0):
        b = n.add("transpose", b, perm=[1, 0])
    if b_zero_point is not None and b_zero_point.numel > 1:
        b_zero_point = reshape(n, b_zero_point, (1, b_zero_point.numel))
    scale = n.add("cast", n.add("mul", a_scale, b_scale if b_scale.numel == 1 else reshape(n, b_scale, (1, b_scale.numel))),
                  dtype=F64)
    acc = n.add("matmul", _shifted(n, a, a_zero_point), _shifted(n, b, b_zero_point))
    if c is not None:
        if c.dtype != torch.int32:
            n.fail(f"C of type {c.dtype}: QGemm's bias is int32")
        acc = n.add("add", acc, n.add("cast", c, dtype=F64))
    y = n.add("mul", acc, n.add("mul", scale, n.const(float(n.attr("alpha", 1.0)), dtype=F64)))
    if y_scale is None:
        return n.add("cast", y, dtype=torch.float32)
    return _quantize_linear(n, n.add("cast", y, dtype=torch.float32), y_scale, y_zero_point)
