"""ONNX's node-test suite (`onnx.backend.test.case.node.collect_testcases()`) run through kfuse and
through ONNX Runtime: what tests/onnx/test_node_suite.py and tests/onnx/report.py share.

Each case is one model with one data set (inputs, expected outputs) and its own rtol/atol. kfuse
runs it as a user would: the model written to a file, `kfuse.compile(path, inputs)` with the
inputs as torch tensors, then the compiled model called on the same inputs. The outcome is one of
    pass    every output has the expected shape and dtype and is within the case's tolerance
            (np.testing.assert_allclose's rule, NaN equal to NaN: what onnx's backend runner checks)
    error   a clear kfuse.KfuseError, at compile or call time
    wrong   an output of another shape or dtype, or outside the tolerance
    crash   any other exception
Inputs torch has no tensor for (sequences, optionals, maps, strings, 2- and 4-bit types) are handed
to kfuse as they are (a list stays a list, None stays None) or as an empty placeholder tensor; the
loader reads the model's declared input types first, so such a case is a clear KfuseError naming
the input (never a skip).
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

import kfuse

HERE = Path(__file__).resolve().parent
EXPECTED_ERRORS = HERE / "expected_errors.txt"

# ONNX element types torch holds with the same bits (beyond those numpy arrays map onto directly)
_BITS = {TensorProto.BFLOAT16: (np.int16, torch.bfloat16),
         TensorProto.FLOAT8E4M3FN: (np.uint8, torch.float8_e4m3fn),
         TensorProto.FLOAT8E4M3FNUZ: (np.uint8, torch.float8_e4m3fnuz),
         TensorProto.FLOAT8E5M2: (np.uint8, torch.float8_e5m2),
         TensorProto.FLOAT8E5M2FNUZ: (np.uint8, torch.float8_e5m2fnuz),
         TensorProto.FLOAT8E8M0: (np.uint8, torch.float8_e8m0fnu)}

_ML_DTYPES = {"bfloat16": TensorProto.BFLOAT16, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN,
              "float8_e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ, "float8_e5m2": TensorProto.FLOAT8E5M2,
              "float8_e5m2fnuz": TensorProto.FLOAT8E5M2FNUZ, "float8_e8m0fnu": TensorProto.FLOAT8E8M0}


@functools.cache
def cases() -> dict:
    """Every node-test case by name (collect_testcases warns about overflowing casts it builds
    on purpose; the warnings are not ours)."""
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {c.name: c for c in collect_testcases()}


# Cases whose expected outputs (ONNX's reference) ONNX Runtime does not give either, where kfuse follows
# ONNX Runtime, the reference `cm.verify()` uses for an ONNX file: held to ONNX Runtime's outputs instead.
FOLLOWS_ORT = {
    "test_resize_downsample_scales_linear_align_corners":
        "align_corners with a fractional output width (scale 0.6 of 2 and 4): ONNX's reference maps by the "
        "fractional width, ONNX Runtime and PyTorch by the integer output length",
    "test_resize_downsample_scales_cubic_align_corners": "the same, cubic",
}


def expected_errors(path: Path = EXPECTED_ERRORS) -> dict[str, str]:
    """The reviewed list: case name -> the reason kfuse gives a clear error on it. One case per
    line, `name  reason`; blank lines and lines starting with # are ignored."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


# -- values ---------------------------------------------------------------------------------------

def to_torch(v):
    """A case's value as kfuse takes it: a torch tensor where torch has the element type, a list
    of them for a sequence, None for an empty optional, else None (no tensor for it)."""
    if v is None:
        return None
    if isinstance(v, list):
        items = [to_torch(x) for x in v]
        return items if all(isinstance(x, torch.Tensor) for x in items) else None
    if isinstance(v, TensorProto):
        if v.data_type in _BITS:
            bits, dtype = _BITS[v.data_type]
            a = numpy_helper.to_array(v)
            return torch.from_numpy(np.array(a).view(bits)).view(dtype)
        v = numpy_helper.to_array(v)
    a = np.array(v)
    if a.dtype.name in _ML_DTYPES:   # ml_dtypes' bfloat16 and float8 arrays: through their bits
        bits, dtype = _BITS[_ML_DTYPES[a.dtype.name]]
        return torch.from_numpy(np.array(a).view(bits)).view(dtype)
    if a.dtype.kind in "biuf":   # numpy.ulonglong and the like: the sized type of the same bits
        a = a.view(np.dtype(a.dtype.str))
    try:
        return torch.from_numpy(a)
    except TypeError:   # strings, and the 2- and 4-bit types of ml_dtypes
        return None


