"""ONNX ops added for the node-test suite's remaining groups, on odd shapes and the variants the suite
does not reach, against ONNX's reference evaluator (the semantics kfuse follows): GridSample, Resize
by weight matrices (cubic coefficients, antialias, tf_crop_and_resize), Scan and Loop unrolled, the
quantization ops, DeformConv, AveragePool by convolution, ScatterND reductions, MaxPool's Indices,
TfIdfVectorizer, BitCast, DFT, STFT, RoiAlign, and ops whose output shape depends on values (compiled again
per value); Resize with align_corners and a fractional output width, and opset-10 RoiAlign, against ONNX
Runtime (which kfuse follows there)."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import kfuse

rng = np.random.default_rng(13)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def model(nodes, inputs, outputs, inits=None, opset=22, shapes=None):
    """(the model, its inputs): `inputs` name -> array (graph inputs), `outputs` name -> element type,
    `inits` name -> array. The outputs' shapes are declared as ONNX's reference computes them."""
    def build(shapes):
        graph = helper.make_graph(
            nodes, "g",
            [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
             for k, v in inputs.items()],
            [helper.make_tensor_value_info(k, t, shapes.get(k)) for k, t in outputs.items()],
            [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    if shapes is None:
        values = ReferenceEvaluator(build({})).run(None, inputs)
        shapes = {k: list(np.shape(v)) for k, v in zip(outputs, values)}
    return build(shapes), inputs


def check(tmp_path, built, feeds=None, atol=1e-5, rtol=1e-5, oracle="reference"):
    """kfuse's outputs of the model `built` (model(...)'s pair) on its inputs (or `feeds`) against
    ONNX's reference evaluator's (or ONNX Runtime's)."""
    m, feeds = built[0], feeds if feeds is not None else built[1]
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    xs = [torch.from_numpy(v) for v in feeds.values()]
    got = kfuse.compile(str(path), xs)(*xs)
    got = got if isinstance(got, (list, tuple)) else [got]
    if oracle == "ort":
        ort = pytest.importorskip("onnxruntime")
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    else:
        want = ReferenceEvaluator(m).run(None, feeds)
    for g, w in zip(got, want):
        w = np.asarray(w)
        assert g.shape == w.shape and g.numpy().dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(g.numpy(), w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode,padding", [(m, p) for m in ("linear", "nearest", "cubic")
                                          for p in ("zeros", "border", "reflection") if (m, p) != ("cubic", "border")])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample(tmp_path, mode, padding, align):
    x, grid = f32(2, 3, 5, 7), (rng.random((2, 4, 6, 2), dtype=np.float32) * 2.6 - 1.3)
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode, padding_mode=padding, align_corners=align)
    check(tmp_path, model([node], {"x": x, "grid": grid}, {"y": TensorProto.FLOAT}), atol=1e-4)


@pytest.mark.parametrize("attrs,scales,roi", [
    ({"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1}, [1, 1, 1.7, 0.6], None),
    ({"mode": "linear", "antialias": 1}, [1, 1, 0.45, 0.7], None),
    ({"mode": "cubic", "antialias": 1}, [1, 1, 0.6, 1.0], None),
    ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 7.0},
     [1, 1, 1.4, 0.8], [0, 0, -0.2, 0.3, 1, 1, 0.9, 1.3]),
])
def test_resize_by_weight_matrices(tmp_path, attrs, scales, roi):
    x = f32(2, 3, 7, 9)
    inits = {"scales": np.array(scales, np.float32), "roi": np.array(roi or [], np.float32)}
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], **attrs)
    check(tmp_path, model([node], {"x": x}, {"y": TensorProto.FLOAT}, inits, opset=19), atol=1e-4)


@pytest.mark.parametrize("mode", ["linear", "cubic", "nearest"])
@pytest.mark.parametrize("scales", [[1, 1, 1.5, 1.5], [1, 1, 0.6, 1.3]])
def test_resize_align_corners_fractional_width_follows_onnx_runtime(tmp_path, mode, scales):
    """align_corners with scales whose output width is fractional (a PyTorch export of
    interpolate(scale_factor=1.5, align_corners=True) on a 7x5 map): ONNX Runtime and PyTorch map by the
    integer output length, ONNX's reference by the fractional width; kfuse follows ONNX Runtime (it had
    followed the reference: 30% off the PyTorch model the file came from)."""
    x = f32(1, 2, 7, 5)
    inits = {"scales": np.array(scales, np.float32), "roi": np.array([], np.float32)}
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode=mode,
                            coordinate_transformation_mode="align_corners")
    out = [1, 2] + [int(np.float32(s) * np.float32(n)) for s, n in zip(scales[2:], (7, 5))]
    check(tmp_path, model([node], {"x": x}, {"y": TensorProto.FLOAT}, inits, opset=19, shapes={"y": out}),
          atol=1e-5, oracle="ort")


