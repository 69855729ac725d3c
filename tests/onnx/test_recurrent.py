"""ONNX LSTM, GRU and RNN (kfuse/capture/onnx_ops/recurrent.py): torch.nn.LSTM/GRU/RNN exported by
the legacy exporter (which writes ONNX LSTM/GRU/RNN nodes), compiled from the file with
kfuse.compile and compared with ONNX Runtime; plus hand-built nodes for what torch does not export
(peepholes, clip, GRU's linear_before_reset=0, layout 1, varying sequence_lens, input_forget);
layout 1 against ONNX's reference evaluator, as ONNX Runtime has no kernel for it. The `recurrent`
op's C kernel (kfuse/backends/c/recurrent.py) against its reference over odd sizes and every option,
into NaN-filled outputs; the unrolled form (dtypes other than float32) still checked. Their speed
against ONNX Runtime and eager: bench/bench_recurrent.py."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import kfuse

ort = pytest.importorskip("onnxruntime")
rng = np.random.default_rng(13)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


class Net(torch.nn.Module):
    def __init__(self, cell, layers, bidirectional, batch_first, with_state):
        super().__init__()
        self.kind = cell
        self.rnn = getattr(torch.nn, cell)(16, 24, num_layers=layers, bidirectional=bidirectional,
                                           batch_first=batch_first)
        self.with_state = with_state

    def forward(self, x, *state):
        if self.kind == "LSTM":
            y, (h, c) = self.rnn(x, tuple(state) if state else None)
            return y, h, c
        y, h = self.rnn(x, state[0] if state else None)
        return y, h


def export(tmp_path, model, xs, name="model.onnx"):
    path = tmp_path / name
    with torch.no_grad():
        torch.onnx.export(model, tuple(xs), str(path), dynamo=False, opset_version=17)
    return path


def ort_run(path, feeds, threads=None):
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess, sess.run(None, dict(zip(names, feeds)))


def check(got, want, tol=1e-4):
    got = got if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = g.detach().numpy()
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,with_state", [
    (1, False, False, False), (1, True, False, True), (2, True, True, False), (2, False, True, True)])
def test_torch_export(tmp_path, cell, layers, bidirectional, batch_first, with_state):
    torch.manual_seed(0)
    model = Net(cell, layers, bidirectional, batch_first, with_state).eval()
    seq, batch = 7, 3
    x = torch.randn((batch, seq, 16) if batch_first else (seq, batch, 16))
    xs = [x]
    if with_state:
        xs += [torch.randn(layers * (2 if bidirectional else 1), batch, 24)
               for _ in range(2 if cell == "LSTM" else 1)]
    path = export(tmp_path, model, xs)
    ops = {nd.op_type for nd in onnx.load(str(path)).graph.node}
    assert cell in ops
    cm = kfuse.compile(str(path), xs)
    _, want = ort_run(path, [v.numpy() for v in xs])
    check(cm(*xs), want)
    report = cm.report()
    assert report.fusions and not report.fallbacks


def one_node(op, names, feeds, outputs, attrs):
    """A one-node opset-22 model: input names ('' for an omitted optional input), the graph inputs'
    arrays by name."""
    node = helper.make_node(op, names, list(outputs), **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
         for n, v in feeds.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"{n}{i}" for i in range(4 if n == "Y" else 3)])
         for n in outputs if n], [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)], ir_version=10)


def run_node(tmp_path, model, feeds, oracle="ort"):
    """kfuse's outputs and the oracle's: ONNX Runtime, or ONNX's reference evaluator where ONNX
    Runtime has no kernel (layout 1)."""
    path = tmp_path / "node.onnx"
    onnx.save(model, path)
    xs = [torch.from_numpy(v) for v in feeds]
    cm = kfuse.compile(str(path), xs)
    if oracle == "ort":
        _, want = ort_run(path, feeds)
    else:
        names = [i.name for i in model.graph.input]
        want = [np.asarray(w, dtype=np.float32) for w in ReferenceEvaluator(model).run(None, dict(zip(names, feeds)))]
    return cm(*xs), want


def inputs(op, dirs, seq=5, batch=3, size=4, hid=6, layout=0, bias=True, lens=None, h0=False, c0=False,
           peep=False):
    global rng
    rng = np.random.default_rng(13)   # the same data whatever order the tests run in
    g = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    d = {"X": f32(batch, seq, size) if layout else f32(seq, batch, size),
         "W": f32(dirs, g * hid, size) * 0.5, "R": f32(dirs, g * hid, hid) * 0.5}
    d["B"] = f32(dirs, 2 * g * hid) if bias else None
    d["L"] = np.array(lens, dtype=np.int32) if lens is not None else None
    state = (batch, dirs, hid) if layout else (dirs, batch, hid)
    d["H"] = f32(*state) if h0 else None
    if op == "LSTM":
        d["C"] = f32(*state) if c0 else None
        d["P"] = f32(dirs, 3 * hid) if peep else None
    while d[list(d)[-1]] is None:   # trailing omitted inputs are dropped
        d.pop(list(d)[-1])
    names = {k: (k if v is not None else "") for k, v in d.items()}
    return {k: v for k, v in d.items() if v is not None}, [names[k] for k in d]


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("variant", ["plain", "layout1_states", "lens", "clip"])
def test_node(tmp_path, op, direction, variant):
    dirs = 2 if direction == "bidirectional" else 1
    kw = {}
    attrs = {"hidden_size": 6, "direction": direction}
    if variant == "layout1_states":
        kw = {"layout": 1, "h0": True, "c0": True}
        attrs["layout"] = 1
    elif variant == "lens":
        kw = {"lens": [5, 2, 4], "h0": True, "c0": True}
    elif variant == "clip":
        attrs["clip"] = 0.7
    feeds, names = inputs(op, dirs, **kw)
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    model = one_node(op, names, feeds, outs, attrs)
    got, want = run_node(tmp_path, model, list(feeds.values()), "reference" if variant == "layout1_states" else "ort")
    check(got, want)


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("acts", [None, ["Relu", "Tanh"], ["Sigmoid", "Relu"]])
def test_gru_linear_before_reset_and_activations(tmp_path, lbr, acts):
    feeds, names = inputs("GRU", 1, h0=True)
    attrs = {"hidden_size": 6, "linear_before_reset": lbr}
    if acts:
        attrs["activations"] = acts
    model = one_node("GRU", names, feeds, ["Y", "Y_h"], attrs)
    got, want = run_node(tmp_path, model, list(feeds.values()))
    check(got, want)


@pytest.mark.parametrize("input_forget", [0, 1])
def test_lstm_peepholes_and_input_forget(tmp_path, input_forget):
    feeds, names = inputs("LSTM", 2, h0=True, c0=True, peep=True)
    attrs = {"hidden_size": 6, "direction": "bidirectional", "input_forget": input_forget,
             "activations": ["Sigmoid", "Tanh", "Relu"] * 2}
    model = one_node("LSTM", names, feeds, ["Y", "Y_h", "Y_c"], attrs)
    got, want = run_node(tmp_path, model, list(feeds.values()))
    check(got, want)


def test_omitted_outputs(tmp_path):
    feeds, names = inputs("LSTM", 1)
    model = one_node("LSTM", names, feeds, ["", "", "Y_c"], {"hidden_size": 6})
    got, want = run_node(tmp_path, model, list(feeds.values()))
    check(got, want)


def test_unsupported_activation_is_a_clear_error(tmp_path):
    feeds, names = inputs("RNN", 1)
    model = one_node("RNN", names, feeds, ["Y"],
                     {"hidden_size": 6, "activations": ["Softsign"]})
    path = tmp_path / "node.onnx"
    onnx.save(model, path)
    with pytest.raises(kfuse.KfuseError, match="activation 'Softsign' is not supported"):
        kfuse.compile(str(path), [torch.from_numpy(v) for v in feeds.values()])


# -- the `recurrent` op's C kernel (kfuse/backends/c/recurrent.py) against its reference ------------
GATE_COUNT = {"lstm": 4, "gru": 3, "rnn": 1}
DEFAULT_ACTS = {"lstm": ("sigmoid", "tanh", "tanh"), "gru": ("sigmoid", "tanh"), "rnn": ("tanh",)}


def recurrent_case(cell, dirs, seq, batch, hid, direction=None, lens=None, clip=None, lbr=True, states=True,
                   rb=False, peep=False, input_forget=False, acts=None):
    """A graph of one `recurrent` node (R a constant, the rest inputs), its input tensors, and the
    reference output."""
    from kfuse.ir import Graph
    from kfuse.ops.reference import REFERENCE
    gen = torch.Generator().manual_seed(hid * 1000 + batch * 10 + seq)
    g_ = GATE_COUNT[cell]

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale
    xw, r = rand(seq, batch, dirs * g_ * hid), rand(dirs, g_ * hid, hid, scale=hid ** -0.5)   # torch.nn's scale
    extra = {"rb": rand(dirs, g_ * hid) if rb else None,
             "h0": rand(dirs, batch, hid) if states else None,
             "c0": rand(dirs, batch, hid) if states and cell == "lstm" else None,
             "p": rand(dirs, 3 * hid) if peep and cell == "lstm" else None}
    extra = {k: v for k, v in extra.items() if v is not None}
    attrs = dict(cell=cell, direction=direction or ("bidirectional" if dirs == 2 else "forward"),
                 acts=((acts or DEFAULT_ACTS[cell]),) * dirs, clip=clip, lbr=lbr, input_forget=input_forget,
                 lens=lens, optional=tuple(extra))
    g = Graph()
    x_in = g.input(xw.shape, torch.float32, "xw")
    ins = [g.input(v.shape, torch.float32, k) for k, v in extra.items()]
    node = g.add("recurrent", x_in, g.const(r), *ins, **attrs)
    return node, [xw, r, *extra.values()], REFERENCE["recurrent"](xw, r, *extra.values(), **attrs)


def run_kernel(node, args, threads=None):
    from kfuse.backends import openmp
    from kfuse.backends.c import recurrent as c_recurrent
    fn, backend = c_recurrent.kernel(node)
    assert backend == "c:recurrent"
    out = torch.full(node.shape, float("nan"))     # every element must be written
    if threads is None:
        got, = fn([out], *args)
    else:
        with openmp.using(threads):
            got, = fn([out], *args)
    assert got is out
    return got


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("hid", [1, 3, 17, 100])
@pytest.mark.parametrize("batch,seq", [(1, 1), (5, 7), (1, 7), (5, 1)])
@pytest.mark.parametrize("dirs", [1, 2])
def test_kernel_odd_sizes(cell, hid, batch, seq, dirs):
    node, args, want = recurrent_case(cell, dirs, seq, batch, hid)
    torch.testing.assert_close(run_kernel(node, args), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("variant", ["lens", "clip", "lens_clip_rb", "gru_lbr0", "peep", "peep_forget_relu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_variants(cell, direction, variant, threads):
    dirs = 2 if direction == "bidirectional" else 1
    kw = {}
    if "lens" in variant:
        kw["lens"] = (7, 3, 0, 5, 1)
    if "clip" in variant:
        kw["clip"] = 0.6
    if "rb" in variant:
        kw["rb"] = True
    if variant == "gru_lbr0":
        kw.update(lbr=False, rb=True, lens=(2, 7, 4, 0, 6))
    if variant.startswith("peep"):
        kw["peep"] = True
    if variant == "peep_forget_relu":
        kw.update(input_forget=True, acts={"lstm": ("sigmoid", "tanh", "relu"), "gru": ("sigmoid", "relu"),
                                           "rnn": ("relu",)}[cell])
    node, args, want = recurrent_case(cell, dirs, 7, 5, 40, direction, **kw)
    torch.testing.assert_close(run_kernel(node, args, threads), want, rtol=1e-4, atol=1e-5)


def test_kernel_split_across_threads():
    """One direction with a step big enough to be split over the threads (a barrier every step)."""
    from kfuse.backends.c import recurrent as c_recurrent
    for cell, lbr in (("lstm", True), ("gru", False)):
        node, args, want = recurrent_case(cell, 1, 5, 6, 200, lens=(5, 2, 5, 0, 4, 5), lbr=lbr, rb=True)
        assert 6 * GATE_COUNT[cell] * 200 * 200 >= c_recurrent.SPLIT_MIN_MACS
        torch.testing.assert_close(run_kernel(node, args, threads=2), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("hid,batch,seq", [(1, 1, 1), (3, 5, 7), (17, 1, 7), (100, 5, 3)])
def test_node_odd_sizes(tmp_path, op, hid, batch, seq):
    """End to end against ONNX Runtime: bidirectional, states given, lengths shorter than seq, clip."""
    lens = [max(1, seq - 2 * i) for i in range(batch)]
    feeds, names = inputs(op, 2, seq=seq, batch=batch, size=4, hid=hid, lens=lens, h0=True, c0=True)
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    model = one_node(op, names, feeds, outs, {"hidden_size": hid, "direction": "bidirectional", "clip": 2.5})
    got, want = run_node(tmp_path, model, list(feeds.values()))
    check(got, want)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_fused_and_unrolled_forms(tmp_path, op, monkeypatch):
    """float32 runs the time loop as one `recurrent` kernel; the unrolled form (other dtypes) still
    matches ONNX Runtime."""
    from kfuse.capture.onnx_ops import recurrent
    feeds, names = inputs(op, 2, lens=[5, 2, 4], h0=True)
    model = one_node(op, names, feeds, ["Y", "Y_h"], {"hidden_size": 6, "direction": "bidirectional"})
    path = tmp_path / "node.onnx"
    onnx.save(model, path)
    xs = [torch.from_numpy(v) for v in feeds.values()]
    _, want = ort_run(path, list(feeds.values()))
    cm = kfuse.compile(str(path), xs)
    assert [k.backend for k in cm.report().kernels if k.name == "recurrent"] == ["c:recurrent"]
    check(cm(*xs), want)
    monkeypatch.setattr(recurrent, "FUSED_DTYPES", ())
    cm = kfuse.compile(str(path), xs)
    assert not any(k.name == "recurrent" for k in cm.report().kernels)
    check(cm(*xs), want)
