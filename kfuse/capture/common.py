"""Graph-building helpers both frontends use. `g` is anything with the Graph's add(op, *inputs,
**attrs) and const(value, dtype): the Graph itself (PyTorch) or an ONNX node's builder, which names
what it adds."""
from __future__ import annotations

import math

import torch

from ..ir import Node


def reshape(g, x: Node, shape) -> Node:
    """x in `shape` (one -1 is inferred); no op when the shape is already x's."""
    shape = [int(d) for d in shape]
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = x.numel // known if known else 0
    return x if tuple(shape) == x.shape else g.add("reshape", x, shape=tuple(shape))


def dim_axis(dim: int, x) -> int:
    """torch's `dim` argument as a non-negative axis of x; a 0-d x takes dim 0 or -1 as torch does
    (softmax, sum, cumsum, topk, gather... of a scalar)."""
    return dim % max(len(x.shape), 1)


def wrap_index(g, idx: Node, dim: int) -> Node:
    """Indices counted from the end (negative: ONNX's Gather, torch's x[..., [-2]]) made positive;
    the IR's gather and scatter take indices in [0, dim) only."""
    if idx.op == "const":
        v = idx.value
        return g.const(torch.where(v < 0, v + dim, v))
    neg = g.add("lt", idx, g.const(0, dtype=idx.dtype))
    return g.add("where", neg, g.add("add", idx, g.const(dim, dtype=idx.dtype)), idx)


def nibble_op(g, a: Node, b: Node | None, fn, bits: int) -> Node:
    """fn applied bitwise to the low `bits` bits of int64 a and b (b None: unary), 4 bits at a time (the
    IR has no bitwise ops: a gather from a 256-entry table per nibble); the result's bits above `bits`
    are those of a sign-extended 64-bit value when bits == 64."""
    i64 = torch.int64
    table = g.const(torch.tensor([fn(i >> 4, i & 15) & 15 for i in range(256)], dtype=i64))
    sixteen = g.const(16, dtype=i64)
    out = None
    steps = (bits + 3) // 4
    for i in range(steps):
        na, nb = g.add("remainder", a, sixteen), g.add("remainder", b, sixteen) if b is not None else None
        idx = g.add("mul", na, sixteen) if nb is None else g.add("add", g.add("mul", na, sixteen), nb)
        r = g.add("gather", table, idx, axis=0)
        if i == 15:   # the top nibble of a 64-bit value holds the sign: -8..7 times 2^60
            r = g.add("sub", r, g.add("mul", g.add("cast", g.add("ge", r, g.const(8, dtype=i64)), dtype=i64), sixteen))
        r = g.add("mul", r, g.const(1 << (4 * i), dtype=i64)) if i else r
        out = r if out is None else g.add("add", out, r)
        if i + 1 < steps:
            a = g.add("floor_div", a, sixteen)
            b = g.add("floor_div", b, sixteen) if b is not None else None
    return out
