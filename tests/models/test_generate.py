"""LLM decoding through `torch.compile(model.forward, backend="kfuse")` under torch.compile's default
(dynamic) settings: Hugging Face generate() with its dynamic KV cache and with StaticCache gives
eager's tokens, with a handful of compilations, not one per length."""
from __future__ import annotations

import gc
import operator

import pytest
import torch

import kfuse.config
import kfuse.dynamo
import kfuse.runtime.kvcache

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _model(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, max_position_embeddings=64)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=8)).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _generate(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def _compiled_generate(model, ids, n, **kw) -> list:
    """Greedy generate() of n tokens with model.forward compiled by kfuse, checked against eager's
    tokens; the Dynamo graphs it compiled."""
    want = _generate(model, ids, n, **kw)
    before = kfuse.dynamo.compiled_count()
    model.forward = torch.compile(model.forward, backend="kfuse")
    assert torch.equal(_generate(model, ids, n, **kw), want)
    return kfuse.dynamo.compilations(since=before)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_generate_matches_eager(arch, cache):
    model = _model(arch)
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    ids = torch.randint(1, VOCAB, (1, 7))
    want = _generate(model, ids, 12, **kw)
    before = kfuse.dynamo.compiled_count()
    model.forward = torch.compile(model.forward, backend="kfuse")
    got = _generate(model, ids, 12, **kw)
    assert torch.equal(got, want)
    graphs = kfuse.dynamo.compilations(since=before)
    assert 1 <= len(graphs) <= 4, [g.summary() for g in graphs]
    assert all(g.strategy != "torch" or g.n_ops < 40 for g in graphs), [g.summary() for g in graphs]
    assert not any(s.fallback for g in graphs for s in g._segments), [g.summary() for g in graphs]
    # a second generate of the same prompt length compiles nothing more: no program per length
    programs = sum(g.programs() for g in graphs)
    assert torch.equal(_generate(model, ids, 12, **kw), want)
    assert kfuse.dynamo.compiled_count() == before + len(graphs)
    assert sum(g.programs() for g in graphs) == programs


# architectures whose decode graphs differ from the three above: Gemma-2 (logit soft-capping, a sliding
# window on alternate layers, a scaled embedding), BLOOM (ALiBi position bias, no rotary), Phi (partial
# rotary, parallel attention and MLP), GPT-J (interleaved rotary on part of the head), DeepSeek-V3 (multi-head
# latent attention: low-rank q and kv projections, v's head dim 24 against q's and k's 48)
MORE = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                          sliding_window=8, max_position_embeddings=64)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                                num_attention_heads=4, max_position_embeddings=64)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        first_k_dense_replace=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=24, max_position_embeddings=64)),
}


@pytest.mark.parametrize("arch", sorted(MORE))
def test_generate_matches_eager_on_more_architectures(arch):
    config, model_class, size = MORE[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, config)(**size, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = getattr(transformers, model_class)(cfg).eval()
    graphs = _compiled_generate(model, torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3)), 12)
    assert 1 <= len(graphs) <= 4, [g.summary() for g in graphs]
    assert not any(s.fallback for g in graphs for s in g._segments), [g.summary() for g in graphs]


def test_sampling_on_the_compiling_call_draws_eagers_numbers(tmp_path, monkeypatch):
    """generate(do_sample=True) compiles on its first call, inside the user's seeded run: the
    compile (its kernel choices timed on random inputs: an empty cache) draws nothing from torch's
    generator, so the sampled tokens are eager's."""
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kfuse.config, "_config", kfuse.config.from_env())
    model = _model("llama")
    ids = torch.randint(1, VOCAB, (2, 6))

    def sample():
        torch.manual_seed(5)
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=True, top_k=5, pad_token_id=0)
    want = sample()
    model.forward = torch.compile(model.forward, backend="kfuse")
    assert torch.equal(sample(), want)