def kfuse_inputs(case) -> list:
    """The inputs handed to kfuse.compile: torch tensors, lists of them for sequences, None for an
    empty optional, an empty float tensor where torch has no type for the value."""
    ins, _ = case.data_sets[0]
    out = []
    for v in ins:
        t = to_torch(v)
        if t is None and v is not None and not isinstance(v, list):
            t = torch.empty(0)
        out.append(t)
    return out


def mismatch(got, want, rtol: float, atol: float) -> str | None:
    """None when `got` (a torch tensor) matches the expected value `want` as onnx's backend runner
    compares (same shape and dtype, then np.testing.assert_allclose(got, want, rtol, atol) with NaN
    equal to NaN; bfloat16 with rtol at least two of its ulp), else what differs."""
    if isinstance(want, list) or want is None:   # a sequence or an empty optional (ONNX Runtime's outputs)
        if not isinstance(got, list) and want is None and got is None:
            return None
        if not isinstance(got, list) or want is None or len(got) != len(want):
            return f"got {type(got).__name__}, want {type(want).__name__}"
        return next((f"item {i}: {w}" for i, w in enumerate(mismatch(g, x, rtol, atol) for g, x in zip(got, want))
                     if w), None)
    if isinstance(got, np.ndarray) and got.dtype == object:   # strings
        return None if np.array_equal(got, np.array(want)) else "strings differ"
    if isinstance(got, (np.ndarray, np.generic, TensorProto)):
        got = to_torch(got)
    expected = to_torch(want)
    if not isinstance(got, torch.Tensor):
        return f"got a {type(got).__name__}, want a tensor"
    if expected is None or not isinstance(expected, torch.Tensor):
        return f"the expected value ({type(want).__name__}) is not a tensor kfuse can produce"
    if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
        return f"got {got.dtype}{list(got.shape)}, want {expected.dtype}{list(expected.shape)}"
    if got.dtype == torch.bfloat16:
        rtol = max(rtol, 2**-6)
    if got.dtype.is_floating_point:
        g, w = got.double(), expected.double()
        ok = torch.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True) | (g == w)   # (inf == inf)
        if not ok.all():
            err = torch.where(ok, 0.0, torch.nan_to_num((g - w).abs(), nan=np.inf, posinf=np.inf))
            i = int(err.argmax())
            return (f"{int((~ok).sum())} of {ok.numel()} elements out of tolerance (rtol {rtol}, atol {atol}); "
                    f"max abs error {err.max().item():.3g} at flat index {i}: got {g.reshape(-1)[i].item():.9g}, "
                    f"want {w.reshape(-1)[i].item():.9g}")
        return None
    bad = got != expected
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        return (f"{int(bad.sum())} of {bad.numel()} elements differ; at flat index {i}: "
                f"got {got.reshape(-1)[i].item()}, want {expected.reshape(-1)[i].item()}")
    return None


# -- the reference's own rounding -------------------------------------------------------------------

def float64_outputs(case) -> list | None:
    """The case's outputs computed in float64: the model with every float16 and float32 type made double
    (kfuse.capture.onnx.widened), run by ONNX's reference evaluator on the inputs as float64. None when
    that model does not run."""
    from onnx.reference import ReferenceEvaluator

    from kfuse.capture.onnx import widened
    model = widened(case.model)
    ins, _ = case.data_sets[0]
    feeds = {}
    for vi, v in zip(case.model.graph.input, ins):
        a = numpy_helper.to_array(v) if isinstance(v, TensorProto) else np.asarray(v)
        feeds[vi.name] = a.astype(np.float64) if a.dtype in (np.float16, np.float32) else a
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]
    except Exception:  # noqa: BLE001 - no float64 evaluation, so no allowance beyond the case's tolerance
        return None


