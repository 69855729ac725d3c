"""The convolution-with-epilogue kernel: act(conv(x, W) + b [+ residual]) with constant W and b (2-D or 3-D,
plain or transposed),
as a library (oneDNN) runs it: the activation and the residual add as post-ops of the convolution.

`as_conv(nodes)` recognises a group the scheduler formed (a convolution by a constant weight, then a
per-channel bias add, then either a residual add of a tensor of the output's shape, an activation,
or a residual add followed by an activation); the activations are those with a oneDNN post-op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir import CONVS, Node


@dataclass
class ConvEpilogue:
    x: Node                       # the convolution's input
    weight: torch.Tensor          # [Cout, Cin/groups, kh, kw] ([..., kd, kh, kw] 3-D; [Cin, Cout/groups, ...] transposed)
    bias: torch.Tensor | None     # [Cout]
    attrs: dict                   # stride, padding, dilation, groups, layout ("nhwc": x and output [N, H, W, C]),
                                  # output_padding (transposed)
    act: tuple | None             # (oneDNN attr, scalars, algorithm), e.g. ("relu", (), "")
    residual: Node | None         # added after the bias, before the activation

    @property
    def transposed(self) -> bool:
        return "output_padding" in self.attrs


def post_op_of(n: Node) -> tuple | None:
    """The oneDNN eltwise post-op computing node n of one input, or None."""
    if n.op in ("relu", "sigmoid", "tanh", "hardswish", "hardsigmoid"):
        return (n.op, (), "")
    if n.op == "silu":
        return ("swish", (), "")
    if n.op == "gelu":
        return ("gelu", (), n.attrs.get("approximate", "none"))
    if n.op == "leaky_relu":
        return ("leaky_relu", (float(n.attrs["alpha"]),), "")
    if n.op == "clamp" and n.attrs.get("min") is not None and n.attrs.get("max") is not None \
            and math.isfinite(n.attrs["min"]) and math.isfinite(n.attrs["max"]):
        return ("hardtanh", (float(n.attrs["min"]), float(n.attrs["max"])), "")
    return None


def per_channel(c: Node, conv: Node) -> torch.Tensor | None:
    """The [C] vector of a constant that broadcasts along the output channels of `conv` only (a
    BatchNorm's scale or shift, a bias), else None."""
    axis = 3 if conv.attrs.get("layout") == "nhwc" else 1
    ch = conv.shape[axis]
    if c.op != "const" or c.numel != ch or c.dtype != conv.dtype or len(c.shape) > len(conv.shape):
        return None
    shape = (1,) * (len(conv.shape) - len(c.shape)) + c.shape
    return c.value.reshape(ch) if shape[axis] == ch else None


def as_conv(nodes) -> ConvEpilogue | None:
    """The description of `nodes` (a convolution by a constant weight and its epilogue), or None."""
    head = nodes[0]
    if head.op not in CONVS or head.dtype != torch.float32 or len(head.shape) != int(head.op[-2]) + 2 \
            or head.inputs[1].op != "const" \
            or (len(head.inputs) == 3 and head.inputs[2].op != "const"):
        return None
    bias = head.inputs[2].value if len(head.inputs) == 3 else None
    act, residual, last = None, None, head
    for n in nodes[1:]:
        if last not in n.inputs or n.shape != last.shape or act is not None:
            return None
        other = [i for i in n.inputs if i is not last]
        if n.op == "add" and len(other) == 1 and residual is None and (v := per_channel(other[0], head)) is not None:
            if last is not head:             # a bias after a residual add is not a post-op
                return None
            bias = v if bias is None else bias + v
        elif n.op == "add" and len(other) == 1 and residual is None and other[0].shape == head.shape \
                and other[0].dtype == head.dtype and other[0].op != "const":
            residual = other[0]
        elif not other and post_op_of(n) is not None:
            act = post_op_of(n)
        else:
            return None
        last = n
    return ConvEpilogue(head.inputs[0], head.inputs[1].value, bias, dict(head.attrs), act, residual)


def as_depthwise_pointwise(nodes) -> tuple[ConvEpilogue, ConvEpilogue] | None:
    """(depthwise, pointwise) when `nodes` are a depthwise convolution's kernel (multiplier 1, its bias
    and activation, no residual) followed by the kernel of a 1x1 stride-1 unpadded convolution of one
    group that reads it (with its own epilogue), both channels-last; else None."""
    heads = [i for i, n in enumerate(nodes) if n.op == "conv2d"]
    if len(heads) != 2 or heads[0] != 0:
        return None
    dw, pw = as_conv(nodes[:heads[1]]), as_conv(nodes[heads[1]:])
    if dw is None or pw is None or pw.x is not nodes[heads[1] - 1] or dw.residual is not None:
        return None
    c = dw.weight.shape[0]
    a = dw.attrs
    if a.get("layout") != "nhwc" or int(a["groups"]) != c or dw.weight.shape[1] != 1 or dw.x.shape[3] != c \
            or not _pointwise_nhwc(pw, c):
        return None
    return dw, pw


def as_pointwise_depthwise(nodes) -> tuple[ConvEpilogue, ConvEpilogue] | None:
    """(pointwise, depthwise) when `nodes` are the kernel of a 1x1 stride-1 unpadded convolution of one
    group (its bias and activation, no residual) followed by the kernel of a depthwise convolution
    (multiplier 1, no residual) that reads it, both channels-last float32; else None."""
    heads = [i for i, n in enumerate(nodes) if n.op == "conv2d"]
    if len(heads) != 2 or heads[0] != 0:
        return None
    pw, dw = as_conv(nodes[:heads[1]]), as_conv(nodes[heads[1]:])
    if pw is None or dw is None or dw.x is not nodes[heads[1] - 1] or pw.residual is not None \
            or dw.residual is not None or not _pointwise_nhwc(pw, pw.x.shape[-1]):
        return None
    c, a = dw.weight.shape[0], dw.attrs
    if a.get("layout") != "nhwc" or int(a["groups"]) != c or dw.weight.shape[1] != 1 or pw.weight.shape[0] != c:
        return None
    return pw, dw


def as_squeeze_excite_pointwise(nodes) -> tuple[Node, ConvEpilogue] | None:
    """(squeeze_excite node, pointwise) when `nodes` are a channels-last float32 squeeze-excitation and
    the kernel of a 1x1 stride-1 unpadded convolution of one group that reads it (with its own
    epilogue): the gate can then scale the convolution's inputs as it reads them; else None."""
    se = nodes[0] if nodes else None
    if se is None or se.op != "squeeze_excite" or len(nodes) < 2 or se.dtype != torch.float32 \
            or len(se.shape) != 4 or se.attrs.get("layout", "nhwc") != "nhwc":
        return None
    pw = as_conv(nodes[1:])
    if pw is None or pw.x is not se or not _pointwise_nhwc(pw, se.shape[3]):
        return None
    return se, pw


def _pointwise_nhwc(pw: ConvEpilogue, c: int) -> bool:
    """Whether pw is a channels-last 1x1 stride-1 unpadded convolution of one group over c channels."""
    b = pw.attrs
    return b.get("layout") == "nhwc" and tuple(pw.weight.shape[1:]) == (c, 1, 1) and int(b["groups"]) == 1 \
        and tuple(b["stride"]) == (1, 1) and tuple(b["padding"]) == (0, 0)


# The pairs with a 1x1 convolution that one kernel computes (passes/autofuse.Scheduler.pointwise_pairs,
# backends.split_pairs): the rule's name (for disable=[...]), its matcher and how reports name it.
POINTWISE_PAIRS = {"depthwise_pointwise": (as_depthwise_pointwise, "depthwise -> pointwise"),
                   "pointwise_depthwise": (as_pointwise_depthwise, "pointwise -> depthwise"),
                   "squeeze_excite_pointwise": (as_squeeze_excite_pointwise, "squeeze-excitation -> pointwise")}
