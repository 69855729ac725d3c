"""Shape tensors given as graph inputs are specialised by value, and declared dims of -1, 0 or a name
are dynamic (docs/ONNX.md). Each model is compiled from its file with kfuse.compile and compared with
ONNX Runtime on the same file; the loaded graph's `specialised` record ({input index: value}) is
checked."""
import numpy as np
import onnx
import pytest
import torch
from helpers import KERNEL_TOL, assert_close
from onnx import TensorProto, helper, numpy_helper

import kfuse
from kfuse.capture.onnx import load_onnx
from kfuse.capture.onnx_ops.common import SPECIALISE_LIMIT
from kfuse.errors import KfuseError

ort = pytest.importorskip("onnxruntime")
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def save(tmp_path, nodes, inputs, outputs, inits=(), opset=18, name="m"):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def tensor_in(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def out(name, rank, elem=F):
    """An output of known rank, its dims named (the checker wants a shape; the sizes are the values')."""
    return helper.make_tensor_value_info(name, elem, [f"{name}{i}" for i in range(rank)])


def run_ort(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(r)) for r in sess.run(None, feeds)]


def check(path, inputs, specialised: dict, ort_path=None):
    """kfuse.compile on the file matches ONNX Runtime (on `ort_path` if given), and the loader
    records `specialised`."""
    g = load_onnx(path, inputs)
    assert set(g.specialised) == set(specialised)
    for i, v in specialised.items():
        assert torch.equal(g.specialised[i], torch.as_tensor(v)), (i, g.specialised[i], v)
    got = kfuse.compile(path, inputs)(*inputs)
    got = list(got) if isinstance(got, tuple) else [got]
    want = run_ort(ort_path or path, inputs)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_close(a, b, **KERNEL_TOL)
    return g


def test_reshape_shape_input(tmp_path):
    path = save(tmp_path, [helper.make_node("Reshape", ["x", "shape"], ["y"])],
                [tensor_in("x", F, [2, 3, 4]), tensor_in("shape", I64, [2])], [out("y", 2)])
    x = torch.randn(2, 3, 4)
    for shape in ([4, -1], [0, 12]):
        check(path, [x, torch.tensor(shape)], {1: shape})


def test_reduce_sum_axes_input(tmp_path):
    path = save(tmp_path, [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
                [tensor_in("x", F, [3, 4, 5]), tensor_in("axes", I64, [1])], [out("y", 2)])
    for axes in ([1], [-1]):
        check(path, [torch.randn(3, 4, 5), torch.tensor(axes)], {1: axes})


def test_slice_starts_input(tmp_path):
    ends = numpy_helper.from_array(np.array([4, 5], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([0, 1], np.int64), "axes")
    path = save(tmp_path, [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])],
                [tensor_in("x", F, [5, 6]), tensor_in("starts", I64, [2])], [out("y", 2)], [ends, axes])
    check(path, [torch.randn(5, 6), torch.tensor([1, -4])], {1: [1, -4]})


def test_topk_k_input(tmp_path):
    path = save(tmp_path, [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1)],
                [tensor_in("x", F, [3, 7]), tensor_in("k", I64, [1])], [out("values", 2), out("indices", 2, I64)])
    check(path, [torch.randn(3, 7), torch.tensor([3])], {1: [3]})


