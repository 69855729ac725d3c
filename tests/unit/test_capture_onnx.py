"""The ONNX frontend, handler by handler, against ONNX Runtime on small hand-built graphs, and
its errors on bad files and unsupported ops."""
import math

import numpy as np
import onnx
import pytest
import torch
from helpers import KERNEL_TOL, SMALL_TOL, C, assert_close, i64, typed_model
from onnx import TensorProto, helper, numpy_helper

from kfuse.capture.onnx import load_onnx, read_model
from kfuse.errors import InputError, KfuseError, ModelFileError, UnsupportedOpError
from kfuse.ops.reference import run

ort = pytest.importorskip("onnxruntime")
INT64_MAX = 2**63 - 1
rng = np.random.default_rng(0)


def f32(*shape, positive=False):
    a = rng.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.1 if positive else a


def make(op, inputs, attrs=None, opset=20, n_out=1, sym=False):
    """A one-node model; outputs typed from what ONNX Runtime computes on an untyped draft.
    `inputs`: arrays become graph inputs (symbolic dims with `sym`), C(...) initializers, None omitted."""
    names, graph_inputs, inits, feeds = [], [], [], {}
    for i, v in enumerate(inputs):
        if v is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(v, C):
            inits.append(numpy_helper.from_array(v.value, name))
        else:
            dims = [f"d{i}_{j}" for j in range(v.ndim)] if sym else list(v.shape)
            elem = helper.np_dtype_to_tensor_dtype(v.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, dims))
            feeds[name] = v
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"the_{op}_node", **(attrs or {}))
    return typed_model([node], graph_inputs, inits, feeds, outs, opset)


def check(op, inputs, attrs=None, opset=20, n_out=1):
    """kfuse's graph of the node computes what ONNX Runtime computes (same dtype and shape)."""
    m, feeds, expected = make(op, inputs, attrs, opset, n_out)
    examples = [torch.from_numpy(v) for v in feeds.values()]
    g = load_onnx(m, examples)
    g.check()
    got = run(g, examples)
    assert len(got) == len(expected)
    for y, e in zip(got, expected):
        assert_close(y, torch.from_numpy(np.array(e)), **KERNEL_TOL)
    return g