@pytest.mark.parametrize("mode", ["linear", "cubic", "nearest"])
def test_resize_of_an_empty_batch(tmp_path, mode):
    """batch 0: an empty output of the resized shape, as ONNX Runtime gives (it had crashed in numpy)."""
    inits = {"scales": np.array([1, 1, 2, 2], np.float32), "roi": np.array([], np.float32)}
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode=mode)
    check(tmp_path, model([node], {"x": f32(0, 3, 5, 4)}, {"y": TensorProto.FLOAT}, inits, opset=19,
                          shapes={"y": [0, 3, 10, 8]}), oracle="ort")


def test_scan_reverse_and_output_axis(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Add", ["s", "a"], ["s2"]), helper.make_node("Mul", ["s2", "b"], ["o"])], "body",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [3]) for k in ("s", "a", "b")],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [3]) for k in ("s2", "o")])
    node = helper.make_node("Scan", ["init", "xa", "xb"], ["final", "ys"], body=body, num_scan_inputs=2,
                            scan_input_axes=[0, 1], scan_input_directions=[1, 0], scan_output_axes=[1],
                            scan_output_directions=[1])
    feeds = {"init": f32(3), "xa": f32(5, 3), "xb": f32(3, 5)}
    built = model([node], feeds, {"final": TensorProto.FLOAT, "ys": TensorProto.FLOAT}, opset=16,
                  shapes={"final": [3], "ys": [3, 5]})
    check(tmp_path, built, oracle="ort")


def test_loop_stops_on_its_condition(tmp_path):
    """trip count 6, the body's condition false from iteration 3 on: 4 iterations."""
    body = helper.make_graph(
        [helper.make_node("Less", ["i", "three"], ["c"]),
         helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["v", "fi"], ["v2"]), helper.make_node("Mul", ["v2", "v2"], ["sq"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cin", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(k, t, None) for k, t in (("c", TensorProto.BOOL), ("v2", TensorProto.FLOAT),
                                                                 ("sq", TensorProto.FLOAT))],
        [numpy_helper.from_array(np.array(3, np.int64), "three")])
    node = helper.make_node("Loop", ["n", "go", "v0"], ["v", "steps"], body=body)
    m = model([node], {"v0": f32(2)}, {"v": TensorProto.FLOAT, "steps": TensorProto.FLOAT},
              {"n": np.array(6, np.int64), "go": np.array(True)}, opset=16)
    check(tmp_path, m, {"v0": f32(2)})


def test_output_shape_by_value_compiles_again(tmp_path):
    """NonZero's output length depends on the values: a new value compiles once more, never reusing
    the program specialised on the first."""
    m, _ = model([helper.make_node("NonZero", ["x"], ["y"])], {"x": f32(3, 4)}, {"y": TensorProto.INT64}, opset=13)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    a = np.array([[0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 4, 5]], np.float32)
    cm = kfuse.compile(str(path), [torch.from_numpy(a)])
    for x in (a, np.eye(3, 4, dtype=np.float32), np.zeros((3, 4), np.float32)):
        np.testing.assert_array_equal(cm(torch.from_numpy(x)).numpy(), np.stack(np.nonzero(x)))


@pytest.mark.parametrize("a_type", [np.uint8, np.int8])
def test_qlinear_matmul_saturates(tmp_path, a_type):
    info = np.iinfo(a_type)
    a = rng.integers(info.min, info.max + 1, (3, 17, 9)).astype(a_type)
    b = rng.integers(info.min, info.max + 1, (9, 5)).astype(a_type)
    inits = {"sa": np.array(0.05, np.float32), "za": np.array(7, a_type), "sb": np.array(0.02, np.float32),
             "zb": np.array(-3 if a_type == np.int8 else 200, a_type), "sy": np.array(0.3, np.float32),
             "zy": np.array(5, a_type)}
    node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])
    check(tmp_path, model([node], {"a": a, "b": b}, {"y": helper.np_dtype_to_tensor_dtype(np.dtype(a_type))}, inits))


def test_quantize_dequantize_blocked(tmp_path):
    x = f32(4, 10) * 20
    scale = np.abs(f32(4, 3)) + 0.1
    zp = rng.integers(-20, 20, (4, 3)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1, block_size=4),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1, block_size=4)]
    check(tmp_path, model(nodes, {"x": x}, {"q": TensorProto.INT8, "y": TensorProto.FLOAT}, {"s": scale, "z": zp}))


