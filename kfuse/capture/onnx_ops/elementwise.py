"""ONNX handlers of elementwise ops: unary and broadcasting binary math, comparisons, casts and
activations."""
from __future__ import annotations

import math

import numpy as np
import torch
from onnx import TensorProto

from .common import DTYPES, handler


def _unary(op):
    return lambda n, x: n.add(op, x)


for _op_type, _op in {
    "Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
    "Sin": "sin", "Cos": "cos", "Tanh": "tanh", "Sigmoid": "sigmoid", "Erf": "erf", "Relu": "relu",
    "Floor": "floor", "Ceil": "ceil", "Not": "logical_not", "IsNaN": "isnan", "Sign": "sign",
    "Softplus": "softplus", "Round": "round", "Atan": "atan", "Tan": "tan", "Asin": "asin", "Acos": "acos",
    "Sinh": "sinh", "Cosh": "cosh", "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh"}.items():
    handler(_op_type)(_unary(_op))


def _binary(op):
    return lambda n, a, b: n.add(op, a, b)


for _op_type, _op in {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Equal": "eq", "Less": "lt", "LessOrEqual": "le",
    "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or",
    "Xor": "ne"}.items():
    handler(_op_type)(_binary(_op))


def _variadic(op):
    def handler(n, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = n.add(op, out, x)
        return out
    return handler


handler("Max")(_variadic("maximum"))
handler("Min")(_variadic("minimum"))
handler("Sum")(_variadic("add"))


@handler("Div")
def _div(n, a, b):
    if a.dtype.is_floating_point:
        return n.add("div", a, b)
    return n.add("trunc_div", a, b)  # integer Div truncates in ONNX; torch's div is true division


@handler("Pow")
def _pow(n, x, y):
    if y.dtype != x.dtype:  # ONNX Pow's result has x's type whatever the exponent's type
        y = n.add("cast", y, dtype=x.dtype)
    return n.add("pow", x, y)


@handler("Mean")
def _mean(n, *xs):
    return n.add("div", _variadic("add")(n, *xs), n.const(float(len(xs)), dtype=xs[0].dtype))


@handler("Mod")
def _mod(n, a, b):
    # fmod=0 (integers only) takes the divisor's sign like Python's %; fmod=1 the dividend's, like C
    return n.add("fmod" if n.attr("fmod", 0) else "remainder", a, b)


@handler("Where")
def _where(n, c, a, b):
    if c.op == "const" and c.value.numel():   # a constant condition that picks one side everywhere
        pick = a if bool(c.value.all()) else b if not bool(c.value.any()) else None
        if pick is not None:
            shape = tuple(torch.broadcast_shapes(c.shape, a.shape, b.shape))
            if pick.shape == shape and pick.dtype == torch.promote_types(a.dtype, b.dtype):
                return pick
    return n.add("where", c, a, b)


@handler("Clip")
def _clip(n, x, lo=None, hi=None):
    bounds = {}
    for key, bound, op in (("min", lo, "maximum"), ("max", hi, "minimum")):
        if bound is None:
            value = n.attr(key)  # attributes before opset 11, inputs after
        elif bound.op == "const":
            value = bound.value.item()
        else:  # a bound computed at run time
            x, value = n.add(op, x, bound), None
        if value is not None:
            bounds[key] = value
    return n.add("clamp", x, **bounds) if bounds else x


@handler("Identity")
def _identity(n, x):
    return x


@handler("Dropout")
def _dropout(n, x, ratio=None, training_mode=None):
    if training_mode is not None and bool(n.value(training_mode, "training_mode").item()):
        # random unless the ratio is 0, when nothing is dropped (as in inference)
        if ratio is None or float(n.value(ratio, "ratio").reshape(-1)[0]) != 0.0:
            n.fail("training-mode dropout is not supported (inference only)")
    if n.n_outputs() > 1 and n.proto.output[1]:  # the mask: nothing is dropped in inference
        return [x, n.const(torch.ones(x.shape, dtype=torch.bool))]
    return x


@handler("Cast")
def _cast(n, x):
    to = n.attr("to")
    if to not in DTYPES:
        n.fail(f"cast to {TensorProto.DataType.Name(to)} is not supported")
    return x if DTYPES[to] == x.dtype else n.add("cast", x, dtype=DTYPES[to])


@handler("CastLike")
def _cast_like(n, x, like):
    return x if like.dtype == x.dtype else n.add("cast", x, dtype=like.dtype)


handler("LeakyRelu")(lambda n, x: n.add("leaky_relu", x, alpha=float(n.attr("alpha", 0.01))))


@handler("Gelu")
def _gelu(n, x):
    return n.add("gelu", x, approximate=n.attr("approximate", "none"))


@handler("HardSigmoid")
def _hard_sigmoid(n, x, alpha=0.2, beta=0.5):
    alpha, beta = n.attr("alpha", alpha), n.attr("beta", beta)
    y = n.add("add", n.add("mul", x, n.const(alpha, dtype=x.dtype)), n.const(beta, dtype=x.dtype))
    return n.add("clamp", y, min=0.0, max=1.0)


@handler("HardSwish")
def _hard_swish(n, x):  # ONNX's function body: x * HardSigmoid(x, alpha=1/6, beta=0.5)
    return n.add("mul", x, _hard_sigmoid(n, x, alpha=float(np.float32(1 / 6))))


@handler("Mish")
def _mish(n, x):
    return n.add("mul", x, n.add("tanh", n.add("softplus", x)))


@handler("Elu")
def _elu(n, x):
    return n.add("elu", x, alpha=float(n.attr("alpha", 1.0)))


@handler("Selu")
def _selu(n, x):
    return n.add("elu", x, alpha=float(n.attr("alpha", 1.67326319217681884765625)),
                 scale=float(n.attr("gamma", 1.05070102214813232421875)))


@handler("Celu")
def _celu(n, x):  # max(0, x) + min(0, alpha (exp(x / alpha) - 1)): torch's celu, an elu
    alpha = float(n.attr("alpha", 1.0))
    return n.add("elu", x, alpha=alpha, input_scale=1.0 / alpha)


@handler("PRelu")
def _prelu(n, x, slope):
    if slope.op == "const" and slope.numel == 1 and x.dtype.is_floating_point:
        return n.add("leaky_relu", x, alpha=float(slope.value.reshape(-1)[0]))
    # ONNX Runtime's x > 0 ? x : x * slope, with slope broadcast to x (unidirectionally)
    return n.add("where", n.add("gt", x, n.const(0, dtype=x.dtype)), x, n.add("mul", x, slope))


@handler("IsInf")
def _is_inf(n, x):
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    if pos and neg:
        return n.add("eq", n.add("abs", x), n.const(math.inf, dtype=x.dtype))
    if pos or neg:
        return n.add("eq", x, n.const(math.inf if pos else -math.inf, dtype=x.dtype))
    return n.const(torch.zeros(x.shape, dtype=torch.bool))


@handler("ThresholdedRelu")
def _thresholded_relu(n, x):   # x where x > alpha, else 0
    return n.add("where", n.add("gt", x, n.const(float(n.attr("alpha", 1.0)), dtype=x.dtype)), x,
                 n.const(0.0, dtype=x.dtype))


@handler("Shrink")
def _shrink(n, x):   # x + bias below -lambd, x - bias above lambd, 0 between
    lambd, bias = float(n.attr("lambd", 0.5)), float(n.attr("bias", 0.0))
    c = lambda v: n.const(v, dtype=x.dtype)  # noqa: E731
    high = n.add("where", n.add("gt", x, c(lambd)), n.add("sub", x, c(bias)), c(0))
    return n.add("where", n.add("lt", x, c(-lambd)), n.add("add", x, c(bias)), high)


@handler("Softsign")
def _softsign(n, x):   # x / (1 + |x|)
    return n.add("div", x, n.add("add", n.add("abs", x), n.const(1.0, dtype=x.dtype)))


@handler("Swish")
def _swish(n, x):   # x * sigmoid(alpha x)
    alpha = float(n.attr("alpha", 1.0))
    return n.add("mul", x, n.add("sigmoid", n.add("mul", x, n.const(alpha, dtype=x.dtype)) if alpha != 1.0 else x))
