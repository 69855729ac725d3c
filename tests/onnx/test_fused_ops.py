"""The opset-23 fused ops (RMSNormalization, RotaryEmbedding, Attention) and LayerNormalization's
Mean/InvStdDev outputs: each model is saved, compiled from its path with kfuse.compile, checked to
run as kfuse's fused kernel (rms_norm, rope, attention, layer_norm) where the plain case maps onto
it, and compared with ONNX Runtime (or ONNX's reference evaluator) on the same file."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import kfuse

ort = pytest.importorskip("onnxruntime")
rng = np.random.default_rng(23)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def one_node(op, inputs, outputs, attrs=None, inits=None):
    """A one-node opset-23 model: `inputs` name -> array (graph inputs, float32/int64/bool),
    `inits` name -> array (initializers), `outputs` name -> shape."""
    inits = inits or {}
    names = list(inputs) + list(inits)
    node = helper.make_node(op, [n if n else "" for n in names], list(outputs), **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
         for n, v in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs.items()],
        [numpy_helper.from_array(v, n) for n, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def run(tmp_path, model, feeds, oracle="ort"):
    """kfuse's outputs, the oracle's, and the compiled model's report."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    xs = [torch.from_numpy(v) for v in feeds.values()]
    cm = kfuse.compile(str(path), xs)
    got = cm(*xs)
    got = [g.numpy() for g in (got if isinstance(got, (tuple, list)) else [got])]
    if oracle == "ort":
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    else:
        want = ReferenceEvaluator(model).run(None, feeds)
    return got, want, cm.report()


def check(got, want, tol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


def kernel_ops(report):
    return [(k.backend, k.ops) for k in report.kernels]


@pytest.mark.parametrize("axis, scale_shape", [(-1, (16,)), (1, (4, 16)), (1, (16,))])
def test_rms_normalization_is_rms_norm(tmp_path, axis, scale_shape):
    x = f32(2, 4, 16)
    m = one_node("RMSNormalization", {"x": x}, {"y": x.shape}, {"axis": axis, "epsilon": 1e-5},
                 inits={"scale": f32(*scale_shape)})
    got, want, report = run(tmp_path, m, {"x": x})
    check(got, want)
    assert any(b == "c" and "rms_norm" in ops for b, ops in kernel_ops(report)), kernel_ops(report)
    assert not report.fallbacks


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_layer_normalization_mean_inv_std_dev(tmp_path, axis):
    x = f32(3, 4, 8)
    shape = x.shape[axis:] if axis >= 0 else x.shape[-1:]
    stat = x.shape[:axis % 3] + (1,) * (3 - axis % 3)
    m = one_node("LayerNormalization", {"x": x}, {"y": x.shape, "mean": stat, "inv": stat}, {"axis": axis},
                 inits={"w": f32(*shape), "b": f32(*shape)})
    got, want, report = run(tmp_path, m, {"x": x})
    check(got, want)
    assert any("layer_norm" in ops for _, ops in kernel_ops(report)) and not report.fallbacks


def test_rotary_embedding_is_rope(tmp_path):
    """4-d input, position_ids gathering constant caches, halves: kfuse's rope kernel."""
    x = f32(2, 3, 5, 8)
    pos = rng.integers(0, 10, (2, 5)).astype(np.int64)
    m = one_node("RotaryEmbedding", {"x": x, "pos": pos}, {"y": x.shape},
                 inits={"cos": f32(10, 4), "sin": f32(10, 4)})
    # initializers come after the inputs in the node: reorder to X, cos, sin, position_ids
    m.graph.node[0].input[:] = ["x", "cos", "sin", "pos"]
    got, want, report = run(tmp_path, m, {"x": x, "pos": pos})
    check(got, want)
    assert report.fusions.get("rope") == 1 and not report.fallbacks


@pytest.mark.parametrize("interleaved, rot", [(1, 0), (1, 4), (0, 4)])
def test_rotary_embedding_3d(tmp_path, interleaved, rot):
    """[B, S, hidden] with num_heads, interleaved pairs and partial rotation."""
    x, cos, sin = f32(2, 5, 3 * 8), f32(2, 5, (rot or 8) // 2), f32(2, 5, (rot or 8) // 2)
    m = one_node("RotaryEmbedding", {"x": x, "cos": cos, "sin": sin}, {"y": x.shape},
                 {"interleaved": interleaved, "num_heads": 3, "rotary_embedding_dim": rot})
    got, want, _ = run(tmp_path, m, {"x": x, "cos": cos, "sin": sin})
    check(got, want)


@pytest.mark.parametrize("three_d", [False, True])
def test_attention_causal_gqa_is_attention(tmp_path, three_d):
    """GQA with a causal mask, 4-d or 3-d inputs: kfuse's fused attention kernel."""
    q, k, v = f32(2, 4, 6, 8), f32(2, 2, 6, 8), f32(2, 2, 6, 8)
    attrs = {"is_causal": 1}
    if three_d:
        q, k, v = (t.transpose(0, 2, 1, 3).reshape(2, 6, -1) for t in (q, k, v))
        attrs.update(q_num_heads=4, kv_num_heads=2)
    m = one_node("Attention", {"q": q, "k": k, "v": v}, {"y": (2, 6, 32) if three_d else (2, 4, 6, 8)}, attrs)
    got, want, report = run(tmp_path, m, {"q": q, "k": k, "v": v})
    check(got, want)
    assert report.fusions.get("attention") == 1 and not report.fallbacks


def test_attention_past_and_mask(tmp_path):
    """past_key/past_value concatenated (present outputs), an additive mask and a causal mask."""
    q, k, v, pk, pv = f32(1, 2, 3, 8), f32(1, 2, 3, 8), f32(1, 2, 3, 8), f32(1, 2, 4, 8), f32(1, 2, 4, 8)
    mask = f32(3, 7)
    feeds = {"q": q, "k": k, "v": v, "mask": mask, "pk": pk, "pv": pv}
    m = one_node("Attention", feeds, {"y": (1, 2, 3, 8), "present_k": (1, 2, 7, 8), "present_v": (1, 2, 7, 8)},
                 {"is_causal": 1})
    got, want, report = run(tmp_path, m, feeds)
    check(got, want)
    assert report.fusions.get("attention") == 1


def test_attention_fully_masked_row_is_zero(tmp_path):
    """A query row whose boolean mask keeps no key gives 0, as ONNX defines (not NaN)."""
    q, k, v = f32(1, 2, 3, 8), f32(1, 2, 4, 8), f32(1, 2, 4, 8)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    feeds = {"q": q, "k": k, "v": v, "mask": mask}
    m = one_node("Attention", feeds, {"y": (1, 2, 3, 8)})
    got, want, _ = run(tmp_path, m, feeds, oracle="reference")
    check(got, want)
    assert np.all(got[0][:, :, 1] == 0)


def test_attention_softcap_and_qk_output(tmp_path):
    """softcap and the qk_matmul_output output: primitive ops, the numbers of ONNX's reference."""
    q, k, v = f32(1, 4, 3, 8), f32(1, 2, 5, 8), f32(1, 2, 5, 8)
    feeds = {"q": q, "k": k, "v": v}
    m = one_node("Attention", feeds, {"y": (1, 4, 3, 8), "pk": (1, 2, 5, 8), "pv": (1, 2, 5, 8), "qk": (1, 4, 3, 5)},
                 {"softcap": 2.0, "qk_matmul_output_mode": 3, "scale": 0.3})
    got, want, report = run(tmp_path, m, feeds, oracle="reference")
    check(got, want)
    assert "attention" not in report.fusions
