"""Fused attention in Triton: softmax(q kᵀ·scale + mask) v, FlashAttention style.

Semantics as `kfuse.ops.reference._attention`: causal mask aligned to the bottom right
(tril(Lk - Lq)), grouped-query attention (k and v with Hkv heads, each shared by H // Hkv
consecutive query heads), an additive float or boolean keep mask broadcastable to [B, H, Lq, Lk]
(read through its strides, 0 on broadcast dims); a row whose keys are all masked gives NaN, as
torch.softmax does, or 0 with zero_masked, as torch's scaled_dot_product_attention does.

One program per (block of BLOCK_M queries, batch x head): the q tile stays in registers; k and v
tiles of BLOCK_N keys stream through; the softmax is online (running max m, running sum l, the
accumulator rescaled by exp(m_old - m_new) when the max grows). A causal program stops at the last
key any of its queries sees. Scores and the accumulator are fp32; fp16/bf16 p is rounded to v's
dtype for the second product (as FlashAttention does). fp32 products use input_precision="ieee"
(no TF32), so fp32 results match the reference to ~1e-6. (In the interpreter, bfloat16 products
run in fp32 too: its NumPy dot does not take bfloat16.)
Bytes: q, k, v and out once per program's tiles: k and v are read ceil(Lq / BLOCK_M) times.
q, k, v and out are read/written through their strides (the last dim contiguous), so the head
split/merge transposes of a model fold into the loads and stores.
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import kernel as tk

BLOCK_M, BLOCK_N = 64, 64

SOURCE = '''import triton
import triton.language as tl


@triton.jit
def kf_attention(q, k, v, o, mask, scale, H, HPK, Lq, Lk,
                 sqb, sqh, sqi, skb, skh, skj, svb, svh, svj, sob, soh, soi, smb, smh, smi, smj,
                 D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, ZERO_MASKED: tl.constexpr):
    # MASK: 0 none, 1 additive float, 2 boolean keep mask (uint8)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // HPK
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    rn0 = tl.arange(0, BN)
    dmask = rd < D
    qt = tl.load(q + b * sqb + h * sqh + rm[:, None] * sqi + rd[None, :],
                 mask=(rm[:, None] < Lq) & dmask[None, :], other=0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BM + Lk - Lq)
        hi = tl.maximum(hi, 0)
    for n0 in range(0, hi, BN):
        rn = n0 + rn0
        nmask = rn < Lk
        kt = tl.load(k + b * skb + hk * skh + rn[:, None] * skj + rd[None, :],
                     mask=nmask[:, None] & dmask[None, :], other=0)
        if IEEE:
            s = tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(kt))
        s = s * scale
        keep = nmask[None, :] & (rm[:, None] < Lq)
        if MASK == 1:
            mv = tl.load(mask + b * smb + h * smh + rm[:, None] * smi + rn[None, :] * smj, mask=keep, other=0)
            s = s + mv.to(tl.float32)
        if MASK == 2:
            mv = tl.load(mask + b * smb + h * smh + rm[:, None] * smi + rn[None, :] * smj, mask=keep, other=0)
            keep = keep & (mv != 0)
        if CAUSAL:
            keep = keep & (rn[None, :] <= rm[:, None] + (Lk - Lq))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v + b * svb + hk * svh + rn[:, None] * svj + rd[None, :],
                     mask=nmask[:, None] & dmask[None, :], other=0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    if ZERO_MASKED:     # a row with every key masked: 0 (torch's SDPA), not 0 / 0
        l_i = tl.where(l_i == 0.0, float("inf"), l_i)
    out = acc / l_i[:, None]
    tl.store(o + b * sob + h * soh + rm[:, None] * soi + rd[None, :], out.to(o.dtype.element_ty),
             mask=(rm[:, None] < Lq) & dmask[None, :])
'''


def _mask_strides(mask, B, H, Lq, Lk):
    """The mask viewed as [B, H, Lq, Lk] (stride 0 on broadcast dims): its four strides."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, H, Lq, Lk)
    return m.stride()


def attention(q, k, v, mask=None, *, scale: float, causal: bool = False, out=None, zero_masked: bool = False):
    """softmax(q kᵀ·scale + mask) v; q [B, H, Lq, D], k and v [B, Hkv, Lk, D], out [B, H, Lq, D] (any
    strides with the last dim contiguous; allocated when None). Returns out."""
    fn = tk.load(SOURCE).kf_attention
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    if mask is None:
        kind, m, ms = 0, q, (0, 0, 0, 0)
    else:
        kind = 2 if mask.dtype == torch.bool else 1
        ms = _mask_strides(mask, B, H, Lq, Lk)
        m = tk.as_arg(mask)
    BD = max(16, 1 << (D - 1).bit_length())
    grid = (math.ceil(Lq / BLOCK_M), B * H)
    with tk.quiet() if tk.interpreting() else contextlib.nullcontext():
        _launch(fn, grid, q, k, v, out, m, scale, H, Hkv, Lq, Lk, ms, D, BD, kind, causal, zero_masked)
    return out


def _launch(fn, grid, q, k, v, out, m, scale, H, Hkv, Lq, Lk, ms, D, BD, kind, causal, zero_masked=False):
    fn[grid](q, k, v, out, m, float(scale), H, H // Hkv, Lq, Lk,
             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *ms,
             D=D, BD=BD, BM=BLOCK_M, BN=BLOCK_N, MASK=kind, CAUSAL=bool(causal), ZERO_MASKED=bool(zero_masked),
             IEEE=q.dtype == torch.float32 or (tk.interpreting() and q.dtype == torch.bfloat16), num_warps=4 if BD <= 64 else 8)
