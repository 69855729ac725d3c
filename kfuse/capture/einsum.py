"""einsum lowered onto the IR (matmul, mul, reduce_sum, transpose, reshape), for both frontends:
ONNX Einsum and ATen's _trilinear (nn.Bilinear). `g` is anything with the Graph's add(op, *inputs,
**attrs)."""
import math

from .common import reshape


class EinsumError(ValueError):
    """An equation that cannot be lowered; `unsupported` when it is valid but not handled here."""

    def __init__(self, message: str, unsupported: bool = False):
        super().__init__(message)
        self.unsupported = unsupported


_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def einsum(g, equation: str, xs):
    """Any equation without repeated subscripts in one operand: operands contract pairwise from
    the left, each pair as one matmul over [batch..., M, K] x [batch..., K, N] (a broadcast multiply
    when nothing is contracted); subscripts no later operand or the output needs are summed first."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(xs):
        raise EinsumError(f"equation {equation!r} has {len(terms)} operands, the node {len(xs)}")
    # the dims an ellipsis stands for get subscripts of their own, right-aligned across operands
    ell = max((len(x.shape) - len(t.replace("...", "")) for x, t in zip(xs, terms) if "..." in t), default=0)
    dots = "".join(chr(0x100 + i) for i in range(ell))

    def expand(t, rank=None):
        return t.replace("...", dots[ell - (rank - len(t.replace("...", ""))):] if rank is not None else dots)

    subs = [expand(t, len(x.shape)) for t, x in zip(terms, xs)]
    if arrow:
        out = expand(rhs)
    else:  # implicit output: the ellipsis dims, then the subscripts used once, in alphabetical order
        counts = "".join(subs)
        out = dots + "".join(sorted(c for c in set(counts) if counts.count(c) == 1 and c not in dots))
    for x, sub, t in zip(xs, subs, terms):
        if len(sub) != len(x.shape) or any(c not in _LETTERS for c in t.replace("...", "")):
            raise EinsumError(f"operand {t!r} of equation {equation!r} does not match a tensor of shape "
                              f"{list(x.shape)}")
        if len(set(sub)) != len(sub):
            raise EinsumError(f"equation {equation!r}: a subscript repeated in one operand (a diagonal or trace)",
                              unsupported=True)
    if len(set(out)) != len(out) or set(out) - set("".join(subs)):
        raise EinsumError(f"equation {equation!r} has an output subscript repeated or on no operand")
    operands = list(zip(xs, subs))
    while len(operands) > 1:
        (a, sa), (b, sb) = operands[:2]
        needed = set(out).union(*(s for _, s in operands[2:]))
        operands[:2] = [_contract(g, a, sa, b, sb, needed)]
    x, sub = _sum_out(g, *operands[0], set(out))
    return _permute(g, x, sub, out)


def _sum_out(g, x, sub, keep):
    drop = [i for i, c in enumerate(sub) if c not in keep]
    if not drop:
        return x, sub
    return g.add("reduce_sum", x, axes=drop, keepdim=False), "".join(c for c in sub if c in keep)


def _permute(g, x, sub, order):
    perm = [sub.index(c) for c in order]
    return x if perm == sorted(perm) else g.add("transpose", x, perm=perm)


def _contract(g, a, sa, b, sb, needed):
    a, sa = _sum_out(g, a, sa, needed | set(sb))
    b, sb = _sum_out(g, b, sb, needed | set(sa))
    batch = [c for c in sa if c in sb and c in needed]
    k = [c for c in sa if c in sb and c not in needed]
    m, nn = [c for c in sa if c not in sb], [c for c in sb if c not in sa]
    size = {c: d for x, s in ((b, sb), (a, sa)) for c, d in zip(s, x.shape)}

    def batch_dims(x, s):
        return tuple(x.shape[s.index(c)] for c in batch)

    if not k:  # an outer product over m and n for each batch index
        y = g.add("mul", reshape(g, _permute(g, a, sa, batch + m), batch_dims(a, sa) + tuple(size[c] for c in m)
                                  + (1,) * len(nn)),
                  reshape(g, _permute(g, b, sb, batch + nn), batch_dims(b, sb) + (1,) * len(m)
                           + tuple(size[c] for c in nn)))
        return y, "".join(batch + m + nn)
    M, K, N = (math.prod(size[c] for c in group) for group in (m, k, nn))
    y = g.add("matmul", reshape(g, _permute(g, a, sa, batch + m + k), batch_dims(a, sa) + (M, K)),
              reshape(g, _permute(g, b, sb, batch + k + nn), batch_dims(b, sb) + (K, N)))
    y = reshape(g, y, y.shape[:len(batch)] + tuple(size[c] for c in m + nn))
    return y, "".join(batch + m + nn)
