"""Squeeze-excitation (MobileNetV3, EfficientNet, RegNetY) as one op, on channels-last tensors:

    x * gate(FC2(act(FC1(mean_hw(x)))))  ->  squeeze_excite(x, W1, b1, W2, b2)

Run as captured it is five kernels: the mean, two 1x1 convolutions on a [N, C, 1, 1] tensor (tiny
GEMVs, each paying a oneDNN call of ~20 us), the gate and the scale. As one op it reads x twice
(the mean, then the scale) and writes once. The FCs may be 1x1 convolutions (torchvision) or linears
on the flattened mean; the rule runs after the channels-last pass (kfuse/passes/layout.py), whose
NHWC tensors it matches, so x is [N, H, W, C] and the gate [N, 1, 1, C].
"""
from __future__ import annotations

import torch

from ...ir import Graph, Node
from ...rewrite import is_op, uses

GATES = ("sigmoid", "hardsigmoid")
ACTS = ("relu", "silu", "gelu", "hardswish", "leaky_relu")
LINEAR_ACTS = {"relu": "relu", "silu": "silu", "gelu": "gelu", "sigmoid": "sigmoid"}   # linear's act attr -> ours


def _flat(n: Node) -> Node:
    """n without the views between a [N, C] vector and a [N, 1, 1, C] one (reshapes, the layout's transpose)."""
    while is_op(n, "reshape", "transpose") and n.numel == n.inputs[0].numel and n.shape[0] == n.inputs[0].shape[0] \
            and sum(d > 1 for d in n.shape[1:]) <= 1 and sum(d > 1 for d in n.inputs[0].shape[1:]) <= 1:
        n = n.inputs[0]
    return n


def _fc(n: Node):
    """(input, W [out, in], b [out], act) of a fully connected layer on a per-channel vector: a 1x1
    convolution on [N, 1, 1, C] (channels-last) or a linear on [N, C]; None otherwise."""
    if is_op(n, "conv2d") and n.attrs.get("layout") == "nhwc" and n.inputs[1].op == "const" \
            and n.inputs[0].shape[1:3] == (1, 1) and n.inputs[1].shape[2:] == (1, 1) and n.attrs["groups"] == 1 \
            and tuple(n.attrs["padding"]) == (0, 0) and (len(n.inputs) == 2 or n.inputs[2].op == "const"):
        w = n.inputs[1].value
        w = w.reshape(w.shape[0], -1)
        b = n.inputs[2].value if len(n.inputs) == 3 else torch.zeros(w.shape[0], dtype=w.dtype)
        return n.inputs[0], w, b, "none"
    if is_op(n, "linear") and len(n.shape) == 2 and n.inputs[1].op == "const" \
            and n.attrs.get("act", "none") in ("none", *LINEAR_ACTS) and (len(n.inputs) == 2 or n.inputs[2].op == "const"):
        w = n.inputs[1].value.t()               # linear stores w [K, N]
        b = n.inputs[2].value.reshape(-1) if len(n.inputs) == 3 else torch.zeros(w.shape[0], dtype=w.dtype)
        if b.numel() != w.shape[0]:
            return None
        return n.inputs[0], w, b, LINEAR_ACTS.get(n.attrs.get("act", "none"), "none")
    return None


def _act(n: Node, names):
    """(act, slope, input) when n applies one of `names` to one tensor, else (None, 0.0, n)."""
    if n.op in names and len(n.inputs) == 1:
        return n.op, float(n.attrs.get("alpha", 0.0)), n.inputs[0]
    return None, 0.0, n


def squeeze_excite(g: Graph, n: Node, report=None):
    if not is_op(n, "mul") or len(n.shape) != 4 or n.dtype != torch.float32:
        return None
    for x, gate in (n.inputs, n.inputs[::-1]):
        if x.shape != n.shape or gate.shape != (n.shape[0], 1, 1, n.shape[3]):
            continue
        chain = [gate]
        s = _flat(gate)
        act2, _, t = _act(s, GATES)
        fc2 = _fc(t)
        if fc2 is None or (act2 is None) == (fc2[3] == "none"):
            continue
        h, w2, b2, fused2 = fc2
        act2 = act2 or fused2
        act1, slope, u = _act(h, ACTS)
        fc1 = _fc(u)
        if fc1 is None or act1 is not None and fc1[3] != "none":
            continue
        m, w1, b1, fused1 = fc1
        act1 = act1 or fused1
        mean = _flat(m)
        if not (is_op(mean, "reduce_mean") and mean.inputs[0] is x and set(mean.attrs["axes"]) == {1, 2}
                and w1.shape == (w2.shape[1], x.shape[3]) and w2.shape[0] == x.shape[3] and act2 in GATES):
            continue
        chain += [s, t, h, u, m, mean]
        if any(uses(g, c) != 1 for c in set(chain)):     # an intermediate read elsewhere: leave the block as it is
            continue
        return g.add("squeeze_excite", x, g.const(w1.float()), g.const(b1.float()), g.const(w2.float()),
                     g.const(b2.float()), act1=act1, act2=act2, slope=slope)
    return None


RULES = [("squeeze_excite", squeeze_excite)]
