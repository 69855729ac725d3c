"""kfuse.verify: the one comparison policy (verify, the fuzzer and the tests use it)."""
import math

import pytest
import torch
from helpers import assert_close

from kfuse.testing.fuzz import compare
from kfuse.verify import F64_FACTOR, TOLERANCE, compare as verify_outputs, mismatch, tolerance

INF, NAN = float("inf"), float("nan")


def test_within_the_table_matches_and_just_beyond_does_not():
    atol, rtol = TOLERANCE[torch.float32]
    want = torch.tensor([0.0, 1.0, -100.0])
    edge = want + torch.tensor([atol, atol + rtol, -(atol + 100 * rtol)]) * 0.99
    assert mismatch(edge, want) is None
    beyond = want.clone()
    beyond[2] = -100.0 - (atol + 100 * rtol) * 1.5
    why = mismatch(beyond, want)
    assert why is not None and "1 of 3 elements" in why and "worst at [2]" in why


def test_the_worst_element_is_named():
    want = torch.zeros(4, 5)
    got = want.clone()
    got[1, 2], got[3, 4] = 1e-3, 1e-2
    why = mismatch(got, want)
    assert "2 of 20 elements" in why and "worst at [3, 4]" in why and "got 0.00999999978" in why


@pytest.mark.parametrize("special", [NAN, INF, -INF])
def test_non_finite_values_must_be_at_the_same_places(special):
    want = torch.tensor([1.0, special, 3.0])
    assert mismatch(want.clone(), want) is None
    moved = torch.tensor([special, 2.0, 3.0])
    why = mismatch(moved, want)
    assert why is not None and "positions differ" in why
    assert mismatch(torch.tensor([1.0, -special if not math.isnan(special) else INF, 3.0]), want) is not None


def test_integers_and_bools_exactly_and_dtype_and_shape_must_agree():
    assert mismatch(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])) is None
    assert "1 of 3 elements differ" in mismatch(torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]))
    assert mismatch(torch.tensor([True, False]), torch.tensor([True, True])) is not None
    assert "want torch.float32[3]" in mismatch(torch.zeros(3, dtype=torch.float64), torch.zeros(3))
    assert mismatch(torch.zeros(3), torch.zeros(1, 3)) is not None


def test_float64_reference_widens_by_the_float32_references_own_error():
    """|got - want| <= atol + rtol |want| + F64_FACTOR |want - want64|: as inexact as the float32
    reference, a few times over, and no more."""
    atol, rtol = TOLERANCE[torch.float32]
    want, want64 = torch.tensor([1.0]), torch.tensor([1.0 + 1e-3], dtype=torch.float64)
    slack = atol + rtol + F64_FACTOR * 1e-3
    assert mismatch(torch.tensor([1.0 + 0.9 * slack]), want) is not None
    assert mismatch(torch.tensor([1.0 + 0.9 * slack]), want, want64) is None
    assert mismatch(torch.tensor([1.0 + 1.1 * slack]), want, want64) is not None


def test_explicit_tolerances_and_the_table():
    assert tolerance(torch.float16) == TOLERANCE[torch.float16]
    assert tolerance(torch.int64) == TOLERANCE[torch.float32]
    assert mismatch(torch.tensor([1.0 + 5e-5]), torch.tensor([1.0]), rtol=1e-5, atol=0) is not None
    assert mismatch(torch.tensor([1.0 + 5e-5]), torch.tensor([1.0])) is None
    assert mismatch(torch.tensor([1.0]), torch.tensor([1.0]), rtol=0, atol=0) is None
    h = torch.tensor([1.0], dtype=torch.float16)
    assert mismatch(h + 0.0078125, h) is None                     # within float16's rtol of 1e-2


def test_the_fuzzer_and_assert_close_use_the_same_oracle():
    got, want = torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0])
    assert compare is mismatch
    with pytest.raises(AssertionError, match="worst at \\[1\\]"):
        assert_close(got, want)
    assert_close([want, torch.tensor([3])], (want.clone(), torch.tensor([3])))


def test_verification_of_outputs():
    names = ["a", "b", "c", "d"]
    want = [torch.tensor([1.0, NAN]), torch.tensor([1, 2]), torch.ones(2, 2), torch.tensor([100.0, 0.0])]
    got = [torch.tensor([1.0, NAN]), torch.tensor([1, 3]), torch.ones(2), torch.tensor([100.02, 0.0])]
    v = verify_outputs(names, got, want, "PyTorch eager")
    assert [o.ok for o in v.outputs] == [True, False, False, False] and not v.ok
    a, b, c, d = v.outputs
    assert (a.max_abs, a.max_rel) == (0.0, 0.0)
    assert b.max_abs == 1.0 and "1 of 2 elements differ" in b.detail
    assert c.max_abs == INF and "want torch.float32[2, 2]" in c.detail
    assert d.max_abs == pytest.approx(0.02, rel=1e-3) and d.max_rel == pytest.approx(2e-4, rel=1e-3)
    assert "worst at [0]" in d.detail
    assert str(v).splitlines()[0] == "verified against PyTorch eager: MISMATCH"
    assert str(d) == "d: max abs 0.02, max rel 0.0002 MISMATCH"
    ok = verify_outputs(names[:1], got[:1], want[:1], "ONNX Runtime")
    assert ok.ok and str(ok) == "verified against ONNX Runtime: all outputs match\n  a: max abs 0, max rel 0 ok"


