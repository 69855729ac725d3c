"""Complex tensors in a PyTorch graph, carried as real ones.

A complex value becomes a float tensor with a trailing dimension of 2 (real, imaginary): the memory
layout torch.view_as_real gives, so view_as_complex and view_as_real are free. That covers rotary
embeddings written with complex numbers (Meta's Llama code, torchtitan, Hugging Face's Llama 4):
`torch.polar` (or `torch.complex`) makes the rotation, `view_as_complex` pairs up a tensor's last
dimension, one complex multiply rotates it, `view_as_real` unpairs it. Mapped here: those four,
complex constants, real / imag, mul / add / sub / div (by a real), neg, conj, abs, sum, mean, the view ops
(their dimensions counted on the complex tensor, the pair kept last), and aten's FFTs (torch.fft, stft,
istft) as the IR's opaque `fft` op on the pairs, run by torch. Any other op on a complex tensor is an
UnsupportedOpError naming it, and so is a complex graph output. A complex graph input is a real one of
its pairs, which CompiledModel feeds as torch.view_as_real's view of the caller's tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir import Node
from .aten import ATEN, Unsupported

aten = torch.ops.aten
REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}


@dataclass(frozen=True)
class Complex:
    pair: Node          # float [..., 2]: the real and imaginary parts

    @property
    def shape(self) -> tuple:
        return self.pair.shape[:-1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def constant(g, value: torch.Tensor, name: str | None = None) -> Complex:
    return Complex(g.const(torch.view_as_real(value.resolve_conj()).contiguous(), name=name))


def involved(target, args, kwargs, out) -> bool:
    """Whether the call (of traced output `out`) makes or takes a complex value."""
    return (target in MAKERS or (isinstance(out, torch.Tensor) and out.dtype.is_complex)
            or any(isinstance(a, Complex) for a in torch.utils._pytree.tree_leaves((args, kwargs))))


def call(g, target, *args, **kwargs):
    """target(*args, **kwargs) with its complex values as pairs"""
    fn = HANDLERS.get(target)
    if fn is None:
        raise Unsupported("on a complex tensor (mapped: view_as_complex, view_as_real, polar, complex, real, imag, "
                          "mul, add, sub, div by a real, neg, conj, abs, sum, mean, the FFTs and the view ops)")
    return fn(g, *args, **kwargs)


def _parts(g, c: Complex) -> tuple[Node, Node]:
    return ATEN[aten.select.int](g, c.pair, -1, 0), ATEN[aten.select.int](g, c.pair, -1, 1)


def _pair(g, re, im) -> Complex:
    """Complex(re + i im), re and im broadcast to one shape."""
    shape = tuple(torch.broadcast_shapes(tuple(re.shape), tuple(im.shape)))
    re, im = (ATEN[aten.expand.default](g, x, shape) for x in (re, im))
    return Complex(ATEN[aten.cat.default](g, [ATEN[aten.unsqueeze.default](g, x, -1) for x in (re, im)], -1))


def _axis(c: Complex, dim: int, extra: int = 0) -> int:
    """dim of the complex tensor as an axis of its pair (rank + extra: unsqueeze's new position)."""
    return dim % (len(c.shape) + extra) if len(c.shape) + extra else 0


def _real(g, x):
    """x (a real node, a number, or a Python complex number) as a complex value"""
    if isinstance(x, complex):
        return Complex(g.const(torch.tensor([x.real, x.imag])))
    zero = g.const(0.0, x.dtype if isinstance(x, Node) and x.dtype.is_floating_point else torch.float32)
    return _pair(g, x if isinstance(x, Node) else g.const(float(x)), zero)


def _mul(g, a, b):
    if not isinstance(a, Complex):
        a, b = b, a
    if isinstance(b, complex):
        b = _real(g, b)
    if not isinstance(b, Complex):      # by a real: both parts scaled
        return _by_real(g, aten.mul.Tensor, a, b)
    mul, add = ATEN[aten.mul.Tensor], ATEN[aten.add.Tensor]
    # (ar + i ai)(br + i bi) as ar [br, bi] + ai [-bi, br]: elementwise in a, read through slices of its
    # pairs, the pairs swapped in b, the smaller (a rotary embedding's table), so a's side fuses into one
    # kernel where the products written out and paired up again took a concatenation of a's size
    if math.prod(a.shape) < math.prod(b.shape):
        a, b = b, a
    br, bi = _parts(g, b)
    swapped = _pair(g, ATEN[aten.neg.default](g, bi), br)
    part = lambda i: ATEN[aten.slice.Tensor](g, a.pair, -1, i, i + 1)
    return Complex(add(g, mul(g, part(0), b.pair), mul(g, part(1), swapped.pair)))


def _add_sub(op):
    def handler(g, a, b, alpha=1):
        a, b = (x if isinstance(x, Complex) else _real(g, x) for x in (a, b))
        return Complex(ATEN[op](g, a.pair, b.pair, alpha=alpha))
    return handler


def _reduce(op):
    """sum or mean over dims of the complex tensor: the pairs' parts reduced alike"""
    def handler(g, c, dims=None, keepdim=False, dtype=None):
        dims = range(len(c.shape)) if dims is None or len(dims) == 0 else dims
        return Complex(ATEN[op](g, c.pair, [_axis(c, d) for d in dims], keepdim))
    return handler


def _by_real(g, op, c: Complex, r) -> Complex:
    """op (mul, div) of both parts of c by r, a real node (broadcast over the pairs) or a number"""
    return Complex(ATEN[op](g, c.pair, ATEN[aten.unsqueeze.default](g, r, -1) if isinstance(r, Node) else r))


def _div(g, a, b):
    if isinstance(b, (Complex, complex)):
        raise Unsupported("division by a complex tensor")
    return _by_real(g, aten.div.Tensor, a, b)


def _view_as_complex(g, x):
    if not isinstance(x, Node) or not x.shape or x.shape[-1] != 2 or x.dtype not in (torch.float32, torch.float64):
        raise Unsupported(f"view_as_complex of {x.dtype}{list(x.shape)}: a float32/float64 [..., 2] tensor")
    return Complex(x)


def _polar(g, r, theta):
    mul = ATEN[aten.mul.Tensor]
    return _pair(g, mul(g, r, g.add("cos", theta)), mul(g, r, g.add("sin", theta)))


def _conj(g, c):
    return Complex(ATEN[aten.mul.Tensor](g, c.pair, g.const(torch.tensor([1.0, -1.0], dtype=c.pair.dtype))))


def _abs(g, c):
    re, im = _parts(g, c)
    mul = ATEN[aten.mul.Tensor]
    return g.add("sqrt", ATEN[aten.add.Tensor](g, mul(g, re, re), mul(g, im, im)))


def _copy(g, c, *_, dtype=None, **__):
    if dtype is not None and dtype not in REAL_OF:
        raise Unsupported(f"a complex tensor cast to {dtype} (torch drops its imaginary part)")
    if not isinstance(c, Complex):      # a real tensor made complex: x + 0i
        return _real(g, ATEN[aten._to_copy.default](g, c, dtype=REAL_OF[dtype]))
    pair = ATEN[aten.clone.default](g, c.pair)
    return Complex(pair if dtype is None else ATEN[aten._to_copy.default](g, pair, dtype=REAL_OF[dtype]))


def _view(g, c, shape):
    return Complex(ATEN[aten.view.default](g, c.pair, [*shape, 2]))     # (a -1 in shape resolves the same)


def _squeeze(g, c, dims=None):
    if dims is None:
        dims = [i for i, d in enumerate(c.shape) if d == 1]
    dims = [dims] if isinstance(dims, int) else dims
    return Complex(ATEN[aten.squeeze.dims](g, c.pair, [_axis(c, d) for d in dims]))


def _cat(g, cs, dim=0):
    if not all(isinstance(c, Complex) for c in cs):
        raise Unsupported("concatenation of complex and real tensors")
    return Complex(ATEN[aten.cat.default](g, [c.pair for c in cs], _axis(cs[0], dim)))


def _fft_args(norm, dims, rank: int) -> dict:
    """The fft op's axes (non-negative, of the complex tensor, the same on its pairs) and aten's norm code."""
    return dict(dims=tuple(d % rank for d in dims), norm=int(norm))


def _fft_r2c(g, x, dim, normalization, onesided):
    return Complex(g.add("fft", x, kind="r2c", onesided=bool(onesided), **_fft_args(normalization, dim, len(x.shape))))


def _fft_c2c(g, c, dim, normalization, forward):
    c = c if isinstance(c, Complex) else _real(g, c)
    return Complex(g.add("fft", c.pair, kind="c2c", forward=bool(forward), **_fft_args(normalization, dim, len(c.shape))))


def _fft_c2r(g, c, dim, normalization, last_dim_size):
    return g.add("fft", c.pair, kind="c2r", length=int(last_dim_size), **_fft_args(normalization, dim, len(c.shape)))


MAKERS = {aten.view_as_complex.default: _view_as_complex, aten.polar.default: _polar,
          aten.complex.default: lambda g, re, im: _pair(g, re, im)}
HANDLERS = {
    **MAKERS,
    aten.view_as_real.default: lambda g, c: c.pair,
    aten.mul.Tensor: _mul, aten.mul.Scalar: _mul,
    aten.add.Tensor: _add_sub(aten.add.Tensor), aten.sub.Tensor: _add_sub(aten.sub.Tensor),
    aten.div.Tensor: _div, aten.div.Scalar: _div,
    aten.neg.default: lambda g, c: Complex(ATEN[aten.neg.default](g, c.pair)),
    aten._conj.default: _conj, aten.conj_physical.default: _conj, aten.resolve_conj.default: lambda g, c: c,
    aten.abs.default: _abs,
    aten.sum.dim_IntList: _reduce(aten.sum.dim_IntList), aten.mean.dim: _reduce(aten.mean.dim),
    aten.clone.default: _copy, aten._to_copy.default: _copy, aten.alias.default: lambda g, c: c,
    aten.detach.default: lambda g, c: c, aten.contiguous.default: lambda g, c, *_, **__: c,
    aten.view.default: _view, aten._unsafe_view.default: _view, aten.reshape.default: _view,
    aten.permute.default: lambda g, c, dims: Complex(ATEN[aten.permute.default](
        g, c.pair, [_axis(c, d) for d in dims] + [len(c.shape)])),
    aten.transpose.int: lambda g, c, a, b: Complex(ATEN[aten.transpose.int](g, c.pair, _axis(c, a), _axis(c, b))),
    aten.unsqueeze.default: lambda g, c, dim: Complex(ATEN[aten.unsqueeze.default](g, c.pair, _axis(c, dim, 1))),
    aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze, aten.squeeze.default: _squeeze,
    aten.expand.default: lambda g, c, shape, implicit=False: Complex(ATEN[aten.expand.default](g, c.pair, [*shape, 2])),
    aten.slice.Tensor: lambda g, c, dim=0, *rest: Complex(ATEN[aten.slice.Tensor](g, c.pair, _axis(c, dim), *rest)),
    aten.select.int: lambda g, c, dim, index: Complex(ATEN[aten.select.int](g, c.pair, _axis(c, dim), index)),
    aten.cat.default: _cat,
    aten._fft_r2c.default: _fft_r2c, aten._fft_c2c.default: _fft_c2c, aten._fft_c2r.default: _fft_c2r,
    aten.real.default: lambda g, c: _parts(g, c)[0], aten.imag.default: lambda g, c: _parts(g, c)[1],
}
