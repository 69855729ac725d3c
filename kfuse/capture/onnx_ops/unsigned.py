"""Unsigned integers wider than 8 bits (ONNX UINT16, UINT32, UINT64) and the bitwise ops.

torch 2.13 has uint16/32/64 tensors but almost no ops on them (no add, comparison, max, ...), and
kfuse's kernels compute in f32/i64/bool. So the loader carries such a value as an int64 *carrier*:
a uint16/uint32 as its value (exact, 0 <= v < 2^k), a uint64 as the same 64 bits (values from 2^63
up read as negative). A graph input is cast to int64 at the start, an output cast back to its
unsigned type at the end (`bind_input`, `to_output`), and `g._unsigned` (node -> bits) records which
int64 nodes are carriers while the model loads.

An ONNX node with a carrier input goes through `convert`, never straight to its handler, so no op
reads a carrier as a signed int64 by mistake:
- ops that only move or select elements (Reshape, Gather, Concat, Where, ...) run their handler
  and their result is a carrier of the same type;
- Add, Sub, Mul and Sum wrap as ONNX's unsigned arithmetic does: modulo 2^k (a remainder) for
  uint16/uint32, multiplied in 16-bit halves so no int64 product overflows; uint64 as two's
  complement int64 arithmetic, which wraps with the same bits (torch's int64 ops wrap, and the C
  kernels are compiled with -fwrapv, so signed overflow is defined there too);
- comparisons, Max/Min, Div and Mod: the int64 ops are exact for uint16/uint32 (non-negative values);
  uint64 compares by sign first (a <u b is a < b when the signs agree, else a >= 0) and divides with
  one halving step (`_divmod_u64`);
- Cast to and from them (a float to uint64 is a clear error: the carrier cannot round it exactly);
- anything else is a clear KfuseError naming the op and type: never a result read with the wrong sign.

The bitwise ops (BitwiseAnd/Or/Xor/Not, BitShift, integer BitCast) have no IR op: they are computed
4 bits at a time, a gather from a 256-entry table per nibble (`common.nibble_op`), on any integer type.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, numpy_helper

from ..common import nibble_op
from .common import DTYPES, HANDLERS, INTERCEPT, handler

UNSIGNED = {TensorProto.UINT16: (torch.uint16, 16), TensorProto.UINT32: (torch.uint32, 32),
            TensorProto.UINT64: (torch.uint64, 64)}
_BITS_DTYPE = {bits: dt for dt, bits in UNSIGNED.values()}
I64 = torch.int64
_MIN = -(1 << 63)


def bits_of(g, x) -> int | None:
    """The unsigned width a node carries (16, 32, 64), or None for an ordinary tensor."""
    return getattr(g, "_unsigned", {}).get(x) if x is not None else None


def _mark(g, x, bits):
    g._unsigned[x] = bits
    return x


def bind_input(g, node, elem):
    """The carrier of an unsigned graph input node (its example's dtype): cast to int64."""
    return _mark(g, g.add("cast", node, dtype=I64, name=node.name), UNSIGNED[elem][1])


def to_output(g, x, elem, name):
    from ...errors import KfuseError
    bits = bits_of(g, x)
    if elem == TensorProto.UNDEFINED and bits:   # no declared type: the carrier's
        elem = next(k for k, v in UNSIGNED.items() if v[1] == bits)
    if elem not in UNSIGNED or bits != UNSIGNED[elem][1]:
        raise KfuseError(f"ONNX graph output {name!r} is {TensorProto.DataType.Name(elem)}, "
                         f"but kfuse computed it as {f'uint{bits}' if bits else x.dtype}")
    return g.add("cast", x, dtype=UNSIGNED[elem][0], name=name)


def const(g, t: TensorProto, name=""):
    """The carrier of an unsigned constant tensor."""
    a = np.ascontiguousarray(numpy_helper.to_array(t))
    a = a.view(np.int64) if a.dtype == np.uint64 else a.astype(np.int64)
    return _mark(g, g.const(torch.from_numpy(a.copy()), name=name), UNSIGNED[t.data_type][1])


def involved(g, onnx_node, ins) -> bool:
    """Whether `convert` handles this node: a carrier input, or an unsigned result."""
    if not hasattr(g, "_unsigned"):
        return False
    if any(bits_of(g, x) for x in ins):
        return True
    op = onnx_node.op_type
    if op == "Cast":
        return any(a.name == "to" and a.i in UNSIGNED for a in onnx_node.attribute)
    if op in ("Constant", "ConstantOfShape"):
        return any(a.type == a.TENSOR and a.t.data_type in UNSIGNED for a in onnx_node.attribute)
    return False


# ops that move or select elements: the result carries the input's type
_MOVE = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice", "Split",
         "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Where", "Trilu", "DepthToSpace",
         "SpaceToDepth", "ScatterElements", "Scatter", "ScatterND"}