def rounding_mismatch(got, want, want64, rtol: float, atol: float) -> str | None:
    """The comparison for a float16 or float32 output that is outside the case's tolerance: the expected
    value was itself computed in that type, rounding after every op, so `got` may also differ from it
    by F64_FACTOR times the expected value's own error against the float64 evaluation
    (kfuse.verify's rule for a reference that rounds): |got - want| <= atol + rtol |want| +
    4 |want - want64|, NaN and infinities in the same places."""
    from kfuse.verify import mismatch as verify_mismatch
    return verify_mismatch(got, to_torch(want), torch.from_numpy(np.asarray(want64, np.float64)),
                           atol=atol, rtol=rtol)


# -- running --------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str        # pass, error, wrong, crash
    detail: str = ""


def run_kfuse(case, workdir: Path) -> Outcome:
    """The case through kfuse.compile(path, inputs) and one call, compared with its outputs."""
    path = Path(workdir) / f"{case.name}.onnx"
    onnx.save(case.model, path)
    inputs = kfuse_inputs(case)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = kfuse.compile(path, inputs)
            got = cm(*inputs)
    except kfuse.KfuseError as e:
        return Outcome("error", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a crash, whatever it is, is what this reports
        return Outcome("crash", f"{type(e).__name__}: {e}")
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    want = ort_outputs(case) if case.name in FOLLOWS_ORT else None
    return compare(case, list(got) if isinstance(got, (list, tuple)) else [got], "wrong", want)


# False: float16 and float32 outputs held to the case's tolerance only (report.py --strict-rounding)
ROUNDING_ALLOWANCE = True
ROUNDED = (torch.float16, torch.float32)     # the output types it applies to


def compare(case, got: list, fail: str, expected: list | None = None) -> Outcome:
    """pass when every output matches the case's expected outputs (or `expected`) (`mismatch`, then
    `rounding_mismatch` for a float16 or float32 output outside the case's tolerance; the detail says which passed
    only so), else `fail` and why."""
    expected = case.data_sets[0][1] if expected is None else expected
    if len(got) != len(expected):
        return Outcome(fail, f"{len(got)} outputs, want {len(expected)}")
    allowed = []
    for i, (g, w) in enumerate(zip(got, expected)):
        why = mismatch(g, w, case.rtol, case.atol)
        if isinstance(g, np.ndarray) and g.dtype == np.float16:
            g = torch.from_numpy(g)
        if why and ROUNDING_ALLOWANCE and isinstance(g, torch.Tensor) and g.dtype in ROUNDED and \
                getattr(to_torch(w), "dtype", None) == g.dtype and tuple(g.shape) == np.shape(w):
            want64 = float64_outputs(case)
            if want64 is not None and rounding_mismatch(g, w, want64[i], case.rtol, case.atol) is None:
                allowed.append(f"output {i}: {why}")
                why = None
        if why:
            return Outcome(fail, f"output {i} ({case.model.graph.output[i].name}): {why}")
    return Outcome("pass", "; ".join(f"within the rounding allowance only: {a}" for a in allowed))


def ort_outputs(case) -> list:
    """The case's outputs from ONNX Runtime (CPU)."""
    import onnxruntime as ort
    ins, _ = case.data_sets[0]
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    sess = ort.InferenceSession(case.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: (numpy_helper.to_array(v) if isinstance(v, TensorProto) else
                      np.asarray(v) if isinstance(v, np.generic) else v)
             for i, v in zip(sess.get_inputs(), ins)}
    return sess.run(None, feeds)


def run_ort(case) -> Outcome:
    """The case through ONNX Runtime (CPU), compared the same way: pass, or fail with the reason."""
    try:
        got = ort_outputs(case)
    except Exception as e:  # noqa: BLE001 - any failure of ORT's is a fail here
        return Outcome("fail", f"{type(e).__name__}: {str(e)[:300]}")
    return compare(case, got, "fail")
