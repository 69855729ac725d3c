"""Normalisations recognised from their decomposed forms (ONNX exports and Llama-style code write
them out op by op), so the fuser sees one row reduction instead of eight kernels.

    layer_norm:  (x - mean(x)) * rsqrt(mean((x - mean(x))²) + eps) [* w] [+ b]
    rms_norm:    x * rsqrt(mean(x²) + eps) [* w]
The residual add in front of either is fused by the automatic fuser (an elementwise prologue of a
row reduction), which reports it as add_layernorm / add_rmsnorm.
"""
from __future__ import annotations

import torch

from ...ir import Graph, Node
from ...rewrite import const_scalar, is_op, uses


def _last_axis_mean(n: Node) -> Node | None:
    """x when n = mean(x, last axis, keepdim=True)."""
    if is_op(n, "reduce_mean") and n.attrs["keepdim"] and n.attrs["axes"] == (len(n.shape) - 1,):
        return n.inputs[0]
    return None


def _square_of(n: Node) -> Node | None:
    if is_op(n, "pow") and const_scalar(n.inputs[1]) == 2.0:
        return n.inputs[0]
    if is_op(n, "mul") and n.inputs[0] is n.inputs[1]:
        return n.inputs[0]
    return None


def _inv_std(n: Node, centred: Node) -> float | None:
    """eps when n is 1/sqrt(mean(centred²) + eps) written as rsqrt(...)."""
    if not is_op(n, "rsqrt"):
        return None
    return _std_eps(n.inputs[0], centred)


def _std_eps(s: Node, centred: Node) -> float | None:
    """eps when s = mean(centred²) + eps."""
    if not is_op(s, "add"):
        return None
    for var, eps in (s.inputs, s.inputs[::-1]):
        e = const_scalar(eps)
        m = _last_axis_mean(var)
        if e is not None and m is not None and _square_of(m) is centred:
            return e
    return None


def _normalized(n: Node, centred: Node) -> float | None:
    """eps when n = centred * rsqrt(mean(centred²) + eps) or centred / sqrt(mean(centred²) + eps)."""
    if is_op(n, "mul"):
        for c, r in (n.inputs, n.inputs[::-1]):
            if c is centred:
                e = _inv_std(r, centred)
                if e is not None:
                    return e
    if is_op(n, "div") and n.inputs[0] is centred and is_op(n.inputs[1], "sqrt"):
        return _std_eps(n.inputs[1].inputs[0], centred)
    return None


def layer_norm(g: Graph, n: Node, report=None):
    if not n.dtype.is_floating_point or not is_op(n, "mul", "div"):
        return None
    centred = n.inputs[0] if is_op(n.inputs[0], "sub") else n.inputs[1] if is_op(n.inputs[1], "sub") else None
    if centred is None or centred.shape != n.shape:
        return None
    x, mu = centred.inputs
    if _last_axis_mean(mu) is not x:
        return None
    eps = _normalized(n, centred)
    if eps is None:
        return None
    d = n.shape[-1]
    return g.add("layer_norm", x, g.const(torch.ones(d, dtype=n.dtype)), g.const(torch.zeros(d, dtype=n.dtype)), eps=eps, ndim=1)


def rms_norm(g: Graph, n: Node, report=None):
    if not is_op(n, "mul") or not n.dtype.is_floating_point:
        return None
    for x, r in (n.inputs, n.inputs[::-1]):
        if x.shape == n.shape and is_op(r, "rsqrt"):
            s = r.inputs[0]
            if not is_op(s, "add"):
                continue
            for ms, eps in (s.inputs, s.inputs[::-1]):
                e = const_scalar(eps)
                m = _last_axis_mean(ms)
                if e is not None and m is not None and _square_of(m) is x:
                    return g.add("rms_norm", x, g.const(torch.ones(n.shape[-1], dtype=n.dtype)), eps=e)
    return None


def _vector_const(n: Node, d: int) -> torch.Tensor | None:
    """The 1-D value of a constant that broadcasts along the last axis only ([d], [1, d], ...)."""
    if n.op == "const" and n.shape and n.shape[-1] == d and n.numel == d:
        return n.value.reshape(d)
    return None


def norm_affine(g: Graph, n: Node, report=None):
    """Scale and shift by constant vectors after a norm with unit weight / zero bias fold into it."""
    if not is_op(n, "mul", "add"):
        return None
    for norm, c in (n.inputs, n.inputs[::-1]):
        if not is_op(norm, "layer_norm", "rms_norm") or norm.shape != n.shape or uses(g, norm) != 1:
            continue
        v = _vector_const(c, n.shape[-1])
        if v is None or norm.op == "layer_norm" and norm.attrs["ndim"] != 1:
            continue
        w = norm.inputs[1]
        if n.op == "mul" and w.op == "const" and bool((w.value == 1).all()):
            rest = norm.inputs[2:]
            if norm.op == "layer_norm" and not bool((rest[0].value == 0).all()):
                continue          # (ln*w + b) * c is not ln with weight c
            return g.add(norm.op, norm.inputs[0], g.const(v.to(n.dtype)), *rest, **norm.attrs)
        if n.op == "add" and norm.op == "layer_norm" and norm.inputs[2].op == "const" and bool((norm.inputs[2].value == 0).all()):
            return g.add("layer_norm", norm.inputs[0], w, g.const(v.to(n.dtype)), **norm.attrs)
    return None


RULES = [("layernorm_decomposed", layer_norm), ("rmsnorm_decomposed", rms_norm), ("norm_affine", norm_affine)]
