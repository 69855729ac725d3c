"""The ONNX ops beyond the first handler table, and constant subgraphs of ops with no handler:
each model is saved, compiled from its path with kfuse.compile, run, and compared with ONNX
Runtime on the same file (values, shapes and dtypes)."""
import warnings

import numpy as np
import onnx
import pytest
import torch
from helpers import SMALL_TOL, C, assert_close, i64, typed_model
from onnx import TensorProto, helper, numpy_helper

import kfuse
from kfuse.capture.onnx import HANDLERS, load_onnx
from kfuse.errors import UnsupportedOpError

ort = pytest.importorskip("onnxruntime")
rng = np.random.default_rng(1)


def f32(*shape, lo=None, hi=None):
    if lo is not None:
        return rng.uniform(lo, hi, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def graph_model(nodes, inputs, outputs, opset=20):
    """A model of `nodes`; `inputs` maps names to arrays (graph inputs) or C (initializers); outputs
    are typed from what ONNX Runtime computes on an untyped draft. Returns (model, feeds, results)."""
    graph_inputs, inits, feeds = [], [], {}
    for name, v in inputs.items():
        if isinstance(v, C):
            inits.append(numpy_helper.from_array(v.value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                              list(v.shape)))
            feeds[name] = v

    return typed_model(nodes, graph_inputs, inits, feeds, outputs, opset, ir_version=8)


def node_model(op, inputs, attrs=None, opset=20, n_out=1):
    """A one-node model: arrays in `inputs` become graph inputs, C(...) initializers, None omitted."""
    names = ["" if v is None else f"in{i}" for i, v in enumerate(inputs)]
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"the_{op}_node", **(attrs or {}))
    return graph_model([node], {n: v for n, v in zip(names, inputs) if n}, outs, opset)


def compiled(tmp_path, m, feeds):
    """kfuse's outputs for the model saved at a path, and the compiled model."""
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    xs = [torch.from_numpy(v) for v in feeds.values()]
    cm = kfuse.compile(str(path), xs)
    got = cm(*xs)
    return (list(got) if isinstance(got, tuple) else [got]), cm


def check_model(tmp_path, m, feeds, expected, sort_axis=None):
    """kfuse's outputs against ONNX Runtime's: dtype, shape, values (SMALL_TOL; NaN and inf alike)."""
    got, cm = compiled(tmp_path, m, feeds)
    assert len(got) == len(expected)
    for y, e in zip(got, expected):
        e = torch.from_numpy(np.array(e))
        if sort_axis is not None:  # an order ONNX leaves unspecified
            y, e = y.sort(sort_axis).values, e.sort(sort_axis).values
        assert_close(y, e, **SMALL_TOL)
    return cm


def check(tmp_path, op, inputs, attrs=None, opset=20, n_out=1, sort_axis=None):
    m, feeds, expected = node_model(op, inputs, attrs, opset, n_out)
    return check_model(tmp_path, m, feeds, expected, sort_axis)


def ops_of(m, feeds):
    """The IR op counts of the loaded (unoptimised) graph, inputs and constants left out."""
    g = load_onnx(m, [torch.from_numpy(v) for v in feeds.values()])
    return {k: v for k, v in g.op_counts().items() if k not in ("input", "const")}


# -- elementwise, broadcast, reductions ------------------------------------------------------------

TIES = np.array([[1, 3, 3, 0, 3, 1, 0], [2, 2, 5, 5, 1, 5, 2], [0, 0, 0, 0, 0, 0, 0]], np.float32)
SPECIAL = np.array([np.inf, -np.inf, np.nan, 0.0, -2.5, 7.0], np.float32)

