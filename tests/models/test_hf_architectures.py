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


# encoders and vision / audio models, each with a form the built-in models lack: DeBERTa-v2's disentangled
# relative-position attention, Swin's shifted windows, Wav2Vec2's strided 1-D convolutions and grouped
# positional convolution, Segformer's spatial-reduction attention and overlapping patch embeddings, FNet's
# Fourier token mixing (torch.fft.fftn)
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
ENCODERS = {
    "deberta_v2": ("DebertaV2Config", "DebertaV2Model", TEXT, "text"),
    "swin": ("SwinConfig", "SwinModel", dict(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                                             window_size=4), {"pixel_values": IMAGES}),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", dict(TEXT, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
                 {"input_values": torch.randn(2, 800, generator=torch.Generator().manual_seed(3))}),
    "segformer": ("SegformerConfig", "SegformerModel", dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                            hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                                                            patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]),
                  {"pixel_values": IMAGES}),
    "fnet": ("FNetConfig", "FNetModel", dict(TEXT, tpu_short_seq_length=13),
             {"input_ids": torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(4))}),
}


@pytest.mark.parametrize("arch", sorted(ENCODERS))
def test_encoder_architecture_matches_eager(arch):
    config, model_class, size, inputs = ENCODERS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config)(**size)).eval()
    if inputs == "text":
        g = torch.Generator().manual_seed(1)
        inputs = dict(input_ids=torch.randint(0, 300, (2, 13), generator=g), attention_mask=torch.ones(2, 13, dtype=torch.long))
        inputs["attention_mask"][1, :4] = 0
    cm = kfuse.compile(model, (), inputs)
    with torch.no_grad():
        want = model(**inputs)
    got = cm(**inputs)
    want_leaves, got_leaves = pytree.tree_leaves(want), pytree.tree_leaves(got)
    assert len(got_leaves) == len(want_leaves) >= 1
    for w, o in zip(want_leaves, got_leaves):
        assert float(w.abs().max()) > 0        # a model whose output is all zeros would check nothing
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
    assert sum(k.backend.startswith("c") for k in cm.report().kernels) >= 5     # fused C kernels ran


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