_PLAIN = {"Shape", "Size", "Equal"}           # results that are not unsigned, the same for any width
_WRAP = {"Add": "add", "Sub": "sub", "Mul": "mul"}
_COMPARE = {"Less": (0, 1, False), "Greater": (1, 0, False), "LessOrEqual": (1, 0, True),
            "GreaterOrEqual": (0, 1, True)}   # (a, b, negate): x op y = [not] lt_u(args[a], args[b])


def convert(n, ins):
    """One ONNX node with carrier inputs or an unsigned result (see the module docstring)."""
    g, op = n.g, n.proto.op_type
    if op == "CastLike":
        like = bits_of(g, ins[1])
        to = next(k for k, v in UNSIGNED.items() if v[1] == like) if like else \
            next((k for k, v in DTYPES.items() if v == ins[1].dtype), None)
        return _cast(n, ins[0], bits_of(g, ins[0]), to)
    widths = {bits_of(g, x) for x in ins} - {None}
    if len(widths) > 1:
        n.fail(f"inputs of different unsigned types ({sorted(widths)} bits)")
    bits = widths.pop() if widths else None
    name = f"uint{bits}"
    if op == "Constant":
        return const(g, n.attrs["value"].t, n.name)
    if op == "ConstantOfShape":
        t = n.attrs["value"].t
        v = int(const(g, t).value.reshape(-1)[0])
        return _mark(g, n.const(torch.full(n.ints(ins[0], "shape"), v, dtype=I64)), UNSIGNED[t.data_type][1])
    if op == "Cast":
        return _cast(n, ins[0], bits, n.attr("to"))
    if op in ("BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "BitCast"):
        return HANDLERS[op](n, *ins)
    if op in _MOVE:
        outs = HANDLERS[op](n, *ins)
        return [_mark(g, o, bits) for o in outs] if isinstance(outs, list) else _mark(g, outs, bits)
    if op in _PLAIN:
        return HANDLERS[op](n, *ins)
    if op in _WRAP or op == "Sum":
        out = ins[0]
        for x in ins[1:]:
            out = _wrap(n, _WRAP.get(op, "add"), out, x, bits)
        return _mark(g, out, bits)
    if op in _COMPARE:
        i, j, negate = _COMPARE[op]
        r = _lt(n, ins[i], ins[j], bits)
        return n.add("logical_not", r) if negate else r
    if op in ("Max", "Min"):
        out = ins[0]
        for x in ins[1:]:
            less = _lt(n, out, x, bits)
            out = n.add("where", less, x, out) if op == "Max" else n.add("where", less, out, x)
        return _mark(g, out, bits)
    if op in ("Div", "Mod"):
        if bits < 64:
            out = n.add("trunc_div" if op == "Div" else "remainder", ins[0], ins[1])
        else:
            out = _divmod_u64(n, ins[0], ins[1])[op == "Mod"]
        return _mark(g, out, bits)
    n.fail(f"{op} of {name} values is not supported")


def _wrap(n, op, a, b, bits):
    """a op b modulo 2^bits (ONNX's unsigned arithmetic) on carriers."""
    if bits == 64:   # two's complement int64 arithmetic wraps with the bits of uint64's
        return n.add(op, a, b)
    m = n.const(1 << bits, dtype=I64)
    if op == "mul" and bits == 32:   # a * b can pass 2^63: multiply by b's 16-bit halves
        h = n.const(1 << 16, dtype=I64)
        hi, lo = n.add("floor_div", b, h), n.add("remainder", b, h)
        top = n.add("remainder", n.add("mul", a, hi), h)   # only its low 16 bits survive the shift
        return n.add("remainder", n.add("add", n.add("mul", top, h), n.add("mul", a, lo)), m)
    return n.add("remainder", n.add(op, a, b), m)


def _lt(n, a, b, bits):
    """a < b as unsigned values."""
    if bits < 64:
        return n.add("lt", a, b)
    zero = n.const(0, dtype=I64)
    differ = n.add("ne", n.add("lt", a, zero), n.add("lt", b, zero))
    return n.add("where", differ, n.add("ge", a, zero), n.add("lt", a, b))


def _shr1_u64(n, a):
    """a >> 1 as an unsigned 64-bit value (non-negative as int64)."""
    half = n.add("floor_div", a, n.const(2, dtype=I64))
    return n.add("where", n.add("lt", a, n.const(0, dtype=I64)), n.add("sub", half, n.const(_MIN, dtype=I64)), half)


def _divmod_u64(n, a, b):
    """(a // b, a % b) as uint64 carriers: exact int64 division where both are below 2^63; a divisor
    from 2^63 up goes into a at most once; a dividend from 2^63 up is halved first (q1 = 2 ((a >> 1) // b),
    then one correction step: the remainder a - q1 b is below 2b)."""
    zero, one = n.const(0, dtype=I64), n.const(1, dtype=I64)
    q1 = n.add("mul", n.add("trunc_div", _shr1_u64(n, a), b), n.const(2, dtype=I64))
    r1 = n.add("sub", a, n.add("mul", q1, b))
    q_big_a = n.add("add", q1, n.add("cast", n.add("logical_not", _lt(n, r1, b, 64)), dtype=I64))
    q = n.add("where", n.add("lt", b, zero), n.add("cast", n.add("logical_not", _lt(n, a, b, 64)), dtype=I64),
              n.add("where", n.add("lt", a, zero), q_big_a, n.add("trunc_div", a, n.add("maximum", b, one))))
    return q, n.add("sub", a, n.add("mul", q, b))


def _cast(n, x, bits, to):
    """Cast between carriers and ordinary tensors."""
    if to in UNSIGNED:
        tb = UNSIGNED[to][1]
        if bits is None and x.dtype.is_floating_point and tb == 64:
            n.fail("cast of a float to uint64 is not supported")
        y = n.add("cast", x, dtype=I64)
        if tb < 64 and (bits is None or bits > tb):
            y = n.add("remainder", y, n.const(1 << tb, dtype=I64))
        return _mark(n.g, y, tb)
    if to not in DTYPES:
        n.fail(f"cast to {TensorProto.DataType.Name(to) if to is not None else 'this type'} is not supported")
    if bits == 64 and DTYPES[to].is_floating_point:
        n.fail("cast of uint64 to a float is not supported (its int64 carrier would round values from 2^63 twice)")
    return n.add("cast", x, dtype=DTYPES[to])   # a new node: the result is no carrier


INTERCEPT.append((involved, convert))


# -- bitwise ops ------------------------------------------------------------------------------------

def _width(n, x) -> tuple[int, bool]:
    """(bits, signed) of an integer node, carriers included."""
    bits = bits_of(n.g, x)
    if bits:
        return bits, False
    if x.dtype == torch.bool:
        return 1, False
    if x.dtype.is_floating_point:
        n.fail(f"bitwise op on {x.dtype}")
    return torch.iinfo(x.dtype).bits, x.dtype.is_signed


def _back(n, y, like):
    """y (int64, the result's low bits) in like's type."""
    bits = bits_of(n.g, like)
    if bits:
        return _mark(n.g, n.add("remainder", y, n.const(1 << bits, dtype=I64)) if bits < 64 else y, bits)
    return n.add("cast", y, dtype=like.dtype)   # a narrowing cast keeps the low bits


def _bitwise(fn):
    def convert(n, a, b=None):
        bits = _width(n, a)[0]
        y = nibble_op(n, n.add("cast", a, dtype=I64), None if b is None else n.add("cast", b, dtype=I64), fn, bits)
        return _back(n, y, a)
    return convert


handler("BitwiseAnd")(_bitwise(lambda x, y: x & y))
handler("BitwiseOr")(_bitwise(lambda x, y: x | y))
handler("BitwiseXor")(_bitwise(lambda x, y: x ^ y))
handler("BitwiseNot")(_bitwise(lambda x, y: ~x))


@handler("BitShift")
def _bit_shift(n, x, y):
    """x << y or x >> y as ONNX's reference computes it: a shift outside [0, width) gives 0 (-1 for
    a negative x shifted right); a left shift keeps the low bits (wraps); a signed right shift is
    arithmetic (floor division by 2^y)."""
    bits, signed = _width(n, x)
    xv, yv = n.add("cast", x, dtype=I64), n.add("cast", y, dtype=I64)
    zero, one = n.const(0, dtype=I64), n.const(1, dtype=I64)
    out_of_range = n.add("logical_or", n.add("lt", yv, zero), n.add("ge", yv, n.const(bits, dtype=I64)))
    yv = n.add("where", out_of_range, zero, yv)   # a uint64 shift from 2^63 up reads as negative: also out of range
    pow2 = n.const(torch.tensor([1 << k if k < 63 else _MIN for k in range(64)], dtype=I64))
    if n.attr("direction") == "LEFT":
        if bits < 64:   # (x mod 2^(bits - y)) * 2^y is below 2^bits: no int64 overflow
            keep = n.const(torch.tensor([1 << (bits - k) for k in range(bits)], dtype=I64))
            xv = n.add("remainder", xv, n.add("gather", keep, yv, axis=0))
        out = n.add("mul", xv, n.add("gather", pow2, yv, axis=0))   # 64 bits: wraps as the bits do
        out = n.add("where", out_of_range, zero, out)
    else:
        if bits == 64:   # halve first, so the divisor 2^(y - 1) is at most 2^62
            half = _shr1_u64(n, xv) if not signed else n.add("floor_div", xv, n.const(2, dtype=I64))
            ym1 = n.add("maximum", n.add("sub", yv, one), zero)
            out = n.add("where", n.add("eq", yv, zero), xv, n.add("floor_div", half, n.add("gather", pow2, ym1, axis=0)))
        else:
            out = n.add("floor_div", xv, n.add("gather", pow2, yv, axis=0))
        fill = n.add("where", n.add("lt", xv, zero), n.const(-1, dtype=I64), zero) if signed else zero
        out = n.add("where", out_of_range, fill, out)
    return _back(n, out, x)


@handler("BitCast")
def _bit_cast(n, x):
    """Between types of one width: integers (the low bits are the same), and floats or bools to and
    from signed integers (the `bitcast` op, torch's Tensor.view(dtype))."""
    to = n.attr("to")
    src_bits, _ = _width(n, x) if not x.dtype.is_floating_point else (0, False)
    if to in UNSIGNED:
        dst, dst_bits = UNSIGNED[to][0], UNSIGNED[to][1]
    elif to in DTYPES and not DTYPES[to].is_floating_point and DTYPES[to] != torch.bool:
        dst, dst_bits = DTYPES[to], torch.iinfo(DTYPES[to]).bits
    else:
        dst, dst_bits = None, 0
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if (x.dtype in floats or x.dtype == torch.bool) and to in DTYPES and DTYPES[to] != torch.bool:
        # the same bits read as another type of the same width (float32 -> int32, bool -> uint8, ...)
        if DTYPES[to].itemsize != x.dtype.itemsize:
            n.fail(f"BitCast to {TensorProto.DataType.Name(to)} from {x.dtype}: the widths differ")
        return x if DTYPES[to] == x.dtype else n.add("bitcast", x, dtype=DTYPES[to])
    if to in DTYPES and DTYPES[to] in floats and not x.dtype.is_floating_point \
            and x.dtype.itemsize == DTYPES[to].itemsize and src_bits == 8 * x.dtype.itemsize:
        return n.add("bitcast", x, dtype=DTYPES[to])   # a signed integer's bits read as a float
    if dst is None or x.dtype.is_floating_point or src_bits != dst_bits:
        n.fail(f"BitCast to {TensorProto.DataType.Name(to)} from {x.dtype} is not supported (integers of one width only)")
    if to in UNSIGNED:
        y = n.add("cast", x, dtype=I64)
        return _mark(n.g, n.add("remainder", y, n.const(1 << dst_bits, dtype=I64)) if dst_bits < 64 else y, dst_bits)
    return n.add("cast", x, dtype=dst)