def test_a_quantized_output_may_be_one_step_off():
    """An output named with its quantization step may differ by one step (a fused float value on the other
    side of a QuantizeLinear's half-way point), not by two."""
    want = torch.tensor([0.25, 0.50, 0.75])
    one, two = want + torch.tensor([0.0, 0.25, 0.0]), want + torch.tensor([0.0, 0.5, 0.0])
    assert verify_outputs(["y"], [one], [want], "x", {"y": 0.25}).ok
    assert not verify_outputs(["y"], [two], [want], "x", {"y": 0.25}).ok
    assert not verify_outputs(["y"], [one], [want], "x").ok


def test_verify_of_a_qdq_quantized_onnx_model(tmp_path):
    """cm.verify() on a model quantized by ONNX Runtime's quantizer (QDQ): the reference is ONNX Runtime
    without its graph optimizations (with them its fused integer kernels round otherwise), and the
    output one DequantizeLinear step wide (it reported this correct program as a MISMATCH: 2 steps from
    optimized ONNX Runtime, 1 from the file's semantics)."""
    quant = pytest.importorskip("onnxruntime.quantization")
    import kfuse

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
            self.c3, self.fc = torch.nn.Conv2d(16, 16, 1), torch.nn.Linear(256, 10)

        def forward(self, x):
            y = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
            z = torch.relu(self.c2(y)) + self.c3(y)
            return self.fc(torch.nn.functional.avg_pool2d(z, 2).flatten(1))

    class Data(quant.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": torch.randn(2, 3, 16, 16).numpy()} for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)
    torch.manual_seed(0)
    plain, qdq = tmp_path / "m.onnx", tmp_path / "qdq.onnx"
    torch.onnx.export(CNN().eval(), (torch.randn(2, 3, 16, 16),), str(plain), dynamo=False, input_names=["x"],
                      opset_version=17)
    quant.quantize_static(str(plain), str(qdq), Data(), quant_format=quant.QuantFormat.QDQ)
    x = torch.randn(2, 3, 16, 16)
    v = kfuse.compile(str(qdq), (x,)).verify(x)
    assert v.ok, str(v)


def test_a_float64_evaluation_allows_the_references_own_worst_error_over_an_output():
    """compare's want64: a float32 output may be off by F64_FACTOR times want's largest distance from it
    over the whole output, not more; outputs of other dtypes are untouched"""
    want = torch.tensor([1e6, 0.5, 0.0])
    want64 = want.double() + torch.tensor([0.25, 0.0, 0.0], dtype=torch.float64)      # want's own error: 0.25
    near = want + torch.tensor([0.0, 0.0, 0.9 * F64_FACTOR * 0.25])
    far = want + torch.tensor([0.0, 0.0, 1.1 * F64_FACTOR * 0.25 + TOLERANCE[torch.float32][0]])
    assert not verify_outputs(["y"], [near], [want], "x").ok
    assert verify_outputs(["y"], [near], [want], "x", want64=[want64]).ok
    assert not verify_outputs(["y"], [far], [want], "x", want64=[want64]).ok
    ints = torch.tensor([1, 2])
    assert not verify_outputs(["i"], [ints + 1], [ints], "x", want64=[ints.double() + 1]).ok


def test_verify_allows_eager_float32_rounding_of_a_model_with_large_values():
    """A model whose values are large (a random-weight Inception-v3's logits near 1e12): eager's float32
    sums err by more than the tolerance of the small outputs, so the compiled program, summing in another
    order, does too; cm.verify then compares with a float64 evaluation of the model and reports a match,
    and a program off by more than eager's own error still fails"""
    import kfuse

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(512, 512), torch.nn.Linear(512, 256)

        def forward(self, x):
            return self.b(torch.relu(self.a(x * 1e4)))

    torch.manual_seed(0)
    model, x = Big().eval(), torch.randn(8, 512)
    with torch.no_grad():                           # the first row's outputs cancel to ~0: every one of them is
        model.b.bias -= model(x)[0]                 # off by eager's rounding whatever order the program sums in
    cm = kfuse.compile(model, (x,))
    got, want = cm(x), model(x).detach()
    assert mismatch(got, want) is not None          # float32 alone: a false alarm
    v = cm.verify(x)
    assert v.ok and "float64" in v.against, str(v)
    wrong = got.clone()
    wrong[0, 0] += 100 * float((got - want).abs().max())
    assert not verify_outputs(["y"], [wrong], [want], "x", want64=cm._reference64([x])).ok


def test_verify_of_an_onnx_file_allows_onnx_runtimes_own_float32_rounding(tmp_path):
    """ONNX Runtime's float32 DFT is ~1e-4 off the float64 result on an irfft(rfft(x)) + fft(x).real model
    (kfuse, on torch's FFT, ~1e-6): verify compares with ONNX Runtime on the file widened to float64
    (capture.onnx.widened) and reports a match; a program off by more than ONNX Runtime's own error still
    fails (the same file with a constant changed, compiled against the original's reference)"""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import kfuse
    from kfuse.capture.onnx import widened

    def build(half):
        nodes = [helper.make_node("Unsqueeze", ["x", "last"], ["xr"]),
                 helper.make_node("DFT", ["xr", "", "axis"], ["f"], onesided=1),
                 helper.make_node("Mul", ["f", "half"], ["g"]),
                 helper.make_node("DFT", ["g", "n", "axis"], ["y1"], inverse=1, onesided=1),
                 helper.make_node("DFT", ["xr", "", "axis"], ["full"]),
                 helper.make_node("Slice", ["full", "zero", "one", "last"], ["re"]),
                 helper.make_node("Add", ["y1", "re"], ["y"])]
        inits = {"last": np.array([-1], np.int64), "axis": np.array(-2, np.int64), "n": np.array(40, np.int64),
                 "half": np.array(half, np.float32), "zero": np.array([0], np.int64), "one": np.array([1], np.int64)}
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    path, off = tmp_path / "m.onnx", tmp_path / "off.onnx"
    onnx.save(build(0.5), path)
    onnx.save(build(0.5 + 1e-3), off)
    x = torch.randn(3, 40) * 30
    f32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    f64 = ort.InferenceSession(widened(onnx.load(path)).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x.double().numpy()})[0]
    assert f64.dtype == np.float64 and np.abs(f32 - f64).max() > 1e-5     # ONNX Runtime's own rounding
    cm = kfuse.compile(str(path), (x,))
    v = cm.verify(x)
    assert v.ok and "in float64" in v.against, str(v)     # the float32 comparison alone had failed
    wrong = kfuse.compile(str(off), (x,))
    wrong.source = path                       # the reference of the right file, the program of the wrong one
    assert not wrong.verify(x).ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_verify_allows_a_half_precision_networks_own_rounding(dtype):
    """A convolutional network in float16/bfloat16: eager's own rounding, layer after layer, exceeds the
    dtype's tolerance on small outputs, and the program, rounding at other places (fused kernels compute in
    float32), is off eager by about as much. cm.verify compares with the model in float64 then; a program
    off by more than eager's own error still fails."""
    import kfuse
    from kfuse.models import build

    model, (x,) = build("unet", batch=1, image=32)
    model, x = model.to(dtype), x.to(dtype)
    cm = kfuse.compile(model, (x,))
    got, want = cm(x), model(x).detach()
    assert mismatch(got, want) is not None          # the dtype's tolerance alone: a false alarm
    v = cm.verify(x)
    assert v.ok and "float64" in v.against, str(v)
    wrong = got.clone()
    wrong[0, 0, 0, 0] += 100 * float((got.float() - want.float()).abs().max())
    assert not verify_outputs(["y"], [wrong], [want], "x", want64=cm._reference64([x])).ok


def test_verify_of_a_float16_onnx_file_where_onnx_runtime_has_no_double_kernel(tmp_path):
    """A float16 transformer exported to ONNX (GELU as Erf, which ONNX Runtime has no double kernel for):
    kfuse is one float16 step off ONNX Runtime, both as far from the float32 result. verify's float64
    evaluation fails to load, so the file widened to float32 stands in; a wrong program still fails."""
    pytest.importorskip("onnxruntime")
    import kfuse
    from kfuse.models import build

    model, inputs = build("bert", batch=1, seq=32, layers=2)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.half(), inputs, path, dynamo=False, opset_version=17)
    cm = kfuse.compile(str(path), inputs)
    got, want = cm(*inputs), torch.as_tensor(cm.reference(*inputs)[0])
    assert got.dtype == torch.float16 and mismatch(got, want) is not None    # float16's tolerance alone: a false alarm
    v = cm.verify(*inputs)
    assert v.ok, str(v)
    wrong = got.clone()
    wrong[0, 0, 0] += 50 * float((got.float() - want.float()).abs().max())
    assert not verify_outputs(["y"], [wrong], [want], "x", want64=cm._reference64(list(inputs))).ok