UNARY = ["Neg", "Abs", "Exp", "Sin", "Cos", "Tanh", "Sigmoid", "Erf", "Relu", "Floor", "Ceil", "Sign",
         "Softplus", "Reciprocal", "Identity"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    check(op, [f32(3, 5, 7)])


@pytest.mark.parametrize("op", ["Log", "Sqrt"])
def test_unary_positive(op):
    check(op, [f32(2, 9, positive=True)])


def test_not_isnan():
    check("Not", [rng.random((4, 3)) > 0.5])
    check("IsNaN", [np.array([1.0, np.nan, -np.inf, 0.0], np.float32)])


CASES = [  # (id, op, inputs, attrs, opset)
    ("leaky_relu", "LeakyRelu", [f32(3, 7)], {"alpha": 0.2}, 20),
    ("leaky_relu_default", "LeakyRelu", [f32(3, 7)], {}, 20),
    ("gelu", "Gelu", [f32(5, 6)], {}, 20),
    ("gelu_tanh", "Gelu", [f32(5, 6)], {"approximate": "tanh"}, 20),
    ("clip_attrs_opset6", "Clip", [f32(4, 5)], {"min": -0.5, "max": 0.3}, 6),
    ("clip_inputs", "Clip", [f32(4, 5), C(np.float32(-0.2)), C(np.float32(0.4))], {}, 13),
    ("clip_only_max", "Clip", [f32(4, 5), None, C(np.float32(0.1))], {}, 13),
    ("clip_runtime_min", "Clip", [f32(4, 5), np.array(-0.3, np.float32)], {}, 13),
    ("cast_f2i", "Cast", [f32(3, 4) * 5], {"to": TensorProto.INT64}, 20),
    ("cast_i2f", "Cast", [i64(-3, 0, 7)], {"to": TensorProto.FLOAT}, 20),
    ("cast_f2bool", "Cast", [np.array([0.0, 1.5, -2.0], np.float32)], {"to": TensorProto.BOOL}, 20),
    ("cast_like", "CastLike", [i64(1, 2, 3), C(np.zeros(1, np.float32))], {}, 20),
    ("add_bcast", "Add", [f32(3, 1, 5), f32(4, 1)], {}, 20),
    ("sub_bcast", "Sub", [f32(2, 3, 5), C(f32(5))], {}, 20),
    ("mul_scalar", "Mul", [f32(2, 3), C(np.float32(3.0))], {}, 20),
    ("div", "Div", [f32(3, 4), f32(3, 4, positive=True)], {}, 20),
    ("div_int_trunc", "Div", [i64(-7, 7, -8, 9), i64(2, -2, 3, 4)], {}, 20),
    ("div_int_const", "Div", [C(i64(-7, 7, 9)), C(i64(2, -2, 4))], {}, 20),
    ("pow_scalar", "Pow", [f32(3, 5), C(np.float32(2.0))], {}, 20),
    ("pow_int_exponent", "Pow", [f32(3, 5), C(np.int64(3))], {}, 20),
    ("pow_tensor", "Pow", [f32(3, 5, positive=True), f32(5)], {}, 20),
    ("equal", "Equal", [i64(1, 2, 3, 4), i64(1, 0, 3, 5)], {}, 20),
    ("less", "Less", [f32(3, 4), f32(4)], {}, 20),
    ("less_equal", "LessOrEqual", [i64(1, 2, 3), i64(2)], {}, 20),
    ("greater", "Greater", [f32(3, 4), f32(3, 1)], {}, 20),
    ("greater_equal", "GreaterOrEqual", [i64(1, 2, 3), i64(2)], {}, 20),
    ("and", "And", [rng.random((3, 4)) > 0.5, rng.random((4,)) > 0.5], {}, 20),
    ("or", "Or", [rng.random((3, 4)) > 0.5, rng.random((3, 4)) > 0.5], {}, 20),
    ("xor", "Xor", [rng.random((3, 4)) > 0.5, rng.random((3, 4)) > 0.5], {}, 20),
    ("where", "Where", [rng.random((2, 1, 4)) > 0.5, f32(3, 4), C(np.float32(-1e9))], {}, 20),
    ("max3", "Max", [f32(3, 4), f32(4), f32(3, 1)], {}, 20),
    ("min2", "Min", [f32(3, 4), f32(3, 4)], {}, 20),
    ("sum3", "Sum", [f32(3, 4), f32(4), f32(3, 4)], {}, 20),
    ("mean3", "Mean", [f32(3, 4), f32(4), f32(3, 4)], {}, 20),
    ("matmul_batched", "MatMul", [f32(2, 3, 5, 7), f32(3, 7, 4)], {}, 20),
    ("matmul_vec", "MatMul", [f32(7), f32(2, 7, 3)], {}, 20),
    ("gemm", "Gemm", [f32(3, 5), C(f32(5, 4)), C(f32(4))], {}, 20),
    ("gemm_trans_alpha_beta", "Gemm", [f32(5, 3), C(f32(4, 5)), C(f32(3, 4))],
     {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, 20),
    ("gemm_no_c", "Gemm", [f32(3, 5), f32(5, 2)], {"alpha": 1.5}, 20),
    # shapes: all fold to constants
    ("shape", "Shape", [f32(2, 3, 5)], {}, 20),
    ("shape_start_end", "Shape", [f32(2, 3, 5, 7)], {"start": 1, "end": -1}, 20),
    ("shape_clamped", "Shape", [f32(2, 3)], {"start": -9, "end": 9}, 20),
    ("size", "Size", [f32(2, 3, 5)], {}, 20),
    ("constant_of_shape", "ConstantOfShape", [C(i64(2, 3))],
     {"value": helper.make_tensor("v", TensorProto.INT64, [1], [7])}, 20),
    ("constant_of_shape_default", "ConstantOfShape", [C(i64(4))], {}, 20),
    ("range_int", "Range", [C(np.int64(2)), C(np.int64(11)), C(np.int64(3))], {}, 20),
    ("range_float_neg", "Range", [C(np.float32(1.0)), C(np.float32(-2.0)), C(np.float32(-0.7))], {}, 20),
    # data movement
    ("reshape_0_-1", "Reshape", [f32(2, 3, 4), C(i64(0, -1))], {}, 20),
    ("reshape_allowzero", "Reshape", [f32(2, 3, 4), C(i64(6, 4))], {"allowzero": 1}, 20),
    ("flatten_0", "Flatten", [f32(2, 3, 4)], {"axis": 0}, 20),
    ("flatten_neg", "Flatten", [f32(2, 3, 4, 5)], {"axis": -2}, 20),
    ("squeeze_attr", "Squeeze", [f32(1, 3, 1, 5)], {"axes": [0, -2]}, 11),
    ("squeeze_input", "Squeeze", [f32(1, 3, 1, 5), C(i64(2))], {}, 13),
    ("squeeze_all", "Squeeze", [f32(1, 3, 1, 5)], {}, 13),
    ("unsqueeze_attr", "Unsqueeze", [f32(3, 5)], {"axes": [0, 3]}, 11),
    ("unsqueeze_input", "Unsqueeze", [f32(3, 5), C(i64(-1, 1))], {}, 13),
    ("transpose_default", "Transpose", [f32(2, 3, 4)], {}, 20),
    ("transpose_perm", "Transpose", [f32(2, 3, 4, 5)], {"perm": [0, 2, 3, 1]}, 20),
    ("concat_neg_axis", "Concat", [f32(2, 3), f32(2, 5), C(f32(2, 1))], {"axis": -1}, 20),
    ("slice_basic", "Slice", [f32(5, 7), C(i64(1)), C(i64(4))], {}, 20),
    ("slice_steps_axes", "Slice",
     [f32(5, 7, 3), C(i64(1, 0)), C(i64(INT64_MAX, 6)), C(i64(1, 2)), C(i64(2, 3))], {}, 20),
    ("slice_negative_idx", "Slice", [f32(5, 7), C(i64(-4)), C(i64(-1)), C(i64(-1))], {}, 20),
    ("slice_negative_step", "Slice", [f32(5, 7), C(i64(-1)), C(i64(-INT64_MAX)), C(i64(1)), C(i64(-2))], {}, 20),
    ("slice_reverse_part", "Slice", [f32(6), C(i64(4)), C(i64(0)), C(i64(0)), C(i64(-1))], {}, 20),
    ("slice_empty", "Slice", [f32(5, 3), C(i64(4)), C(i64(2))], {}, 20),
    ("slice_opset9_attrs", "Slice", [f32(5, 7)], {"starts": [1, -3], "ends": [100, -1], "axes": [0, 1]}, 9),
    ("gather_neg_const", "Gather", [f32(4, 6, 3), C(i64(-1, 0, 2, -6).reshape(2, 2))], {"axis": 1}, 20),
    ("gather_runtime_idx", "Gather", [C(f32(10, 4)), np.array([[3, -1], [0, -10]], np.int64)], {}, 20),
    ("gather_scalar", "Gather", [f32(4, 6), C(np.int64(-2))], {"axis": 0}, 20),
    ("gather_int32_idx", "Gather", [f32(4, 6), np.array([1, 3], np.int32)], {"axis": 1}, 20),
    ("gather_elements", "GatherElements", [f32(3, 4), C(np.array([[0, -1], [2, 1], [3, 0]]))], {"axis": 1}, 20),
    ("gather_elements_axis0", "GatherElements", [f32(3, 4, 2), C(rng.integers(-3, 3, (2, 4, 2)))], {"axis": 0}, 20),
    ("gather_nd", "GatherND", [f32(3, 4, 5), C(np.array([[0, 1], [2, -1], [1, 3]], np.int64))], {}, 20),
    ("gather_nd_bool", "GatherND", [rng.random((2, 5)) > 0.5, C(rng.integers(0, 2, (2, 1, 3, 2)) * [1, 2])], {}, 20),
    ("expand_bidirectional", "Expand", [f32(3, 1), C(i64(2, 1, 4))], {}, 20),
    ("expand_noop", "Expand", [f32(3, 4), C(i64(1))], {}, 20),
    ("tile", "Tile", [f32(2, 3), C(i64(3, 2))], {}, 20),
    ("tile_bool", "Tile", [rng.random((1, 2, 3)) > 0.5, C(i64(2, 1, 2))], {}, 20),
    ("trilu_upper", "Trilu", [f32(2, 4, 5)], {}, 20),
    ("trilu_lower_k", "Trilu", [f32(4, 5), C(np.int64(-1))], {"upper": 0}, 20),
    ("trilu_upper_k", "Trilu", [f32(5, 4), C(np.int64(2))], {"upper": 1}, 20),
    ("pad_opset11", "Pad", [f32(2, 3, 4), C(i64(0, 1, 2, 0, 0, 1)), C(np.float32(-1.5))], {}, 11),
    ("pad_axes_opset18", "Pad", [f32(2, 3, 4), C(i64(1, 3, 0, 2)), None, C(i64(-1, 0))], {}, 18),
    ("pad_opset2_attrs", "Pad", [f32(3, 4)], {"pads": [1, 0, 0, 2], "value": 2.0}, 2),
    ("cumsum", "CumSum", [f32(3, 5), C(np.int64(1))], {}, 20),
    ("cumsum_exclusive_reverse", "CumSum", [f32(3, 5), C(np.int64(-2))], {"exclusive": 1, "reverse": 1}, 20),
    ("cumsum_exclusive", "CumSum", [i64(1, 2, 3, 4), C(np.int64(0))], {"exclusive": 1}, 20),
    # reductions and normalisations
    ("reduce_mean_attr", "ReduceMean", [f32(2, 3, 5)], {"axes": [-1]}, 17),
    ("reduce_mean_input", "ReduceMean", [f32(2, 3, 5), C(i64(0, 2))], {"keepdims": 0}, 18),
    ("reduce_mean_all", "ReduceMean", [f32(2, 3, 5)], {}, 18),
    ("reduce_mean_noop", "ReduceMean", [f32(2, 3, 5)], {"noop_with_empty_axes": 1}, 18),
    ("reduce_sum_input", "ReduceSum", [f32(2, 3, 5), C(i64(1))], {}, 13),
    ("reduce_sum_attr", "ReduceSum", [f32(2, 3, 5)], {"axes": [0, 1], "keepdims": 0}, 11),
    ("reduce_max", "ReduceMax", [f32(2, 3, 5), C(i64(-2))], {}, 18),
    ("reduce_min", "ReduceMin", [f32(2, 3, 5)], {"axes": [2], "keepdims": 0}, 17),
    ("argmax", "ArgMax", [f32(3, 7)], {"axis": 1, "keepdims": 0}, 13),
    ("argmax_keep", "ArgMax", [f32(3, 7)], {}, 13),
    ("softmax", "Softmax", [f32(2, 3, 5)], {}, 13),
    ("softmax_axis1", "Softmax", [f32(2, 3, 5)], {"axis": 1}, 13),
    ("softmax_opset11_flatten", "Softmax", [f32(2, 3, 5)], {"axis": 1}, 11),
    ("softmax_opset11_default", "Softmax", [f32(2, 3, 5)], {}, 11),
    ("log_softmax", "LogSoftmax", [f32(2, 7)], {}, 13),
    ("log_softmax_opset11", "LogSoftmax", [f32(2, 3, 4)], {"axis": 0}, 11),
    ("layer_norm", "LayerNormalization", [f32(2, 3, 8), C(f32(8)), C(f32(8))], {"epsilon": 1e-5}, 17),
    ("layer_norm_axis1", "LayerNormalization", [f32(2, 3, 4), C(f32(3, 4)), C(f32(3, 4))], {"axis": 1}, 17),
    ("layer_norm_no_bias", "LayerNormalization", [f32(3, 6), C(f32(6))], {}, 17),
    ("layer_norm_bcast_scale", "LayerNormalization", [f32(2, 3, 4), C(f32(1, 4))], {"axis": -2}, 17),
    ("batch_norm", "BatchNormalization", [f32(2, 3, 4, 5), C(f32(3)), C(f32(3)), C(f32(3)), C(f32(3, positive=True))],
     {"epsilon": 1e-3}, 15),
    ("dropout", "Dropout", [f32(3, 4)], {}, 13),
    ("dropout_ratio", "Dropout", [f32(3, 4), C(np.float32(0.3)), C(np.bool_(False))], {}, 13),
    # windows
    ("conv", "Conv", [f32(2, 3, 7, 9), C(f32(4, 3, 3, 3)), C(f32(4))], {"pads": [1, 1, 1, 1]}, 20),
    ("conv_asym_pads", "Conv", [f32(1, 2, 6, 7), C(f32(3, 2, 3, 2))], {"pads": [0, 1, 2, 0]}, 20),
    ("conv_same_upper_stride", "Conv", [f32(1, 2, 7, 8), C(f32(3, 2, 4, 3))],
     {"auto_pad": "SAME_UPPER", "strides": [2, 3]}, 20),
    ("conv_same_lower", "Conv", [f32(1, 2, 7, 8), C(f32(3, 2, 4, 4))], {"auto_pad": "SAME_LOWER"}, 20),
    ("conv_valid_dilated", "Conv", [f32(1, 2, 9, 9), C(f32(3, 2, 3, 3))],
     {"auto_pad": "VALID", "dilations": [2, 1]}, 20),
    ("conv_depthwise", "Conv", [f32(2, 6, 5, 5), C(f32(6, 1, 3, 3)), C(f32(6))],
     {"group": 6, "pads": [1, 1, 1, 1]}, 20),
    ("conv_group2", "Conv", [f32(1, 4, 5, 6), C(f32(6, 2, 1, 3))], {"group": 2, "strides": [2, 2]}, 20),
    ("maxpool", "MaxPool", [f32(2, 3, 8, 8)], {"kernel_shape": [2, 2], "strides": [2, 2]}, 20),
    ("maxpool_pads", "MaxPool", [f32(1, 2, 7, 9)],
     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}, 20),
    ("maxpool_asym", "MaxPool", [f32(1, 2, 7, 9)], {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]}, 20),
    ("maxpool_ceil", "MaxPool", [f32(1, 2, 7, 9)], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, 20),
    ("avgpool", "AveragePool", [f32(2, 3, 8, 8)], {"kernel_shape": [2, 2], "strides": [2, 2]}, 20),
    ("avgpool_pads_exclude", "AveragePool", [f32(1, 2, 7, 9)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 20),
    ("avgpool_pads_include", "AveragePool", [f32(1, 2, 7, 9)],
     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1, "strides": [2, 1]}, 20),
    ("avgpool_asym_include", "AveragePool", [f32(1, 2, 7, 9)],
     {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1], "count_include_pad": 1}, 20),
    ("global_avg_pool", "GlobalAveragePool", [f32(2, 3, 5, 7)], {}, 20),
    ("global_max_pool", "GlobalMaxPool", [f32(2, 3, 5, 7)], {}, 20),
]


