"""Multi-head attention -> one fused attention kernel (MHA, GQA, MQA; padding and causal masks)."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL_TOL, Fn, assert_close, compiled


def mha(m, x, mask, heads=4, kv_heads=4):
    b, s, h = x.shape
    d = h // heads
    q = (x @ m.wq).view(b, s, heads, d).transpose(1, 2)
    k = (x @ m.wk).view(b, s, kv_heads, d).transpose(1, 2)
    v = (x @ m.wv).view(b, s, kv_heads, d).transpose(1, 2)
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, s, h)


def weights(h, kv):
    return {"wq": torch.randn(h, h) / h ** 0.5, "wk": torch.randn(h, kv) / h ** 0.5, "wv": torch.randn(h, kv) / h ** 0.5}


def padding_mask(b, s):
    mask = torch.zeros(b, 1, 1, s)
    for i in range(1, b):
        mask[i, ..., s - i:] = torch.finfo(torch.float32).min
    return mask


def causal_mask(b, s):
    return torch.full((s, s), torch.finfo(torch.float32).min).triu(1).expand(b, 1, s, s).clone()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("mask", [padding_mask, causal_mask])
@pytest.mark.parametrize("seq", [1, 7, 33])
def test_attention_fires(heads, kv_heads, mask, seq):
    h = 64
    model = Fn(lambda m, x, msk: mha(m, x, msk, heads, kv_heads), **weights(h, h // heads * kv_heads))
    cm = compiled(model, torch.randn(3, seq, h), mask(3, seq))
    rep = cm.report()
    assert rep.fusions.get("attention") == 1
    att = cm.graph.op_counts()
    assert att["attention"] == 1 and "softmax" not in att
    node = next(n for n in cm.graph.nodes if n.op == "attention")
    assert node.inputs[1].shape[1] == kv_heads         # the K/V repeat is folded into the kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_scores_scaled_by_an_inexact_float_fire(dtype):
    """1/sqrt(80) is not a float16/bfloat16 number: capture scales such scores in float32 (as eager
    does) and casts back, and the pattern reads the scale through the casts."""
    def fn(m, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 80 ** -0.5, dim=-1) @ v, \
            torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(80), dim=-1) @ v
    q, k, v = (torch.randn(1, 2, 16, 80).to(dtype) for _ in range(3))
    cm = compiled(Fn(fn), q, k, v)
    assert cm.report().fusions.get("attention") == 2
    f32 = lambda v: torch.tensor(v).item()        # the scale in float32, not rounded to the dtype
    assert [n.attrs["scale"] for n in cm.graph.nodes if n.op == "attention"] == [f32(80 ** -0.5), 1 / f32(math.sqrt(80))]


def test_sdpa_causal_and_gqa():
    def fn(m, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    cm = compiled(Fn(fn), torch.randn(2, 8, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16))
    rep = cm.report()
    assert rep.fusions == {"attention": 1}


def test_probabilities_used_elsewhere_is_a_near_miss():
    def fn(m, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
        return p @ v, p
    cm = compiled(Fn(fn), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    rep = cm.report()
    assert "attention" not in rep.fusions
    assert any(w.code == "shared_intermediate" and "softmax" in w.producer and "used outside" in w.detail
               for w in rep.why_not), rep.why_not


def test_mask_inside_the_scale_is_a_near_miss():
    def fn(m, q, k, v, mask):
        return torch.softmax((q @ k.transpose(-1, -2) + mask) * 0.25, dim=-1) @ v
    args = (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.zeros(1, 1, 1, 5))
    cm = compiled(Fn(fn), *args)
    rep = cm.report()
    assert "attention" not in rep.fusions
    assert any(w.code == "pattern_order" and "before the scaling" in w.detail for w in rep.why_not), rep.why_not


def test_no_score_matrix_is_materialised():
    """The attention kernel's planned memory holds no [B, H, L, L] buffer."""
    s, h = 256, 64
    model = Fn(lambda m, x, msk: mha(m, x, msk), **weights(h, h))
    cm = compiled(model, torch.randn(1, s, h), padding_mask(1, s))
    rep = cm.report()
    scores = 4 * s * s * 4
    assert all(k.bytes_after < scores for k in rep.kernels if k.name == "attention")
    assert rep.peak_bytes < scores


def test_decode_attention_with_fewer_tasks_than_threads_is_split(monkeypatch):
    """One query against a long KV cache with one KV head: the fission pass records split-KV."""
    import kfuse.backends.c.attention as att
    monkeypatch.setattr(att, "num_threads", lambda: 2)

    def fn(m, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 1, 4096, 64), torch.randn(1, 1, 4096, 64)
    cm = compiled(Fn(fn), q, k, v)
    rep = cm.report()
    assert len(rep.splits) == 1 and "split-KV" in rep.splits[0]
    cm2 = compiled(Fn(fn), torch.randn(1, 4, 64, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64))
    rep2 = cm2.report()
    assert rep2.splits == []


