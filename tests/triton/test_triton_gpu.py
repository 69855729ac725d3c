"""What needs a real GPU (skipped elsewhere): built-in models moved to CUDA by the caller (torch's
default device left on the CPU, so a tensor kfuse makes on the wrong device fails), and CUDA graph
replay (kfuse/runtime/cudagraph.py): outputs equal eager's on fresh inputs, and stay valid after the
next call."""
import pytest
import torch

import kfuse
from kfuse.backends.triton import interpreting
from kfuse.models import build

from helpers import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                                reason="needs a CUDA GPU and TRITON_INTERPRET=0")

SMALL = {"bert": dict(layers=2, hidden=64, heads=4, ffn=128), "gpt2": dict(layers=2, hidden=64, heads=4),
         "llama": dict(layers=2, hidden=64, heads=4)}


@pytest.fixture
def cpu_default():
    before = torch.get_default_device()
    torch.set_default_device("cpu")
    yield
    torch.set_default_device(before)


def _on_cuda(name, seed=0):
    model, inputs = build(name, batch=2, seq=16, seed=seed, **SMALL[name])
    return model.cuda().eval(), [t.cuda() for t in inputs]


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_builtin_model_on_cuda(name, cpu_default):
    model, inputs = _on_cuda(name)
    cm = kfuse.compile(model, inputs)            # CUDA inputs: the Triton backend by default
    v = cm.verify(*inputs)
    assert v.ok and v.max_rel <= 1e-4, v
    backends = {k.backend for k in cm.report().kernels}
    assert "triton" in backends and not cm.report().fallbacks, (backends, cm.report().fallbacks)


@pytest.mark.parametrize("mode", [True, "auto", False])
def test_cuda_graph_replay(mode, cpu_default):
    model, inputs = _on_cuda("llama")
    cm = kfuse.compile(model, inputs, cuda_graphs=mode)
    calls = [_on_cuda("llama", seed=s)[1] for s in range(1, 5)]
    outs = [cm(*x) for x in calls]              # first call launched, second captured, then replayed
    with torch.no_grad():
        for x, got in zip(calls, outs):         # earlier outputs are not overwritten by later replays
            assert_close(got, model(*x), atol=1e-4, rtol=1e-4)
    launch = cm.report().launch
    if mode is True:
        assert launch.startswith("CUDA graph replay"), launch
    elif mode is False:
        assert launch == "", launch
    else:
        assert launch.startswith(("CUDA graph replay", "one launch per kernel")), launch


def test_torch_compile_backend_on_cuda(cpu_default):
    model, inputs = _on_cuda("gpt2")
    compiled = torch.compile(model, backend="kfuse")
    with torch.no_grad():
        assert_close(compiled(*inputs), model(*inputs), atol=1e-4, rtol=1e-4)


class CacheStep(torch.nn.Module):
    def forward(self, x, cache, pos):
        cache.index_copy_(2, pos, x)
        return torch.softmax(cache.sum(-1) * 2, dim=-1)


def test_a_model_writing_its_inputs_is_not_replayed(cpu_default):
    # a CUDA graph would write into its static copies of the inputs, not into the caller's cache
    x, cache = torch.randn(2, 3, 1, 5, device="cuda"), torch.randn(2, 3, 9, 5, device="cuda")
    cm = kfuse.compile(CacheStep(), (x, cache.clone(), torch.tensor([4], device="cuda")), cuda_graphs=True)
    for p in (4, 0, 8, 2):
        pos = torch.tensor([p], device="cuda")
        mine, theirs = cache.clone(), cache.clone()
        got = cm(x, mine, pos)
        want = CacheStep()(x, theirs, pos)
        assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert torch.equal(mine, theirs)
    assert "writes into its inputs" in cm.report().launch
