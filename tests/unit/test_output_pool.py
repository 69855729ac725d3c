"""A C kernel's large outputs are recycled between calls (kfuse/backends/outputs.py, POOL_MIN): the
previous call's tensor is reused only when nothing outside the pool refers to it or its storage."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kfuse
from kfuse import backends, config


class _Gelu(torch.nn.Module):
    def forward(self, x):
        return F.gelu(x * 2.0)


def _compiled(n=512):
    x = torch.randn(n, n)      # 1 MiB of output: pooled
    assert x.nbytes >= backends.POOL_MIN
    return kfuse.compile(_Gelu(), (x,)), x, _Gelu()(x)


def test_a_loop_reuses_two_buffers_and_every_result_is_right():
    cm, x, ref = _compiled()
    ptrs = set()
    y = None
    for _ in range(6):
        y = cm(x)              # the previous y is still held during the call
        ptrs.add(y.data_ptr())
        torch.testing.assert_close(y, ref)
    assert len(ptrs) == 2


def test_a_held_output_its_views_and_storage_sharers_are_never_overwritten():
    cm, x, ref = _compiled()
    held = [cm(x) for _ in range(4)]
    assert len({h.data_ptr() for h in held}) == 4
    view = held[-1][0]
    detached = held[-2].detach()
    array = held[-3].numpy()
    del held
    before = [view.clone(), detached.clone(), torch.from_numpy(array.copy())]
    fresh = [cm(x * 0.5) for _ in range(3)]
    taken = {view.data_ptr() - 0, detached.data_ptr(), array.ctypes.data}
    assert not taken & {f.data_ptr() for f in fresh}
    for a, b in zip([view, detached, torch.from_numpy(array)], before):
        assert torch.equal(a, b)


def test_small_outputs_are_not_pooled():
    x = torch.randn(8, 8)
    cm = kfuse.compile(_Gelu(), (x,))
    ys = [cm(x) for _ in range(3)]
    del ys
    assert x.nbytes < backends.POOL_MIN
    torch.testing.assert_close(cm(x), _Gelu()(x))


class _ConstantOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.ones(4))

    def forward(self, x):
        return x * 2, torch.arange(4.0) * 2, self.b * 3, (self.b * 5).view(2, 2)


def test_an_output_folded_to_a_constant_is_the_callers_to_write():
    """Outputs that fold to constants (or views of one) are copies: writing into one does not change
    the next call's results (it once returned the program's constant itself)."""
    m, x = _ConstantOutputs(), torch.randn(3)
    cm = kfuse.compile(m, (x,))
    for out in cm(x):
        out.add_(100)
    for got, want in zip(cm(x), m(x)):
        assert torch.equal(got, want)


class _Clones(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x * 3)
        return y, y.clone(), x.clone()


def test_a_folded_clone_is_a_separate_output():
    """`y, y.clone()` and `x.clone()` once returned y twice and the caller's own x: writing into one
    output changed another output, or the caller's input."""
    x = torch.randn(4, 5)
    keep = x.clone()
    y, y2, x2 = kfuse.compile(_Clones(), (x,))(x)
    y2.add_(1)
    x2.add_(1)
    assert torch.equal(y, torch.relu(keep * 3)) and torch.equal(x, keep)


class _InputClones(torch.nn.Module):
    def forward(self, x):
        return x.reshape(-1).clone(), x.clone(), x.t().clone(), x.clone() * 2


def test_clones_of_an_input_and_its_views_are_copies():
    """A clone of the input, or of a view of it, is a tensor of its own (captured as a copy, never merged
    with another): writing into one output changes neither the caller's input nor another output."""
    x = torch.randn(4, 5)
    keep = x.clone()
    cm = kfuse.compile(_InputClones(), (x,))
    outs = cm(x)
    for o, want in zip(outs, (keep.reshape(-1), keep, keep.t(), keep * 2)):
        assert torch.equal(o, want)
    ptrs = {o.untyped_storage().data_ptr() for o in outs} | {x.untyped_storage().data_ptr()}
    assert len(ptrs) == 5
    for o in outs:
        o.add_(1)
    assert torch.equal(x, keep) and torch.equal(outs[1], keep + 1) and torch.equal(outs[0], keep.reshape(-1) + 1)
    assert sum(n.op == "copy" for n in cm._last.graph.nodes) == 4      # not merged into one


class _ConvResidual(torch.nn.Module):
    """A 1x1 convolution + residual + ReLU on channels-last tensors: our GEMM writes the NHWC output the
    caller gets (as an NCHW view), 1 MiB."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(64, 256, 1)

    def forward(self, x, r):
        return F.relu(self.conv(x) + r)


def test_a_convolutions_large_output_comes_from_the_pool_and_a_held_one_is_never_overwritten(monkeypatch):
    taken = []
    take = backends.OutputPool.take
    monkeypatch.setattr(backends.OutputPool, "take", lambda self: taken.append(self.pooled) or take(self))
    monkeypatch.setenv("KFUSE_AUTOTUNE", "0")       # our GEMM (the first candidate), not oneDNN's
    monkeypatch.setattr(config, "_config", config.from_env())
    m = _ConvResidual().eval()
    x, r = (torch.randn(1, c, 32, 32).contiguous(memory_format=torch.channels_last) for c in (64, 256))
    cm = kfuse.compile(m, (x, r))
    cm(x, r)
    assert [k.backend for k in cm._last.report.kernels if k.name == "conv_add_relu"] == ["c:gemm"]
    held = [cm(x * s, r) for s in (1.0, 2.0, 3.0)]
    assert taken and all(taken) and len({h.data_ptr() for h in held}) == 3
    for s, h in zip((1.0, 2.0, 3.0), held):
        torch.testing.assert_close(h, m(x * s, r), rtol=1e-5, atol=1e-5)
    del held
    ptrs = set()
    for _ in range(4):
        y = cm(x, r)
        ptrs.add(y.data_ptr())
    assert len(ptrs) <= 2