def test_if_on_a_scalar_bool_input(tmp_path):
    then = helper.make_graph([helper.make_node("Add", ["x", "x"], ["t"])], "then", [], [out("t", 2)])
    other = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["e"])], "else", [], [out("e", 2)])
    path = save(tmp_path, [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                [tensor_in("x", F, [2, 3]), tensor_in("cond", TensorProto.BOOL, [])], [out("y", 2)])
    x = torch.randn(2, 3)
    for cond in (True, False):
        g = check(path, [x, torch.tensor(cond)], {1: cond})
        assert [n.op for n in g.nodes if n.op not in ("input", "const")] == ["add" if cond else "mul"]


def test_shape_computed_from_inputs_and_constants(tmp_path):
    """A shape computed from inputs (and constants) by ops kfuse maps: the inputs it reads are
    specialised, the data input is not."""
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    nodes = [helper.make_node("Add", ["rows", "one"], ["rows1"]),
             helper.make_node("Concat", ["rows1", "cols"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    path = save(tmp_path, nodes, [tensor_in("x", F, [4, 6]), tensor_in("rows", I64, [1]),
                                  tensor_in("cols", I64, [1])], [out("y", 2)], [one])
    check(path, [torch.randn(4, 6), torch.tensor([2]), torch.tensor([-1])], {1: [2], 2: [-1]})


def test_data_operands_are_not_specialised(tmp_path):
    """Indices and OneHot's values given as inputs are data: computed at run time, never specialised."""
    nodes = [helper.make_node("GatherElements", ["x", "idx"], ["ge"], axis=1),
             helper.make_node("GatherND", ["x", "nd"], ["gnd"]),
             helper.make_node("OneHot", ["cls", "depth", "values"], ["oh"])]
    depth = numpy_helper.from_array(np.array(4, np.int64), "depth")
    path = save(tmp_path, nodes, [tensor_in("x", F, [3, 4]), tensor_in("idx", I64, [3, 2]), tensor_in("nd", I64, [2, 2]),
                                  tensor_in("cls", I64, [5]), tensor_in("values", F, [2])],
                [out("ge", 2), out("gnd", 1), out("oh", 2)], [depth])
    inputs = [torch.randn(3, 4), torch.tensor([[0, -1], [2, 1], [3, 3]]), torch.tensor([[0, 1], [-1, 2]]),
              torch.tensor([0, 3, -1, 2, 1]), torch.tensor([-1.0, 5.0])]
    check(path, inputs, {})


@pytest.mark.parametrize("dim", [-1, 0, "batch", None])
def test_dynamic_declared_dims(tmp_path, dim):
    """A dim declared as -1, 0, a name or nothing takes the example's size; a positive one must match.
    (ONNX Runtime holds a declared 0 to size 0: it runs the file with the dim named instead.)"""
    def model(dim, name):
        x_info = tensor_in("x", F, [3, 4])
        d = x_info.type.tensor_type.shape.dim[0]
        d.Clear()
        if isinstance(dim, int):
            d.dim_value = dim
        elif dim is not None:
            d.dim_param = dim
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "dyn", [x_info], [out("y", 2)])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), tmp_path / name)
        return tmp_path / name

    path = model(dim, "dyn.onnx")
    named = model("n", "named.onnx") if dim == 0 else None
    for batch in (1, 5):
        check(path, [torch.randn(batch, 4)], {}, ort_path=named)
    with pytest.raises(KfuseError, match="has size 4 in dim 1"):
        load_onnx(path, [torch.randn(2, 3)])


def test_a_large_input_is_not_specialised(tmp_path):
    """Only small inputs are shape tensors: a shape-like operand computed from a big input stays a
    clear error."""
    nodes = [helper.make_node("ReduceMax", ["big"], ["m"], keepdims=1),
             helper.make_node("Cast", ["m"], ["k"], to=I64),
             helper.make_node("TopK", ["x", "k"], ["values", "indices"])]
    path = save(tmp_path, nodes, [tensor_in("x", F, [2, 8]), tensor_in("big", F, [SPECIALISE_LIMIT + 1])],
                [out("values", 2), out("indices", 2, I64)])
    with pytest.raises(KfuseError, match="specialised by value"):
        load_onnx(path, [torch.randn(2, 8), torch.full((SPECIALISE_LIMIT + 1,), 3.0)])


def test_non_tensor_inputs_are_clear_errors(tmp_path):
    seq = helper.make_tensor_sequence_value_info("s", F, None)
    nodes = [helper.make_node("SequenceAt", ["s", "i"], ["y"])]
    path = save(tmp_path, nodes, [seq, tensor_in("i", I64, [])], [out("y", 1)])
    with pytest.raises(KfuseError, match="'s' is a sequence"):
        kfuse.compile(path, ([torch.ones(2)], torch.tensor(0)))
    path = save(tmp_path, [helper.make_node("Identity", ["x"], ["y"])], [tensor_in("x", TensorProto.FLOAT8E4M3FN, [2])],
                [out("y", 1, TensorProto.FLOAT8E4M3FN)], name="f8")
    with pytest.raises(KfuseError, match="element type FLOAT8E4M3FN"):
        kfuse.compile(path, (torch.ones(2).to(torch.float8_e4m3fn),))


def test_new_value_of_a_specialised_input_compiles_again(tmp_path):
    path = save(tmp_path, [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
                [tensor_in("x", F, [3, 4]), tensor_in("axes", I64, [1])], [out("y", 1)])
    x = torch.randn(3, 4)
    cm = kfuse.compile(path, (x, torch.tensor([0])))
    assert_close(cm(x, torch.tensor([0])), x.sum(0), **KERNEL_TOL)
    assert_close(cm(x, torch.tensor([1])), x.sum(1), **KERNEL_TOL)
    assert_close(cm(x, torch.tensor([0])), x.sum(0), **KERNEL_TOL)     # the first program, from the cache
    cm.save(tmp_path / "art")                                          # both values travel in the artifact
    loaded = kfuse.load(tmp_path / "art")
    for axis in (0, 1):
        assert torch.equal(loaded(x, torch.tensor([axis])), cm(x, torch.tensor([axis])))
    with pytest.raises(KfuseError, match="loaded from an artifact"):
        loaded(x, torch.tensor([-1]))
