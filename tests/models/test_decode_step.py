"""A decode step as one C call (kfuse/dynamo_step.py): generate() through torch.compile(backend="kfuse") gives
eager's tokens with the step serving the decode calls, and every call the step cannot serve as set up (a
weight changed, a cache that must regrow, another caller in it, a first call that differs) runs as
partitioned, with the same tokens."""
from __future__ import annotations

import operator

import pytest
import torch
from test_generate import VOCAB, _compiled_generate, _generate, _model, fresh_dynamo  # noqa: F401

import kfuse.config
import kfuse.dynamo
import kfuse.dynamo_step
import kfuse.runtime.kvcache

pytest.importorskip("transformers")


def _served(monkeypatch) -> list:
    """A list that gets one entry per decode call a Step served (not None)."""
    served = []
    call = kfuse.dynamo_step.Step._call

    def counted(self, args):
        out = call(self, args)
        if out is not None:
            served.append(1)
        return out
    monkeypatch.setattr(kfuse.dynamo_step.Step, "_call", counted)
    return served


def _stepped(graphs) -> list:
    return [g for g in graphs if g.strategy == "partitioned" and g._step is not None]


@pytest.mark.parametrize("arch,batch", [("gpt2", 1), ("llama", 1), ("llama", 2)])
def test_decode_steps_run_as_one_c_call(arch, batch, monkeypatch):
    served = _served(monkeypatch)
    model = _model(arch)
    ids = torch.randint(1, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(1))
    graphs = _compiled_generate(model, ids, 14)
    stepped = _stepped(graphs)
    assert len(stepped) == 1, [g.summary() for g in graphs]
    g = stepped[0]
    assert "decode steps as one C call" in g.summary()
    # one run per segment after the first (whose embedding gather is a torch op), one attention call per layer
    assert len(g._step.layers) == 2 and len(g._step.segs) == 3 and sum(not s.pre for s in g._step.segs) >= 2
    # the decode graph's calls after its first STEP_AFTER - 1 (and the checking one): all by the step
    calls = 13 - (kfuse.dynamo.STEP_AFTER - 1) - 1
    assert len(served) >= calls, (len(served), calls)
    # a second generate(): new caches (new buffers) for the same step
    before = len(served)
    assert torch.equal(_generate(model, ids, 10), _generate_eager(arch, ids, 10))
    assert len(served) - before == 9


def _generate_eager(arch, ids, n):
    return _generate(_model(arch), ids, n)


def test_a_weight_changed_in_place_is_seen(monkeypatch):
    """The step checks its segments' weights (identity and version) each call: after an in-place change the
    call runs as partitioned, which compiles the segment again, and the tokens follow the new weights."""
    served = _served(monkeypatch)
    model = _model("llama")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    _compiled_generate(model, ids, 8)
    assert served
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    eager = _model("llama")
    with torch.no_grad():
        eager.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    assert torch.equal(_generate(model, ids, 10), _generate(eager, ids, 10))


def test_caches_that_regrow_run_as_partitioned(monkeypatch):
    """A cache without a spare row (capacity squeezed to 4 rows more than needed: it regrows every fifth
    step) cannot grow in place: that call runs as partitioned, the others by the step, all with eager's tokens."""
    served = _served(monkeypatch)
    monkeypatch.setattr(kfuse.runtime.kvcache, "capacity", lambda rows: rows + 4)
    model = _model("gpt2")
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    graphs = _compiled_generate(model, ids, 24)
    assert _stepped(graphs), [g.summary() for g in graphs]
    assert 0 < len(served) < 23 - kfuse.dynamo.STEP_AFTER


def test_a_call_while_the_step_is_busy_runs_as_partitioned(monkeypatch):
    """Another thread inside the step (its lock held): the call runs as partitioned, with eager's tokens."""
    served = _served(monkeypatch)
    model = _model("llama")
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    step = _stepped(_compiled_generate(model, ids, 8))[0]._step
    before = len(served)
    with step._busy:
        assert torch.equal(_generate(model, ids, 8), _generate_eager("llama", ids, 8))
    assert len(served) == before
    assert torch.equal(_generate(model, ids, 8), _generate_eager("llama", ids, 8))
    assert len(served) - before == 7


