"""GEMMs with their epilogues (torch GEMM + epilogue), the Triton attention kernel (causal, masks,
GQA, fp32/fp16/bf16), and the built-in BERT, GPT-2 and Llama compiled with backend="triton"."""
import pytest
import torch
import torch.nn.functional as F

import kfuse
from kfuse.backends.triton.attention import attention
from kfuse.models import build
from kfuse.ops.reference import REFERENCE

from helpers import SMALL_TOL, assert_close
from triton_helpers import check


@pytest.mark.parametrize("act", [torch.nn.Identity, torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh])
def test_linear_epilogue(act):
    m = torch.nn.Sequential(torch.nn.Linear(24, 40), act())
    cm = check(m, [torch.randn(2, 5, 24)], tol={"atol": 1e-5, "rtol": 1e-5})
    (k,) = [k for k in cm.report().kernels if k.backend.startswith("library")]
    assert k.backend.startswith("library:torch.mm+bias"), k.backend


def _attn_inputs(B, H, Hkv, Lq, Lk, D, dtype):
    q = torch.randn(B, H, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
# odd sizes (every block at an edge) and sizes that are whole blocks (the unmasked loop: whole key blocks
# seen by every query, then the causal diagonal; Lk > Lq shifts the diagonal)
@pytest.mark.parametrize("shape", [(1, 2, 2, 5, 5, 16), (2, 4, 2, 70, 70, 32), (1, 4, 1, 3, 80, 24),
                                   (1, 2, 1, 128, 192, 32), (2, 2, 2, 64, 64, 64)])
@pytest.mark.parametrize("scale", [0.3, -0.2])     # a positive scale is folded into exp2's argument
def test_attention_kernel(shape, causal, scale):
    q, k, v = _attn_inputs(*shape, torch.float32)
    out = torch.full_like(q, float("nan"))
    attention(q, k, v, scale=scale, causal=causal, out=out)
    want = REFERENCE["attention"](q, k, v, scale=scale, causal=causal)
    assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 1, 200, 32), (1, 2, 1, 5, 131, 16), (1, 2, 2, 3, 20, 24),
                                   (2, 8, 2, 5, 70, 16)])
def test_attention_split_keys(shape, causal, splits, pack):
    # decoding: a few queries, keys split over programs whose partial softmaxes kf_combine merges
    # (8 splits of 20 keys: more splits than key blocks, clamped); masks and fully masked rows too.
    # pack: the rows of a tile are the (query head, query) pairs of one kv head (4 heads x 5 queries:
    # two 16-row tiles, the second part empty), each row with its own head's mask row
    for _ in range(2):          # the second call of a shape: through the compiled kernels directly (on a GPU)
        q, k, v = _attn_inputs(*shape, torch.float32)
        want = REFERENCE["attention"](q, k, v, scale=0.3, causal=causal)
        assert_close(attention(q, k, v, scale=0.3, causal=causal, splits=splits, pack=pack), want, atol=1e-5,
                     rtol=1e-5)
    B, H, _, Lq, Lk, _ = shape
    mask = torch.rand(B, H, Lq, Lk) > 0.5
    mask[:, 0, 0, :] = False                                  # head 0's query 0 sees no key: NaN, or 0 as SDPA
    for zero in (False, True):
        got = attention(q, k, v, mask, scale=0.3, zero_masked=zero, splits=splits, pack=pack)
        want = REFERENCE["attention"](q, k, v, mask, scale=0.3)
        if zero:
            want = torch.nan_to_num(want, nan=0.0)
        assert_close(got, want, atol=1e-5, rtol=1e-5)
    additive = torch.randn(1, H, 1, Lk)
    assert_close(attention(q, k, v, additive, scale=0.3, splits=splits, pack=pack),
                 REFERENCE["attention"](q, k, v, additive, scale=0.3), atol=1e-5, rtol=1e-5)
    assert_close(attention(q, k, v, additive, scale=0.3, causal=True, splits=splits, pack=pack),
                 REFERENCE["attention"](q, k, v, additive, scale=0.3, causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lq, lk", [(9, 67), (64, 128)])
@pytest.mark.parametrize("kind", ["additive", "bool"])
def test_attention_masks(kind, lq, lk):
    q, k, v = _attn_inputs(2, 3, 3, lq, lk, 16, torch.float32)
    if kind == "bool":
        mask = torch.rand(2, 1, lq, lk) > 0.3
        mask[..., 0] = True
    else:
        mask = torch.randn(1, 3, 1, lk)      # broadcast over batch and queries
    out = attention(q, k, v, mask, scale=0.25)
    assert_close(out, REFERENCE["attention"](q, k, v, mask, scale=0.25), atol=1e-5, rtol=1e-5)


def test_attention_fully_masked_row_is_nan_as_softmax_or_zero_as_sdpa():
    q, k, v = _attn_inputs(1, 1, 1, 4, 6, 16, torch.float32)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    out = attention(q, k, v, mask, scale=0.25)
    want = REFERENCE["attention"](q, k, v, mask, scale=0.25)
    assert torch.isnan(out[0, 0, 2]).all() and torch.isnan(want[0, 0, 2]).all()
    assert_close(out, want, atol=1e-5, rtol=1e-5)
    out = attention(q, k, v, mask, scale=0.25, zero_masked=True)
    assert (out[0, 0, 2] == 0).all() and not out.isnan().any()
    assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25),
                 atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half(dtype):
    q, k, v = _attn_inputs(1, 4, 2, 33, 40, 32, dtype)
    out = attention(q, k, v, scale=32 ** -0.5, causal=True)
    assert out.dtype == dtype
    want = REFERENCE["attention"](q.float(), k.float(), v.float(), scale=32 ** -0.5, causal=True)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_attention_in_a_model_writes_head_merged_layout():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    cm = check(Attn(), list(_attn_inputs(2, 2, 2, 7, 7, 16, torch.float32)), tol=SMALL_TOL)
    assert "triton:attention" in {k.backend for k in cm.report().kernels}


SMALL = {"bert": dict(layers=2, hidden=64, heads=4, ffn=128), "gpt2": dict(layers=2, hidden=64, heads=4),
         "llama": dict(layers=2, hidden=64, heads=4)}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_builtin_model(name):
    try:
        model, inputs = build(name, batch=2, seq=16, **SMALL[name])
    except TypeError:            # a model that does not take these size arguments: its own small config
        model, inputs = build(name, batch=2, seq=16, layers=2)
    model.eval()
    cm = kfuse.compile(model, inputs, backend="triton")
    with torch.no_grad():
        want = model(*inputs)
    assert_close(cm(*inputs), want, atol=1e-4, rtol=1e-4)
    v = cm.verify(*inputs)
    assert v.ok and v.max_rel <= 1e-4, v
    backends = {k.backend for k in cm.report().kernels}
    assert "triton" in backends and any(b.startswith("library:torch") for b in backends), backends
    assert not cm.report().fallbacks, cm.report().fallbacks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["head_split_view", "per_batch_positions", "per_head", "rank3", "one_position"])
