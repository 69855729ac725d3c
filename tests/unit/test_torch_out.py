"""Lone ops that write into their planned arena buffers instead of a new tensor per call: torch's with an
out= form (matmul; backends/reference.py OUT_FORMS) and a concatenation (our C kernel, c:concat): right
values call after call, outputs the caller keeps are new tensors, and neither inputs that require grad nor
torch.inference_mode() get in the way."""
from __future__ import annotations

import warnings

import pytest
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


def _lone_kernels(cm):
    """{op: (kernel, backend)} of the one-op kernels torch or our concat kernel runs"""
    prog = cm._last
    return {g.nodes[0].op: (k, info.backend) for g, k, info in zip(prog.groups, prog.kernels, prog.report.kernels)
            if info.backend in ("torch", "c:concat")}


def test_concat_and_matmul_write_into_planned_buffers_call_after_call():
    cm = kfuse.compile(module_of(_model), _inputs(0))
    kernels = _lone_kernels(cm)
    assert kernels["concat"][1] == "c:concat" and kernels["matmul"][1] == "torch"
    assert all(k.writes_into and not k.aliases for op, (k, _) in kernels.items() if op in ("concat", "matmul"))
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



def test_a_vector_times_a_matrix_keeps_its_shape_and_warns_of_nothing(tmp_path):
    """torch.matmul(vector, matrix, out=) resizes an [N] out to [1, N] with a deprecation warning: such a
    product is not run into a planned buffer (found by the fuzzer, seed 424251). An ONNX MatMul of a
    vector and a matrix, both activations, is captured as that matmul."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    nodes = [helper.make_node("MatMul", ["v", "m"], ["y"]), helper.make_node("Sin", ["y"], ["s"]),
             helper.make_node("Abs", ["y"], ["a"])]
    graph = helper.make_graph(nodes, "vm", [helper.make_tensor_value_info("v", TensorProto.FLOAT, [33]),
                                            helper.make_tensor_value_info("m", TensorProto.FLOAT, [33, 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [16]) for n in "sa"])
    path = tmp_path / "vm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    cm = kfuse.compile(str(path), (torch.randn(33), torch.randn(33, 16)))
    assert _lone_kernels(cm)["matmul"][1] == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            v, m = torch.randn(33, generator=g), torch.randn(33, 16, generator=g)
            s, a = cm(v, m)
            assert s.shape == a.shape == (16,)
            torch.testing.assert_close(s, (v @ m).sin(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a, (v @ m).abs(), rtol=1e-5, atol=1e-5)
