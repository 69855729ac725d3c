"""Fused attention in Triton: softmax(q kᵀ·scale + mask) v, FlashAttention style.

Semantics as `kfuse.ops.reference._attention`: causal mask aligned to the bottom right
(tril(Lk - Lq)), grouped-query attention (k and v with Hkv heads, each shared by H // Hkv
consecutive query heads), an additive float or boolean keep mask broadcastable to [B, H, Lq, Lk]
(read through its strides, 0 on broadcast dims); a row whose keys are all masked gives NaN, as
torch.softmax does, or 0 with zero_masked, as torch's scaled_dot_product_attention does.

One program per (block of BLOCK_M queries, batch x head): the q tile stays in registers; k and v
tiles of BLOCK_N keys stream through; the softmax is online (running max m, running sum l, the
accumulator rescaled by exp(m_old - m_new) when the max grows). Key blocks that every query of the
program sees whole run first, with no bounds or causal test; the blocks at the causal diagonal or past
Lk follow, tested. A causal program stops at the last key any of its queries sees. Exponentials are
exp2 with log2(e) folded into the scale, except under an additive mask (finfo.min * log2(e) would
overflow to -inf, and a fully masked row would no longer be uniform as in eager). Tile sizes, warps,
stages and a warp-specialised key loop are timed per problem on a GPU (CONFIGS).
Scores and the accumulator are fp32; fp16/bf16 p is rounded to v's dtype for the second product
(as FlashAttention does). fp32 products use input_precision="ieee" (no TF32), so fp32 results match
the reference to ~1e-6. (In the interpreter, bfloat16 products run in fp32 too: its NumPy dot does
not take bfloat16.)
Decoding (a few queries): the keys are split over programs too (SPLIT), each writing its partial
softmax (running max, sum, unnormalised accumulator, fp32); kf_combine rescales them to their common
max and sums them, one program per query row. With grouped-query heads a program's rows can be the
(query head, query) pairs of one kv head (PACK), so k and v are read once per kv head.
Bytes: q, k, v and out once per program's tiles: k and v are read ceil(Lq / BLOCK_M) times (unpacked:
once per query head).
q, k, v and out are read/written through their strides (the last dim contiguous), so the head
split/merge transposes of a model fold into the loads and stores.
"""
from __future__ import annotations

import math

import torch

from . import kernel as tk
from .render import pow2

# (BLOCK_M, BLOCK_N, num_warps, num_stages, warp-specialised key loop, key splits, grouped-query rows
# packed) timed on a GPU for each new problem; the first is the default (and the interpreter's). fp32
# (IEEE products) keeps small tiles: its tiles are twice the bytes. A config that does not compile on
# this GPU is skipped. A few queries (decoding: DECODE_LQ or fewer) take 16-row blocks and split the
# keys over programs, each writing a partial softmax that kf_combine merges: B x H programs alone leave
# most of a GPU idle. Packed, a tile's rows are the queries of all the heads that share a kv head, so
# those keys and values are read once (unpacked: once per query head, and 15 of 16 rows idle at Lq 1).
CONFIGS = {"half": [(128, 64, 8, 3, False, 1, False), (128, 128, 8, 3, False, 1, False),
                    (64, 64, 4, 3, False, 1, False), (128, 64, 4, 4, False, 1, False),
                    (64, 128, 4, 3, False, 1, False), (128, 128, 8, 3, True, 1, False),
                    (128, 64, 8, 3, True, 1, False)],
           "f32": [(64, 64, 4, 2, False, 1, False), (64, 32, 4, 2, False, 1, False), (32, 64, 4, 2, False, 1, False)],
           "decode": [(16, 64, 4, 2, False, 8, True), (16, 64, 4, 2, False, 1, False), (16, 64, 4, 2, False, 8, False),
                      (16, 128, 4, 2, False, 16, False), (16, 64, 4, 2, False, 32, False),
                      (16, 128, 4, 3, False, 64, False), (16, 64, 4, 2, False, 1, True),
                      (16, 128, 4, 2, False, 16, True), (16, 64, 4, 2, False, 32, True),
                      (16, 128, 4, 3, False, 64, True)]}