def test_rope_kernel_strided_and_broadcast(dtype, case):
    from kfuse.backends.triton.rope import rope
    if case == "head_split_view":           # q as a head-split view of [B, S, H, D]; cos [S, D]
        x = torch.randn(2, 9, 3, 20, dtype=dtype).transpose(1, 2)
        cos, sin = torch.randn(9, 20, dtype=dtype), torch.randn(9, 20, dtype=dtype)
    elif case == "per_batch_positions":     # cos/sin [B, 1, S, D] (position ids per sequence), 37 positions
        x = torch.randn(2, 5, 37, 12, dtype=dtype)
        cos, sin = torch.randn(2, 1, 37, 12, dtype=dtype), torch.randn(2, 1, 37, 12, dtype=dtype)
    elif case == "per_head":                # cos/sin varying across heads too: read once per head
        x = torch.randn(2, 5, 11, 16, dtype=dtype)
        cos, sin = torch.randn(5, 11, 16, dtype=dtype), torch.randn(5, 11, 16, dtype=dtype)
    elif case == "rank3":
        x = torch.randn(3, 70, 8, dtype=dtype)
        cos, sin = torch.randn(70, 8, dtype=dtype), torch.randn(70, 8, dtype=dtype)
    else:                                   # decoding: one position, a cos row broadcast over batch and heads
        x = torch.randn(4, 6, 1, 16, dtype=dtype)
        cos, sin = torch.randn(1, 16, dtype=dtype), torch.randn(1, 16, dtype=dtype)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    for _ in range(2):          # the second call of a shape: through the compiled kernel directly (on a GPU)
        out = torch.full(x.shape, float("nan"), dtype=dtype)
        rope(x, cos, sin, out=out)
        want = REFERENCE["rope"](x.float(), cos.float(), sin.float())
        torch.testing.assert_close(out.float(), want, **tol)
        x, cos, sin = (t.clone().mul_(-1.5) for t in (x, cos, sin))    # other values, the same strides


def test_triton_missing_is_a_clear_error(monkeypatch):
    from kfuse.backends.triton import kernel as tk
    from kfuse.errors import KfuseError
    monkeypatch.setattr(tk, "triton_version", lambda: None)
    with pytest.raises(KfuseError, match="needs Triton"):
        kfuse.compile(torch.nn.ReLU(), (torch.randn(3),), backend="triton")
