"""The com.microsoft ops ONNX Runtime's transformer optimizer writes (SkipLayerNormalization,
BiasGelu, Attention, ...): each as a one-node model compiled with kfuse.compile and compared with
ONNX Runtime itself on the same file, and a small BERT optimized by onnxruntime.transformers
compiled and compared with ONNX Runtime on the unoptimized export."""
import collections
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kfuse
from kfuse.errors import KfuseError

ort = pytest.importorskip("onnxruntime")
rng = np.random.default_rng(13)
MS = "com.microsoft"


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def out(name, elem=TensorProto.FLOAT, rank=3):
    """An output of known rank and element type, its dims left symbolic."""
    return helper.make_tensor_value_info(name, elem, [f"{name}_{i}" for i in range(rank)])


def ms_node(op, inputs, outputs, attrs=None, inits=None):
    """A one-node model of com.microsoft `op`: `inputs` name -> array (graph inputs; "" or None
    values omitted), `inits` name -> array (initializers), `outputs` name -> element type, or
    (element type, rank) for an output not 3-d."""
    inits = inits or {}
    names = [k for k in list(inputs) + list(inits)]
    ins = [k if (k in inits or inputs.get(k) is not None) else "" for k in names]
    while ins and not ins[-1]:
        ins.pop()
    node = helper.make_node(op, ins, list(outputs), name=f"the_{op}", domain=MS, **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
         for k, v in inputs.items() if v is not None],
        [out(k, *t) if isinstance(t, tuple) else out(k, t) for k, t in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid(MS, 1)])