@pytest.mark.parametrize("op, inputs, attrs, opset", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_handler(op, inputs, attrs, opset):
    check(op, inputs, attrs, opset)


@pytest.mark.parametrize("attrs, opset, n_out", [({"axis": 1, "split": [2, 5]}, 11, 2), ({"axis": 0}, 11, 3),
                                                 ({"axis": -1, "num_outputs": 3}, 18, 3)])
def test_split(attrs, opset, n_out):
    check("Split", [f32(6, 7)], attrs, opset, n_out)


@pytest.mark.parametrize("op, inputs, attrs", [
    ("MaxPool", [f32(1, 2, 7, 9)], {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "dilations": [1, 2]}),
    ("Conv", [f32(1, 2, 7, 9), f32(3, 2, 3, 3)], {"auto_pad": "SAME_LOWER", "dilations": [2, 2]}),
])
def test_same_pads_with_dilation_follow_the_spec(op, inputs, attrs):
    """ONNX Runtime leaves dilation out of SAME padding (MaxPool) or refuses it (Conv); the spec and
    ONNX's own reference evaluator count it, and so do we."""
    from onnx.reference import ReferenceEvaluator
    names = [f"in{i}" for i in range(len(inputs))]
    g = helper.make_graph([helper.make_node(op, names, ["y"], **attrs)], "g",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
                           for n, v in zip(names, inputs)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    expected = ReferenceEvaluator(m).run(None, dict(zip(names, inputs)))[0]
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, list(expected.shape)))
    xs = [torch.from_numpy(v) for v in inputs]
    assert_close(run(load_onnx(m, xs), xs)[0], torch.from_numpy(expected), **KERNEL_TOL)


