"""ONNX handlers of the opset-23 fused ops: RMSNormalization, RotaryEmbedding and Attention, each
mapped onto kfuse's own fused IR ops (`rms_norm`, `rope`, `attention`) where the ONNX semantics fit
them, and onto primitive IR ops for the variants they do not (interleaved rotary, softcap, the
qk_matmul_output output). ONNX's reference implementation (onnx.reference.ops) is the meaning
followed, step by step where it matters for the numbers."""
from __future__ import annotations

import math

import torch

from ..common import reshape
from .common import DTYPES, _axis, _slice_axis, handler
from .nn import _norm_weight

_LOW = (torch.float16, torch.bfloat16)


def _cast(n, x, dtype):
    return x if x.dtype == dtype else n.add("cast", x, dtype=dtype)


def _stash(n, x):
    """The dtype the statistics are computed in: stash_type (float32, the only one ONNX defines
    an implementation for) for float16/bfloat16 inputs, the input's own otherwise."""
    stash = n.attr("stash_type", 1)
    if stash != 1:
        n.unsupported(f"stash_type {stash} (only 1, float32, is supported)")
    return torch.float32 if x.dtype in _LOW else x.dtype


# -- RMSNormalization -----------------------------------------------------------------------------

@handler("RMSNormalization")
def _rms_normalization(n, x, scale):
    """x / sqrt(mean(x^2 over axes axis..) + eps) * scale: kfuse's rms_norm over the trailing axes
    flattened to one (the scale as its weight when it has the normalised shape)."""
    rank = len(x.shape)
    axis = _axis(n.attr("axis", -1), rank)
    if not 0 <= axis < rank:
        n.fail(f"axis {n.attr('axis', -1)} is out of range for rank {rank}")
    dtype = _stash(n, x)
    shape = tuple(x.shape[axis:])
    size = math.prod(shape)
    flat = reshape(n, _cast(n, x, dtype), x.shape[:axis] + (size,))
    fits = len(scale.shape) <= len(shape) and all(
        s in (1, d) for s, d in zip(reversed(scale.shape), reversed(shape)))
    if fits:
        w = reshape(n, _cast(n, _norm_weight(n, scale, shape), dtype), (size,))
        y = reshape(n, n.add("rms_norm", flat, w, eps=float(n.attr("epsilon", 1e-5))), x.shape)
    else:   # a scale of higher rank: normalise with a weight of ones, then broadcast the scale
        ones = n.const(torch.ones(size, dtype=dtype))
        y = reshape(n, n.add("rms_norm", flat, ones, eps=float(n.attr("epsilon", 1e-5))), x.shape)
        y = n.add("mul", y, _cast(n, scale, dtype))
    return _cast(n, y, x.dtype)


# -- RotaryEmbedding ------------------------------------------------------------------------------

