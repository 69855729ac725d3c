"""Rotary position embedding in Triton: out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].

x is [..., S, D] (rank <= 4) with any strides whose last dim is contiguous (q and k arrive as
head-split views of the projection output: no copy); cos and sin broadcast against x through their
strides (0 on broadcast dims). out is a contiguous [..., S, D] buffer. One program per RB rows of
the flattened leading dims, the row's two halves in registers (BH = next_power_of_2(D / 2), masked).
Bytes: x read once, cos/sin once per row (they stay in L2: S x D values), out written once.
fp16/bf16 computed in fp32, rounded at the store.
"""
from __future__ import annotations

import torch

from . import kernel as tk

SOURCE = '''import triton
import triton.language as tl


@triton.jit
def kf_rope(x, c, s, o, n1, n2, R, xs0, xs1, xs2, cs0, cs1, cs2, ss0, ss1, ss2,
            D: tl.constexpr, BH: tl.constexpr, RB: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)[:, None]
    i2 = rows % n2
    q = rows // n2
    i1 = q % n1
    i0 = q // n1
    j = tl.arange(0, BH)[None, :]
    m = (rows < R) & (j < D // 2)
    xo = i0 * xs0 + i1 * xs1 + i2 * xs2 + j
    co = i0 * cs0 + i1 * cs1 + i2 * cs2 + j
    so = i0 * ss0 + i1 * ss1 + i2 * ss2 + j
    x1 = tl.load(x + xo, mask=m, other=0).to(tl.float32)
    x2 = tl.load(x + xo + D // 2, mask=m, other=0).to(tl.float32)
    c1 = tl.load(c + co, mask=m, other=0).to(tl.float32)
    c2 = tl.load(c + co + D // 2, mask=m, other=0).to(tl.float32)
    s1 = tl.load(s + so, mask=m, other=0).to(tl.float32)
    s2 = tl.load(s + so + D // 2, mask=m, other=0).to(tl.float32)
    oo = rows * D + j
    tl.store(o + oo, (x1 * c1 + (-x2) * s1).to(o.dtype.element_ty), mask=m)
    tl.store(o + oo + D // 2, (x2 * c2 + x1 * s2).to(o.dtype.element_ty), mask=m)
'''


def _strides3(t: torch.Tensor, shape) -> tuple[int, int, int] | None:
    """The leading strides of t broadcast to `shape` seen as [n0, n1, n2, D]; None when its last dim
    is not contiguous."""
    st = t.expand(shape).stride()
    if st[-1] != 1 and shape[-1] > 1:
        return None
    return ((0,) * (4 - len(shape)) + tuple(st))[:3]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[-1] % 2 or x.dim() > 4 or x.dim() < 1:
        raise NotImplementedError("Triton rope takes x of rank 1 to 4 with an even last dim")
    fn = tk.load(SOURCE).kf_rope
    shape = tuple(x.shape)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    st = [_strides3(t, shape) for t in (x, cos, sin)]
    if None in st:
        x, cos, sin = (t if _strides3(t, shape) else t.expand(shape).contiguous() for t in (x, cos, sin))
        st = [_strides3(t, shape) for t in (x, cos, sin)]
    if out is None or out.device != x.device:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    full = (1,) * (4 - len(shape)) + shape
    D = shape[-1]
    R = full[0] * full[1] * full[2]
    BH = max(1, 1 << (D // 2 - 1).bit_length())
    args = (x, cos, sin, out, full[1], full[2], R, *st[0], *st[1], *st[2])

    def launch(config):
        elems, warps = config
        RB = max(1, min(1 << max(0, (R - 1).bit_length()), elems // (2 * BH)))
        fn[((R + RB - 1) // RB,)](*args, D=D, BH=BH, RB=RB, num_warps=warps)
    if tk.interpreting():
        with tk.quiet():
            launch(CONFIGS[0])
        return out
    launch(tk.choice("rope", SOURCE, (x.dtype, shape, tuple(st)), CONFIGS, launch))
    return out


# (elements per program, num_warps) timed on a GPU for each new problem; the first is the default
CONFIGS = [(4096, 4), (8192, 8), (16384, 8), (2048, 4)]
