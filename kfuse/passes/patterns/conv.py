"""BatchNorm folded into the convolution before it (2-D or 3-D, plain or transposed): inference BatchNorm
is x * scale + shift per channel (capture already writes it so), and both fold into the conv's weights
and bias once.

    conv(x, W, b) * s[c]  -> conv(x, W * s[c], b * s[c])     (W's output-channel axis: 0, or 1 of each group
    conv(x, W, b) + t[c]  -> conv(x, W, b + t[c])             of a transposed conv's [Cin, Cout/g, ...])
"""
from __future__ import annotations

import torch

from ...ir import CONVS, Graph, Node
from ...kernels.conv import per_channel
from ...rewrite import is_op, uses


def fold_bn(g: Graph, n: Node, report=None):
    """A BatchNorm's scale (mul) or shift (add) folded into the conv before it."""
    if not is_op(n, "mul", "add"):
        return None
    for conv, c in (n.inputs, n.inputs[::-1]):
        if not is_op(conv, *CONVS) or conv.inputs[1].op != "const" or uses(g, conv) != 1:
            continue
        if len(conv.inputs) == 3 and conv.inputs[2].op != "const":
            continue
        v = per_channel(c, conv)
        if v is None:
            continue
        w = conv.inputs[1].value
        b = conv.inputs[2].value if len(conv.inputs) == 3 else torch.zeros(v.numel(), dtype=w.dtype)
        if n.op == "mul":
            taps = (1,) * (w.dim() - 2)
            if "output_padding" in conv.attrs:
                groups = conv.attrs.get("groups", 1)
                s = v.reshape(groups, 1, -1, *taps)
                w = (w.reshape(groups, w.shape[0] // groups, *w.shape[1:]) * s).reshape(w.shape)
            else:
                w = w * v.reshape(-1, 1, *taps)
            b = b * v
        else:
            b = b + v
        return g.add(conv.op, conv.inputs[0], g.const(w), g.const(b), **conv.attrs)
    return None


def fold_scale(g: Graph, n: Node, report=None):
    return fold_bn(g, n, report) if is_op(n, "mul") else None


def fold_shift(g: Graph, n: Node, report=None):
    return fold_bn(g, n, report) if is_op(n, "add") else None


# counted apart: a BatchNorm folds as one scale and one shift
RULES = [("conv_bn_scale", fold_scale), ("conv_bn_shift", fold_shift)]