DECODE_LQ = 16
LOG2E = 1.4426950408889634

SOURCE = '''import triton
import triton.language as tl


@triton.jit
def _step(acc, l_i, m_i, qt, kp, vp, mp, qi, mrow, rv, rd, n0, Lk, shift, qk_scale, skj, svj, smj,
          D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
          IEEE: tl.constexpr, EDGE: tl.constexpr, FOLD: tl.constexpr):
    # one block of BN keys; EDGE: it may hold keys past Lk or, causal, keys some of the queries do not see.
    # Per row of the tile: qi its query's index, mrow its mask row's offset, rv whether it is a row at all.
    # FOLD (a positive scale, no additive mask): the scores stay unscaled, the scale is folded into the
    # running max and into exp2's argument (one FMA a score instead of a multiply and a subtract)
    rn = n0 + tl.arange(0, BN)
    koff = rn[:, None] * skj + rd[None, :]
    voff = rn[:, None] * svj + rd[None, :]
    if EDGE or D != BD:
        kvm = (rn[:, None] < Lk) & (rd[None, :] < D)
        kt = tl.load(kp + koff, mask=kvm, other=0)
    else:
        kt = tl.load(kp + koff)
    if IEEE:
        s = tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(qt, tl.trans(kt))
    if not FOLD:
        s = s * qk_scale
    if MASK != 0:
        mv = tl.load(mp + mrow[:, None] + rn[None, :] * smj, mask=rv[:, None] & (rn[None, :] < Lk), other=0)
        if MASK == 1:
            s = s + mv.to(tl.float32)
        else:
            s = tl.where(mv != 0, s, float("-inf"))
    if EDGE:
        keep = rn[None, :] < Lk
        if CAUSAL:
            keep = keep & (rn[None, :] <= qi[:, None] + shift)
        s = tl.where(keep, s, float("-inf"))
    if FOLD:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASK != 0 or CAUSAL:     # a row may have seen no key yet: exp(-inf - -inf) would be NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    if MASK == 1:       # natural base: a mask of finfo.min times log2(e) would overflow to -inf
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
    elif FOLD:          # log2 base: qk_scale carries log2(e)
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if EDGE or D != BD:
        vt = tl.load(vp + voff, mask=kvm, other=0)
    else:
        vt = tl.load(vp + voff)
    acc = acc * alpha[:, None]          # the product accumulates into the rescaled accumulator
    if IEEE:
        acc = tl.dot(p, vt.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(vt.dtype), vt, acc)
    return acc, l_i, m_new


@triton.jit
def kf_attention(q, k, v, o, mask, qk_scale, H, HPK, Lq, Lk,
                 sqb, sqh, sqi, skb, skh, skj, svb, svh, svj, sob, soh, soi, smb, smh, smi, smj, pacc, pm, pl, NS,
                 D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, ZERO_MASKED: tl.constexpr,
                 EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, WS: tl.constexpr, SPLIT: tl.constexpr,
                 FOLD: tl.constexpr, PACK: tl.constexpr):
    # MASK: 0 none, 1 additive float, 2 boolean keep mask (uint8). EVEN_M: the tile's rows are all rows;
    # EVEN_N: Lk % BN == 0. SPLIT: this program takes key chunk program_id(2) of NS and writes its partial
    # softmax (running max pm, sum pl, unnormalised accumulator pacc, fp32) for kf_combine.
    # PACK (decoding, grouped-query): program_id(1) is a (batch, kv head) and the tile's rows are the
    # (query head, query) pairs of that kv head's group, so its keys and values are read once for the group
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    r = pid_m * BM + tl.arange(0, BM)
    if PACK:
        b = (bh // (H // HPK)).to(tl.int64)
        hk = (bh % (H // HPK)).to(tl.int64)
        qi = r % Lq
        h = hk * HPK + (r // Lq)
        rv = r < HPK * Lq
        q_lo = 0                    # the rows' queries: any of the Lq
        q_hi = Lq - 1
    else:
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // HPK
        qi = r
        rv = r < Lq
        q_lo = pid_m * BM
        q_hi = pid_m * BM + BM - 1
    rd = tl.arange(0, BD)
    qoff = b * sqb + (h * sqh + qi * sqi)[:, None] + rd[None, :]
    if EVEN_M and D == BD:
        qt = tl.load(q + qoff)
    else:
        qt = tl.load(q + qoff, mask=rv[:, None] & (rd[None, :] < D), other=0)
    kp = k + b * skb + hk * skh
    vp = v + b * svb + hk * svh
    mp = mask + b * smb
    mrow = h * smh + qi * smi
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    shift = Lk - Lq
    # keys [0, full) are seen by every query of this program (no bounds or causal test); [full, hi) are tested
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Lk, q_hi + 1 + shift), 0)
        full = tl.minimum(tl.maximum(q_lo + shift + 1, 0) // BN * BN, hi)
    else:
        hi = Lk
        full = Lk
    if not EVEN_N:
        full = tl.minimum(full, Lk // BN * BN)
    lo = 0
    if SPLIT:       # this program's chunk of keys, whole blocks of BN
        chunk = tl.cdiv(tl.cdiv(hi, NS), BN) * BN
        lo = tl.program_id(2) * chunk
        hi = tl.minimum(hi, lo + chunk)
        full = tl.maximum(tl.minimum(full, hi), lo)
    for n0 in tl.range(lo, full, BN, warp_specialize=WS):
        acc, l_i, m_i = _step(acc, l_i, m_i, qt, kp, vp, mp, qi, mrow, rv, rd, n0, Lk, shift, qk_scale, skj, svj, smj,
                              D, BD, BN, MASK, CAUSAL, IEEE, False, FOLD)
    for n0 in range(full, hi, BN):
        acc, l_i, m_i = _step(acc, l_i, m_i, qt, kp, vp, mp, qi, mrow, rv, rd, n0, Lk, shift, qk_scale, skj, svj, smj,
                              D, BD, BN, MASK, CAUSAL, IEEE, True, FOLD)
    if SPLIT:
        prow = ((b * H + h) * NS + tl.program_id(2)) * Lq + qi
        tl.store(pm + prow, m_i, mask=rv)
        tl.store(pl + prow, l_i, mask=rv)
        tl.store(pacc + prow[:, None] * BD + rd[None, :], acc, mask=rv[:, None])
        return
    if ZERO_MASKED:     # a row with every key masked: 0 (torch's SDPA), not 0 / 0
        l_i = tl.where(l_i == 0.0, float("inf"), l_i)
    out = acc / l_i[:, None]
    ooff = b * sob + (h * soh + qi * soi)[:, None] + rd[None, :]
    if EVEN_M and D == BD:
        tl.store(o + ooff, out.to(o.dtype.element_ty))
    else:
        tl.store(o + ooff, out.to(o.dtype.element_ty), mask=rv[:, None] & (rd[None, :] < D))


@triton.jit
def kf_combine(pacc, pm, pl, o, H, Lq, NS, sob, soh, soi,
               D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, MASK: tl.constexpr, ZERO_MASKED: tl.constexpr):
    # one query row of one (batch, head): the NS partial softmaxes rescaled to their common max and summed
    bh = tl.program_id(0)
    i = tl.program_id(1)
    rs = tl.arange(0, BS)
    rd = tl.arange(0, BD)
    row = (bh.to(tl.int64) * NS + rs) * Lq + i
    sm = rs < NS
    m = tl.load(pm + row, mask=sm, other=float("-inf"))
    l = tl.load(pl + row, mask=sm, other=0.0)
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    if MASK == 1:
        w = tl.exp(m - top)
    else:
        w = tl.math.exp2(m - top)
    total = tl.sum(l * w, axis=0)
    acc = tl.load(pacc + row[:, None] * BD + rd[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0)
    if ZERO_MASKED:
        total = tl.where(total == 0.0, float("inf"), total)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tl.store(o + b * sob + h * soh + i * soi + rd, (out / total).to(o.dtype.element_ty), mask=rd < D)
'''


