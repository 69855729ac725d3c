"""ONNX handlers of the com.microsoft operators that ONNX Runtime's transformer optimizer writes into
optimized files (SkipLayerNormalization, BiasGelu, Attention, GroupQueryAttention, ...) and its graph
optimizer (FusedConv, FusedGemm, FusedMatMul), mapped onto kfuse's fused IR ops (`layer_norm`,
`rms_norm`, `gelu`, `linear`, `attention`, `rope`) and elementwise ops. The meaning is ONNX Runtime's
(its contrib op docs and CPU kernels); a variant not mapped (past/present state of Attention, rotary
inside Attention, packed or Megatron masks, softcap of GroupQueryAttention, ...) is a clear error
naming it."""
from __future__ import annotations

import math

import torch

from ..common import reshape
from .common import HANDLERS, _axis, handler
from .fused import _rotary_embedding
from .nn import _norm_weight

MS = "com.microsoft"
_LOW = (torch.float16, torch.bfloat16)


def _cast(n, x, dtype):
    return x if x.dtype == dtype else n.add("cast", x, dtype=dtype)


def _given(n, i):
    """Whether the node's i-th output is wanted (present and named)."""
    return n.n_outputs() > i and bool(n.proto.output[i])


def _only_inputs(n, names, ins):
    for name, x in zip(names, ins):
        if x is not None:
            n.unsupported(f"input {name!r} is not supported")


def _only_outputs(n, first_unsupported, names):
    for i, name in enumerate(names, first_unsupported):
        if _given(n, i):
            n.unsupported(f"output {name!r} is not supported")


# -- normalisations -------------------------------------------------------------------------------

def _skip_sum(n, x, skip, bias):
    if skip.shape != x.shape and (len(skip.shape) > len(x.shape) or any(
            s not in (1, d) for s, d in zip(reversed(skip.shape), reversed(x.shape)))):
        n.fail(f"skip of shape {list(skip.shape)} does not broadcast to the input's {list(x.shape)}")
    s = n.add("add", x, _cast(n, skip, x.dtype))
    return s if bias is None else n.add("add", s, _cast(n, bias, x.dtype))


def _stats(n, x, eps, centred):
    """The mean (over the last axis, kept) and the inverse standard deviation, in float32."""
    xs = _cast(n, x, torch.float32)
    ax = [len(x.shape) - 1]
    if centred:
        mean = n.add("reduce_mean", xs, axes=ax, keepdim=True)
        var = n.add("reduce_var", xs, axes=ax, correction=0, keepdim=True)
    else:
        mean = None
        var = n.add("reduce_mean", n.add("mul", xs, xs), axes=ax, keepdim=True)
    return mean, n.add("rsqrt", n.add("add", var, n.const(eps, dtype=torch.float32)))


@handler((MS, "SkipLayerNormalization"))
def _skip_layer_norm(n, x, skip, gamma, beta=None, bias=None):
    """LayerNorm(input + skip [+ bias]) over the last axis: kfuse's add + layer_norm (fused as
    add_layernorm). Outputs: output, mean, inv_std_var, input_skip_bias_sum."""
    h = x.shape[-1]
    eps = float(n.attr("epsilon", 1e-12))
    s = _skip_sum(n, x, skip, bias)
    beta = n.const(torch.zeros(h, dtype=x.dtype)) if beta is None else _cast(n, _norm_weight(n, beta, (h,)), x.dtype)
    y = n.add("layer_norm", s, _cast(n, _norm_weight(n, gamma, (h,)), x.dtype), beta, eps=eps, ndim=1)
    out = [y, None, None, s]
    if _given(n, 1) or _given(n, 2):
        out[1], out[2] = _stats(n, s, eps, True)
    return out