def run(tmp_path, model, feeds):
    """kfuse's outputs, ONNX Runtime's, and the compiled model's report."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    feeds = {k: v for k, v in feeds.items() if v is not None}
    xs = [torch.from_numpy(v) for v in feeds.values()]
    cm = kfuse.compile(str(path), xs)
    got = cm(*xs)
    got = [g.numpy() for g in (got if isinstance(got, (tuple, list)) else [got])]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    return got, want, cm.report()


def check(got, want, tol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w.reshape(g.shape) if g.size == w.size else w, rtol=tol, atol=tol)


def kernel_ops(report):
    return [op for k in report.kernels for op in k.ops]


F = TensorProto.FLOAT


@pytest.mark.parametrize("bias, beta, extra", [(True, True, False), (False, True, False),
                                               (True, False, True), (False, True, True)])
def test_skip_layer_normalization(tmp_path, bias, beta, extra):
    x, skip = f32(2, 5, 16), f32(2, 5, 16)
    inits = {"gamma": f32(16), "beta": f32(16) if beta else None, "bias": f32(16) if bias else None}
    inits = {k: v for k, v in inits.items() if v is not None}
    if not beta and bias:   # beta omitted, bias given: keep the position with an empty name
        m = ms_node("SkipLayerNormalization", {"x": x, "skip": skip}, {"y": F}, {"epsilon": 1e-5},
                    inits={"gamma": inits["gamma"], "bias": inits["bias"]})
        node = m.graph.node[0]
        node.input[:] = ["x", "skip", "gamma", "", "bias"]
    else:
        m = ms_node("SkipLayerNormalization", {"x": x, "skip": skip}, {"y": F}, {"epsilon": 1e-5}, inits=inits)
    if extra:   # every optional output: mean, inv_std_var ([B, S, 1]), input_skip_bias_sum
        m.graph.node[0].output[:] = ["y", "mean", "inv", "sum"]
        m.graph.output.extend([out(k) for k in ("mean", "inv", "sum")])
    got, want, report = run(tmp_path, m, {"x": x, "skip": skip})
    check(got, want)
    assert "layer_norm" in kernel_ops(report) and not report.fallbacks


def test_skip_layer_normalization_broadcast_skip(tmp_path):
    x, skip = f32(2, 5, 16), f32(5, 16)
    m = ms_node("SkipLayerNormalization", {"x": x, "skip": skip}, {"y": F}, {"epsilon": 1e-12},
                inits={"gamma": f32(16), "beta": f32(16)})
    check(*run(tmp_path, m, {"x": x, "skip": skip})[:2])


@pytest.mark.parametrize("bias", [False, True])
def test_skip_simplified_layer_normalization(tmp_path, bias):
    x, skip = f32(2, 5, 16), f32(2, 5, 16)
    inits = {"gamma": f32(16), **({"bias": f32(16)} if bias else {})}
    m = ms_node("SkipSimplifiedLayerNormalization", {"x": x, "skip": skip}, {"y": F, "": F},
                {"epsilon": 1e-6}, inits=inits)
    m.graph.node[0].output[:] = ["y", "", "", "sum"]
    del m.graph.output[:]
    m.graph.output.extend([out(k) for k in ("y", "sum")])
    got, want, report = run(tmp_path, m, {"x": x, "skip": skip})
    check(got, want)
    assert "rms_norm" in kernel_ops(report) and not report.fallbacks


def test_simplified_layer_normalization(tmp_path):
    """ONNX Runtime has it in the default domain only (no ONNX schema: onnx's checker refuses such a
    file, kfuse's loader checks a copy with it moved aside): kfuse's com.microsoft form and the
    default-domain form against ONNX Runtime's."""
    x = f32(2, 5, 16)
    m = ms_node("SimplifiedLayerNormalization", {"x": x}, {"y": F}, {"epsilon": 1e-6, "axis": -1},
                inits={"scale": f32(16)})
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    cm = kfuse.compile(str(path), [torch.from_numpy(x)])
    got = cm(torch.from_numpy(x)).numpy()
    m.graph.node[0].domain = ""
    onnx.save(m, path)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert "rms_norm" in kernel_ops(cm.report())
    default_domain = kfuse.compile(str(path), [torch.from_numpy(x)])(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(default_domain, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op, bias, attrs", [("Gelu", False, {}), ("BiasGelu", True, {}), ("FastGelu", False, {}),
                                             ("FastGelu", True, {}), ("QuickGelu", False, {}),
                                             ("QuickGelu", False, {"alpha": 1.5})])
def test_activations(tmp_path, op, bias, attrs):
    x = f32(2, 5, 16) * 2
    m = ms_node(op, {"x": x}, {"y": F}, attrs, inits={"bias": f32(16)} if bias else {})
    check(*run(tmp_path, m, {"x": x})[:2])


def test_bias_add(tmp_path):
    """ONNX Runtime has BiasAdd on CUDA only: compared with its definition, x + bias + skip."""
    x, skip, bias = f32(2, 5, 16), f32(2, 5, 16), f32(16)
    m = ms_node("BiasAdd", {"x": x}, {"y": F}, inits={"bias": bias, "skip": skip})
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    got = kfuse.compile(str(path), [torch.from_numpy(x)])(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), x + bias + skip, rtol=1e-6, atol=1e-6)


def test_embed_layer_normalization(tmp_path):
    ids = rng.integers(0, 30, (2, 6)).astype(np.int32)
    seg = rng.integers(0, 2, (2, 6)).astype(np.int32)
    mask = np.ones((2, 6), np.int32)
    mask[1, 4:] = 0
    inits = {"word": f32(30, 16), "pos": f32(10, 16), "segw": f32(2, 16), "gamma": f32(16), "beta": f32(16)}
    m = ms_node("EmbedLayerNormalization", {"ids": ids, "seg": seg}, {"y": F, "mask_index": (TensorProto.INT32, 1)},
                {"epsilon": 1e-12}, inits=inits)
    m.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [2, 6]))
    m.graph.node[0].input[:] = ["ids", "seg", "word", "pos", "segw", "gamma", "beta", "mask"]
    got, want, _ = run(tmp_path, m, {"ids": ids, "seg": seg, "mask": mask})
    check(got, want)


def _attention_model(mask, attrs, b=2, s=6, hidden=16):
    x = f32(b, s, hidden)
    inputs = {"x": x, "mask": mask}
    m = ms_node("Attention", inputs, {"y": F}, {"num_heads": 4, **attrs})
    m.graph.initializer.extend([numpy_helper.from_array(f32(hidden, 3 * hidden) * 0.5, "w"),
                                numpy_helper.from_array(f32(3 * hidden), "bias")])
    m.graph.node[0].input[:] = ["x", "w", "bias"] + (["mask"] if mask is not None else [])
    return m, inputs


