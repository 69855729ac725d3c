"""Graph-building helpers both frontends use. `g` is anything with the Graph's add(op, *inputs,
**attrs): the Graph itself (PyTorch) or an ONNX node's builder, which names what it adds."""
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


def wrap_index(g, idx: Node, dim: int) -> Node:
    """Indices counted from the end (negative: ONNX's Gather, torch's x[..., [-2]]) made positive;
    the IR's gather and scatter take indices in [0, dim) only."""
    if idx.op == "const":
        v = idx.value
        return g.const(torch.where(v < 0, v + dim, v))
    neg = g.add("lt", idx, g.const(0, dtype=idx.dtype))
    return g.add("where", neg, g.add("add", idx, g.const(dim, dtype=idx.dtype)), idx)
