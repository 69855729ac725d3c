"""A model that writes into its inputs (a static KV cache's index_copy_, a step counter's add_):
the compiled model writes the same values into the same tensors, the cache rows in place."""
from __future__ import annotations

import pytest
import torch

import kfuse
from kfuse.errors import KfuseError


class CacheStep(torch.nn.Module):
    def forward(self, x, cache, pos, step):
        cache.index_copy_(2, pos, x)
        step.add_(1)
        return torch.softmax(cache.sum(-1) * 2, dim=-1), step * 3


def _inputs(length=9):
    return torch.randn(2, 3, 1, 5), torch.randn(2, 3, length, 5), torch.tensor([4]), torch.tensor([7])


def test_writes_into_inputs_in_place():
    x, cache, pos, step = _inputs()
    cm = kfuse.compile(CacheStep(), (x, cache.clone(), pos, step.clone()))
    for p in ([4], [0], [8]):                 # fresh values at every call
        x, cache, _, step = _inputs()
        pos = torch.tensor(p)
        mine, theirs = (cache.clone(), step.clone()), (cache.clone(), step.clone())
        ptr = mine[0].data_ptr()
        got = cm(x, mine[0], pos, mine[1])
        want = CacheStep()(x, theirs[0], pos, theirs[1])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
        assert mine[0].data_ptr() == ptr
    assert cm.graph.mutated == [1, 3]
    puts = [n for n in cm.graph.nodes if n.op == "index_put"]
    assert len(puts) == 1 and puts[0].attrs.get("inplace"), "the cache rows are written in place, not copied"


class CacheStepWithLengths(torch.nn.Module):
    """Python ints among the outputs, before and between tensors (a static cache's lengths)."""
    def forward(self, x, cache, pos):
        cache.index_copy_(2, pos, x)
        return cache.shape[2], cache.sum(-1), 5, x * 2


def test_python_values_among_the_outputs_of_a_model_writing_its_inputs():
    """The export lists the writes into inputs first, then the outputs: the Python values keep their
    places among the model's outputs (they had been placed by the export's numbering, one output off
    per write: a Mistral generate() with StaticCache failed on a second prompt length)."""
    x, cache, pos, _ = _inputs()
    cm = kfuse.compile(CacheStepWithLengths(), (x, cache.clone(), pos))
    mine, theirs = cache.clone(), cache.clone()
    got, want = cm(x, mine, pos), CacheStepWithLengths()(x, theirs, pos)
    assert got[0] == want[0] == 9 and got[2] == 5
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[3], want[3])
    assert torch.equal(mine, theirs) and cm.graph.mutated == [1]


def test_input_read_after_write_is_not_in_place():
    """When the model also reads the input's old value, the write cannot happen in place first."""
    class ReadOld(torch.nn.Module):
        def forward(self, x, cache, pos):
            old = cache * 1.0
            cache.index_copy_(2, pos, x)
            return old.sum(-1) - cache.sum(-1)

    x, cache, pos, _ = _inputs()
    cm = kfuse.compile(ReadOld(), (x, cache.clone(), pos))
    mine, theirs = cache.clone(), cache.clone()
    torch.testing.assert_close(cm(x, mine, pos), ReadOld()(x, theirs, pos))
    assert torch.equal(mine, theirs)
    assert not any(n.attrs.get("inplace") for n in cm.graph.nodes if n.op == "index_put")


def test_mutation_survives_save_and_load(tmp_path):
    x, cache, pos, step = _inputs()
    cm = kfuse.compile(CacheStep(), (x, cache.clone(), pos, step.clone()))
    cm.save(tmp_path / "m")
    loaded = kfuse.load(tmp_path / "m")
    mine, theirs = (cache.clone(), step.clone()), (cache.clone(), step.clone())
    got = loaded(x, mine[0], pos, mine[1])
    want = CacheStep()(x, theirs[0], pos, theirs[1])
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


def test_buffer_write_is_a_clear_error():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(1))

        def forward(self, x):
            self.n.add_(1)
            return x * self.n

    with pytest.raises(KfuseError, match="writes into its buffer"):
        kfuse.compile(Counter(), (torch.randn(3),))


def test_parameter_write_is_a_clear_error():
    """Hugging Face's RWKV rescales its weights in place on its first call: export lists the write as
    a parameter mutation, which kfuse names (it was an extra output that failed to unflatten)."""
    class Rescale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            with torch.no_grad():
                self.lin.weight.div_(2)
            return self.lin(x)

    with pytest.raises(KfuseError, match=r"writes into its parameter\(s\) lin.weight.*call the model once in eager"):
        kfuse.compile(Rescale(), (torch.randn(2, 4),))
