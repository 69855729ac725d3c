"""Rotary position embeddings (Llama, GPT-NeoX): x * cos + rotate_half(x) * sin -> one rope op,
where rotate_half(x) = concat(-x[..., D/2:], x[..., :D/2]). Run unfused it is six kernels and a
concatenated copy per use; as one op it reads x, cos and sin once and writes once."""
from __future__ import annotations

from ...ir import Graph, Node
from ...rewrite import is_op


def _rotate_half_of(n: Node) -> Node | None:
    """x when n = concat(neg(x[..., h:]), x[..., :h]) along the last axis, h = D/2."""
    if not (is_op(n, "concat") and len(n.inputs) == 2 and n.attrs["axis"] == len(n.shape) - 1):
        return None
    neg, first = n.inputs
    if not (is_op(neg, "neg") and is_op(neg.inputs[0], "slice") and is_op(first, "slice")):
        return None
    second = neg.inputs[0]
    d = n.shape[-1]
    x = first.inputs[0]
    last = len(x.shape) - 1
    if (second.inputs[0] is not x or d % 2 or x.shape != n.shape
            or (first.attrs["axis"], first.attrs["start"], first.attrs["end"], first.attrs["step"]) != (last, 0, d // 2, 1)
            or (second.attrs["axis"], second.attrs["start"], second.attrs["end"], second.attrs["step"]) != (last, d // 2, d, 1)):
        return None
    return x


def rope(g: Graph, n: Node, report=None):
    if not (is_op(n, "add") and all(is_op(i, "mul") for i in n.inputs)) or not n.dtype.is_floating_point:
        return None
    for direct, rotated in (n.inputs, n.inputs[::-1]):
        for x, cos in (direct.inputs, direct.inputs[::-1]):
            for r, sin in (rotated.inputs, rotated.inputs[::-1]):
                if _rotate_half_of(r) is x and x.shape == n.shape and cos.shape[-1:] == sin.shape[-1:] == x.shape[-1:]:
                    return g.add("rope", x, cos, sin)
    return None


RULES = [("rope", rope)]
