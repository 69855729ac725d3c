"""Graph-building helpers both frontends use. `g` is anything with the Graph's add(op, *inputs,
**attrs): the Graph itself (PyTorch) or an ONNX node's builder, which names what it adds."""
from __future__ import annotations

import math

from ..ir import Node


def reshape(g, x: Node, shape) -> Node:
    """x in `shape` (one -1 is inferred); no op when the shape is already x's."""
    shape = [int(d) for d in shape]
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = x.numel // known if known else 0
    return x if tuple(shape) == x.shape else g.add("reshape", x, shape=tuple(shape))
