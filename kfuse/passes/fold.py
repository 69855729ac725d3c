"""Folding: simplifications that change no arithmetic, so they must match the original bit for bit.

Constants are already folded as the graph is built (kfuse.ir.Graph.add); eval-mode dropout never
reaches the IR (capture maps it to identity). This pass merges chains of reshapes and transposes,
drops identities, removes common subexpressions, and names decomposed activations.
"""
from __future__ import annotations

import hashlib

import torch

from ..ir import Graph, Kind, Node, bits, fingerprint, has_bits
from ..rewrite import apply, const_scalar, is_op, uses


def reshape_chain(g: Graph, n: Node, report=None):
    """reshape(reshape(x)) -> reshape(x); a reshape to the same shape -> x."""
    if is_op(n, "reshape"):
        src = n.inputs[0]
        if src.shape == n.shape:
            return src
        if is_op(src, "reshape"):
            return g.add("reshape", src.inputs[0], shape=n.shape)
    return None


def transpose_chain(g: Graph, n: Node, report=None):
    """transpose(transpose(x, p), q) -> transpose(x, p∘q); the identity permutation -> x."""
    if is_op(n, "transpose"):
        perm = n.attrs["perm"]
        if perm == tuple(range(len(perm))):
            return n.inputs[0]
        src = n.inputs[0]
        if is_op(src, "transpose"):
            inner = src.attrs["perm"]
            combined = tuple(inner[p] for p in perm)
            x = src.inputs[0]
            return x if combined == tuple(range(len(combined))) else g.add("transpose", x, perm=combined)
    return None


def same_cast(g: Graph, n: Node, report=None):
    if is_op(n, "cast", "expand") and n.inputs[0].dtype == n.dtype and n.inputs[0].shape == n.shape:
        return n.inputs[0]
    return None


def neutral_operand(g: Graph, n: Node, report=None):
    """x & True, x | False, x * 1 -> x (broadcast to the result's shape): exact, and it keeps masks
    that only vary along some dims as broadcasts (transformers builds its masks this way)."""
    neutral = {"logical_and": True, "logical_or": False, "mul": 1.0}.get(n.op)
    if neutral is None:
        return None
    for x, c in (n.inputs, n.inputs[::-1]):
        if c.op == "const" and x.dtype == n.dtype and bool((c.value == neutral).all()):
            return x if x.shape == n.shape else g.add("expand", x, shape=n.shape)
    return None


def sink_reshape(g: Graph, n: Node, report=None):
    """act(reshape(x)) -> reshape(act(x)) for a one-input elementwise op: the same values, and the
    activation then sits right after the op that produced x (a GEMM it can be an epilogue of)."""
    if n.kind == Kind.ELEMENTWISE and len(n.inputs) == 1 and is_op(n.inputs[0], "reshape") \
            and uses(g, n.inputs[0]) == 1:
        return g.add("reshape", g.add(n.op, n.inputs[0].inputs[0], **n.attrs), shape=n.shape)
    return None


def silu(g: Graph, n: Node, report=None):
    """x * sigmoid(x) -> silu(x), as SiLU decomposes in core ATen."""
    if is_op(n, "mul") and n.inputs[0].shape == n.inputs[1].shape:
        a, b = n.inputs
        for x, s in ((a, b), (b, a)):
            if is_op(s, "sigmoid") and s.inputs[0] is x:
                return g.add("silu", x)
    return None


def _relu6_of_x_plus_3(c: Node) -> Node | None:
    """x for clamp(x + 3, 0, 6), written as one clamp or as clamp_min then clamp_max, else None."""
    bounds = {}
    while is_op(c, "clamp") and len(bounds) < 2:
        for k in ("min", "max"):
            if c.attrs.get(k) is not None:
                if k in bounds:
                    return None
                bounds[k] = c.attrs[k]
        c = c.inputs[0]
    if bounds != {"min": 0, "max": 6} or not is_op(c, "add"):
        return None
    a, b = c.inputs
    x = a if const_scalar(b) == 3.0 else b if const_scalar(a) == 3.0 else None
    return x if x is not None and x.shape == c.shape and x.dtype == c.dtype else None