@handler("RotaryEmbedding")
def _rotary_embedding(n, x, cos, sin, position_ids=None):
    """Rotary embedding of x [B, H, S, D] or [B, S, hidden] (num_heads heads): the first
    rotary_embedding_dim features rotated by the cos/sin caches (gathered by position_ids when
    given). Halves (the default): kfuse's rope with the caches doubled; interleaved (even/odd
    pairs): primitive ops."""
    interleaved = bool(n.attr("interleaved", 0))
    heads = int(n.attr("num_heads", 0))
    rank = len(x.shape)
    if rank == 4:   # [B, H, S, D]: caches [B, S, r/2] act as [B, 1, S, r/2]
        xs, head_axis = x, 1
    elif rank == 3:  # [B, S, hidden] -> [B, S, H, D]: caches act as [B, S, 1, r/2]
        if heads <= 0 or x.shape[2] % heads:
            n.fail(f"a 3-d input needs num_heads dividing its hidden size {x.shape[2]} (got {heads})")
        xs, head_axis = reshape(n, x, (x.shape[0], x.shape[1], heads, x.shape[2] // heads)), 2
    else:
        n.fail(f"the input must be 3-d or 4-d, got shape {list(x.shape)}")
    d = xs.shape[3]
    rot = int(n.attr("rotary_embedding_dim", 0)) or d
    if rot % 2 or rot > d:
        n.fail(f"rotary_embedding_dim {rot} must be even and at most the head size {d}")
    if position_ids is not None:
        cos = n.add("gather", cos, position_ids, axis=0)
        sin = n.add("gather", sin, position_ids, axis=0)
    if len(cos.shape) != 3 or cos.shape[-1] != rot // 2 or sin.shape != cos.shape:
        n.fail(f"cos/sin caches of shape {list(cos.shape)}/{list(sin.shape)} do not fit "
               f"[batch, seq, {rot // 2}]")
    cshape = list(cos.shape)
    cshape.insert(head_axis, 1)
    cos, sin = (_cast(n, reshape(n, c, cshape), xs.dtype) for c in (cos, sin))
    part = _slice_axis(n, xs, 3, 0, rot, 1)
    if not interleaved:
        c2, s2 = (n.add("concat", c, c, axis=3) for c in (cos, sin))
        y = n.add("rope", part, c2, s2)
    else:
        x1, x2 = _slice_axis(n, part, 3, 0, rot, 2), _slice_axis(n, part, 3, 1, rot, 2)
        real = n.add("sub", n.add("mul", cos, x1), n.add("mul", sin, x2))
        imag = n.add("add", n.add("mul", sin, x1), n.add("mul", cos, x2))
        pair = tuple(real.shape) + (1,)
        y = n.add("concat", reshape(n, real, pair), reshape(n, imag, pair), axis=4)
        y = reshape(n, y, part.shape)
    if rot < d:
        y = n.add("concat", y, _slice_axis(n, xs, 3, rot, d, 1), axis=3)
    return reshape(n, y, x.shape)


# -- Attention ------------------------------------------------------------------------------------

def _heads(n, t, heads, what):
    """[B, S, heads * D] -> [B, heads, S, D]."""
    b, s, hidden = t.shape
    if heads <= 0 or hidden % heads:
        n.fail(f"3-d {what} of hidden size {hidden} needs q_num_heads/kv_num_heads dividing it (got {heads})")
    return n.add("transpose", reshape(n, t, (b, s, heads, hidden // heads)), perm=[0, 2, 1, 3])


def _static_keep(lq, lk, offset, causal, left, right):
    """The positions causal masking and the sliding window allow, a [lq, lk] bool tensor (None:
    all): query i attends key j when j <= i + offset (causal) and within the window around
    i + offset, as ONNX's reference aligns them (bottom-right by the past length)."""
    if not causal and left < 0 and right < 0:
        return None
    diff = torch.arange(lq).reshape(lq, 1) + offset - torch.arange(lk).reshape(1, lk)
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        keep &= diff >= 0
    if left >= 0:
        keep &= diff <= left
    if right >= 0:
        keep &= -diff <= right
    return keep


def _nonpad_keep(n, nonpad, batch, lq, lk, causal, left, right):
    """The keep mask [B, 1, lq, lk] of an external (static) KV cache: key j is valid below
    nonpad_kv_seqlen[b], and the causal frontier and window are aligned to query position
    i + nonpad_kv_seqlen[b] - lq, as ONNX's reference aligns them."""
    if nonpad.numel != batch:
        n.fail(f"nonpad_kv_seqlen has {nonpad.numel} elements for a batch of {batch}")
    valid = reshape(n, _cast(n, nonpad, torch.int64), (batch, 1, 1, 1))
    j = n.const(torch.arange(lk).reshape(1, 1, 1, lk))
    keep = n.add("lt", j, valid)
    if causal or left >= 0 or right >= 0:
        pos = n.add("add", n.const(torch.arange(lq).reshape(1, 1, lq, 1) - lq), valid)
        diff = n.add("sub", pos, j)
        zero = n.const(0, dtype=torch.int64)
        if causal:
            keep = n.add("logical_and", keep, n.add("ge", diff, zero))
        if left >= 0:
            keep = n.add("logical_and", keep, n.add("le", diff, n.const(left, dtype=torch.int64)))
        if right >= 0:
            keep = n.add("logical_and", keep, n.add("ge", diff, n.const(-right, dtype=torch.int64)))
    return keep


@handler("Attention")
def _attention(n, q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    """ONNX Attention (opset 23+). Without softcap and without the qk_matmul_output output it is
    kfuse's fused `attention` op (3-d inputs split into heads around it); the rest is primitive ops
    following ONNX's reference step by step. A query row every key of which is masked gives 0, as
    ONNX defines."""
    if (past_key is None) != (past_value is None):
        n.fail("past_key and past_value must be given together")
    rank = len(q.shape)
    if rank != len(k.shape) or rank != len(v.shape) or rank not in (3, 4):
        n.fail(f"Q, K and V must all be 3-d or all 4-d, got shapes {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if rank == 3:
        qh, kvh = int(n.attr("q_num_heads", 0)), int(n.attr("kv_num_heads", 0))
        q, k, v = _heads(n, q, qh, "Q"), _heads(n, k, kvh, "K"), _heads(n, v, kvh, "V")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        n.fail(f"{q.shape[1]} query heads cannot share {k.shape[1]} key / {v.shape[1]} value heads")
    dtype = q.dtype
    k, v = _cast(n, k, dtype), _cast(n, v, dtype)
    offset = 0
    if past_key is not None:
        offset = past_key.shape[2]
        k = n.add("concat", _cast(n, past_key, dtype), k, axis=2)
        v = n.add("concat", _cast(n, past_value, dtype), v, axis=2)
    present_k, present_v = k, v
    lq, lk = q.shape[2], k.shape[2]
    scale = n.attr("scale")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    causal = bool(n.attr("is_causal", 0))
    left, right = int(n.attr("left_window_size", -1)), int(n.attr("right_window_size", -1))
    keep = _static_keep(lq, lk, offset, causal, left, right)
    dynamic = None   # with nonpad_kv_seqlen: the keep mask [B, 1, lq, lk], computed at run time
    if nonpad_kv_seqlen is not None:
        if past_key is not None:
            n.fail("nonpad_kv_seqlen cannot be combined with past_key/past_value")
        keep = None
        dynamic = _nonpad_keep(n, nonpad_kv_seqlen, q.shape[0], lq, lk, causal, left, right)
    softcap = float(n.attr("softcap", 0.0) or 0.0)
    mode = int(n.attr("qk_matmul_output_mode", 0))
    want_qk = n.n_outputs() > 3 and bool(n.proto.output[3])
    if mode not in (0, 1, 2, 3):
        n.unsupported(f"qk_matmul_output_mode {mode}")

    if mask is not None:   # shorter than the keys: padded with masked positions
        if mask.shape[-1] > lk:
            n.fail(f"attn_mask's last dim {mask.shape[-1]} is longer than the {lk} keys")
        if mask.shape[-1] < lk:
            fill = 0.0 if mask.dtype == torch.bool else -math.inf
            pads = [0, lk - mask.shape[-1]]
            m = mask if mask.dtype != torch.bool else n.add("cast", mask, dtype=torch.uint8)
            m = n.add("pad", m, pads=pads, value=fill)
            mask = m if mask.dtype != torch.bool else n.add("cast", m, dtype=torch.bool)
        if mask.dtype != torch.bool:
            mask = _cast(n, mask, dtype)

    def additive():
        """The whole additive bias (mask and static masking), or None when nothing is masked."""
        bias = None
        if mask is not None:
            bias = mask if mask.dtype != torch.bool else n.add(
                "where", mask, n.const(0.0, dtype=dtype), n.const(-math.inf, dtype=dtype))
        if keep is not None:
            static = n.const(torch.zeros(lq, lk, dtype=dtype).masked_fill(~keep, -math.inf))
            bias = static if bias is None else n.add("add", bias, static)
        if dynamic is not None:
            pad = n.add("where", dynamic, n.const(0.0, dtype=dtype), n.const(-math.inf, dtype=dtype))
            bias = pad if bias is None else n.add("add", bias, pad)
        return bias

    def row_ok(bias):
        """[..., lq, 1]: whether a query row has a key it may attend (None: every row has)."""
        if bias is None:
            return None
        if bias.op == "const":
            if (bias.value.amax(-1) > -math.inf).all():
                return None
            return n.const(bias.value.amax(-1, keepdim=True) > -math.inf)
        return n.add("gt", n.add("reduce_max", bias, axes=[len(bias.shape) - 1], keepdim=True),
                     n.const(-math.inf, dtype=dtype))

    if softcap == 0.0 and not want_qk:
        # kfuse's attention: causal when its bottom-right alignment is ONNX's, else a keep mask
        fused_causal = causal and left < 0 and right < 0 and offset == lk - lq
        static = None if keep is None or fused_causal else n.const(keep)
        static = dynamic if static is None else static
        if mask is None:
            m = static
        elif mask.dtype == torch.bool:
            m = mask if static is None else n.add("logical_and", mask, static)
        else:
            m = mask if static is None else n.add("add", mask, n.add(
                "where", static, n.const(0.0, dtype=dtype), n.const(-math.inf, dtype=dtype)))
        y = n.add("attention", *((q, k, v) if m is None else (q, k, v, m)), scale=scale, causal=fused_causal)
        ok = row_ok(additive())
        if ok is not None:
            y = n.add("where", ok, y, n.const(0.0, dtype=dtype))
        qk = None
    else:
        rep = q.shape[1] // k.shape[1]
        if rep > 1:   # each key/value head shared by `rep` query heads: [h0, h0, h1, h1, ...]
            idx = n.const(torch.arange(k.shape[1]).repeat_interleave(rep))
            k, v = n.add("gather", k, idx, axis=1), n.add("gather", v, idx, axis=1)
        root = n.const(math.sqrt(scale), dtype=dtype)
        kt = n.add("transpose", n.add("mul", k, root), perm=[0, 1, 3, 2])
        qk = n.add("matmul", n.add("mul", q, root), kt)
        if softcap > 0:
            cap = n.const(softcap, dtype=dtype)
            qk = n.add("mul", n.add("tanh", n.add("div", qk, cap)), cap)
        bias = additive()
        scores = qk if bias is None else n.add("add", qk, bias)
        if mode == 2:
            qk = scores
        precision = n.attr("softmax_precision")
        if precision is not None:
            if precision not in DTYPES or not DTYPES[precision].is_floating_point:
                n.unsupported(f"softmax_precision {precision}")
            scores = _cast(n, scores, DTYPES[precision])
        p = n.add("softmax", scores, axis=3)
        ok = row_ok(bias)
        if ok is not None:
            p = n.add("where", ok, p, n.const(0.0, dtype=p.dtype))
        if mode == 3:
            qk = p
        qk = _cast(n, qk, dtype)
        y = n.add("matmul", _cast(n, p, dtype), v)
    if rank == 3:
        y = n.add("transpose", y, perm=[0, 2, 1, 3])
        y = reshape(n, y, (y.shape[0], y.shape[1], y.shape[2] * y.shape[3]))
    return [y, present_k, present_v, qk]
