"""Linear layers: matmul by a constant weight [+ bias] [+ activation] -> one GEMM with its epilogue,
and projections that read the same input (Q, K, V; gate and up) merged into one GEMM.

    x @ W            -> linear(x, W)              (through the reshapes that flatten x to 2-D)
    linear + b       -> linear(x, W, b)
    act(linear)      -> linear(x, W, b, act)      act in relu, gelu (erf, tanh), silu, sigmoid, tanh
    linear(x, W1), linear(x, W2), ...  -> linear(x, [W1 W2 ...]) sliced per projection
    act(slice(wide)) * slice(wide)     -> gated_linear(x, [Wg Wu], act)   (SwiGLU, GeGLU: the merged
                                          gate/up GEMM with the gating in its epilogue, CPU backend)
"""
from __future__ import annotations

import torch

from ...ir import Graph, Node
from ...kernels.linear import activation_of
from ...rewrite import is_op, uses


def _flattened(a: Node) -> Node:
    """x when a = reshape(x, [prod(leading dims), K])."""
    if is_op(a, "reshape") and len(a.shape) == 2 and a.inputs[0].shape[-1:] == a.shape[-1:]:
        return a.inputs[0]
    return a


def _through_reshape(n: Node) -> tuple[Node, bool]:
    """(linear, True) when n is a linear or a reshape of one that keeps the last dim."""
    if is_op(n, "reshape") and is_op(n.inputs[0], "linear") and n.inputs[0].shape[-1] == n.shape[-1]:
        return n.inputs[0], True
    return n, False


def linear(g: Graph, n: Node, report=None):
    if is_op(n, "matmul") and n.inputs[1].op == "const" and len(n.inputs[1].shape) == 2 and len(n.inputs[0].shape) >= 2:
        x = _flattened(n.inputs[0])
        out = g.add("linear", x, n.inputs[1], act="none")
        return out if out.shape == n.shape else g.add("reshape", out, shape=n.shape)
    return None


def bias(g: Graph, n: Node, report=None):
    if not is_op(n, "add"):
        return None
    for a, b in (n.inputs, n.inputs[::-1]):
        lin, reshaped = _through_reshape(a)
        if (is_op(lin, "linear") and len(lin.inputs) == 2 and lin.attrs["act"] == "none" and b.op == "const"
                and b.numel == lin.shape[-1] and b.shape[-1:] == lin.shape[-1:] and b.dtype == lin.dtype
                and uses(g, lin) == 1 and (not reshaped or uses(g, a) == 1)):
            out = g.add("linear", *lin.inputs, g.const(b.value.reshape(-1)), act="none")
            return g.add("reshape", out, shape=n.shape) if reshaped else out
    return None


def activation(g: Graph, n: Node, report=None):
    act = activation_of(n)
    if act is None:
        return None
    lin, reshaped = _through_reshape(n.inputs[0])
    if not is_op(lin, "linear") or lin.attrs["act"] != "none":
        return None
    if uses(g, lin) != 1 or reshaped and uses(g, n.inputs[0]) != 1:
        if report is not None:
            report.refuse("shared_intermediate", lin.label, n.label,
                          f"linear_act: the linear's output is also read without the {n.op}")
        return None
    out = g.add("linear", *lin.inputs, act=act)
    return g.add("reshape", out, shape=n.shape) if reshaped else out


def horizontal(g: Graph, report) -> int:
    """Merge linears without activation that read the same input into one wider GEMM."""
    by_input: dict[Node, list[Node]] = {}
    for n in g.nodes:
        if is_op(n, "linear") and n.attrs["act"] == "none" and n.inputs[1].op == "const":
            by_input.setdefault(n.inputs[0], []).append(n)
    merged = 0
    for x, lins in by_input.items():
        if len(lins) < 2:
            continue
        w = torch.cat([lin.inputs[1].value for lin in lins], dim=1)
        has_bias = any(len(lin.inputs) == 3 for lin in lins)
        args = [x, g.const(w)]
        if has_bias:
            args.append(g.const(torch.cat([lin.inputs[2].value if len(lin.inputs) == 3
                                           else torch.zeros(lin.shape[-1], dtype=lin.dtype) for lin in lins])))
        wide = g.add("linear", *args, act="none")
        start = 0
        for lin in lins:
            width = lin.shape[-1]
            g.replace_uses(lin, g.add("slice", wide, axis=len(wide.shape) - 1, start=start, end=start + width, step=1))
            start += width
        report.fired("horizontal_gemm")
        merged += 1
    g.toposort()
    g.prune()
    return merged


def _half(n: Node) -> tuple[Node, bool] | None:
    """(linear, reshaped) when n is a unit-step slice of the last dim of a linear's output without an
    activation (or of a reshape of it that keeps the last dim)."""
    if not (is_op(n, "slice") and n.attrs["axis"] % len(n.shape) == len(n.shape) - 1 and n.attrs["step"] == 1):
        return None
    lin, reshaped = _through_reshape(n.inputs[0])
    if not (is_op(lin, "linear") and lin.attrs["act"] == "none" and lin.inputs[1].op == "const"):
        return None
    return lin, reshaped


def _columns(t: torch.Tensor, s: Node) -> torch.Tensor:
    """The last-dim columns of t (a weight [K, N] or bias [N]) that slice s takes from the linear's output."""
    return t[..., s.attrs["start"]:s.attrs["end"]]


def gated(g: Graph, n: Node, report=None):
    """mul(act(gate), up) with gate and up two slices of one linear's output, read by nothing else:
    one gated_linear whose weight holds the gate's columns, then the up projection's."""
    if not is_op(n, "mul") or n.inputs[0] is n.inputs[1]:
        return None
    for a, up in (n.inputs, n.inputs[::-1]):
        act = activation_of(a)
        if act is None or a.inputs[0].shape != up.shape or up.shape != n.shape:
            continue
        gate = a.inputs[0]
        halves = _half(gate), _half(up)
        if None in halves or gate.inputs[0] is not up.inputs[0]:     # two slices of one tensor
            continue
        (lin, reshaped), src = halves[0], gate.inputs[0]
        if uses(g, a) != 1 or uses(g, gate) != 1 or uses(g, up) != 1 or uses(g, src) != 2 \
                or reshaped and uses(g, lin) != 1:
            if report is not None:
                report.refuse("shared_intermediate", lin.label, n.label,
                              "gated_linear: a half of the gate/up GEMM (or its gating) is also read elsewhere")
            continue
        w = torch.cat([_columns(lin.inputs[1].value, s) for s in (gate, up)], dim=-1)
        args = [lin.inputs[0], g.const(w)]
        if len(lin.inputs) == 3:
            args.append(g.const(torch.cat([_columns(lin.inputs[2].value, s) for s in (gate, up)])))
        out = g.add("gated_linear", *args, act=act)
        return out if out.shape == n.shape else g.add("reshape", out, shape=n.shape)
    return None


RULES = [("linear", linear), ("linear_bias", bias)]
ACT_RULES = [("linear_act", activation)]
GATED_RULES = [("gated_linear", gated)]     # the CPU backend's (its C GEMM has the gated epilogue)
