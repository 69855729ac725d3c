"""Hugging Face architectures beyond the built-in ones, from small configs with seeded random weights,
through kfuse.compile with the fused backend: each matches eager, KV caches included (the model's
default use_cache=True returns a DynamicCache / EncoderDecoderCache, rebuilt from kfuse's outputs).
Each one covers forms the others do not: Falcon's fused-QKV split by negative indices, Mixtral's
mixture-of-experts routing (histc, transformers' grouped-GEMM custom op, an inverse permutation
through torch.empty), an encoder-decoder cache."""
import copy

import pytest
import torch
from torch.utils import _pytree as pytree

import kfuse

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)
ARCHS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                   bos_token_id=0, eos_token_id=0)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(TEXT, multi_query=True, parallel_attn=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(TEXT, num_key_value_heads=2, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "bart": ("BartConfig", "BartModel", dict(vocab_size=300, d_model=64, encoder_layers=1, decoder_layers=1,
                                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                             decoder_ffn_dim=128, max_position_embeddings=128)),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_matches_eager_with_its_cache(arch):
    config, model_class, size = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config)(**size)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(input_ids=torch.randint(0, 300, (2, 13), generator=g), attention_mask=torch.ones(2, 13, dtype=torch.long))
    inputs["attention_mask"][1, :4] = 0                                   # left padding in row 1
    cm = kfuse.compile(model, (), inputs)
    with torch.no_grad():
        want = model(**inputs)
    got = cm(**inputs)
    assert type(got) is type(want)
    cache = getattr(want, "past_key_values", None)
    assert cache is not None and type(got.past_key_values) is type(cache)
    want_leaves, got_leaves = pytree.tree_leaves(want), pytree.tree_leaves(got)
    assert len(got_leaves) == len(want_leaves) > 2
    for w, o in zip(want_leaves, got_leaves):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


def test_decode_step_with_a_cache_among_the_inputs():
    """A decode step called with past_key_values (a DynamicCache) flattens the cache into inputs and
    returns the grown cache. (Eager also grows the passed cache object in place; kfuse, like
    torch.export, returns the new cache and leaves the passed one as it was.)"""
    config, model_class, size = ARCHS["gpt2"]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config)(**size)).eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        past = model(input_ids=ids).past_key_values
    step = lambda cache: dict(input_ids=ids[:, :1], past_key_values=cache)
    cm = kfuse.compile(model, (), step(copy.deepcopy(past)))
    with torch.no_grad():
        want = model(**step(copy.deepcopy(past)))
    got = cm(**step(copy.deepcopy(past)))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    assert [t.shape[-2] for t in pytree.tree_leaves(got.past_key_values)] == [10] * 4
    for w, o in zip(pytree.tree_leaves(want.past_key_values), pytree.tree_leaves(got.past_key_values)):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-4)
