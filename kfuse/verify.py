"""Fused against reference: the error of every output, and one tolerance table per dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# (atol, rtol) per dtype: fused kernels reorder float arithmetic, so bit-exactness is not expected.
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2),
             torch.float64: (1e-12, 1e-10)}


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float       # max |a - b| / max(|b|), the error relative to the output's scale
    ok: bool

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


def compare(names, got, want, against: str) -> Verification:
    rows = []
    for name, a, b in zip(names, got, want):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if a.shape != b.shape:
            rows.append(OutputError(name, float("inf"), float("inf"), False))
            continue
        if not a.dtype.is_floating_point:
            bad = float((a != b).sum())
            rows.append(OutputError(name, bad, bad, bad == 0))
            continue
        a64, b64 = a.double(), b.double()
        same_nonfinite = bool(((~torch.isfinite(a64)) == (~torch.isfinite(b64))).all()) and bool(
            (a64[~torch.isfinite(b64)].nan_to_num(0, 1, -1) == b64[~torch.isfinite(b64)].nan_to_num(0, 1, -1)).all())
        finite = torch.isfinite(a64) & torch.isfinite(b64)
        diff = (a64 - b64).abs()[finite]
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(b64[finite].abs().max()) if diff.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        atol, rtol = TOLERANCE.get(b.dtype, (1e-5, 1e-4))
        ok = same_nonfinite and bool(torch.all(diff <= atol + rtol * b64[finite].abs()).item() or max_rel <= rtol)
        rows.append(OutputError(name, max_abs, max_rel, ok))
    return Verification(rows, against)
