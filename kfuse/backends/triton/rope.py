"""Rotary position embedding in Triton: out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].

x is [..., S, D] (rank <= 4, seen as [n0, n1, S, D]) with any strides whose last dim is contiguous
(q and k arrive as head-split views of the projection output: no copy); cos and sin broadcast against
x through their strides (0 on broadcast dims). out is a contiguous [..., S, D] buffer.
One program per block of RB positions of G heads (consecutive n1) of one n0: base offsets are scalars,
worked out once per program, and a [RB, D/2] tile's offsets are int32 within a head's slab (int64 where
a slab spans 2^31 elements). Where cos and sin do not vary across heads (the usual [S, D] or [B, 1, S, D])
their tile is loaded once for the G heads. The row's two halves in registers (BH = next_power_of_2(D / 2),
masked). Bytes: x read once, out written once, cos/sin once per program (from L2: S x D values).
fp16/bf16 computed in fp32, rounded at the store.
"""
from __future__ import annotations

import torch

from . import kernel as tk
from .render import pow2

SOURCE = '''import triton
import triton.language as tl


@triton.jit
def kf_rope(x, c, s, o, n1, S, NSB, NG, xs0, xs1, xs2, cs0, cs1, cs2, ss0, ss1, ss2,
            D: tl.constexpr, BH: tl.constexpr, RB: tl.constexpr, G: tl.constexpr, SHARED: tl.constexpr,
            WIDE: tl.constexpr):
    # program: positions [sb * RB, +RB) of G consecutive i1 (heads) of one i0; SHARED: cos and sin do not
    # vary along i1 (stride 0), so their tile is loaded once for the G heads
    pid = tl.program_id(0)
    sb = pid % NSB
    rest = pid // NSB
    g0 = (rest % NG) * G
    i0 = (rest // NG).to(tl.int64)
    r = sb * RB + tl.arange(0, RB)[:, None]
    if WIDE:
        r = r.to(tl.int64)
    j = tl.arange(0, BH)[None, :]
    m = (r < S) & (j < D // 2)
    co = i0 * cs0 + r * cs2 + j
    so = i0 * ss0 + r * ss2 + j
    if SHARED:
        c1 = tl.load(c + co, mask=m, other=0).to(tl.float32)
        c2 = tl.load(c + co + D // 2, mask=m, other=0).to(tl.float32)
        s1 = tl.load(s + so, mask=m, other=0).to(tl.float32)
        s2 = tl.load(s + so + D // 2, mask=m, other=0).to(tl.float32)
    for g in range(G):
        i1 = g0 + g
        mg = (r < tl.where(i1 < n1, S, 0)) & (j < D // 2)       # a head past n1 (the last program's): none
        if not SHARED:
            c1 = tl.load(c + i1 * cs1 + co, mask=mg, other=0).to(tl.float32)
            c2 = tl.load(c + i1 * cs1 + co + D // 2, mask=mg, other=0).to(tl.float32)
            s1 = tl.load(s + i1 * ss1 + so, mask=mg, other=0).to(tl.float32)
            s2 = tl.load(s + i1 * ss1 + so + D // 2, mask=mg, other=0).to(tl.float32)
        xp = x + (i0 * xs0 + i1.to(tl.int64) * xs1)
        xo = r * xs2 + j
        x1 = tl.load(xp + xo, mask=mg, other=0).to(tl.float32)
        x2 = tl.load(xp + xo + D // 2, mask=mg, other=0).to(tl.float32)
        op = o + (i0 * n1 + i1) * S * D
        oo = r * D + j
        tl.store(op + oo, (x1 * c1 - x2 * s1).to(o.dtype.element_ty), mask=mg)
        tl.store(op + oo + D // 2, (x2 * c2 + x1 * s2).to(o.dtype.element_ty), mask=mg)
'''


def _strides3(t: torch.Tensor, shape) -> tuple[int, int, int] | None:
    """The leading strides of t broadcast to `shape` seen as [n0, n1, S, D]; None when its last dim
    is not contiguous."""
    st = t.expand(shape).stride()
    if st[-1] != 1 and shape[-1] > 1:
        return None
    return ((0,) * (4 - len(shape)) + tuple(st))[:3]


_PLANS: dict = {}      # (dtype, device, shapes and strides of x, cos, sin) -> (Launch, its integer arguments)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[-1] % 2 or x.dim() > 4 or x.dim() < 1:
        raise NotImplementedError("Triton rope takes x of rank 1 to 4 with an even last dim")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    shape = tuple(x.shape)
    if out is None or out.device != x.device:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    key = (x.dtype, x.device, shape, x.stride(), cos.shape, cos.stride(), sin.shape, sin.stride())
    plan = _PLANS.get(key)
    if plan is None:
        st = [_strides3(t, shape) for t in (x, cos, sin)]
        if None in st:      # a last dim that is not contiguous: copied (not planned: each call copies)
            x, cos, sin = (t if _strides3(t, shape) else t.expand(shape).contiguous() for t in (x, cos, sin))
            return rope(x, cos, sin, out)
        plan = _plan(x, cos, sin, out, st)
        if len(_PLANS) > 1024:          # prompts of many lengths: start again rather than grow
            _PLANS.clear()
        _PLANS[key] = plan
    launch, ints = plan
    launch([x, cos, sin, out, *ints])
    return out


def _plan(x, cos, sin, out, st):
    """The launch of the kernel for these shapes and strides (its config tuned on a GPU) and its
    integer arguments."""
    fn = tk.load(SOURCE).kf_rope
    n0, n1, S, D = (1,) * (4 - x.dim()) + tuple(x.shape)
    BH = pow2(D // 2)
    # a head's slab: S rows of any of the three tensors' strides, or of out's D
    wide = S * max(D, *(abs(t[2]) for t in st)) + D >= 2 ** 31
    shared = st[1][1] == 0 and st[2][1] == 0

    def planned(config):
        elems, warps, heads = config
        RB = max(1, min(pow2(S), elems // (2 * BH)))
        G = min(heads, n1)
        nsb, ng = (S + RB - 1) // RB, (n1 + G - 1) // G
        launch = tk.Launch(fn, (n0 * ng * nsb,), warps, D=D, BH=BH, RB=RB, G=G, SHARED=shared, WIDE=wide)
        return launch, (n1, S, nsb, ng, *st[0], *st[1], *st[2])
    if not tk.autotune_enabled():
        return planned(CONFIGS[0])
    plans = {c: planned(c) for c in CONFIGS}
    best = tk.choice("rope", SOURCE, (x.dtype, tuple(x.shape), tuple(st)), CONFIGS,
                     lambda c: plans[c][0]([x, cos, sin, out, *plans[c][1]]))
    return plans[best]


# (elements per program and head, num_warps, heads per program) timed on a GPU for each new problem; the
# first is the default. Several heads a program read the cos/sin tile once for all of them: one head a
# program read it from L2 once per head, twice the bytes of x (2.8 TB/s of a 3.8 TB/s copy on an H200).
CONFIGS = [(2048, 4, 4), (4096, 4, 8), (2048, 4, 16), (4096, 8, 32), (2048, 4, 1), (8192, 8, 4)]