def test_layers_of_a_decode_graph_share_one_export(monkeypatch):
    """A partitioned decode graph's static segments between attentions are one per layer, equal but
    for their weights: they are exported once and converted with each layer's weights."""
    import kfuse.capture.fx as fx
    exports = []
    exported = fx.exported
    monkeypatch.setattr(fx, "exported", lambda *a, **k: exports.append(a[0]) or exported(*a, **k))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=5, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, max_position_embeddings=64)).eval()
    graphs = _compiled_generate(model, torch.randint(1, VOCAB, (1, 6)), 6)
    decode = [g for g in graphs if g.strategy == "partitioned"]
    assert decode, [g.summary() for g in graphs]
    segments = [s for s in decode[0]._segments if s.builds]
    sizes = [len(s.fn.graph.nodes) for s in segments]
    layers = [s for s, n in zip(segments, sizes) if n == max(set(sizes), key=sizes.count)]
    assert len(layers) == 4, sizes        # between each two of the five layers' attentions
    assert len(decode[0]._exports) == len(segments) - len(layers) + 1, "the layers' segments share one export"
    assert sum(1 for m in exports if getattr(m, "kfuse_export", None) is not None) == \
        sum(len(g._exports) for g in decode)


def test_recompiled_graph_reuses_the_programs_of_identical_segments():
    """Mistral's dynamic cache from a 3-token prompt: Dynamo compiles the decode graph again (a guard on
    the length, again once the cache passes the sliding window); the static segments it repeats, over
    the same weights, run the programs already compiled rather than compile again."""
    graphs = _compiled_generate(_model("mistral"), torch.randint(1, VOCAB, (1, 3)), 12)
    segments = [s for g in graphs for s in g._segments]
    reused = [s for s in segments if s.reused]
    assert reused and all(s.builds == 0 and s.programs == 0 for s in reused), [g.summary() for g in graphs]
    assert any("identical segment of another graph" in g.summary() for g in graphs)
    assert sum(g.programs() for g in graphs) == sum(s.builds for s in segments)


def test_decode_graph_is_partitioned_and_fused():
    """With the dynamic cache, the decode step's KV length is symbolic: the projections, norms and
    MLP run as static kfuse programs, only the cache concatenation and attention over it by torch."""
    graphs = _compiled_generate(_model("llama"), torch.randint(1, VOCAB, (2, 5)), 10)
    decode = [g for g in graphs if g.strategy == "partitioned"]
    assert decode, [g.summary() for g in graphs]
    fused = {name for g in decode for r in g.reports() for name in r.fusions}
    assert any("rmsnorm" in f for f in fused) and "gemm_swiglu" in fused, fused
    assert decode[0].static_share > 0.8
    assert decode[0].n_symbolic_ops < decode[0].n_ops / 4
    # each layer's cache update and attention: one call, the new rows written by the attention kernel
    torch_parts = [m for m in decode[0]._run.children() if isinstance(m, torch.fx.GraphModule)]
    calls = [n.target for m in torch_parts for n in m.graph.nodes if n.op == "call_function"]
    assert calls.count(kfuse.dynamo.sdpa_appending) == 2 and kfuse.runtime.kvcache.append not in calls, calls
    # and nothing else splits the step: a kfuse program before, between and after the two attentions
    # (the cache's unused numel dropped, the cache lengths' + 1 moved beside the attention)
    run = decode[0]._run.graph.nodes
    assert [n.op for n in run if n.op in ("call_module", "call_function") and n.target is not operator.getitem] == \
        ["call_function", "call_module"] * 2 + ["call_function"], decode[0]._run.code