@pytest.mark.parametrize("form, attrs", [
    (None, {}), ("2d", {}), ("1d", {}), ("3d", {}), (None, {"unidirectional": 1}), ("2d", {"unidirectional": 1}),
    ("2d", {"scale": 0.3, "mask_filter_value": -1000.0})])
def test_attention(tmp_path, form, attrs):
    b, s = 2, 6
    mask = {None: None,
            "2d": np.array([[1] * 6, [1] * 4 + [0] * 2], np.int32),
            "1d": np.array([6, 3], np.int32),
            "3d": (rng.uniform(size=(b, s, s)) > 0.3).astype(np.int32)}[form]
    if form == "3d":
        mask[:, :, 0] = 1
    m, feeds = _attention_model(mask, attrs)
    got, want, report = run(tmp_path, m, feeds)
    check(got, want)
    assert report.fusions.get("attention") == 1 and not report.fallbacks


def test_attention_unsupported_forms_are_clear_errors(tmp_path):
    m, feeds = _attention_model(np.array([6, 3, 0, 0], np.int32), {})   # [2 * batch]: ends and starts
    with pytest.raises(KfuseError, match="mask_index of shape"):
        run(tmp_path, m, feeds)
    m, feeds = _attention_model(None, {"do_rotary": 1})
    with pytest.raises(KfuseError, match="do_rotary"):
        run(tmp_path, m, feeds)


@pytest.mark.parametrize("bias, mask, unidirectional", [(False, None, 0), (True, "2d", 0), (True, "1d", 0),
                                                        (False, None, 1)])
def test_multi_head_attention(tmp_path, bias, mask, unidirectional):
    q, k, v = f32(2, 5, 16), f32(2, 7, 16), f32(2, 7, 16)
    if unidirectional:
        k, v = f32(2, 5, 16), f32(2, 5, 16)
    lk = k.shape[1]
    kpm = {None: None, "2d": np.array([[1] * lk, [1] * 3 + [0] * (lk - 3)], np.int32),
           "1d": np.array([lk, 4], np.int32)}[mask]
    inputs = {"q": q, "k": k, "v": v, "bias": f32(48) if bias else None, "kpm": kpm}
    m = ms_node("MultiHeadAttention", inputs, {"y": F}, {"num_heads": 4, "unidirectional": unidirectional})
    got, want, report = run(tmp_path, m, inputs)
    check(got, want)
    assert report.fusions.get("attention") == 1


# -- a BERT optimized by ONNX Runtime's transformer optimizer --------------------------------------

_EXPORT = textwrap.dedent("""
    import sys, torch, transformers
    from onnxruntime.transformers.optimizer import optimize_model
    plain, optimized = sys.argv[1], sys.argv[2]
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=64)
    cfg._attn_implementation = "eager"   # the attention pattern ONNX Runtime's fusion recognises
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    with torch.no_grad():   # random norms and biases, so no two initializers are alike
        for name, p in bert.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)

    class Wrap(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, ids, mask):
            o = self.b(input_ids=ids, attention_mask=mask, return_dict=False)
            return o[0], o[1]

    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(Wrap(bert).eval(), (ids, mask), plain, input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state", "pooler_output"], dynamo=False, opset_version=17,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes})
    optimize_model(plain, model_type="bert", num_heads=4, hidden_size=64).save_model_to_file(optimized)
""")


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("bert")
    plain, optimized = d / "bert.onnx", d / "bert_opt.onnx"
    r = subprocess.run([sys.executable, "-c", _EXPORT, str(plain), str(optimized)], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 or not optimized.exists():
        pytest.fail(f"exporting/optimizing BERT failed:\n{r.stderr[-3000:]}")
    return plain, optimized


def test_optimized_bert_compiles_and_matches_the_unoptimized_file(bert_files):
    plain, optimized = bert_files
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load(str(optimized)).graph.node)
    assert ops[(MS, "SkipLayerNormalization")] >= 4
    assert ops[(MS, "Attention")] + ops[(MS, "MultiHeadAttention")] == 2
    assert ops[(MS, "BiasGelu")] + ops[(MS, "FastGelu")] + ops[(MS, "Gelu")] == 2
    ids = torch.from_numpy(rng.integers(0, 100, (2, 8)))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0   # right padding, the form the optimized file's mask_index expresses
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    want = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, feeds)
    cm = kfuse.compile(str(optimized), (ids, mask))
    got = [g.numpy() for g in cm(ids, mask)]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    report = cm.report()
    assert report.fusions.get("attention") == 2, report.fusions
    assert not report.fallbacks
    ops_run = kernel_ops(report)
    assert ops_run.count("layer_norm") >= 5 and "linear" in ops_run
    plain_cm = kfuse.compile(str(plain), (ids, mask))   # the unoptimized file compiles too, and agrees
    for g, w in zip([g.numpy() for g in plain_cm(ids, mask)], want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank, interleaved, offset", [(3, 0, False), (4, 0, False), (3, 1, False), (3, 0, True),
                                                      (4, 1, True)])