def test_deform_conv_groups_mask_bias(tmp_path):
    x, w = f32(2, 4, 6, 7), f32(6, 2, 3, 2)
    offset, mask = f32(2, 2 * 2 * 3 * 2, 3, 3), rng.random((2, 2 * 3 * 2, 3, 3), dtype=np.float32)
    node = helper.make_node("DeformConv", ["x", "w", "offset", "b", "mask"], ["y"], group=2, offset_group=2,
                            strides=[2, 2], pads=[1, 0, 0, 1], dilations=[1, 2])
    check(tmp_path, model([node], {"x": x, "offset": offset, "mask": mask}, {"y": TensorProto.FLOAT},
                          {"w": w, "b": f32(6)}), atol=1e-4)


@pytest.mark.parametrize("include,ceil", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_average_pool_dilated_asymmetric(tmp_path, include, ceil):
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 3], dilations=[2, 1],
                            pads=[1, 0, 2, 1], count_include_pad=include, ceil_mode=ceil)
    check(tmp_path, model([node], {"x": f32(2, 3, 11, 10)}, {"y": TensorProto.FLOAT}))


@pytest.mark.parametrize("reduction", ["mul", "max", "min"])
def test_scatter_nd_reductions_with_duplicates(tmp_path, reduction):
    idx = np.array([[[1, 2]], [[0, 0]], [[1, 2]]], np.int64)     # (1, 2) twice
    node = helper.make_node("ScatterND", ["x", "idx", "u"], ["y"], reduction=reduction)
    check(tmp_path, model([node], {"x": f32(2, 3, 4), "u": f32(3, 1, 4)}, {"y": TensorProto.FLOAT}, {"idx": idx}, opset=18))


@pytest.mark.parametrize("order", [0, 1])
def test_max_pool_indices(tmp_path, order):
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[3, 3], strides=[2, 1], pads=[1, 1, 1, 1],
                            storage_order=order)
    check(tmp_path, model([node], {"x": f32(2, 3, 5, 6)}, {"y": TensorProto.FLOAT, "i": TensorProto.INT64}))


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
def test_tfidf_vectorizer_weights(tmp_path, mode):
    node = helper.make_node("TfIdfVectorizer", ["x"], ["y"], mode=mode, min_gram_length=1, max_gram_length=3,
                            max_skip_count=2, ngram_counts=[0, 4, 8], ngram_indexes=[6, 0, 1, 2, 3, 4, 5],
                            pool_int64s=[2, 3, 5, 4, 5, 6, 7, 8, 5, 6, 7], weights=[0.5, 1, 2, 3, 4, 5, 6])
    x = rng.integers(2, 9, (3, 11)).astype(np.int64)
    check(tmp_path, model([node], {"x": x}, {"y": TensorProto.FLOAT}, opset=9))


def test_bitcast_float_bits(tmp_path):
    x = np.array([1.5, -0.0, np.inf, np.nan, 1e-40], np.float32)
    node = helper.make_node("BitCast", ["x"], ["y"], to=TensorProto.INT32)
    check(tmp_path, model([node], {"x": x}, {"y": TensorProto.INT32}, opset=26))


def test_max_pool_indices_1d(tmp_path):
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[3], strides=[2], pads=[1, 1])
    check(tmp_path, model([node], {"x": f32(2, 3, 9)}, {"y": TensorProto.FLOAT, "i": TensorProto.INT64}))


@pytest.mark.parametrize("last,axis,length,inverse,onesided,opset", [
    (1, 1, None, 0, 0, 17), (1, -2, 11, 0, 1, 20), (2, 1, 6, 0, 1, 20), (2, 2, None, 1, 0, 20),
    (1, 1, 13, 1, 0, 17), (2, 1, 14, 1, 1, 20), (2, -2, 9, 1, 1, 20), (2, 1, 3, 0, 0, 17),
])
def test_dft_variants(tmp_path, last, axis, length, inverse, onesided, opset):
    """DFT of a real ([..., 1]) or complex ([..., 2]) signal on odd lengths: dft_length cutting or
    zero-padding, forward and inverse, one-sided (irfft for the inverse), axis attribute or input"""
    ins = ["x", "n" if length else ""] + (["axis"] if opset >= 20 else [])
    attrs = dict(inverse=inverse, onesided=onesided) | ({"axis": axis} if opset < 20 else {})
    inits = ({"n": np.array(length, np.int64)} if length else {}) | ({"axis": np.array(axis, np.int64)} if opset >= 20 else {})
    built = model([helper.make_node("DFT", ins, ["y"], **attrs)], {"x": f32(2, 7, 5, last)}, {"y": TensorProto.FLOAT},
                  inits, opset=opset)
    check(tmp_path, built, atol=1e-5)