def test_sliding_window_decode_writes_its_cache_in_place():
    """Mistral's dynamic cache keeps the last w rows of cat([past, new]): before and after the window
    fills, each layer's cache update and attention is one sdpa_appending call, reading the keys
    unrepeated (enable_gqa, not repeat_kv's copies, also where a sliding mask is given), and the cache
    is a view of a buffer that the step writes into."""
    graphs = _compiled_generate(_model("mistral"), torch.randint(1, VOCAB, (1, 5)), 12)
    decode = [g for g in graphs if any(c.cat.target is kfuse.runtime.kvcache.append for c in g._appends.values())]
    assert len(decode) >= 2, [g.summary() for g in graphs]          # symbolic lengths before and after the window fills
    masked = False
    for g in decode:      # the parts torch runs (the static ones are kfuse programs)
        nodes = [n for c in g._run.graph.nodes if c.op == "call_module" for n in getattr(g._run, c.target).graph.nodes]
        appending = [n for n in nodes if n.target is kfuse.dynamo.sdpa_appending]
        assert len(appending) == 2 and all(n.kwargs.get("enable_gqa") for n in appending), g._run.code
        assert not any(n.target in ("expand", kfuse.runtime.kvcache.append) for n in nodes), g._run.code
        assert sum(n.target is kfuse.runtime.kvcache.window for n in nodes) == 4
        masked = masked or any(n.kwargs.get("attn_mask") is not None for n in appending)
    assert masked, "past the window, the sliding mask goes to the attention kernel"
    # step by step: eager's logits, and the window's buffer kept from the second step on (the window
    # moves along it), through the window filling (8 rows) and past it
    torch._dynamo.reset()       # Dynamo's recompile limit counts the generate()'s graphs above
    model, ids = _model("mistral"), torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        wants = [model(ids, use_cache=True)]
        for i in range(9):
            wants.append(model(ids[:, i % 5:i % 5 + 1], past_key_values=wants[-1].past_key_values, use_cache=True))
        forward = torch.compile(model.forward, backend="kfuse")
        out, storages = forward(ids, use_cache=True), []
        for i in range(9):
            out = forward(ids[:, i % 5:i % 5 + 1], past_key_values=out.past_key_values, use_cache=True)
            torch.testing.assert_close(out.logits, wants[i + 1].logits, rtol=1e-4, atol=1e-5)
            storages.append([t.untyped_storage().data_ptr() for t in _cache_tensors(out.past_key_values)])
    for got, ref in zip(_cache_tensors(out.past_key_values), _cache_tensors(wants[-1].past_key_values)):
        assert got.shape == ref.shape == (1, 2, 7, 16)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert all(s == storages[1] for s in storages[1:]), storages


def test_static_cache_written_in_place():
    """StaticCache's index_copy_ into the cache becomes an in-place index_put: the new rows are
    written into the cache tensor (same storage), no copy of the whole cache per token."""
    graphs = _compiled_generate(_model("llama"), torch.randint(1, VOCAB, (1, 6)), 6, cache_implementation="static")
    programs = [s.cm._last for g in graphs for s in g._segments if s.cm is not None]
    inplace = [n for p in programs for n in p.graph.nodes if n.op == "index_put" and n.attrs.get("inplace")]
    assert len(inplace) >= 4, "2 layers x (keys, values) written in place by the decode step"
    assert any(p.graph.mutated for p in programs)


def test_dynamic_true():
    model = _model("gpt2")
    ids = torch.randint(1, VOCAB, (1, 6))
    want = _generate(model, ids, 8)
    before = kfuse.dynamo.compiled_count()
    model.forward = torch.compile(model.forward, backend="kfuse", dynamic=True)
    assert torch.equal(_generate(model, ids, 8), want)
    assert kfuse.dynamo.compilations(since=before)
    # kfuse keeps no compiled graph (nor its weights) alive once Dynamo lets go of it
    torch._dynamo.reset()
    gc.collect()
    assert kfuse.dynamo.compilations(since=before) == []


def test_weights_are_frozen_but_changes_are_seen():
    """Parameters compile in as constants; an in-place change (or another model's parameters
    reaching the same compiled code) compiles again instead of using stale weights."""
    model = _model("gpt2")
    ids = torch.randint(1, VOCAB, (1, 5))
    compiled = torch.compile(model, backend="kfuse")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
        model.lm_head.weight.mul_(0.5)
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
        other = _model("gpt2")
        for p in other.parameters():
            p.add_(0.01)
        compiled_other = torch.compile(other, backend="kfuse")
        torch.testing.assert_close(compiled_other(ids).logits, other(ids).logits, rtol=1e-4, atol=1e-5)


def test_backend_options_are_checked():
    model = _model("gpt2")
    compiled = torch.compile(model, backend="kfuse", options={"pattern": False})
    with pytest.raises(Exception, match="unknown option 'pattern'"):
        compiled(torch.randint(1, VOCAB, (1, 4)))


@pytest.fixture
def exports(monkeypatch):
    """The dynamic_shapes of each torch.export kfuse makes."""
    calls, real = [], torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(k.get("dynamic_shapes")) or real(*a, **k))
    return calls


