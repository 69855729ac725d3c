"""Dense accuracy sweeps of the C backend's own vector math (docs/vecmath.md): every k-th float32 in
a range through the normal lower/build kernel path, max ULP against float64; gelu's mixed error
|y - f| / max(|f|, 1) beside torch's float32 gelu. About 250M values, a minute or two.
Run: python bench/vecmath_dense.py
"""
import numpy as np
import torch

from kfuse.backends.c import build
from kfuse.ir import Graph
from kfuse.kernels import lower
from kfuse.ops import reference

RANGES = [("exp", 1e-3, 88.7, 7), ("exp", -1e-3, -86.9, 7), ("erf", 1e-3, 4.0, 3), ("erf", 1e-30, 1e-3, 97),
          ("tanh", 1e-4, 10.0, 5), ("sigmoid", 1e-3, 20.0, 5), ("sigmoid", -1e-3, -20.0, 5)]


def run(op, x):
    g = Graph()
    g.outputs = [g.add(op, g.input(list(x.shape), torch.float32))]
    out = torch.empty_like(x)
    build(lower(g.nodes[1:], g.outputs))([x], [out])
    return out


def floats(lo, hi, step):
    """Every step-th float32 from lo to hi (same sign)."""
    sign = -1.0 if lo < 0 else 1.0
    a, b = np.float32(abs(lo)).view(np.int32), np.float32(abs(hi)).view(np.int32)
    return sign * torch.from_numpy(np.arange(a, b, step, dtype=np.int32).view(np.float32).copy())


def ulp_error(y, ref64):
    a = ref64.float().abs()
    return (y.double() - ref64).abs() / (torch.nextafter(a, torch.tensor(float("inf"))) - a).double()


def main():
    for op, lo, hi, step in RANGES:
        x = floats(lo, hi, step)
        y = run(op, x)
        e = ulp_error(y, reference.REFERENCE[op](x.double()))
        print(f"{op:8s} [{lo:g}, {hi:g}] every {step}th float: {len(x)} values, max ULP {e.max():.3g} "
              f"at {x[e.argmax()]:.7g}, non-finite results {int((~torch.isfinite(y)).sum())}")
    x = torch.cat([floats(1e-6, 10.0, 5), floats(-1e-6, -10.0, 5)])
    ref = reference.REFERENCE["gelu"](x.double())
    for name, y in (("kfuse", run("gelu", x)), ("torch", torch.nn.functional.gelu(x))):
        err = ((y.double() - ref).abs() / ref.abs().clamp(min=1)).max()
        print(f"gelu ({name}) over +-[1e-6, 10] every 5th float: {len(x)} values, mixed error {err:.3g}")


if __name__ == "__main__":
    main()