CASES = [  # (id, op, inputs, attrs, opset, n_out)
    ("elu", "Elu", [f32(3, 5, 7)], {"alpha": 0.7}, 20, 1),
    ("selu", "Selu", [f32(3, 5, 7)], {}, 20, 1),
    ("selu_attrs", "Selu", [f32(5, 7)], {"alpha": 1.5, "gamma": 0.9}, 20, 1),
    ("celu", "Celu", [f32(3, 5, 7)], {"alpha": 1.5}, 20, 1),
    ("hard_sigmoid", "HardSigmoid", [f32(3, 5, 7) * 4], {}, 20, 1),
    ("hard_sigmoid_attrs", "HardSigmoid", [f32(5, 7) * 4], {"alpha": 0.3, "beta": 0.4}, 20, 1),
    ("hard_swish", "HardSwish", [f32(3, 5, 7) * 4], {}, 20, 1),
    ("mish", "Mish", [f32(3, 5, 7) * 4], {}, 20, 1),
    ("prelu_channel", "PRelu", [f32(2, 3, 5, 7), C(f32(3, 1, 1))], {}, 20, 1),
    ("prelu_scalar", "PRelu", [f32(2, 3, 5), C(np.array([0.25], np.float32))], {}, 20, 1),
    ("prelu_runtime_slope", "PRelu", [f32(2, 3, 5), f32(5)], {}, 20, 1),
    ("mod_int", "Mod", [i64(-7, 7, -8, 9, 5, -3), i64(2, -2, 3, -4, 5, 7)], {}, 20, 1),
    ("mod_int_fmod", "Mod", [i64(-7, 7, -8, 9, 5, -3), i64(2, -2, 3, -4, 5, 7)], {"fmod": 1}, 20, 1),
    ("mod_float_fmod", "Mod", [f32(3, 5, 7) * 5, f32(5, 7, lo=0.5, hi=3)], {"fmod": 1}, 20, 1),
    ("round", "Round", [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -3.7], np.float32)], {}, 20, 1),
    ("atan", "Atan", [f32(3, 5, 7) * 3], {}, 20, 1),
    ("tan", "Tan", [f32(3, 5, 7, lo=-1.2, hi=1.2)], {}, 20, 1),
    *((op.lower(), op, [f32(3, 5, 7, lo=lo, hi=hi)], {}, 20, 1) for op, lo, hi in (
        ("Asin", -1, 1), ("Acos", -1, 1), ("Sinh", -5, 5), ("Cosh", -5, 5), ("Asinh", -9, 9), ("Acosh", 1, 9),
        ("Atanh", -0.99, 0.99))),
    ("is_inf", "IsInf", [SPECIAL], {}, 20, 1),
    ("is_inf_pos", "IsInf", [SPECIAL], {"detect_negative": 0}, 20, 1),
    ("is_inf_neg", "IsInf", [SPECIAL], {"detect_positive": 0}, 20, 1),
    ("is_inf_none", "IsInf", [SPECIAL], {"detect_positive": 0, "detect_negative": 0}, 20, 1),
    ("reduce_prod_attr", "ReduceProd", [f32(3, 5, 7, lo=0.5, hi=1.5)], {"axes": [0, 2]}, 13, 1),
    ("reduce_prod_input", "ReduceProd", [f32(3, 5, 7, lo=0.5, hi=1.5), C(i64(-2))], {"keepdims": 0}, 18, 1),
    ("reduce_prod_int_all", "ReduceProd", [i64(1, -2, 3, 4, -5)], {}, 18, 1),
    ("reduce_l1", "ReduceL1", [f32(3, 5, 7), C(i64(1))], {}, 18, 1),
    ("reduce_l2", "ReduceL2", [f32(3, 5, 7)], {"axes": [1, 2], "keepdims": 0}, 13, 1),
    ("reduce_sum_square", "ReduceSumSquare", [f32(3, 5, 7), C(i64(0, -1))], {}, 18, 1),
    ("reduce_sum_square_noop", "ReduceSumSquare", [f32(3, 5)], {"noop_with_empty_axes": 1}, 18, 1),
    ("reduce_log_sum", "ReduceLogSum", [f32(3, 5, 7, lo=0.1, hi=2)], {"axes": [2]}, 13, 1),
    ("reduce_log_sum_exp", "ReduceLogSumExp", [f32(3, 5, 7) * 30, C(i64(-1))], {"keepdims": 0}, 18, 1),
    ("reduce_log_sum_exp_keep", "ReduceLogSumExp", [f32(3, 5, 7) * 30], {"axes": [0, 1]}, 13, 1),
    ("argmin", "ArgMin", [f32(3, 5, 7)], {"axis": 1, "keepdims": 0}, 13, 1),
    ("argmin_keep_ties", "ArgMin", [TIES], {"axis": -1}, 13, 1),
    ("argmin_last_index", "ArgMin", [TIES], {"axis": 1, "select_last_index": 1}, 13, 1),
    ("argmax_last_index", "ArgMax", [TIES], {"axis": 1, "keepdims": 0, "select_last_index": 1}, 13, 1),
    ("topk", "TopK", [f32(3, 9, 5), C(i64(4))], {"axis": 1}, 11, 2),
    ("topk_smallest_ties", "TopK", [TIES, C(i64(3))], {"largest": 0}, 11, 2),
    ("topk_largest_ties", "TopK", [TIES, C(i64(5))], {}, 11, 2),
    ("topk_opset1_attr", "TopK", [f32(3, 9)], {"k": 3, "axis": 0}, 1, 2),
    ("one_hot", "OneHot", [i64(0, 3, -1, 5, -6, 2).reshape(2, 3), C(np.float32(5)), C(np.float32([0, 1]))], {}, 11, 1),
    ("one_hot_axis0_int", "OneHot", [i64(1, 0, 2, -2, 3, -4).reshape(2, 3), C(i64(3)), C(i64(-1, 7))],
     {"axis": 0}, 11, 1),
    ("one_hot_int32_idx", "OneHot", [np.array([[1, 0], [2, -2]], np.int32), C(np.float32(3)),
                                     C(np.float32([0.5, 2.0]))], {"axis": 1}, 11, 1),
    ("one_hot_float_idx", "OneHot", [np.array([0.0, 2.0, 1.0, 3.0], np.float32), C(np.float32(4)),
                                     C(np.float32([0, 1]))], {"axis": 0}, 11, 1),
    ("depth_to_space_dcr", "DepthToSpace", [f32(2, 12, 3, 5)], {"blocksize": 2}, 13, 1),
    ("depth_to_space_crd", "DepthToSpace", [f32(2, 18, 3, 5)], {"blocksize": 3, "mode": "CRD"}, 13, 1),
    ("space_to_depth", "SpaceToDepth", [f32(2, 3, 6, 9)], {"blocksize": 3}, 13, 1),
    ("instance_norm", "InstanceNormalization", [f32(2, 3, 5, 7) * 3 + 1, C(f32(3)), C(f32(3))], {}, 20, 1),
    ("instance_norm_1d", "InstanceNormalization", [f32(2, 4, 9), C(f32(4)), C(f32(4))], {"epsilon": 1e-3}, 20, 1),
    ("div_int_trunc", "Div", [i64(-7, 7, -8, 9), i64(2, -2, 3, 4)], {}, 20, 1),
    # scatters: distinct indices where the result would depend on the order of writes
    ("scatter_elements", "ScatterElements", [f32(3, 5), np.array([[0, -1], [2, 1], [4, 3]], np.int64), f32(3, 2)],
     {"axis": 1}, 18, 1),
    ("scatter_elements_add", "ScatterElements", [f32(3, 5), C(np.array([[1, 1, 0], [2, 0, 0]], np.int64)), f32(2, 3)],
     {"axis": 0, "reduction": "add"}, 18, 1),
    ("scatter_elements_max", "ScatterElements", [f32(4, 3), C(np.array([[0, 1, 2], [0, 1, 2]], np.int64)),
                                                  f32(2, 3)], {"axis": 1, "reduction": "max"}, 18, 1),
    ("scatter_opset10", "Scatter", [f32(3, 5), C(np.array([[0, 4], [2, 1], [4, 3]], np.int64)), f32(3, 2)],
     {"axis": 1}, 10, 1),
    ("scatter_nd", "ScatterND", [f32(4, 3, 2), C(np.array([[0, 1], [3, -1]], np.int64)), f32(2, 2)], {}, 18, 1),
    ("scatter_nd_rows_add", "ScatterND", [f32(5, 3), np.array([[1], [4], [1]], np.int64), f32(3, 3)],
     {"reduction": "add"}, 18, 1),
]


