"""Multi-head attention: softmax(Q·Kᵀ · scale + mask) · V -> one attention op, run by a kernel that
never materialises the score matrix (online softmax over key tiles, as FlashAttention does).

Matched through the reshapes that merge batch and head dims around batched matmuls, the transpose
of K, the repeat of K/V heads in grouped-query attention, any constant scale (mul or div, in float32
for float16/bfloat16 scores) and one additive mask added after the scaling. What breaks a near match
is recorded as a why-not.
"""
from __future__ import annotations

import torch

from ...ir import Graph, Node
from ...errors import GraphError
from ...rewrite import const_scalar, is_op, uses


def strip_batch_reshape(n: Node) -> Node:
    """Look through reshapes that only merge or split leading dims (the last two stay)."""
    while is_op(n, "reshape") and n.inputs[0].shape[-2:] == n.shape[-2:]:
        n = n.inputs[0]
    return n


def strip_repeat_kv(n: Node) -> Node:
    """k for k repeated per query head: reshape(expand(reshape(k, [.., hkv, 1, L, D]), [.., hkv, rep, L, D]))."""
    n = strip_batch_reshape(n)
    if is_op(n, "expand") and len(n.shape) >= 3:
        src = n.inputs[0]
        if src.shape[-3] == 1 and src.shape[:-3] == n.shape[:-3]:
            inner = src.inputs[0] if is_op(src, "reshape") else src
            if inner.shape[:-2] == src.shape[:-3] and inner.shape[-2:] == src.shape[-2:]:
                return inner
    return n


def _scores(s: Node):
    """(qk matmul, scale, mask) for s = [mask +] scale * (q @ kᵀ), looking through batch reshapes."""
    mask, scale = None, 1.0
    s = strip_batch_reshape(s)
    if is_op(s, "add"):
        a, b = s.inputs
        a, b = (strip_batch_reshape(a), b)
        for scores, m in ((a, b), (strip_batch_reshape(b), a)):
            if not _depends_on_qk(m) and _depends_on_qk(scores):
                mask, s = m, scores
                break
        else:
            return None, "the add before softmax has no mask operand independent of the scores"
    while True:
        s = strip_batch_reshape(s)
        down = s if _scaled_in_float32(s) else None
        if down:
            s = s.inputs[0]
        if is_op(s, "mul", "div"):
            c = const_scalar(s.inputs[1]) if s.inputs[1].numel == 1 else None
            if c is None and s.op == "mul" and s.inputs[0].numel == 1:
                c, s_in = const_scalar(s.inputs[0]), s.inputs[1]
            else:
                s_in = s.inputs[0]
            if c is None:
                return None, f"scores scaled by a non-constant in {s.op}"
            scale = scale * c if s.op == "mul" else scale / c
            s = s_in
            if down:
                s = strip_batch_reshape(s)
                if not (is_op(s, "cast") and s.inputs[0].dtype == down.dtype):
                    return None, f"scores scaled in float32 and cast to {down.dtype} were not {down.dtype} before"
                s = s.inputs[0]
        elif is_op(s, "matmul"):
            return (s, scale, mask), ""
        elif is_op(s, "add"):
            return None, "the mask is added before the scaling"
        else:
            return None, f"the scores come from {s.op}, not a matmul"


def _scaled_in_float32(s: Node) -> bool:
    """Whether s is a float32 mul or div cast down to float16/bfloat16: how capture writes such scores
    times a python float, cast(cast(x, float32) * c, x's dtype) (capture/aten.py, UNROUNDED_SCALAR).
    The attention kernel scales in float32 too."""
    return (is_op(s, "cast") and s.dtype in (torch.float16, torch.bfloat16) and is_op(s.inputs[0], "mul", "div")
            and s.inputs[0].dtype == torch.float32)


def _depends_on_qk(n: Node, depth: int = 12) -> bool:
    """Whether n is computed from a matmul within a few ops (the scores); masks are not."""
    stack = [(n, 0)]
    while stack:
        m, d = stack.pop()
        if m.op == "matmul" and not any(i.op == "const" for i in m.inputs):
            return True
        if d < depth:
            stack.extend((i, d + 1) for i in m.inputs)
    return False


def attention(g: Graph, n: Node, report=None):
    if not is_op(n, "matmul") or len(n.shape) < 3:
        return None
    p, v = n.inputs
    sm = strip_batch_reshape(p)
    if not (is_op(sm, "softmax") and sm.attrs["axis"] == len(sm.shape) - 1):
        return None
    where = (sm, n)
    if uses(g, sm) != 1:
        return _miss(report, "shared_intermediate", "the softmax probabilities are used outside the attention", where)
    found, why = _scores(sm.inputs[0])
    if found is None:
        return _miss(report, "pattern_order", why, where)
    qk, scale, mask = found
    q = strip_batch_reshape(qk.inputs[0])
    kt = strip_batch_reshape(qk.inputs[1])
    swap = tuple(range(len(kt.shape) - 2)) + (len(kt.shape) - 1, len(kt.shape) - 2)
    k = kt.inputs[0] if is_op(kt, "transpose") and kt.attrs["perm"] == swap else g.add("transpose", kt, perm=swap)
    k = strip_repeat_kv(k)
    v = strip_repeat_kv(v)
    if len(q.shape) < 3 or q.shape[:-3] != k.shape[:-3] or k.shape[:-1] != v.shape[:-1] or q.shape[-3] % k.shape[-3]:
        return _miss(report, "pattern_shape", f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not line up as heads",
                     where)
    try:
        args = (q, k, v) if mask is None else (q, k, v, mask)
        out = g.add("attention", *args, scale=scale, causal=False)
    except GraphError:
        return _miss(report, "pattern_shape", f"mask {list(mask.shape)} does not broadcast to the scores", where)
    return out if out.shape == n.shape else g.add("reshape", out, shape=n.shape)


def mask_broadcast(g: Graph, n: Node, report=None):
    """attention(q, k, v, expand(m)) -> attention(q, k, v, m): the kernel broadcasts masks itself,
    and a mask that does not vary along the queries takes its fast path."""
    if is_op(n, "attention") and len(n.inputs) == 4 and is_op(n.inputs[3], "expand"):
        return g.add("attention", *n.inputs[:3], n.inputs[3].inputs[0], **n.attrs)
    return None


def _miss(report, code, detail, where):
    """Record a near miss of the attention rule between the softmax and the matmul after it."""
    if report is not None:
        report.refuse(code, where[0].label, where[1].label, f"attention: {detail}")
    return None


RULES = [("attention", attention), ("mask_broadcast", mask_broadcast)]