def test_a_step_whose_first_call_differs_is_dropped(monkeypatch):
    """The first call is checked against the partitioned graph's outputs bit for bit: a step computing
    anything else is not kept, the summary says so, and the tokens are eager's."""
    call = kfuse.dynamo_step.Step._call

    def wrong(self, args):
        out = call(self, args)
        return None if out is None else (*out[:-1], out[-1] + 1e-3)
    monkeypatch.setattr(kfuse.dynamo_step.Step, "_call", wrong)
    graphs = _compiled_generate(_model("llama"), torch.randint(1, VOCAB, (1, 5)), 10)
    decode = [g for g in graphs if g.strategy == "partitioned"]
    assert decode and all(g._step is None for g in decode)
    assert "its first call differed" in decode[0].summary()


def test_mistral_window_views_and_masks_past_the_window():
    """Mistral's sliding window: the pieces return window views of the caches (and, before the window
    fills, size arithmetic); past it, a torch piece computes the embedding and positions first and each
    attention reads a mask a segment computes. The decode graph past the window runs as one C call, with
    eager's tokens."""
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    graphs = _compiled_generate(_model("mistral"), ids, 16)
    decode = [g for g in graphs if g.strategy == "partitioned" and g._step is not None]
    assert decode, [g.summary() for g in graphs]
    assert any(layer["mask"] is not None for g in decode for layer in g._step.layers)
    assert any(w[0] == "window" for g in decode for layer in g._step.layers for w in layer["what"])
    assert any(isinstance(s, kfuse.dynamo_step._TorchPre) for g in decode for s in g._step.segs)


def test_a_graph_the_step_does_not_serve_says_why(monkeypatch):
    """Without native runners (KFUSE_NATIVE=0) a segment after an attention call has Python steps: not one C
    call, and the summary says why; the tokens are eager's."""
    monkeypatch.setenv("KFUSE_NATIVE", "0")
    monkeypatch.setattr(kfuse.config, "_config", kfuse.config.from_env())
    graphs = _compiled_generate(_model("llama"), torch.randint(1, VOCAB, (1, 5)), 10)
    decode = [g for g in graphs if g.strategy == "partitioned"]
    assert decode and all(g._step is None for g in decode)
    assert "steps not one C call: a segment with Python steps, or a piece torch runs, after a piece of the C call" \
        in decode[0].summary()


def test_a_torch_piece_that_writes_is_not_run_first():
    """A torch piece before the first attention runs first as a pre piece, and again where the step declines
    a call: one that writes into a tensor (in place, or by setitem) is refused."""
    class Writes(torch.nn.Module):
        def forward(self, x):
            x.add_(1)
            return x * 2

    class Pure(torch.nn.Module):
        def forward(self, x):
            return x * 2

    node = torch.fx.Graph().placeholder("x")
    source = {node: ("arg", 0)}
    wrap = lambda m: torch.fx.symbolic_trace(m)     # noqa: E731
    call = type("Call", (), {"args": (node,)})()
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.call_function(operator.setitem, (x, 0, 1.0))
    g.output(g.call_function(operator.mul, (x, 2)))
    sets_item = torch.fx.GraphModule(torch.nn.Module(), g)
    for piece in (wrap(Writes()), sets_item):
        with pytest.raises(kfuse.dynamo_step.NotStepped, match="writes into a tensor"):
            kfuse.dynamo_step._TorchPre(piece, call, source, lambda src: src[0] == "arg")
    pre = kfuse.dynamo_step._TorchPre(wrap(Pure()), call, source, lambda src: src[0] == "arg")
    assert torch.equal(pre.run([torch.ones(3)], {})[0], torch.full((3,), 2.0))