def test_encoder_with_dynamic_sizes_runs_static_programs(exports):
    """An encoder whose every op depends on the sequence length is specialised per size set: each
    length runs a static kfuse program (the static path's speed), converted from one export with
    the length symbolic (no trace per length), and the summary says so."""
    from kfuse.models import build
    from helpers import assert_close
    model, (ids, mask) = build("bert", batch=1, seq=16, layers=1)
    before = kfuse.dynamo.compiled_count()
    compiled = torch.compile(model, backend="kfuse", dynamic=True)
    with torch.no_grad():
        for seq in (16, 24, 16, 37):
            ids, mask = torch.randint(1, 100, (1, seq)), torch.ones(1, seq, dtype=torch.long)
            assert_close(compiled(ids, mask), model(ids, mask))
    graphs = kfuse.dynamo.compilations(since=before)
    assert [g.strategy for g in graphs] == ["specialised"], [g.summary() for g in graphs]
    assert graphs[0].programs() == 3 and "3 size set(s)" in graphs[0].summary()
    assert "each converted from one export with symbolic sizes" in graphs[0].summary()
    assert len(exports) == 1 and exports[0] is not None, exports
    assert any(r.fusions for r in graphs[0].reports())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompts_of_new_lengths_trace_nothing(arch, exports):
    """generate() over prompts of several lengths: eager's tokens, and a prompt of a new length
    converts the one symbolic export of the prefill graph instead of tracing the model again."""
    model = _model(arch)
    prompts = [torch.randint(1, VOCAB, (1, n)) for n in (7, 11, 5, 19)]
    want = [_generate(model, p, 4) for p in prompts]
    before = kfuse.dynamo.compiled_count()
    model.forward = torch.compile(model.forward, backend="kfuse")
    got = [_generate(model, p, 4) for p in prompts[:2]]
    graphs = kfuse.dynamo.compilations(since=before)
    n_exports = len(exports)
    got += [_generate(model, p, 4) for p in prompts[2:]]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(exports) == n_exports, "prompts of new lengths traced the model again"
    prefill = [g for g in kfuse.dynamo.compilations(since=before) if g.strategy == "specialised"]
    assert len(prefill) == 1 and prefill[0].programs() == 3, [g.summary() for g in graphs]
    assert len(kfuse.dynamo.compilations(since=before)) <= 4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padded_batch_generate(arch):
    """Left-padded prompts: the padding positions' queries see no key (torch's SDPA gives 0 there,
    not NaN, and NaN would reach every later token through 0 * NaN)."""
    model = _model(arch)
    ids = torch.randint(1, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    kw = dict(attention_mask=mask, pad_token_id=0)
    want = _generate(model, ids, 8, **kw)
    model.forward = torch.compile(model.forward, backend="kfuse")
    assert torch.equal(_generate(model, ids, 8, **kw), want)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_beam_search_matches_eager(arch):
    """Beam search reorders the cache between steps (every layer's keys and values indexed by the beams
    kept), so a step's past is a fresh tensor, not the view of a buffer with spare rows the step before
    returned: the cache write must notice and still give eager's beams."""
    model = _model(arch)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    graphs = _compiled_generate(model, ids, 10, num_beams=3)
    assert 1 <= len(graphs) <= 4, [g.summary() for g in graphs]
    assert not any(s.fallback for g in graphs for s in g._segments), [g.summary() for g in graphs]


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("dynamic", [None, True])
def test_dynamic_cache_grows_in_place(dynamic):
    """DynamicCache's torch.cat([past, new], -2) per layer comes back as a view of a buffer with spare
    rows, and from the second decode step on each step writes only the new row into it: the cache
    tensors keep their memory, the values are eager's, and the compilations are as many as before."""
    model = _model("gpt2")
    ids = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        want = model(ids, use_cache=True)
        wants = [want]
        for i in range(5):
            wants.append(model(ids[:, i:i + 1], past_key_values=wants[-1].past_key_values, use_cache=True))
    eager_cache = _cache_tensors(wants[-1].past_key_values)
    before = kfuse.dynamo.compiled_count()
    forward = torch.compile(model.forward, backend="kfuse", dynamic=dynamic)
    with torch.no_grad():
        out = forward(ids, use_cache=True)
        addresses = []
        for i in range(5):
            out = forward(ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            torch.testing.assert_close(out.logits, wants[i + 1].logits, rtol=1e-4, atol=1e-5)
            addresses.append([t.data_ptr() for t in _cache_tensors(out.past_key_values)])
    cache = _cache_tensors(out.past_key_values)
    for got, ref in zip(cache, eager_cache):
        assert got.shape == ref.shape == (1, 4, 11, 16)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        assert got.untyped_storage().nbytes() > got.numel() * 4          # spare rows behind the view
    assert addresses[1] == addresses[2] == addresses[3] == addresses[4]
    assert len(kfuse.dynamo.compilations(since=before)) <= 3


def test_other_concatenations_of_an_input_get_no_spare_rows():
    """A graph returning torch.cat([input, y], -2) that is not a cache kfuse started keeps torch.cat's
    result: no buffer with spare rows for tensors that are not caches."""
    f = torch.compile(lambda x, y: (torch.cat([x, y * 2], dim=-2),), backend="kfuse")
    for n in (3, 4, 5):              # static, then symbolic sizes (partitioned or torch)
        x, y = torch.randn(2, 3, n, 8), torch.randn(2, 3, 1, 8)
        (out,) = f(x, y)
        torch.testing.assert_close(out, torch.cat([x, y * 2], -2))
        assert out.untyped_storage().nbytes() == out.numel() * 4


def test_sdpa_of_a_decode_step_matches_torch():
    """kfuse.dynamo.sdpa (the decode step's attention over a symbolic KV length) and sdpa_appending
    (the cache appends inside it) equal torch's SDPA over torch.cat, for GQA, masks, strided rows, and
    inputs the kernel does not take (a batch that only broadcasts, float64: torch runs them)."""
    from kfuse.dynamo import sdpa, sdpa_appending
    F = torch.nn.functional
    q, past = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 9, 16)
    new = torch.randn(2, 1, 2, 16).transpose(1, 2)
    mask = torch.randn(2, 1, 1, 10)
    for m in (None, mask, mask > 0):
        want = F.scaled_dot_product_attention(q, torch.cat([past, new], -2), torch.cat([past, new], -2), m,
                                              enable_gqa=True)
        cache_k, cache_v = kfuse.runtime.kvcache.adopt(past, -2), kfuse.runtime.kvcache.adopt(past.clone(), -2)
        got, k, v = sdpa_appending(q, [cache_k, new], [cache_v, new], m, enable_gqa=True, dim=-2)
        torch.testing.assert_close(got, want)
        assert torch.equal(k, torch.cat([past, new], -2)) and torch.equal(v, k) and k.data_ptr() == cache_k.data_ptr()
    k1 = torch.randn(1, 2, 9, 16)
    torch.testing.assert_close(sdpa(q, k1, k1, enable_gqa=True), F.scaled_dot_product_attention(q, k1, k1, enable_gqa=True))
    q64, k64 = q.double(), past.double()
    torch.testing.assert_close(sdpa(q64, k64, k64, enable_gqa=True),
                               F.scaled_dot_product_attention(q64, k64, k64, enable_gqa=True))


def test_static_cache_prompts_either_side_of_the_sliding_window():
    """Mistral with a static cache: a prompt longer than the window, then a shorter one (its graph returns
    the cache lengths as Python ints beside the cache writes: they had been put one output off)."""
    model = _model("mistral")
    long, short = torch.randint(1, VOCAB, (1, 12)), torch.randint(1, VOCAB, (1, 5))
    want = [_generate(model, ids, 6, cache_implementation="static") for ids in (long, short)]
    model.forward = torch.compile(model.forward, backend="kfuse")
    got = [_generate(model, ids, 6, cache_implementation="static") for ids in (long, short)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("positional", [True, False])
def test_cache_concatenation_with_a_positional_dim(positional):
    """torch.cat([past, new], -2) with the dim positional, as much user code writes it, in a decode step
    kfuse partitions: the append kept its positional -2 beside dim= and failed from the first symbolic
    length ("append() got multiple values for argument 'dim'")."""
    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k, self.o = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x, past):
            new = self.k(x).view(1, 1, -1, 16)
            k = torch.cat([past, new], -2) if positional else torch.cat([past, new], dim=-2)
            return self.o(x) + k.mean(), k
    torch.manual_seed(0)
    m = Step().eval()
    f = torch.compile(m, backend="kfuse")
    want = got = torch.zeros(1, 1, 0, 16)
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(1, 16)
            (ye, want), (yg, got) = m(x, want), f(x, got)
            torch.testing.assert_close(yg, ye)
            torch.testing.assert_close(got, want)