@pytest.mark.parametrize("signal,window,frame_length,onesided", [
    ((2, 50, 1), 16, None, 1), ((1, 41, 2), 12, None, 0), ((2, 33, 1), None, 10, 1), ((1, 30, 1), 8, 12, 1),
])
def test_stft_variants(tmp_path, signal, window, frame_length, onesided):
    """STFT of real and complex signals: a window, or frame_length alone, or a window shorter than the
    DFT (zero-padded frames), one- and two-sided, a step that leaves a tail unused"""
    ins = ["x", "step", "w" if window else "", "n" if frame_length else ""]
    inits = {"step": np.array(7, np.int64)} | ({"w": np.hanning(window).astype(np.float32)} if window else {}) \
        | ({"n": np.array(frame_length, np.int64)} if frame_length else {})
    built = model([helper.make_node("STFT", ins, ["y"], onesided=onesided)], {"x": f32(*signal)},
                  {"y": TensorProto.FLOAT}, inits, opset=17)
    check(tmp_path, built, atol=1e-5)


def test_dft_of_float16_is_a_clear_error(tmp_path):
    built = model([helper.make_node("DFT", ["x"], ["y"])], {"x": f32(2, 8, 1).astype(np.float16)},
                  {"y": TensorProto.FLOAT16}, opset=17)
    with pytest.raises(kfuse.UnsupportedOpError, match="DFT.*float16 input"):
        check(tmp_path, built)


@pytest.mark.parametrize("attrs,opset", [
    ({}, 16), ({"mode": "max"}, 16), ({"sampling_ratio": 2, "spatial_scale": 0.5}, 16),
    ({"coordinate_transformation_mode": "output_half_pixel", "output_height": 3, "output_width": 2}, 16),
    ({"mode": "max", "sampling_ratio": 3, "output_height": 2, "output_width": 5}, 16), ({"spatial_scale": 0.25}, 10),
])
def test_roi_align_variants(tmp_path, attrs, opset):
    """RoiAlign over ROIs of different sizes (so the adaptive sampling grid differs per ROI), partly and
    wholly outside the image, empty, in both images of the batch. Opset 10 against ONNX Runtime: its
    RoiAlign had no half-pixel shift (opset 16's output_half_pixel), which ONNX's reference evaluator,
    one class for both versions, does not follow (1.09 off ONNX Runtime there)."""
    rois = np.array([[0, 0, 9, 7], [2.5, 1.5, 4, 9.7], [-3, -2, 2, 3], [6, 6, 30, 25], [4, 4, 4, 4], [8.5, 0, 11.9, 2]],
                    np.float32)
    attrs = {"output_height": 2, "output_width": 3} | attrs
    built = model([helper.make_node("RoiAlign", ["x", "rois", "at"], ["y"], **attrs)],
                  {"x": f32(2, 3, 10, 12), "rois": rois, "at": np.array([0, 1, 0, 1, 0, 1], np.int64)},
                  {"y": TensorProto.FLOAT}, opset=opset)
    check(tmp_path, built, atol=1e-5, oracle="ort" if opset < 16 else "reference")


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_of_only_empty_rois_in_an_image(tmp_path, mode):
    """every ROI of image 0 empty (a detector's padding boxes): zeros there, no error"""
    rois = np.array([[4, 4, 4, 4], [0, 0, 0, 0], [1, 1, 5, 5]], np.float32)
    built = model([helper.make_node("RoiAlign", ["x", "rois", "at"], ["y"], mode=mode, output_height=2, output_width=3)],
                  {"x": f32(2, 3, 10, 12), "rois": rois, "at": np.array([0, 0, 1], np.int64)}, {"y": TensorProto.FLOAT},
                  opset=16)
    check(tmp_path, built, atol=1e-5)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_spreads_inf_and_nan_as_the_reference(tmp_path, mode):
    """An Inf and a NaN in the map reach the bins whose samples read them, as in ONNX's reference (the
    average of a finite map takes other code: grid_sample). In max mode NaN is left out here: the
    reference's Python max() keeps or drops a NaN by argument order; kfuse's max keeps it."""
    x = f32(2, 3, 10, 12)
    x[0, 1, 5, 6], x[1, 2, 2, 9] = np.inf, (np.nan if mode == "avg" else -np.inf)
    rois = np.array([[0, 0, 9, 7], [2.5, 1.5, 4, 9.7], [6, 6, 30, 25], [4, 1, 11, 5]], np.float32)
    built = model([helper.make_node("RoiAlign", ["x", "rois", "at"], ["y"], mode=mode, output_height=3, output_width=2)],
                  {"x": x, "rois": rois, "at": np.array([0, 0, 1, 1], np.int64)}, {"y": TensorProto.FLOAT}, opset=16)
    check(tmp_path, built, atol=1e-5)