@pytest.mark.parametrize("op, inputs, attrs, opset, n_out", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_op(tmp_path, op, inputs, attrs, opset, n_out):
    check(tmp_path, op, inputs, attrs, opset, n_out)


def test_topk_unsorted_matches_as_a_set(tmp_path):
    """sorted=0 leaves the order open (ONNX Runtime returns heap order): we return sorted order."""
    check(tmp_path, "TopK", [f32(3, 9), C(i64(4))], {"sorted": 0}, 11, 2, sort_axis=-1)


def test_topk_values_only(tmp_path):
    """Unused indices are pruned: the values alone are one topk."""
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=0)
    m, feeds, expected = graph_model([node], {"x": f32(7, 4), "k": C(i64(3))}, ["values"], 11)
    check_model(tmp_path, m, feeds, expected)
    assert ops_of(m, feeds) == {"topk": 1}


# -- einsum -----------------------------------------------------------------------------------------

EINSUM = [  # (equation, operand shapes)
    ("bij,bjk->bik", [(3, 4, 5), (3, 5, 6)]),
    ("bhid,bhjd->bhij", [(2, 3, 5, 4), (2, 3, 7, 4)]),
    ("bhij,bhjd->bhid", [(2, 3, 5, 7), (2, 3, 7, 4)]),
    ("ij,jk->ik", [(5, 3), (3, 7)]),
    ("bi,bi->b", [(4, 9), (4, 9)]),
    ("ij->ji", [(3, 5)]),
    ("ij->", [(3, 5)]),
    ("i,j->ij", [(4,), (5,)]),
    ("bij,bij->bij", [(2, 3, 5), (2, 3, 5)]),
    ("...ij,...jk->...ik", [(2, 3, 4, 5), (1, 3, 5, 6)]),
    ("...ij,...jk", [(3, 4, 5), (3, 5, 2)]),
    ("ij,jk", [(5, 3), (3, 7)]),  # implicit output
    ("bn,anm,bm->ba", [(2, 3), (4, 3, 5), (2, 5)]),
    ("abc,cd,ea->ebd", [(2, 3, 4), (4, 5), (6, 2)]),
    ("ibnd,jbnd->bnij", [(5, 2, 3, 4), (6, 2, 3, 4)]),
]