def _mask_strides(mask, B, H, Lq, Lk):
    """The mask viewed as [B, H, Lq, Lk] (stride 0 on broadcast dims): its four strides."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, H, Lq, Lk)
    return m.stride()


def attention(q, k, v, mask=None, *, scale: float, causal: bool = False, out=None, zero_masked: bool = False,
              splits: int | None = None, pack: bool | None = None):
    """softmax(q kᵀ·scale + mask) v; q [B, H, Lq, D], k and v [B, Hkv, Lk, D], out [B, H, Lq, D] (any
    strides with the last dim contiguous; allocated when None). Returns out. `splits`: split the keys
    over that many programs per query block; `pack`: a tile's rows are the queries of the heads sharing a
    kv head (decoding only); None: the tuned or default config's."""
    mod = tk.load(SOURCE)
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
    ieee = q.dtype == torch.float32 or (tk.interpreting() and q.dtype == torch.bfloat16)
    args = (q, k, v, out, m, float(scale) * (1.0 if kind == 1 else LOG2E), H, H // Hkv, Lq, Lk,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *ms)
    flags = dict(D=D, BD=max(16, pow2(D)), MASK=kind, CAUSAL=bool(causal), IEEE=ieee,
                 ZERO_MASKED=bool(zero_masked), FOLD=kind != 1 and scale > 0)
    configs = CONFIGS["decode" if Lq <= DECODE_LQ else "f32" if q.dtype == torch.float32 else "half"]
    if splits is not None or pack is not None:
        c = configs[0]
        configs = [(*c[:5], c[5] if splits is None else splits, c[6] if pack is None else bool(pack) and Lq <= DECODE_LQ)]
    if tk.interpreting():
        _launch(mod, configs[0], args, flags, B * H)
        return out
    launch = lambda c: _launch(mod, c, args, flags, B * H)   # noqa: E731
    # tuned per length bucket (a power of two): a decode step's key length grows by one each call
    problem = (q.dtype, B * H, pow2(Lq), pow2(Lk), tuple(sorted(flags.items())))
    launch(tk.choice("attention", SOURCE, problem, configs, launch, reps=3))
    return out


_LAUNCHES: dict = {}     # (kernel, grid, constexprs, warps, stages) -> tk.Launch


def _launcher(fn, grid, warps, stages, **constexprs):
    key = (fn, grid, tuple(constexprs.items()), warps, stages)
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) > 4096:       # decoding makes a grid per key length in a while: start again
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = tk.Launch(fn, grid, warps, stages, **constexprs)
    return launch


