"""Ops torch runs that have an out= form (concat, matmul) write into their planned arena buffers instead of
a new tensor per call (backends/reference.py OUT_FORMS): right values call after call, outputs the caller
keeps are new tensors, and neither inputs that require grad nor torch.inference_mode() get in the way."""
from __future__ import annotations

import torch
from helpers import module_of

import kfuse


def _model(x, y):
    # a setitem on a slice exports as slice_scatter, captured as a concat of the kept parts (mvit's
    # relative positions); the batched product of two activations is a matmul torch runs
    s = x @ y.transpose(-1, -2)
    s = torch.cat([s[..., :1], s[..., 1:] + 1.0], -1)
    return torch.cat([s.sin(), x[..., :3] * 2], -1).relu(), torch.cat([x, y], 1)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 7, generator=g), torch.randn(2, 6, 7, generator=g)


def _torch_kernels(cm):
    prog = cm._last
    return {g.nodes[0].op: k for g, k, info in zip(prog.groups, prog.kernels, prog.report.kernels)
            if info.backend == "torch"}


def test_concat_and_matmul_write_into_planned_buffers_call_after_call():
    cm = kfuse.compile(module_of(_model), _inputs(0))
    kernels = _torch_kernels(cm)
    assert {"concat", "matmul"} <= set(kernels)
    assert all(k.writes_into and not k.aliases for op, k in kernels.items() if op in ("concat", "matmul"))
    planned = {n.op for n in cm._last._plan.slot_of}
    assert {"concat", "matmul"} <= planned
    for seed in range(3):
        x, y = _inputs(seed)
        for got, want in zip(cm(x, y), _model(x, y)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_concat_the_caller_keeps_is_a_new_tensor_each_call():
    cm = kfuse.compile(module_of(_model), _inputs(0))
    x, y = _inputs(1)
    first = cm(x, y)[1]
    kept = first.clone()
    second = cm(*_inputs(2))[1]
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, kept)


def test_inputs_that_require_grad():
    cm = kfuse.compile(module_of(_model), _inputs(0))
    x, y = (t.requires_grad_() for t in _inputs(3))
    with torch.no_grad():
        want = _model(x, y)
    for got, w in zip(cm(x, y), want):
        torch.testing.assert_close(got.detach(), w, rtol=1e-5, atol=1e-5)


def test_compiled_in_inference_mode_and_called_outside_it():
    """The arena is made at compile; made of inference tensors, torch would refuse to write into it
    outside inference mode."""
    with torch.inference_mode():
        cm = kfuse.compile(module_of(_model), _inputs(0))
        x, y = _inputs(4)
        inside = cm(x, y)[0].clone()
    x, y = _inputs(4)
    torch.testing.assert_close(cm(x, y)[0], inside)
    torch.testing.assert_close(inside, _model(x, y)[0], rtol=1e-5, atol=1e-5)


def test_a_concat_of_mixed_dtypes_runs_as_torch_promotes():
    f = lambda a, b: torch.cat([a, b], 0).mul(3)      # noqa: E731
    a, b = torch.arange(6, dtype=torch.int32).reshape(2, 3), torch.rand(1, 3)
    got = kfuse.compile(module_of(f), (a, b))(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, f(a, b))