@pytest.mark.parametrize("equation, shapes", EINSUM, ids=[e for e, _ in EINSUM])
def test_einsum(tmp_path, equation, shapes):
    check(tmp_path, "Einsum", [f32(*s) for s in shapes], {"equation": equation}, 12)


def test_einsum_diagonal(tmp_path):
    check(tmp_path, "Einsum", [f32(4, 4)], {"equation": "ii->i"}, 12)
    check(tmp_path, "Einsum", [f32(3, 4, 4), f32(3, 4)], {"equation": "bii,bi->b"}, 12)


# -- windows: 1-d, transposed convolution ---------------------------------------------------------------

WINDOWS = [  # (id, op, inputs, attrs)
    ("conv1d", "Conv", [f32(2, 3, 11), C(f32(4, 3, 3)), C(f32(4))], {"pads": [1, 2], "strides": [2]}),
    ("conv1d_same_dilated_group", "Conv", [f32(2, 4, 10), C(f32(6, 2, 3))],
     {"auto_pad": "SAME_UPPER", "group": 2, "dilations": [1]}),
    ("maxpool1d", "MaxPool", [f32(2, 3, 11)], {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ("maxpool1d_ceil", "MaxPool", [f32(2, 3, 10)], {"kernel_shape": [3], "strides": [2], "ceil_mode": 1}),
    ("avgpool1d", "AveragePool", [f32(2, 3, 11)], {"kernel_shape": [4], "strides": [3], "pads": [1, 1]}),
    ("conv_transpose", "ConvTranspose", [f32(2, 3, 5, 6), C(f32(3, 4, 3, 3)), C(f32(4))],
     {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("conv_transpose_output_padding", "ConvTranspose", [f32(1, 3, 5, 4), C(f32(3, 2, 3, 2))],
     {"strides": [3, 2], "output_padding": [2, 1]}),
    ("conv_transpose_group_dilation", "ConvTranspose", [f32(2, 4, 5, 5), C(f32(4, 3, 3, 3)), C(f32(6))],
     {"group": 2, "dilations": [2, 1], "strides": [1, 2]}),
    ("conv_transpose_asym_pads", "ConvTranspose", [f32(1, 2, 5, 6), C(f32(2, 3, 4, 3))],
     {"strides": [2, 2], "pads": [0, 2, 1, 0]}),
    ("conv_transpose_same_upper", "ConvTranspose", [f32(1, 2, 5, 6), C(f32(2, 3, 3, 3))],
     {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("conv_transpose_same_lower", "ConvTranspose", [f32(1, 2, 5, 6), C(f32(2, 3, 4, 3))],
     {"strides": [2, 3], "auto_pad": "SAME_LOWER"}),
    ("conv_transpose_output_shape", "ConvTranspose", [f32(1, 2, 5, 6), C(f32(2, 3, 3, 3)), C(f32(3))],
     {"strides": [2, 2], "output_shape": [10, 12]}),
    ("conv_transpose_1d", "ConvTranspose", [f32(2, 3, 7), C(f32(3, 5, 4)), C(f32(5))],
     {"strides": [3], "pads": [1, 2], "output_padding": [1]}),
    ("conv3d", "Conv", [f32(1, 2, 5, 6, 7), C(f32(4, 2, 3, 2, 3)), C(f32(4))],
     {"strides": [1, 2, 1], "pads": [1, 0, 1, 1, 0, 1], "dilations": [1, 1, 2]}),
    ("conv3d_asym_pads_groups", "Conv", [f32(1, 4, 5, 6, 7), C(f32(4, 2, 3, 3, 3))],
     {"group": 2, "pads": [0, 1, 2, 1, 0, 0]}),
    ("maxpool3d", "MaxPool", [f32(2, 3, 6, 7, 5)], {"kernel_shape": [2, 3, 2], "strides": [2, 2, 1]}),
    ("avgpool3d", "AveragePool", [f32(1, 3, 6, 7, 5)], {"kernel_shape": [3, 3, 3], "pads": [1, 1, 1, 1, 1, 1],
                                                      "count_include_pad": 1}),
]


@pytest.mark.parametrize("op, inputs, attrs", [w[1:] for w in WINDOWS], ids=[w[0] for w in WINDOWS])
def test_window(tmp_path, op, inputs, attrs):
    check(tmp_path, op, inputs, attrs, 20)


def test_conv_transpose_is_one_op():
    m, feeds, _ = node_model("ConvTranspose", [f32(1, 2, 5, 6), C(f32(2, 3, 4, 3))],
                             {"strides": [2, 2], "pads": [0, 2, 1, 0]})
    assert ops_of(m, feeds) == {"conv_transpose2d": 1, "slice": 2}


# -- resize -----------------------------------------------------------------------------------------

def _scales(*s):
    return C(np.array(s, np.float32))


def _sizes(*s):
    return C(i64(*s))


NO = None
RESIZE = [  # (id, inputs after X, attrs, opset, the IR ops expected)
    ("nearest_asymmetric_floor", [NO, _scales(1, 1, 2, 3)],
     {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, 19, {"resize": 1}),
    ("nearest_half_pixel_up3", [NO, NO, _sizes(1, 2, 15, 21)], {}, 19, {"resize": 1}),
    ("nearest_half_pixel_down2", [NO, _scales(1, 1, 0.5, 0.5)], {}, 19, {"resize": 1}),
    ("nearest_prefer_ceil", [NO, NO, _sizes(1, 2, 7, 4)], {"nearest_mode": "round_prefer_ceil"}, 19, {"resize": 1}),
    ("nearest_align_corners", [NO, NO, _sizes(1, 2, 8, 3)], {"coordinate_transformation_mode": "align_corners"},
     19, None),
    ("nearest_asymmetric_ceil", [NO, _scales(1, 1, 1.5, 0.75)],
     {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"}, 19, {"gather": 2}),
    ("nearest_batch_axis", [NO, _scales(2, 1, 1, 1)], {"coordinate_transformation_mode": "asymmetric"}, 19,
     {"gather": 1}),
    ("linear_half_pixel", [NO, NO, _sizes(1, 2, 9, 4)], {"mode": "linear"}, 19, {"resize": 1}),
    ("linear_align_corners", [NO, NO, _sizes(1, 2, 9, 13)],
     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 19, {"resize": 1}),
    ("linear_pytorch_half_pixel", [NO, _scales(1, 1, 2, 2)],
     {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 19, {"resize": 1}),
    ("linear_pytorch_half_pixel_to_1", [NO, NO, _sizes(1, 2, 1, 11)],
     {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 19, None),
    ("linear_asymmetric", [NO, _scales(1, 1, 2, 1.5)],
     {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, 19, {"gather": 4, "mul": 4, "add": 2}),
    ("linear_half_pixel_symmetric", [NO, _scales(1, 1, 1.7, 0.6)],
     {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, 19, None),
    ("linear_scale_not_size_ratio", [NO, _scales(1, 1, 1.7, 2)], {"mode": "linear"}, 19, None),
    ("cubic_half_pixel", [NO, _scales(1, 1, 2, 2)], {"mode": "cubic"}, 19, {"resize": 1}),
    ("cubic_align_corners", [NO, NO, _sizes(1, 2, 8, 11)],
     {"mode": "cubic", "coordinate_transformation_mode": "align_corners"}, 19, {"resize": 1}),
    ("opset10_nearest", [_scales(1, 1, 0.6, 1.5)], {}, 10, None),
    ("opset10_linear", [_scales(1, 1, 2, 2)], {"mode": "linear"}, 10, None),
    ("opset11_empty_scales", [C(np.zeros(0, np.float32)), C(np.zeros(0, np.float32)), _sizes(1, 2, 10, 14)],
     {"mode": "linear"}, 11, {"resize": 1}),
    ("opset18_axes", [NO, NO, _sizes(9, 4)], {"mode": "linear", "axes": [2, 3]}, 18, {"resize": 1}),
    ("opset18_not_larger", [NO, NO, _sizes(9, 20)], {"axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
     18, None),
]


@pytest.mark.parametrize("rest, attrs, opset, ops", [r[1:] for r in RESIZE], ids=[r[0] for r in RESIZE])
def test_resize(tmp_path, rest, attrs, opset, ops):
    m, feeds, expected = node_model("Resize", [f32(1, 2, 5, 7)] + rest, attrs, opset)
    check_model(tmp_path, m, feeds, expected)
    if ops is not None:
        assert ops_of(m, feeds) == ops


def test_resize_rank3_and_integers(tmp_path):
    check(tmp_path, "Resize", [f32(2, 3, 7), None, None, _sizes(2, 3, 12)], {"mode": "linear"}, 19)
    ints = np.arange(2 * 3 * 5, dtype=np.int32).reshape(1, 2, 3, 5)
    check(tmp_path, "Resize", [ints, None, _scales(1, 1, 2, 0.5)], {}, 19)


@pytest.mark.parametrize("attrs", [
    {"coordinate_transformation_mode": "tf_crop_and_resize", "mode": "linear"},
    {"mode": "cubic", "exclude_outside": 1},
    {"mode": "linear", "antialias": 1},
], ids=["tf_crop_and_resize", "exclude_outside", "antialias"])
def test_resize_variants_as_weight_matrices(tmp_path, attrs):
    """The Resize variants torch has no mode for: one constant weight matrix per axis, as ONNX's
    reference computes them (ONNX Runtime's tf_crop_and_resize differs from it on this roi)."""
    from onnx.reference import ReferenceEvaluator
    x = f32(1, 2, 5, 7)
    roi = C(np.array([0, 0, 0.1, 0.2, 1, 1, 0.9, 0.8], np.float32))
    m, feeds, _ = node_model("Resize", [x, roi, _scales(1, 1, 0.6, 0.5)], attrs, 19)
    got, _ = compiled(tmp_path, m, feeds)
    assert_close(got[0], torch.from_numpy(ReferenceEvaluator(m).run(None, feeds)[0]), **SMALL_TOL)


# -- pad modes ----------------------------------------------------------------------------------------

PADS = [  # (id, shape, pads, mode, opset, the IR ops expected)
    ("reflect_hw", (2, 3, 5, 7), [0, 0, 2, 1, 0, 0, 1, 3], "reflect", 18, {"pad": 1}),
    ("edge_hw", (2, 3, 5, 7), [0, 0, 4, 1, 0, 0, 1, 9], "edge", 18, {"pad": 1}),
    ("wrap_chw", (2, 3, 5, 7), [0, 1, 2, 3, 0, 2, 1, 0], "wrap", 19, {"pad": 1}),
    ("reflect_last_of_5d", (2, 2, 3, 4, 5), [0, 0, 0, 0, 2, 0, 0, 0, 0, 3], "reflect", 18,
     {"pad": 1, "reshape": 2}),
    ("edge_batch_dim", (2, 3, 4, 5), [1, 0, 0, 2, 2, 0, 0, 0], "edge", 18, {"gather": 2}),
    ("reflect_2d", (4, 6), [1, 2, 3, 1], "reflect", 13, {"pad": 1, "reshape": 2}),
    ("wrap_more_than_dim", (3, 4), [0, 5, 0, 6], "wrap", 19, {"gather": 1}),
    ("edge_negative", (4, 6), [-1, 2, 2, -3], "edge", 18, {"gather": 2}),
]


@pytest.mark.parametrize("shape, pads, mode, opset, ops", [p[1:] for p in PADS], ids=[p[0] for p in PADS])
def test_pad_mode(tmp_path, shape, pads, mode, opset, ops):
    m, feeds, expected = node_model("Pad", [f32(*shape), C(i64(*pads))], {"mode": mode}, opset)
    check_model(tmp_path, m, feeds, expected)
    assert ops_of(m, feeds) == ops


def test_pad_mode_axes_and_opset2(tmp_path):
    check(tmp_path, "Pad", [f32(2, 3, 5, 7), C(i64(2, 1, 0, 2)), None, C(i64(-1, 1))], {"mode": "reflect"}, 18)
    check(tmp_path, "Pad", [f32(3, 5)], {"mode": "edge", "pads": [0, 2, 1, 3]}, 2)


# -- constant subgraphs of ops with no handler ----------------------------------------------------------

def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


def test_op_without_handler_on_constants_is_evaluated(tmp_path, monkeypatch):
    """An op with no handler (DFT, its handler taken out) on a constant is computed at load time."""
    monkeypatch.delitem(HANDLERS, "DFT")
    nodes = [_const("sig", f32(1, 8, 1)),
             helper.make_node("DFT", ["sig"], ["spec"]),
             helper.make_node("Reshape", ["spec", "flat"], ["s"]),
             helper.make_node("Add", ["x", "s"], ["y"])]
    m, feeds, expected = graph_model(nodes, {"x": f32(16), "flat": C(i64(-1))}, ["y"], 20)
    check_model(tmp_path, m, feeds, expected)
    assert ops_of(m, feeds) == {"add": 1}


def test_unsupported_variant_on_constants_is_evaluated(tmp_path):
    """A Resize mode kfuse does not map, applied to a constant, folds all the same."""
    roi = np.array([0, 0, 0.1, 0.2, 1, 1, 0.9, 0.7], np.float32)
    nodes = [helper.make_node("Resize", ["table", "roi", "", "sizes"], ["t"], mode="linear",
                              coordinate_transformation_mode="tf_crop_and_resize"),
             helper.make_node("Mul", ["x", "t"], ["y"])]
    inputs = {"x": f32(1, 2, 4, 6), "table": C(f32(1, 2, 3, 5)), "roi": C(roi), "sizes": C(i64(1, 2, 4, 6))}
    m, feeds, expected = graph_model(nodes, inputs, ["y"], 19)
    check_model(tmp_path, m, feeds, expected)


def test_constant_evaluation_has_limits(monkeypatch):
    monkeypatch.delitem(HANDLERS, "DFT")       # an op evaluated at load time, as one with no handler is
    x = torch.zeros(2)
    nodes = [_const("small", np.zeros((1, 4, 1), np.float32)),
             helper.make_node("DFT", ["small", "length"], ["huge"], name="grow"),
             helper.make_node("ReduceSum", ["huge"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.array(1 << 20, np.int64), "length")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(UnsupportedOpError, match="DFT.*grow.*over 1048576 elements"):
        load_onnx(m, [x])
    # a random op is never frozen into a constant
    node = helper.make_node("RandomNormal", [], ["r"], shape=[2], name="noise")
    g = helper.make_graph([node, helper.make_node("Add", ["x", "r"], ["y"])], "g", g.input, g.output)
    with pytest.raises(UnsupportedOpError, match="RandomNormal.*noise.*random"):
        load_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), [x])


def test_op_without_handler_on_runtime_values_is_unsupported(monkeypatch):
    monkeypatch.delitem(HANDLERS, "DFT")
    m, _, _ = node_model("DFT", [f32(1, 8, 1)], {}, 20)
    with pytest.raises(UnsupportedOpError, match="DFT.*the_DFT_node"):
        load_onnx(m, [torch.randn(1, 8, 1)])


def _if_model(threshold):
    """y = x * 2 + c if size(x) > threshold else x - 1, the branch reading x from the outer scope."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["doubled"]),
                              helper.make_node("Add", ["doubled", "c"], ["then_out"])], "then", [],
                             [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(np.float32(2), "two")])
    other = helper.make_graph([helper.make_node("Sub", ["x", "one"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Size", ["shape"], ["rank"]),
             helper.make_node("Greater", ["rank", "threshold"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="the_if")]
    return nodes, {"x": f32(3, 4), "c": C(f32(4)), "one": C(np.float32(1)), "threshold": C(np.int64(threshold))}


@pytest.mark.parametrize("threshold", [1, 5])
def test_if_with_constant_condition_is_inlined(tmp_path, threshold):
    nodes, inputs = _if_model(threshold)
    m, feeds, expected = graph_model(nodes, inputs, ["y"], 17)
    check_model(tmp_path, m, feeds, expected)
    assert ops_of(m, feeds) == ({"mul": 1, "add": 1} if threshold == 1 else {"sub": 1})


def test_if_on_an_input_is_specialised_by_its_value(tmp_path):
    """An If whose condition comes from a graph input takes the branch the example's value picks; a
    call with another value compiles the other branch (the program cache is keyed by the value)."""
    nodes, inputs = _if_model(1)
    nodes[2] = helper.make_node("Greater", ["flag", "threshold"], ["cond"])
    inputs["flag"] = np.array(3, np.int64)
    m, feeds, _ = graph_model(nodes, inputs, ["y"], 17)
    args = [torch.from_numpy(v) for v in feeds.values()]
    g = load_onnx(m, args)
    flag = list(feeds).index("flag")
    assert list(g.specialised) == [flag] and int(g.specialised[flag]) == 3
    assert ops_of(m, feeds) == {"mul": 1, "add": 1}
    onnx.save(m, tmp_path / "if.onnx")
    cm = kfuse.compile(str(tmp_path / "if.onnx"), args)
    sess = ort.InferenceSession(str(tmp_path / "if.onnx"), providers=["CPUExecutionProvider"])
    for value in (3, 0, 3):
        args[flag] = torch.tensor(value)
        (want,) = sess.run(None, {k: a.numpy() for k, a in zip(feeds, args)})
        assert_close(cm(*args), torch.from_numpy(want))


# -- exported torch modules ---------------------------------------------------------------------------

def _export(tmp_path, module, args, dynamo=False):
    path = tmp_path / f"{type(module).__name__}_{'dynamo' if dynamo else 'legacy'}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, path, dynamo=dynamo)
    return path


def _compiled_vs_ort(path, args):
    cm = kfuse.compile(str(path), args)
    got = cm(*args)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    assert_close(got, torch.from_numpy(expected), **SMALL_TOL)
    return cm


class Narrow(torch.nn.Module):
    def forward(self, x):
        return x[:, 1:3]


def test_legacy_slice_with_step_1_runs_as_a_view(tmp_path):
    """A step-1 Slice alone in its kernel is a view kernel: the IR slice must carry its step."""
    x = torch.randn(4, 5)
    cm = _compiled_vs_ort(_export(tmp_path, Narrow(), (x,)), (x,))
    assert [n.attrs["step"] for n in cm.graph.nodes if n.op == "slice"] == [1]


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x, padding):
        return self.mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]


class Spread(torch.nn.Module):
    def forward(self, x):
        return x.var(-1) + x.std(1).sum()


class Tile(torch.nn.Module):
    def forward(self, x):
        return torch.tile(x, (2, 1, 3))


def test_legacy_exports_with_constant_shape_arithmetic(tmp_path):
    """Mod over constants (MultiheadAttention with a key padding mask), ReduceProd over a Shape
    (var/std), If on the rank (tile): the legacy exporter's shape code folds at load time."""
    x, padding = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    _compiled_vs_ort(_export(tmp_path, Attention(), (x, padding)), (x, padding))
    x = torch.randn(3, 5, 7)
    _compiled_vs_ort(_export(tmp_path, Spread(), (x,)), (x,))
    # ONNX Runtime cannot load this export (its shape inference rejects the untaken branch): vs eager
    x = torch.randn(3, 4)
    path = _export(tmp_path, Tile(), (x,))
    assert "If" in {n.op_type for n in onnx.load(path).graph.node}
    assert_close(kfuse.compile(str(path), (x,))(x), torch.tile(x, (2, 1, 3)), atol=0, rtol=0)


class Blocks(torch.nn.Module):
    """Ops whose exports use the new handlers: upsampling, reflect padding, transposed and 1-d
    convolutions, instance norm, pixel shuffle, activations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.norm = torch.nn.InstanceNorm2d(4, affine=True)
        self.conv1d = torch.nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.nn.functional.pad(x, (1, 2, 2, 1), mode="reflect")
        y = torch.nn.functional.hardswish(self.up(y)) + torch.nn.functional.elu(y).mean()
        y = torch.nn.functional.interpolate(self.norm(y), scale_factor=2, mode="bilinear", align_corners=False)
        y = torch.nn.functional.mish(torch.nn.functional.pixel_shuffle(y, 2))
        b, c, h, w = y.shape
        z = self.conv1d(y.reshape(b, c * h, w)[:, :4])
        return torch.nn.functional.interpolate(z, scale_factor=3, mode="nearest").sum(-1)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_exported_blocks(tmp_path, dynamo):
    x = torch.randn(2, 3, 5, 7)
    _compiled_vs_ort(_export(tmp_path, Blocks(), (x,), dynamo), (x,))


# Op types this file tests; with test_capture_onnx.py's (and the opset-23 fused ops, tested in
# tests/onnx/test_fused_ops.py) they cover the whole handler table.
TESTED = {c[1] for c in CASES} | {"TopK", "Einsum", "Resize", "Pad", "If"} | {w[1] for w in WINDOWS} \
    | {"Attention", "RMSNormalization", "RotaryEmbedding"} \
    | {"SimplifiedLayerNormalization"} | {("com.microsoft", op) for op in (   # tests/onnx/test_contrib.py
        "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
        "EmbedLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "QuickGelu", "BiasAdd", "Attention",
        "MultiHeadAttention", "RotaryEmbedding", "GroupQueryAttention", "FusedConv", "FusedGemm", "FusedMatMul",
        "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearAveragePool",
        "QLinearGlobalAveragePool", "QGemm")}
TESTED |= {"LSTM", "GRU", "RNN"}   # tested in tests/onnx/test_recurrent.py
# tests/onnx/test_more_ops.py, test_unsigned.py and the node suite (tests/onnx/test_node_suite.py)
TESTED |= {("ai.onnx.ml", "ArrayFeatureExtractor"), ("ai.onnx.ml", "Binarizer"), "AffineGrid", "BitCast", "BitShift",
           "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow", "CenterCropPad", "Col2Im", "Compress",
           "ConvInteger", "CumProd", "DeformConv", "DequantizeLinear", "Det", "DFT", "DynamicQuantizeLinear", "EyeLike",
           "GridSample", "GroupNormalization", "HammingWindow", "HannWindow", "Hardmax", "LRN", "Loop",
           "LpNormalization", "LpPool", "MatMulInteger", "MaxUnpool", "MeanVarianceNormalization", "MelWeightMatrix",
           "NegativeLogLikelihoodLoss", "NonMaxSuppression", "NonZero", "QLinearConv", "QLinearMatMul", "QuantizeLinear",
           "RoiAlign", "STFT", "ReverseSequence", "Scan", "Shrink", "SoftmaxCrossEntropyLoss", "Softsign", "Swish",
           "TensorScatter", "TfIdfVectorizer", "ThresholdedRelu", "Unique", "Upsample"}


def test_ops_in_tests_cover_the_table():
    from test_capture_onnx import CASES as FIRST_CASES, UNARY
    tested = TESTED | set(UNARY) | {c[1] for c in FIRST_CASES} | {"Log", "Sqrt", "Not", "IsNaN", "Split", "Constant"}
    assert set(HANDLERS) - tested == set()