def _launch(mod, config, args, flags, bh):
    bm, bn, warps, stages, ws, ns, pack = config
    q, out, H, hpk, Lq, Lk = args[0], args[3], args[6], args[7], args[8], args[9]
    ns = max(1, min(ns, math.ceil(Lk / bn)))        # no split without a key block of its own
    rows = hpk * Lq if pack else Lq                 # a program's rows: per kv head packed, else per head
    grid = (math.ceil(rows / bm), bh // hpk if pack else bh, ns)
    kw = dict(BM=bm, BN=bn, EVEN_M=rows % bm == 0, EVEN_N=Lk % bn == 0, WS=ws, PACK=pack, **flags)
    if ns == 1:
        _launcher(mod.kf_attention, grid, warps, stages, SPLIT=False, **kw)([*args, q, q, q, 1])
        return
    BD = flags["BD"]
    pacc = torch.empty(bh * ns * Lq * BD, dtype=torch.float32, device=q.device)
    pm = torch.empty(bh * ns * Lq, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    _launcher(mod.kf_attention, grid, warps, stages, SPLIT=True, **kw)([*args, pacc, pm, pl, ns])
    _launcher(mod.kf_combine, (bh, Lq), 4, None, D=flags["D"], BD=BD, BS=max(2, pow2(ns)),
              MASK=flags["MASK"], ZERO_MASKED=flags["ZERO_MASKED"])([pacc, pm, pl, out, H, Lq, ns, *out.stride()[:3]])