def test_rotary_embedding(tmp_path, rank, interleaved, offset):
    """Position ids [batch, seq] or one offset; 3-d (num_heads) or 4-d input; halves or pairs."""
    b, s, heads, d = 2, 5, 2, 8
    x = f32(b, s, heads * d) if rank == 3 else f32(b, heads, s, d)
    pos = np.array([3], np.int64) if offset else rng.integers(0, 16, (b, s)).astype(np.int64)
    inputs = {"x": x, "pos": pos}
    attrs = {"interleaved": interleaved, **({"num_heads": heads} if rank == 3 else {})}
    m = ms_node("RotaryEmbedding", inputs, {"y": (F, rank)}, attrs, inits={"cos": f32(16, d // 2), "sin": f32(16, d // 2)})
    got, want, report = run(tmp_path, m, inputs)
    check(got, want)
    if not interleaved:
        assert report.fusions.get("rope") == 1


# -- GroupQueryAttention ----------------------------------------------------------------------------

_GQA_INPUTS = ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total", "cos", "sin", "position_ids",
               "attention_bias", "head_sink"]
_GQA_OUT = {"y": F, "present_key": (F, 4), "present_value": (F, 4)}


def _gqa(tmp_path, feeds, attrs, valid=None):
    """Compile a one-node GroupQueryAttention model and compare with ONNX Runtime; `valid` ([batch]
    query rows per batch entry) leaves out the padded query rows ONNX Runtime leaves unspecified."""
    inputs = {name: feeds.get(name) for name in _GQA_INPUTS}
    m = ms_node("GroupQueryAttention", inputs, _GQA_OUT, attrs)
    got, want, report = run(tmp_path, m, inputs)
    if valid is not None:
        for i, rows in enumerate(valid):
            got[0][i, rows:] = want[0][i, rows:]
    check(got, want)
    return report


def _gqa_feeds(b, s, heads, kv_heads, d, past, lengths, packed=False, rotary=False):
    """Feeds for a step of `s` new tokens over a BNSH cache of `past` rows (0: no past); lengths:
    the total length per batch entry after the step (seqlens_k + 1)."""
    feeds = {"seqlens_k": np.array(lengths, np.int32) - 1,
             "total": np.array(max(max(lengths), s if past == 0 else 0), np.int32)}
    if packed:
        feeds["q"] = f32(b, s, (heads + 2 * kv_heads) * d)
    else:
        feeds.update(q=f32(b, s, heads * d), k=f32(b, s, kv_heads * d), v=f32(b, s, kv_heads * d))
    if past:
        feeds.update(past_key=f32(b, kv_heads, past, d), past_value=f32(b, kv_heads, past, d))
    if rotary:
        feeds.update(cos=f32(64, d // 2), sin=f32(64, d // 2))
    return feeds


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary, interleaved", [(False, 0), (True, 0), (True, 1)])
@pytest.mark.parametrize("step", ["prompt", "decode"])
def test_group_query_attention(tmp_path, heads, kv_heads, packed, rotary, interleaved, step):
    """A prompt (no past) and one decoding step over a past of 6 (present = past + 1), batch 2."""
    past, s = (0, 5) if step == "prompt" else (6, 1)
    feeds = _gqa_feeds(2, s, heads, kv_heads, 16, past, [past + s] * 2, packed, rotary)
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": int(rotary), "rotary_interleaved": interleaved}
    report = _gqa(tmp_path, feeds, attrs)
    assert report.fusions.get("attention") == 1 and not report.fallbacks
    if rotary and not interleaved:
        assert report.fusions.get("rope") == 2


@pytest.mark.parametrize("case", ["padded prompt", "ragged decode", "static cache", "chunk", "chunk static",
                                  "window prompt", "window decode", "non-causal", "attention_bias", "position_ids",
                                  "position_ids prompt", "scale"])
def test_group_query_attention_forms(tmp_path, case):
    """Batch entries of different lengths (seqlens_k), a fixed-size past buffer (present rows
    written at seqlens_k, zeros after), several new tokens over a past, local windows, ..."""
    h, kvh, d = 4, 2, 16
    attrs = {"num_heads": h, "kv_num_heads": kvh, "do_rotary": 1}
    valid = None
    if case == "padded prompt":
        feeds, valid = _gqa_feeds(2, 5, h, kvh, d, 0, [5, 3], rotary=True), [5, 3]
    elif case == "ragged decode":
        feeds = _gqa_feeds(2, 1, h, kvh, d, 6, [7, 4], rotary=True)
    elif case == "static cache":
        feeds = _gqa_feeds(2, 1, h, kvh, d, 10, [7, 4], rotary=True)
    elif case == "chunk":
        feeds = _gqa_feeds(1, 3, h, kvh, d, 4, [7], rotary=True)
    elif case == "chunk static":
        feeds = _gqa_feeds(1, 3, h, kvh, d, 10, [7], rotary=True)
    elif case == "window prompt":
        feeds, valid = _gqa_feeds(2, 6, h, kvh, d, 0, [6, 4]), [6, 4]
        attrs.update(do_rotary=0, local_window_size=2)
    elif case == "window decode":
        feeds = _gqa_feeds(2, 1, h, kvh, d, 10, [9, 6], rotary=True)
        attrs.update(local_window_size=3)
    elif case == "non-causal":
        feeds, valid = _gqa_feeds(2, 5, h, kvh, d, 0, [5, 3]), [5, 3]
        attrs.update(do_rotary=0, causal=0)
    elif case == "attention_bias":
        feeds = _gqa_feeds(2, 1, h, kvh, d, 10, [7, 4])
        feeds["attention_bias"] = f32(2, 1, 1, 7)
        attrs.update(do_rotary=0)
    elif case == "position_ids":
        feeds = _gqa_feeds(2, 1, h, kvh, d, 6, [7, 7], rotary=True)
        feeds["position_ids"] = np.array([[9], [2]], np.int64)
    elif case == "position_ids prompt":   # the first prompt reads only position_ids[0, 0]
        feeds = _gqa_feeds(2, 5, h, kvh, d, 0, [5, 5], rotary=True)
        feeds["position_ids"] = np.array([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]], np.int64)
    else:
        feeds = _gqa_feeds(2, 1, h, kvh, d, 6, [7, 7])
        attrs.update(do_rotary=0, scale=0.3)
    _gqa(tmp_path, feeds, attrs, valid)


@pytest.mark.parametrize("attrs, extra, match", [
    ({"smooth_softmax": 1}, {}, "smooth_softmax"),
    ({"softcap": 30.0}, {}, "softcap"),
    ({"qk_output": 1}, {}, "qk_output"),
    ({}, {"head_sink": f32(4)}, "head_sink"),
])
def test_group_query_attention_unsupported_forms_are_clear_errors(tmp_path, attrs, extra, match):
    feeds = {**_gqa_feeds(2, 5, 4, 2, 16, 0, [5, 5]), **extra}
    inputs = {name: feeds.get(name) for name in _GQA_INPUTS}
    m = ms_node("GroupQueryAttention", inputs, _GQA_OUT, {"num_heads": 4, "kv_num_heads": 2, **attrs})
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    with pytest.raises(KfuseError, match=match):
        kfuse.compile(str(path), [torch.from_numpy(v) for v in inputs.values() if v is not None])


def test_group_query_attention_seqlens_k_is_read_at_run_time(tmp_path):
    """A fixed-size cache decoded at other lengths: seqlens_k is not specialised, so one compiled
    model serves every step (total_sequence_length, which sets no shape here, is)."""
    feeds = _gqa_feeds(2, 1, 4, 2, 16, 10, [7, 4], rotary=True)
    inputs = {name: feeds.get(name) for name in _GQA_INPUTS}
    m = ms_node("GroupQueryAttention", inputs, _GQA_OUT, {"num_heads": 4, "kv_num_heads": 2, "do_rotary": 1})
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    given = {k: v for k, v in inputs.items() if v is not None}
    cm = kfuse.compile(str(path), [torch.from_numpy(v) for v in given.values()])
    assert list(cm.graph.specialised) == [list(given).index("total")]
    given["seqlens_k"] = np.array([2, 6], np.int32)
    got = [g.numpy() for g in cm(*[torch.from_numpy(v) for v in given.values()])]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, given)
    check(got, want)


@pytest.mark.parametrize("activation, params", [("", []), ("Relu", []), ("Sigmoid", []), ("Tanh", []),
                                                ("LeakyRelu", [0.2]), ("Clip", [-0.5, 0.7]),
                                                ("HardSigmoid", [0.3, 0.4])])
@pytest.mark.parametrize("z", [False, True])
def test_fused_conv(tmp_path, activation, params, z):
    """ONNX Runtime's FusedConv: activation(Conv(x, w, b) + z), Conv's attributes (groups, pads, strides)."""
    attrs = dict(kernel_shape=[3, 3], pads=[1, 0, 1, 2], strides=[2, 1], group=2, activation=activation,
                 activation_params=params)
    if not activation:
        del attrs["activation"]
    if not params:
        del attrs["activation_params"]
    x, w, b = f32(2, 4, 9, 7), f32(6, 2, 3, 3), f32(6)
    zin = {"z": f32(2, 6, 5, 7)} if z else {}
    model = ms_node("FusedConv", {"x": x, **zin}, {"y": (F, 4)}, attrs, inits={"w": w, "b": b})
    # Z is FusedConv's fourth input: put it after the initializers
    node = model.graph.node[0]
    if z:
        node.input[:] = ["x", "w", "b", "z"]
    got, want, _ = run(tmp_path, model, {"x": x, **zin})
    check(got, want)


@pytest.mark.parametrize("activation, attrs", [("Relu", {}), ("LeakyRelu", {"activation_alpha": 0.3}),
                                               ("HardSigmoid", {"activation_alpha": 0.25, "activation_beta": 0.6})])
def test_fused_gemm(tmp_path, activation, attrs):
    a, b, c = f32(5, 7), f32(3, 7), f32(3)
    model = ms_node("FusedGemm", {"a": a}, {"y": (F, 2)}, dict(transB=1, alpha=0.5, beta=2.0, activation=activation,
                                                                  **attrs), inits={"b": b, "c": c})
    got, want, _ = run(tmp_path, model, {"a": a})
    check(got, want)


@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_fused_matmul(tmp_path, trans_a, trans_b):
    a = f32(2, 3, 5, 4) if trans_a else f32(2, 3, 4, 5)
    b = f32(3, 6, 5) if trans_b else f32(3, 5, 6)
    model = ms_node("FusedMatMul", {"a": a, "b": b}, {"y": (F, 4)}, dict(alpha=0.7, transA=trans_a, transB=trans_b))
    got, want, _ = run(tmp_path, model, {"a": a, "b": b})
    check(got, want)


def test_extended_optimized_cnn_file(tmp_path):
    """A CNN file as ONNX Runtime's EXTENDED optimizations save it (FusedConv with its activation and the
    residual add): kfuse compiles it and matches the unoptimized file."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Hardtanh(0.0, 6.0),
                            torch.nn.Conv2d(8, 4, 1), torch.nn.Sigmoid()).eval()
    x = torch.randn(1, 3, 16, 16)
    plain, opt = tmp_path / "plain.onnx", tmp_path / "opt.onnx"
    torch.onnx.export(m, (x,), str(plain), dynamo=False, input_names=["x"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(plain), so, providers=["CPUExecutionProvider"])
    assert "FusedConv" in {n.op_type for n in onnx.load(str(opt)).graph.node}
    got = kfuse.compile(str(opt), (x,))(x)
    np.testing.assert_allclose(got.numpy(), m(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_qoperator_quantized_cnn(tmp_path):
    """A CNN quantized by ONNX Runtime's quantizer in the QOperator format: QLinearConv and the com.microsoft
    QLinearAdd, QLinearMul, QLinearConcat, QLinearLeakyRelu, QLinearAveragePool, QLinearSigmoid,
    QLinearGlobalAveragePool and QGemm; ONNX Runtime's outputs exactly (at two batch sizes)."""
    quant = pytest.importorskip("onnxruntime.quantization")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 1), torch.nn.Linear(8, 10)

        def forward(self, x):
            a, b = self.c1(x), self.c2(x)
            y = torch.nn.functional.leaky_relu(torch.cat([a + b, a * b], 1), 0.1)
            y = torch.sigmoid(torch.nn.functional.avg_pool2d(y, 2))
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))

    class Data(quant.CalibrationDataReader):
        def __init__(self):
            g = torch.Generator().manual_seed(3)
            self.batches = iter([{"x": torch.randn(2, 4, 8, 8, generator=g).numpy()} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)
    torch.manual_seed(0)
    plain, qop = tmp_path / "m.onnx", tmp_path / "qop.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(2, 4, 8, 8),), str(plain), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    quant.quantize_static(str(plain), str(qop), Data(), quant_format=quant.QuantFormat.QOperator)
    ops = {n.op_type for n in onnx.load(str(qop)).graph.node if n.domain == MS}
    assert {"QLinearAdd", "QLinearMul", "QLinearConcat", "QGemm", "QLinearGlobalAveragePool"} <= ops, ops
    sess = ort.InferenceSession(str(qop), providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(batch))
        got = kfuse.compile(str(qop), (x,))(x)
        np.testing.assert_array_equal(got.numpy(), sess.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("quantized_output", [False, True])
def test_qgemm(tmp_path, quantized_output):
    """QGemm with transA, a per-column weight scale and zero point, an int32 bias, alpha; a float output
    where no y_scale is given."""
    a = rng.integers(0, 256, (5, 7), dtype=np.uint8)          # [K, M], transA
    b = rng.integers(-128, 128, (5, 6), dtype=np.int8)
    inits = {"a_scale": np.array(0.02, np.float32), "a_zp": np.array(128, np.uint8), "b": b,
             "b_scale": np.linspace(0.01, 0.03, 6).astype(np.float32), "b_zp": np.zeros(6, np.int8),
             "c": rng.integers(-500, 500, (6,), dtype=np.int32)}
    if quantized_output:
        inits |= {"y_scale": np.array(0.05, np.float32), "y_zp": np.array(100, np.uint8)}
    model = ms_node("QGemm", {"a": a}, {"y": (TensorProto.UINT8 if quantized_output else F, 2)},
                    dict(transA=1, alpha=0.75), inits=inits)
    got, want, _ = run(tmp_path, model, {"a": a})
    # The exact result, from int64 products: ONNX Runtime's u8s8 kernel on AVX2 without VNNI (a Zen 3)
    # sums pairs of products in saturating int16 and was off by up to 2.4 here, so it is not the reference.
    acc = (a.T.astype(np.int64) - 128) @ b.astype(np.int64) + inits["c"]
    y = 0.75 * acc * (0.02 * inits["b_scale"].astype(np.float64))
    if quantized_output:
        y = np.clip(np.rint(y / 0.05) + 100, 0, 255)
        assert np.abs(got[0].astype(np.int64) - y).max() <= 1      # float32 rounding at a half-way point
    else:
        np.testing.assert_allclose(got[0], y, rtol=1e-6, atol=1e-5)
    if np.abs(want[0].astype(np.float64) - y).max() <= (1 if quantized_output else 1e-5):
        check(got, want, tol=1 if quantized_output else 1e-6)      # and as ONNX Runtime, where it is exact