@handler((MS, "SkipSimplifiedLayerNormalization"))
def _skip_simplified_layer_norm(n, x, skip, gamma, bias=None):
    """RMSNorm(input + skip [+ bias]): kfuse's add + rms_norm. Outputs: output, mean (not
    computed: an error if asked for), inv_std_var, input_skip_bias_sum."""
    h = x.shape[-1]
    eps = float(n.attr("epsilon", 1e-12))
    s = _skip_sum(n, x, skip, bias)
    y = n.add("rms_norm", s, _cast(n, _norm_weight(n, gamma, (h,)), x.dtype), eps=eps)
    if _given(n, 1):
        n.unsupported("output 'mean' (a simplified layer norm computes none)")
    inv = _stats(n, s, eps, False)[1] if _given(n, 2) else None
    return [y, None, inv, s]


@handler("SimplifiedLayerNormalization", (MS, "SimplifiedLayerNormalization"))
def _simplified_layer_norm(n, x, scale):
    """ONNX Runtime registers it in the default domain (no ONNX schema) and writes it there: RMS
    normalisation over the axes axis.. (flattened to one): kfuse's rms_norm; the optional
    inv_std_var output beside it."""
    rank = len(x.shape)
    axis = _axis(int(n.attr("axis", -1)), rank)
    if not 0 <= axis < rank:
        n.fail(f"axis {n.attr('axis', -1)} is out of range for rank {rank}")
    if int(n.attr("stash_type", 1)) != 1:
        n.unsupported(f"stash_type {n.attr('stash_type')} (only 1, float32, is supported)")
    eps = float(n.attr("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    size = math.prod(shape)
    dtype = torch.float32 if x.dtype in _LOW else x.dtype
    flat = reshape(n, _cast(n, x, dtype), x.shape[:axis] + (size,))
    w = reshape(n, _cast(n, _norm_weight(n, scale, shape), dtype), (size,))
    y = _cast(n, reshape(n, n.add("rms_norm", flat, w, eps=eps), x.shape), x.dtype)
    if not _given(n, 1):
        return y
    inv = _stats(n, flat, eps, False)[1]
    return [y, reshape(n, inv, x.shape[:axis] + (1,) * (rank - axis))]


@handler((MS, "EmbedLayerNormalization"))
def _embed_layer_norm(n, ids, segment_ids, word, position, segment=None, gamma=None, beta=None,
                      mask=None, position_ids=None):
    """LayerNorm(word[ids] + position[position_ids or 0..S-1] [+ segment[segment_ids]]); outputs
    output, mask_index (int32 [batch]: the number of 1s of each mask row, the key length the
    following Attention nodes mask to) and the embedding sum."""
    if gamma is None or beta is None:
        n.fail("gamma and beta are required")
    if int(n.attr("mask_index_type", 1)) != 1:
        n.unsupported(f"mask_index_type {n.attr('mask_index_type')} (only 1, the key lengths, is supported)")
    b, s = ids.shape
    e = n.add("gather", word, _cast(n, ids, torch.int64), axis=0)
    if position_ids is None:
        pos = n.add("gather", position, n.const(torch.arange(s)), axis=0)   # [S, H]
    else:
        pos = n.add("gather", position, _cast(n, position_ids, torch.int64), axis=0)
    e = n.add("add", e, pos)
    if segment is not None and segment_ids is not None:
        e = n.add("add", e, n.add("gather", segment, _cast(n, segment_ids, torch.int64), axis=0))
    h = e.shape[-1]
    y = n.add("layer_norm", e, _norm_weight(n, gamma, (h,)), _norm_weight(n, beta, (h,)),
              eps=float(n.attr("epsilon", 1e-12)), ndim=1)
    index = None
    if _given(n, 1):
        if mask is None:
            index = n.const(torch.full((b,), s, dtype=torch.int32))
        else:
            ones = n.add("eq", _cast(n, mask, torch.int64), n.const(1, dtype=torch.int64))
            index = _cast(n, n.add("reduce_sum", _cast(n, ones, torch.int64), axes=[1], keepdim=False), torch.int32)
    return [y, index, e]


# -- activations ----------------------------------------------------------------------------------

def _biased(n, x, bias):
    return x if bias is None else n.add("add", x, _cast(n, bias, x.dtype))


@handler((MS, "Gelu"))
def _gelu(n, x):
    return n.add("gelu", x, approximate="none")


@handler((MS, "BiasGelu"))
def _bias_gelu(n, x, bias):
    return n.add("gelu", _biased(n, x, bias), approximate="none")


@handler((MS, "FastGelu"))
def _fast_gelu(n, x, bias=None):
    """The tanh approximation of GELU, of x + bias when a bias is given."""
    return n.add("gelu", _biased(n, x, bias), approximate="tanh")


@handler((MS, "QuickGelu"))
def _quick_gelu(n, x):
    """x * sigmoid(alpha * x), alpha 1.702 by default."""
    alpha = float(n.attr("alpha", 1.702))
    return n.add("mul", x, n.add("sigmoid", n.add("mul", x, n.const(alpha, dtype=x.dtype))))


@handler((MS, "BiasAdd"))
def _bias_add(n, x, bias, skip):
    return n.add("add", n.add("add", x, _cast(n, bias, x.dtype)), _cast(n, skip, x.dtype))


# -- attention ------------------------------------------------------------------------------------

def _split_heads(n, t, heads):
    """[B, S, heads * D] -> [B, heads, S, D]."""
    b, s, hidden = t.shape
    if heads <= 0 or hidden % heads:
        n.fail(f"num_heads {heads} does not divide the hidden size {hidden}")
    return n.add("transpose", reshape(n, t, (b, s, heads, hidden // heads)), perm=[0, 2, 1, 3])


def _merge_heads(n, y):
    y = n.add("transpose", y, perm=[0, 2, 1, 3])
    return reshape(n, y, (y.shape[0], y.shape[1], y.shape[2] * y.shape[3]))


def _mask_bias(n, mask, batch, lq, lk, dtype, what):
    """ONNX Runtime's mask forms as an additive bias broadcasting to [B, 1, lq, lk]: mask_filter_value
    where masked, 0 elsewhere. 1-d [B]: key lengths (keys at or past it masked); 2-d [B, lk] and 3-d
    [B, lq, lk]: 0 masks, anything else keeps."""
    fill = n.const(float(n.attr("mask_filter_value", -10000.0)), dtype=dtype)
    zero = n.const(0.0, dtype=dtype)
    rank = len(mask.shape)
    if rank == 1 and mask.shape[0] == batch:
        j = n.const(torch.arange(lk).reshape(1, lk))
        keep = n.add("lt", j, reshape(n, _cast(n, mask, torch.int64), (batch, 1)))
        return reshape(n, n.add("where", keep, zero, fill), (batch, 1, 1, lk))
    if rank == 2 and tuple(mask.shape) == (batch, lk):
        keep = n.add("ne", _cast(n, mask, torch.int64), n.const(0, dtype=torch.int64))
        return reshape(n, n.add("where", keep, zero, fill), (batch, 1, 1, lk))
    if rank == 3 and tuple(mask.shape) == (batch, lq, lk):
        keep = n.add("ne", _cast(n, mask, torch.int64), n.const(0, dtype=torch.int64))
        return reshape(n, n.add("where", keep, zero, fill), (batch, 1, lq, lk))
    n.unsupported(f"{what} of shape {list(mask.shape)} (supported: [batch] key lengths, "
                  f"[batch, {lk}] and [batch, {lq}, {lk}] 1/0 masks)")


def _attend(n, q, k, v, heads, bias):
    """kfuse's fused attention of [B, S, heads*D] q, k, v with an additive bias (or None),
    unidirectional adding mask_filter_value above the diagonal as ONNX Runtime does."""
    qh, kh, vh = (_split_heads(n, t, heads) for t in (q, k, v))
    lq, lk = qh.shape[2], kh.shape[2]
    dtype = q.dtype
    if int(n.attr("unidirectional", 0)):
        fill = float(n.attr("mask_filter_value", -10000.0))
        causal = torch.zeros(lq, lk, dtype=dtype).masked_fill(
            ~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), fill)
        bias = n.const(causal) if bias is None else n.add("add", bias, n.const(causal))
    scale = n.attr("scale")
    scale = 1.0 / math.sqrt(qh.shape[3]) if not scale else float(scale)
    y = n.add("attention", *((qh, kh, vh) if bias is None else (qh, kh, vh, bias)), scale=scale, causal=False)
    return _merge_heads(n, y)


@handler((MS, "Attention"))
def _ms_attention(n, x, weights, bias=None, mask_index=None, past=None, attention_bias=None,
                  past_sequence_length=None):
    """ONNX Runtime's packed-QKV self-attention (BERT): x @ weights + bias split into Q, K, V
    (qkv_hidden_sizes, equal thirds by default), multi-head attention over them, kfuse's `linear`
    and `attention`."""
    _only_inputs(n, ["past", "past_sequence_length"], [past, past_sequence_length])
    _only_outputs(n, 1, ["present"])
    for attr in ("do_rotary", "past_present_share_buffer"):
        if int(n.attr(attr, 0)):
            n.unsupported(f"attribute {attr}={n.attr(attr)}")
    heads = int(n.attr("num_heads", 0))
    if len(x.shape) != 3 or len(weights.shape) != 2 or weights.shape[0] != x.shape[2]:
        n.fail(f"input {list(x.shape)} and weights {list(weights.shape)} are not [B, S, H] and [H, 3 * hidden]")
    sizes = n.attr("qkv_hidden_sizes")
    total = weights.shape[1]
    sizes = [total // 3] * 3 if sizes is None else [int(v) for v in sizes]
    if len(sizes) != 3 or sum(sizes) != total or sizes[0] != sizes[1]:
        n.fail(f"qkv_hidden_sizes {sizes} do not fit weights of {total} columns")
    qkv = n.add("linear", x, _cast(n, weights, x.dtype), *([] if bias is None else [_cast(n, bias, x.dtype)]),
                act="none")
    starts = [0, sizes[0], sizes[0] + sizes[1], total]
    q, k, v = (n.add("slice", qkv, axis=2, start=starts[i], end=starts[i + 1], step=1) for i in range(3))
    b, s = x.shape[0], x.shape[1]
    add = None if mask_index is None else _mask_bias(n, mask_index, b, s, s, x.dtype, "mask_index")
    if attention_bias is not None:
        ab = _cast(n, attention_bias, x.dtype)
        add = ab if add is None else n.add("add", add, ab)
    return [_attend(n, q, k, v, heads, add), None]


@handler((MS, "MultiHeadAttention"))
def _ms_multi_head_attention(n, q, k=None, v=None, bias=None, key_padding_mask=None, attention_bias=None,
                             past_key=None, past_value=None, past_sequence_length=None, cache_indirection=None):
    """ONNX Runtime's MultiHeadAttention with separate 3-d query, key and value ([B, S, N*H],
    [B, L, N*H], [B, L, N*Hv]), an optional packed bias [N*H + N*H + N*Hv], key_padding_mask and
    attention_bias: kfuse's fused `attention`. Packed QKV/KV and past/present are not mapped."""
    _only_inputs(n, ["past_key", "past_value", "past_sequence_length", "cache_indirection"],
                 [past_key, past_value, past_sequence_length, cache_indirection])
    _only_outputs(n, 1, ["present_key", "present_value", "qk"])
    if k is None or v is None or not (len(q.shape) == len(k.shape) == len(v.shape) == 3):
        n.unsupported("packed QKV/KV or 4-d key/value (only separate 3-d query, key and value are supported)")
    heads = int(n.attr("num_heads", 0))
    dtype = q.dtype
    k, v = _cast(n, k, dtype), _cast(n, v, dtype)
    if bias is not None:
        dq, dk, dv = q.shape[2], k.shape[2], v.shape[2]
        if bias.shape != (dq + dk + dv,):
            n.fail(f"bias of shape {list(bias.shape)} is not [{dq + dk + dv}]")
        bias = _cast(n, bias, dtype)
        q = n.add("add", q, n.add("slice", bias, axis=0, start=0, end=dq, step=1))
        k = n.add("add", k, n.add("slice", bias, axis=0, start=dq, end=dq + dk, step=1))
        v = n.add("add", v, n.add("slice", bias, axis=0, start=dq + dk, end=dq + dk + dv, step=1))
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    add = None if key_padding_mask is None else _mask_bias(n, key_padding_mask, b, lq, lk, dtype, "key_padding_mask")
    if attention_bias is not None:
        ab = _cast(n, attention_bias, dtype)
        add = ab if add is None else n.add("add", add, ab)
    return _attend(n, q, k, v, heads, add)


# -- rotary embedding -----------------------------------------------------------------------------

@handler((MS, "RotaryEmbedding"))
def _ms_rotary_embedding(n, x, position_ids, cos, sin):
    """ONNX Runtime's RotaryEmbedding: caches [max_positions, rotary_dim / 2] gathered by
    position_ids ([batch, seq], or one offset: positions offset..offset+seq-1), then ONNX's
    RotaryEmbedding (kfuse's `rope`; interleaved pairs as primitive ops)."""
    if int(n.attr("is_packed_batching", 0)):
        n.unsupported("attribute is_packed_batching=1")
    if float(n.attr("scale", 1.0)) != 1.0:
        n.unsupported(f"attribute scale={n.attr('scale')} (only 1.0 is supported)")
    seq = x.shape[2] if len(x.shape) == 4 else x.shape[1]
    pos = _cast(n, position_ids, torch.int64)
    if pos.numel == 1:
        pos = n.add("add", reshape(n, pos, (1, 1)), n.const(torch.arange(seq).reshape(1, seq)))
    if len(pos.shape) != 2:
        n.fail(f"position_ids of shape {list(position_ids.shape)} is neither [batch, seq] nor one offset")
    cos, sin = (n.add("gather", c, pos, axis=0) for c in (cos, sin))
    if cos.shape[0] != x.shape[0]:
        cos, sin = (n.add("expand", c, shape=(x.shape[0],) + tuple(c.shape[1:])) for c in (cos, sin))
    return _rotary_embedding(n, x, cos, sin)


# -- GroupQueryAttention --------------------------------------------------------------------------

# GroupQueryAttention's inputs past the ones mapped, and attributes that must keep their defaults
_GQA_INPUTS = ["head_sink", "k_scale", "v_scale", "q_norm_weight", "k_norm_weight", "query_seqlens"]
_GQA_ATTRS = {"smooth_softmax": 0, "qk_output": 0, "sliding_window_cache": 0, "softcap": 0.0,
              "k_quant_type": "NONE", "v_quant_type": "NONE"}


def _gqa_rotary(n, x, pos, cos, sin):
    """x [B, heads, S, D] rotated at positions pos [B, S] by caches [max_positions, rotary_dim / 2]
    (the first rotary_dim features; halves or interleaved pairs): ONNX's RotaryEmbedding helper."""
    c, s = (n.add("gather", t, pos, axis=0) for t in (cos, sin))
    n.overrides.update(interleaved=int(n.attr("rotary_interleaved", 0)), rotary_embedding_dim=2 * cos.shape[1])
    try:
        return _rotary_embedding(n, x, c, s)
    finally:
        del n.overrides["interleaved"], n.overrides["rotary_embedding_dim"]


def _gqa_place(n, past, new, start, length):
    """The present cache [B, Hkv, length, D] ONNX Runtime's CPU kernel writes: past's rows below
    start[b], the new rows at start[b].., zeros after them. start is a [B, 1, 1, 1] int64 node, or
    0 (every row starts at 0, a static placement)."""
    b, h, s, d = new.shape
    if isinstance(start, int):
        return new if length == s else n.add("concat", new, n.const(torch.zeros(b, h, length - s, d, dtype=new.dtype)),
                                             axis=2)
    lp = past.shape[2]
    base = past if lp == length else n.add("concat", past, n.const(torch.zeros(b, h, length - lp, d, dtype=past.dtype)),
                                           axis=2)
    j = n.const(torch.arange(length).reshape(1, 1, length, 1))
    rel = n.add("sub", j, start)                                      # [B, 1, L, 1]: row j holds new row j - start
    idx = n.add("minimum", n.add("maximum", rel, n.const(0, dtype=torch.int64)), n.const(s - 1, dtype=torch.int64))
    placed = n.add("gather_elements", new, n.add("expand", idx, shape=(b, h, length, d)), axis=2)
    zero = n.const(0.0, dtype=new.dtype)
    placed = n.add("where", n.add("lt", rel, n.const(s, dtype=torch.int64)), placed, zero)
    return n.add("where", n.add("lt", j, start), base, placed)


@handler((MS, "GroupQueryAttention"))
def _ms_group_query_attention(n, q, k=None, v=None, past_key=None, past_value=None, seqlens_k=None, total=None,
                              cos=None, sin=None, position_ids=None, attention_bias=None, *rest):
    """ONNX Runtime's GroupQueryAttention as its CPU kernel computes it (float32): query [B, S, H*D]
    with key/value [B, S, Hkv*D] (or packed [B, S, (H + 2 Hkv) * D]), rotary on Q and K with
    do_rotary, the new K/V written into the BNSH cache at row P[b] (0 for the first prompt, when
    S == total_sequence_length; else seqlens_k[b] + 1 - S), and kfuse's fused `attention` over the
    present cache with a keep mask computed at run time from seqlens_k: key j < seqlens_k[b] + 1,
    causal j <= P[b] + i, local window j > P[b] + i - local_window_size. total_sequence_length
    sets the cache length (max(total, past length)) and is specialised by value."""
    _only_inputs(n, _GQA_INPUTS, list(rest) + [None] * (len(_GQA_INPUTS) - len(rest)))
    _only_outputs(n, 3, ["output_qk"])
    for attr, default in _GQA_ATTRS.items():
        if n.attr(attr, default) != default:
            n.unsupported(f"attribute {attr}={n.attr(attr)}")
    heads, kv_heads = int(n.attr("num_heads", 0)), int(n.attr("kv_num_heads", 0))
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        n.fail(f"num_heads {heads} is not a positive multiple of kv_num_heads {kv_heads}")
    if seqlens_k is None or total is None:
        n.fail("seqlens_k and total_sequence_length are required")
    if (k is None) != (v is None) or (past_key is None) != (past_value is None) or (cos is None) != (sin is None):
        n.fail("key/value, past_key/past_value and cos_cache/sin_cache must each be given together")
    if len(q.shape) != 3:
        n.unsupported(f"query of shape {list(q.shape)} (only 3-d [batch, seq, hidden] is supported)")
    b, s, hidden = q.shape
    dtype = q.dtype
    if k is None:   # packed QKV: [B, S, (H + 2 Hkv) * D]
        if hidden % (heads + 2 * kv_heads):
            n.fail(f"packed QKV of hidden size {hidden} does not split into {heads} + 2 * {kv_heads} heads")
        d = hidden // (heads + 2 * kv_heads)
        q, k, v = (n.add("slice", q, axis=2, start=a * d, end=e * d, step=1)
                   for a, e in ((0, heads), (heads, heads + kv_heads), (heads + kv_heads, heads + 2 * kv_heads)))
    elif len(k.shape) != 3 or k.shape[:2] != (b, s) or v.shape != k.shape:
        n.unsupported(f"key/value of shapes {list(k.shape)}/{list(v.shape)} (only [batch, {s}, kv_hidden] is supported)")
    qh = _split_heads(n, q, heads)
    kh, vh = (_split_heads(n, _cast(n, t, dtype), kv_heads) for t in (k, v))
    d = qh.shape[3]
    if kh.shape[3] != d or vh.shape[3] != d:
        n.fail(f"query head size {d} differs from the key/value head size {kh.shape[3]}")
    lp = 0
    if past_key is not None:
        if len(past_key.shape) != 4 or past_key.shape[:2] != (b, kv_heads) or past_key.shape[3] != d \
                or past_value.shape != past_key.shape:
            n.fail(f"past_key/past_value of shapes {list(past_key.shape)}/{list(past_value.shape)} are not "
                   f"BNSH [{b}, {kv_heads}, past, {d}]")
        lp = past_key.shape[2]
    total = int(n.value(total, "total_sequence_length").reshape(-1)[0])
    first = s == total
    if not first and s > 1 and b != 1:
        n.fail("batch_size must be 1 when sequence_length > 1 and past context is given")
    if not first and s != 1 and total != lp + s and total > lp:
        n.fail(f"total_sequence_length {total} is neither past {lp} + new {s} nor at most the past length")
    length = max(total, lp)
    if seqlens_k.shape != (b,):
        n.fail(f"seqlens_k of shape {list(seqlens_k.shape)} is not [{b}]")
    t = reshape(n, n.add("add", _cast(n, seqlens_k, torch.int64), n.const(1, dtype=torch.int64)), (b, 1, 1, 1))
    start = 0 if first else n.add("sub", t, n.const(s, dtype=torch.int64))   # P[b], [B, 1, 1, 1]

    if int(n.attr("do_rotary", 0)):
        if cos is None:
            n.fail("do_rotary=1 needs cos_cache and sin_cache")
        if len(cos.shape) != 2 or cos.shape != sin.shape or 2 * cos.shape[1] > d:
            n.fail(f"cos/sin caches of shapes {list(cos.shape)}/{list(sin.shape)} are not [max_positions, <= {d // 2}]")
        cos, sin = _cast(n, cos, dtype), _cast(n, sin, dtype)
        steps = torch.arange(s).reshape(1, s)
        if position_ids is not None:   # the first prompt reads only its first element, as ONNX Runtime does
            pos = _cast(n, position_ids, torch.int64)
            if first:
                pos = n.add("add", reshape(n, n.add("slice", reshape(n, pos, (pos.numel,)), axis=0, start=0, end=1, step=1),
                                           (1, 1)), n.const(steps))
            if tuple(pos.shape) != (b, s):
                pos = n.add("expand", pos, shape=(b, s))
        elif first:
            pos = n.const(steps.expand(b, s).contiguous())
        else:
            pos = n.add("add", reshape(n, start, (b, 1)), n.const(steps))
        qh, kh = _gqa_rotary(n, qh, pos, cos, sin), _gqa_rotary(n, kh, pos, cos, sin)
    elif cos is not None:
        n.fail("cos_cache/sin_cache are given without do_rotary=1")

    pk = None if past_key is None else _cast(n, past_key, dtype)
    pv = None if past_value is None else _cast(n, past_value, dtype)
    present_k, present_v = _gqa_place(n, pk, kh, start, length), _gqa_place(n, pv, vh, start, length)

    # the keep mask [B, 1, S, L]: key j below T[b], causal and in the local window of query i at P[b] + i
    j = n.const(torch.arange(length).reshape(1, 1, 1, length))
    keep = n.add("lt", j, t)
    causal = int(n.attr("causal", 1))
    window = int(n.attr("local_window_size", -1))
    if causal or window > 0:
        if not causal:
            n.fail("local_window_size needs causal=1")
        pos_i = n.const(torch.arange(s).reshape(1, 1, s, 1))
        pos_i = pos_i if isinstance(start, int) else n.add("add", pos_i, start)
        diff = n.add("sub", pos_i, j)                                  # P[b] + i - j
        keep = n.add("logical_and", keep, n.add("ge", diff, n.const(0, dtype=torch.int64)))
        if window > 0:
            keep = n.add("logical_and", keep, n.add("lt", diff, n.const(window, dtype=torch.int64)))
    mask = keep
    if attention_bias is not None:   # [B or 1, H or 1, S, total]: indexed by absolute key position
        ab = _cast(n, attention_bias, dtype)
        if len(ab.shape) != 4 or ab.shape[2] != s or ab.shape[3] != total or ab.shape[0] not in (1, b) \
                or ab.shape[1] not in (1, heads):
            n.fail(f"attention_bias of shape {list(ab.shape)} is not [batch or 1, num_heads or 1, {s}, {total}]")
        if length > total:
            ab = n.add("pad", ab, pads=[0, length - total], value=0.0)
        mask = n.add("where", keep, ab, n.const(-math.inf, dtype=dtype))
    scale = n.attr("scale")
    scale = 1.0 / math.sqrt(d) if not scale else float(scale)
    y = n.add("attention", qh, present_k, present_v, mask, scale=scale, causal=False, zero_masked=True)
    return [_merge_heads(n, y), present_k, present_v]


# -- ONNX Runtime's graph optimizer (EXTENDED level): a convolution or GEMM with its activation ---------

def _activation(n, y, name: str, params: list):
    """y through the activation ONNX Runtime fused into a FusedConv/FusedGemm (its MLAS activations),
    `params` its alpha, beta (or Clip's min, max)."""
    def p(i, default):
        return float(params[i]) if len(params) > i else default
    if not name:
        return y
    if name in ("Relu", "Sigmoid", "Tanh"):
        return n.add(name.lower(), y)
    if name == "LeakyRelu":
        return n.add("leaky_relu", y, alpha=p(0, 0.01))
    if name == "Clip":
        return n.add("clamp", y, min=p(0, -math.inf), max=p(1, math.inf))
    if name == "HardSigmoid":
        scaled = n.add("add", n.add("mul", y, n.const(p(0, 0.2), dtype=y.dtype)), n.const(p(1, 0.5), dtype=y.dtype))
        return n.add("clamp", scaled, min=0.0, max=1.0)
    n.unsupported(f"activation {name!r}")


@handler((MS, "FusedConv"))
def _fused_conv(n, x, w, b=None, z=None):
    """activation(Conv(x, w, b) + z): Conv's attributes, `activation` and `activation_params`."""
    y = HANDLERS["Conv"](n, x, w, b)
    if z is not None:
        y = n.add("add", y, z)
    return _activation(n, y, n.attr("activation", ""), list(n.attr("activation_params", [])))


@handler((MS, "FusedGemm"))
def _fused_gemm(n, a, b, c=None):
    """activation(Gemm(a, b, c)): Gemm's attributes, `activation`, `activation_alpha` and `_beta`."""
    y = HANDLERS["Gemm"](n, a, b, c)
    name = n.attr("activation", "")
    params = [n.attr("activation_alpha", 0.01 if name == "LeakyRelu" else 0.2)] if name in ("LeakyRelu", "HardSigmoid") \
        else []
    if name == "HardSigmoid":
        params.append(n.attr("activation_beta", 0.5))
    return _activation(n, y, name, params)


@handler((MS, "FusedMatMul"))
def _fused_matmul(n, a, b):
    """alpha * op(a) @ op(b), op a transpose of the last two dims where transA / transB say so."""
    if n.attr("transBatchA", 0) or n.attr("transBatchB", 0):
        n.unsupported("transBatchA/transBatchB")
    for name, t in (("transA", a), ("transB", b)):
        if n.attr(name, 0):
            if len(t.shape) < 2:
                n.fail(f"{name} on a rank-{len(t.shape)} input")
            perm = list(range(len(t.shape)))
            perm[-2:] = perm[-1], perm[-2]
            t = n.add("transpose", t, perm=perm)
            a, b = (t, b) if name == "transA" else (a, t)
    y = HANDLERS["MatMul"](n, a, b)
    alpha = float(n.attr("alpha", 1.0))
    return y if alpha == 1.0 else n.add("mul", y, n.const(alpha, dtype=y.dtype))