def hard_activations(g: Graph, n: Node, report=None):
    """x * clamp(x + 3, 0, 6) / 6 -> hardswish(x) and clamp(x + 3, 0, 6) / 6 -> hardsigmoid(x), as
    core ATen decomposes them (the same operations in the same order as torch's float32 kernels; in
    half precision torch's kernels round once, the decomposition after every op, so those stay)."""
    if not (is_op(n, "div") and const_scalar(n.inputs[1]) == 6.0 and n.dtype == torch.float32):
        return None
    top = n.inputs[0]
    x = _relu6_of_x_plus_3(top)
    if x is not None and x.shape == n.shape:
        return g.add("hardsigmoid", x)
    if is_op(top, "mul") and top.inputs[0].shape == top.inputs[1].shape == n.shape:
        a, b = top.inputs
        for x, c in ((a, b), (b, a)):
            if _relu6_of_x_plus_3(c) is x:
                return g.add("hardswish", x)
    return None


def gelu_tanh(g: Graph, n: Node, report=None):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> gelu(x, approximate="tanh")
    (the form transformers' GPT-2 writes out)."""
    if not is_op(n, "mul"):
        return None
    for half_x, one_plus in (n.inputs, n.inputs[::-1]):
        if not (is_op(half_x, "mul") and is_op(one_plus, "add")):
            continue
        x = next((i for i, c in ((half_x.inputs[0], half_x.inputs[1]), (half_x.inputs[1], half_x.inputs[0]))
                  if const_scalar(c) == 0.5), None)
        t = next((i for i in one_plus.inputs if is_op(i, "tanh")), None)
        one = next((i for i in one_plus.inputs if const_scalar(i) == 1.0), None)
        if x is None or t is None or one is None or x.shape != n.shape:
            continue
        inner = t.inputs[0]                       # sqrt(2/pi) * (x + 0.044715 * x^3)
        if not is_op(inner, "mul"):
            continue
        k = next((const_scalar(i) for i in inner.inputs if const_scalar(i) is not None), None)
        poly = next((i for i in inner.inputs if is_op(i, "add")), None)
        if k is None or abs(k - 0.7978845608) > 1e-6 or poly is None or x not in poly.inputs:
            continue
        cube = next(i for i in poly.inputs if i is not x)
        if is_op(cube, "mul") and any(abs((const_scalar(c) or 0) - 0.044715) < 1e-8 for c in cube.inputs) and any(
                is_op(p, "pow") and p.inputs[0] is x and const_scalar(p.inputs[1]) == 3.0 for p in cube.inputs):
            return g.add("gelu", x, approximate="tanh")
    return None


RULES = [("reshape_chain", reshape_chain), ("transpose_chain", transpose_chain), ("identity", same_cast),
         ("neutral_operand", neutral_operand), ("sink_reshape", sink_reshape),
         ("silu", silu), ("gelu_tanh", gelu_tanh), ("hard_activations", hard_activations)]


def _const_keys(consts: list[Node]) -> dict[Node, object]:
    """Constants compare by bits: each use of `2.0` in a model is its own const node, and a weight
    transposed at two call sites folds to two equal constants. Grouped by a cheap fingerprint, then
    compared whole within a group (hashing every weight's bytes took 0.1 s per compile of a 96 MB model)."""
    keys, groups = {}, {}
    for n in consts:
        t = n.value
        if not has_bits(t):
            flat = t.clone(memory_format=torch.contiguous_format).reshape(-1)   # (a one-element slice keeps
            data = flat.view(torch.uint8).numpy().tobytes() if n.numel else b""  # stride 2: no byte view)
            keys[n] = ("bytes", n.dtype, n.shape, hashlib.sha1(data).hexdigest())
            continue
        t = t.contiguous()
        fp = fingerprint(t)             # the dtype in it: an int and a float of equal bits stay apart
        group = groups.setdefault(fp, [])
        i = next((i for i, m in enumerate(group) if torch.equal(bits(m), bits(t))), None)
        if i is None:
            i = len(group)
            group.append(t)
        keys[n] = ("const", fp, i)
    return keys


def cse(g: Graph) -> int:
    """Merge equal constants, then nodes that compute the same op on the same inputs with the same
    attributes. Copies stay apart: each is a tensor of its own (a model's clones of an input)."""
    seen: dict[tuple, Node] = {}
    const_key = _const_keys([n for n in g.nodes if n.op == "const"])
    merged = 0
    for n in list(g.nodes):
        if n.op in ("input", "copy"):
            continue
        key = const_key[n] if n.op == "const" else (
            n.op, tuple(const_key.get(i, i.id) for i in n.inputs), repr(sorted(n.attrs.items())))
        if key in seen:
            g.replace_uses(n, seen[key])
            merged += 1
        else:
            seen[key] = n
    g.prune()
    return merged


def run(graph: Graph, options, report) -> Graph:
    apply(graph, RULES, report)
    cse(graph)
    return graph