def test_split_input():
    check("Split", [f32(6, 7), C(i64(1, 3, 3))], {"axis": 1}, 13, 3)


def test_dropout_mask_output():
    check("Dropout", [f32(3, 4)], {}, 13, n_out=2)


def test_constant_node():
    for attrs in ({"value": numpy_helper.from_array(f32(2, 3))}, {"value_float": 2.5}, {"value_ints": [1, 2, 3]},
                  {"value_int": 4}):
        check("Constant", [], attrs, 13)


# every handler is tested here or in test_onnx_more_ops.py: asserted there (test_ops_in_tests_cover_the_table)


# -- static shapes: binding and folding -------------------------------------------------------------

def _view_model(opset=20):
    """x[b, s, h] -> reshape to [b, s, 2, h/2] through Shape/Gather/Concat, as exporters write it."""
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 2, 4])
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "i01"], ["bs"], axis=0),
        helper.make_node("Concat", ["bs", "tail"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["r"], name="the_view"),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    inits = [numpy_helper.from_array(i64(0, 1), "i01"), numpy_helper.from_array(i64(2, -1), "tail")]
    g = helper.make_graph(nodes, "view", [X], [Y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


@pytest.mark.parametrize("shape", [(2, 3, 8), (5, 1, 8)])
def test_shape_arithmetic_folds(shape):
    x = torch.randn(shape)
    g = load_onnx(_view_model(), [x])
    assert g.op_counts() == {"input": 1, "reshape": 1, "relu": 1}
    assert g.input_names == ["x"] and g.output_names == ["y"]
    assert_close(run(g, [x])[0], torch.relu(x.reshape(*shape[:2], 2, 4)), atol=0, rtol=0)


@pytest.mark.parametrize("x, match", [(torch.randn(2, 8), "rank"), (torch.randn(2, 3, 5), "size 8"),
                                      (torch.randn(2, 3, 8, dtype=torch.float64), "FLOAT")])
def test_input_mismatch(x, match):
    with pytest.raises(InputError, match=match) as e:
        load_onnx(_view_model(), [x])
    assert "'x'" in str(e.value)


def test_input_count_and_shared_dims():
    with pytest.raises(InputError, match="1 inputs"):
        load_onnx(_view_model(), [torch.randn(2, 3, 8), torch.randn(2, 3, 8)])
    m, _, _ = make("Add", [f32(2, 3), f32(2, 3)])
    for vi in m.graph.input:
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(InputError, match="batch"):
        load_onnx(m, [torch.randn(2, 3), torch.randn(4, 3)])


def test_runtime_shape_input_is_specialised_by_its_value():
    """A Reshape's shape given as a graph input takes the example's value (docs/ONNX.md); the graph
    records which input it specialised, so a compiled model keys its programs by that value."""
    m, _, _ = make("Reshape", [f32(2, 6), i64(3, 4)])
    g = load_onnx(m, [torch.randn(2, 6), torch.tensor([3, 4])])
    assert g.outputs[0].shape == (3, 4)
    assert list(g.specialised) == [1] and torch.equal(g.specialised[1], torch.tensor([3, 4]))


def test_external_data(tmp_path):
    m, feeds, expected = make("MatMul", [f32(3, 40), C(f32(40, 50))])
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").exists()
    x = torch.from_numpy(feeds["in0"])
    g = load_onnx(tmp_path / "ext.onnx", [x])
    # a 40-term dot product summed in another order than ORT's: a few 1e-6 apart on unlucky draws
    assert_close(run(g, [x])[0], torch.from_numpy(expected[0]), **SMALL_TOL)
    assert read_model(tmp_path / "ext.onnx").graph.initializer[0].raw_data  # loaded from weights.bin
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelFileError, match="ext.onnx"):
        load_onnx(tmp_path / "ext.onnx", [x])


# -- errors -----------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="nope.onnx"):
        load_onnx(tmp_path / "nope.onnx", [])


def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.onnx"
    p.write_bytes(bytes(rng.integers(0, 256, 4000, dtype=np.uint8)))
    with pytest.raises(ModelFileError, match="garbage.onnx"):
        load_onnx(p, [])


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_file(tmp_path, fraction):
    m, _, _ = make("Gemm", [f32(3, 5), C(f32(5, 4)), C(f32(4))])
    data = m.SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(ModelFileError, match="cut.onnx"):
        load_onnx(p, [torch.randn(3, 5)])


def test_unsupported_op_names_op_and_node():
    m, _, _ = make("RandomNormalLike", [f32(3, 4)])
    with pytest.raises(UnsupportedOpError, match="RandomNormalLike.*the_RandomNormalLike_node") as e:
        load_onnx(m, [torch.randn(3, 4)])
    assert e.value.op_type == "RandomNormalLike" and e.value.node == "the_RandomNormalLike_node" and e.value.source == "ONNX"


def test_unsupported_domain():
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    node = helper.make_node("Relu", ["x"], ["y"], name="custom", domain="com.example")
    g = helper.make_graph([node], "g", [X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError, match="com.example.Relu.*custom"):
        load_onnx(m, [torch.randn(2)])


def test_unsupported_attribute_is_clear():
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    ratio = helper.make_tensor("r", TensorProto.FLOAT, [], [0.5])
    training = helper.make_tensor("t", TensorProto.BOOL, [], [True])
    node = helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="the_Dropout_node")
    g = helper.make_graph([node], "g", [X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                          initializer=[ratio, training])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(KfuseError, match="the_Dropout_node.*training-mode dropout"):
        load_onnx(m, [torch.randn(2, 3)])


def test_names_are_data_not_code():
    # A hostile name is carried as a string; nothing is evaluated.
    m, feeds, _ = make("Relu", [f32(2, 3)])
    evil = "__import__('os').system('touch /tmp/kfuse_pwned')"
    m.graph.node[0].name = evil
    m.graph.output[0].name = m.graph.node[0].output[0] = evil
    g = load_onnx(m, [torch.from_numpy(feeds["in0"])])
    assert g.output_names == [evil] and not math.isnan(run(g, [torch.ones(2, 3)])[0].sum().item())


@pytest.mark.parametrize("declared", ["nothing", "a type without a shape"])
def test_graph_output_declaring_no_type_or_shape(tmp_path, declared):
    """ONNX Runtime runs a file whose output declares no type (or no shape); the checker refuses it. kfuse
    checks a copy with the outputs typed and finds the real type and shape by conversion."""
    import kfuse
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = onnx.ValueInfoProto(name="y") if declared == "nothing" else helper.make_tensor_value_info("y", TensorProto.INT64, None)
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT64)], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(m, tmp_path / "m.onnx")
    got = kfuse.compile(str(tmp_path / "m.onnx"), (torch.ones(2, 3),))(torch.full((2, 3), 2.7))
    assert got.dtype == torch.int64 and torch.equal(got, torch.full((2, 3), 2))
    assert not read_model(m).graph.output[0].type.tensor_type.HasField("shape")    # the file's model, unchanged


def test_default_domain_op_without_a_schema_that_kfuse_handles(tmp_path):
    """ONNX Runtime's EXTENDED optimizer writes RMSNorm as SimplifiedLayerNormalization in the default domain,
    which has no ONNX schema: the checker refused the file before kfuse's handler could take it."""
    import kfuse
    ort = pytest.importorskip("onnxruntime")
    w = numpy_helper.from_array(np.linspace(0.5, 2.0, 8).astype(np.float32), "w")
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-6)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = kfuse.compile(str(path), (torch.from_numpy(x),))(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
