"""Fused against reference: kfuse's one comparison policy, used by `CompiledModel.verify`, the
differential fuzzer (kfuse.testing) and the tests.

`mismatch(got, want)` is None when `got` matches `want`, else a sentence naming the worst element:
- shape and dtype must be equal; integers and bools exactly;
- floats: NaN, +Inf and -Inf at the same places, and at every finite element
  |got - want| <= atol + rtol |want| (+ F64_FACTOR |want - want64| when a float64 evaluation of the
  same computation is given: the rounding error the float32 (or float16/bfloat16) reference itself
  makes, from cancellation in a large sum, an amplifying log, or a deep half-precision network, so the
  compiled result may be as inexact as the reference, a few times over, and no more).
(atol, rtol) default to `TOLERANCE` for want's dtype: fused kernels reorder float arithmetic, so
bit-exactness is not expected.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# (atol, rtol) per dtype
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2),
             torch.float64: (1e-12, 1e-10)}
F64_FACTOR = 4.0
ROUNDED = (torch.float32, torch.float16, torch.bfloat16)   # outputs held to the float64 allowance


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing values of `dtype` (float32's for a dtype not in the table)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def _at(bad: torch.Tensor) -> tuple:
    return tuple(bad.nonzero()[0].tolist())


def mismatch(got: torch.Tensor, want: torch.Tensor, want64: torch.Tensor | None = None, *,
             atol: float | None = None, rtol: float | None = None) -> str | None:
    """None if `got` matches `want` (see the module docstring), else what differs, worst element first."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        return f"got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
    if not want.dtype.is_floating_point:
        bad = got != want
        if bad.any():
            i = _at(bad)
            return f"{int(bad.sum())} of {want.numel()} elements differ, e.g. at {list(i)}: got {got[i].item()}, " \
                   f"want {want[i].item()}"
        return None
    for name, f in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")), ("-Inf", lambda t: t == float("-inf"))):
        bad = f(got) != f(want)
        if bad.any():
            i = _at(bad)
            return f"{name} positions differ at {int(bad.sum())} elements, e.g. at {list(i)}: got {got[i].item()}, " \
                   f"want {want[i].item()}"
    default_atol, default_rtol = tolerance(want.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    fin = torch.isfinite(want)
    g, w = got[fin].double(), want[fin].double()
    tol = atol + rtol * w.abs()
    if want64 is not None:
        w64 = torch.as_tensor(want64)[fin].double()
        tol = tol + F64_FACTOR * torch.nan_to_num((w - w64).abs(), nan=0.0, posinf=0.0)
    err = (g - w).abs()
    bad = err > tol
    if bad.any():
        k = int((err - tol).argmax())
        idx = fin.nonzero()[k].tolist()
        f64 = f" (float64 {w64[k].item():.9g})" if want64 is not None else ""
        return (f"{int(bad.sum())} of {want.numel()} elements out of tolerance; worst at {idx}: got {g[k].item():.9g}, "
                f"want {w[k].item():.9g}{f64}, |err| {err[k].item():.3g} > tol {tol[k].item():.3g}")
    return None


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float       # max |a - b| / max(|b|), the error relative to the output's scale
    ok: bool
    detail: str = ""     # what `mismatch` found, when not ok

    def __str__(self):
        return f"{self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} {'ok' if self.ok else 'MISMATCH'}"


@dataclass
class Verification:
    outputs: list[OutputError]
    against: str

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def __str__(self):
        head = f"verified against {self.against}: {'all outputs match' if self.ok else 'MISMATCH'}"
        return "\n".join([head] + [f"  {o}" for o in self.outputs])


def compare(names, got, want, against: str, steps: dict | None = None, want64: list | None = None) -> Verification:
    """Each output of `got` against `want` by `mismatch`, with its max abs and max rel error; an output
    named in `steps` (a quantized model's output -> its quantization step) may also be one step off.
    `want64`, a float64 evaluation of the same model: a float32/16 output may also be off by F64_FACTOR times
    want's own worst rounding error over that output (its largest distance from want64), where a model's
    large values make eager's float32 sums err by more than the tolerance of its small outputs (or a deep
    float16/bfloat16 network's rounding adds up past its dtype's tolerance)."""
    rows = []
    for k, (name, a, b) in enumerate(zip(names, got, want)):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        step = (steps or {}).get(name)
        atol = None if step is None else tolerance(b.dtype)[0] + step * (1 + 1e-6)
        b64 = None if want64 is None else torch.as_tensor(want64[k])
        if b64 is not None and b.dtype in ROUNDED and a.shape == b.shape == b64.shape:
            off = (b.double() - b64.double()).abs()
            off = off[torch.isfinite(off)]
            atol = (tolerance(b.dtype)[0] if atol is None else atol) + F64_FACTOR * float(off.max() if off.numel() else 0.0)
        why = mismatch(a, b, atol=atol)
        if a.shape != b.shape:
            rows.append(OutputError(name, float("inf"), float("inf"), False, why))
            continue
        if not b.dtype.is_floating_point or not a.dtype.is_floating_point:
            bad = float((a != b).sum())
            rows.append(OutputError(name, bad, bad, why is None, why or ""))
            continue
        a64, b64 = a.double(), b.double()
        finite = torch.isfinite(a64) & torch.isfinite(b64)
        diff = (a64 - b64).abs()[finite]
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(b64[finite].abs().max()) if diff.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        rows.append(OutputError(name, max_abs, max_rel, why is None, why or ""))
    return Verification(rows, against)