@pytest.mark.parametrize("causal", [False, True])
def test_split_kv_counts_the_kernels_own_query_blocks(causal, monkeypatch):
    """64 queries of one head over 2048 keys on 2 threads: one 64-query task unmasked (split-KV), four
    16-query tasks causal (enough for the threads, not split); the report says what the kernel runs."""
    import kfuse.kernels.attention as plan_module
    monkeypatch.setattr(plan_module, "num_threads", lambda: 2)

    def fn(m, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    q, k, v = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 2048, 64), torch.randn(1, 1, 2048, 64)
    cm = compiled(Fn(fn), q, k, v)
    assert len(cm.report().splits) == (0 if causal else 1)
    assert plan_module.plan(1, 1, 64, 2048, bq=plan_module.block_q(causal, False))[1] == (0 if causal else 4)
    q, k, v = (torch.randn_like(t) for t in (q, k, v))
    torch.testing.assert_close(cm(q, k, v), fn(None, q, k, v), rtol=1e-4, atol=1e-5)


def test_sdpa_of_one_tensor_and_of_k_as_v():
    """sdpa(x, x, x) and sdpa(q, k, k, mask): the kernel gets each of its operands, not the
    group's de-duplicated inputs in order."""
    x, q, k, m = torch.randn(1, 2, 13, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 1, 9, 11)
    rep = compiled(Fn(lambda _, x: F.scaled_dot_product_attention(x, x, x)), x).report()
    assert rep.fusions["attention"] == 1
    rep = compiled(Fn(lambda _, q, k, m: F.scaled_dot_product_attention(q, k, k, attn_mask=m)), q, k, m).report()
    assert rep.fusions["attention"] == 1


@pytest.mark.parametrize("lead", [(), (2, 3), (2, 1, 3)])
def test_attention_of_rank_3_and_above_runs_the_kernel(lead):
    """softmax(q kᵀ + bias) v over windows ([B, G, H, L, D], maxvit's; a bias [H, L, L] broadcast over
    B and G) and over 3-d [H, L, D]: the kernel runs with the leading dims as its batch, no fallback."""
    q, k, v = (torch.randn(*lead, 4, 7, 8) for _ in range(3))
    bias = torch.randn(4, 7, 7)

    def fn(m, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + m.bias, -1) @ v
    cm = compiled(Fn(fn, bias=bias), q, k, v)
    rep = cm.report()
    assert rep.fusions.get("attention") == 1 and not rep.fallbacks
    assert [ki.backend for ki in rep.kernels if "attention" in ki.name] == ["c:attention"]
    out = cm(q, k, v)
    assert out.shape == (*lead, 4, 7, 8)
    sdpa = F.scaled_dot_product_attention(q.reshape(-1, 4, 7, 8), k.reshape(-1, 4, 7, 8), v.reshape(-1, 4, 7, 8),
                                          attn_mask=bias)
    assert_close(out, sdpa.reshape(out.shape), **SMALL_TOL)


@pytest.mark.parametrize("dv", [4, 32])
def test_v_head_dim_other_than_qs_runs_the_kernel(dv):
    """v's head dim other than q's (LeViT's 16 and 32, DeepSeek's MLA 192 and 128): SDPA (causal too) and
    softmax(q kᵀ + bias) v run the C kernel, not torch, and give torch's numbers"""
    q, k, v = torch.randn(1, 2, 13, 16), torch.randn(1, 2, 13, 16), torch.randn(1, 2, 13, dv)
    bias = torch.randn(2, 13, 13)
    for fn in (lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               lambda m, q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.25 + m.bias, -1) @ v):
        cm = compiled(Fn(fn, bias=bias), q, k, v)
        rep = cm.report()
        assert [ki.backend for ki in rep.kernels if ki.name == "attention"] == ["c:attention"]
        out = cm(q, k, v)
        assert out.shape == (1, 2, 13, dv)
        assert_close(out, fn(Fn(fn, bias=bias), q, k, v), **SMALL_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_onnx_exported_sdpa_with_transposed_k(tmp_path, causal):
    """The legacy exporter writes SDPA as Transpose(K) * sqrt(scale): the fused kernel then sees a
    k whose last dim is strided, and copies it."""
    import kfuse
    lk = 11 if not causal else 13
    q, k, v = torch.randn(1, 2, 13, 8), torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 8)
    model = Fn(lambda _, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    path = tmp_path / "sdpa.onnx"
    torch.onnx.export(model, (q, k, v), str(path), dynamo=False)
    cm = kfuse.compile(str(path), (q, k, v))
    assert_close(cm(q, k, v), model(q, k, v), **SMALL_TOL)
    assert cm.report().fusions.get("attention") == 1


@pytest.mark.parametrize("lq, lk", [(3, 7), (7, 3), (1, 5)])
def test_sdpa_is_causal_with_unequal_lengths_keeps_torch_alignment(lq, lk):
    """torch's is_causal with lq != lk masks top-left (query i sees keys j <= i); kfuse's attention
    op aligns bottom-right (a KV cache's): the capture must say torch's meaning."""
    q, k, v = torch.randn(1, 2, lq, 8), torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 8)
    fn = Fn(lambda _, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert_close(compiled(fn, q, k, v)(q, k, v), fn(q, k, v))


def test_sdpa_rows_with_every_key_masked_are_zero_as_torch():
    """torch's SDPA gives 0 for a query whose keys are all masked (a left-padding row): so does the
    compiled model, bool or -inf mask, not softmax's NaN."""
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    keep[1, ..., :2] = False                  # batch 1: two padding keys, so query rows 0 and 1 see nothing
    for mask in (keep, torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))):
        fn = Fn(lambda _, q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
        want = fn(q, k, v, mask)
        assert (want[1, :, :2] == 0).all()
        assert_close(compiled(fn, q, k, v, mask)(q, k, v, mask), want)
