"""The activation after a convolution, shared by the C convolution kernels (depthwise.c, pointwise.c):
conv_act.c defines `act(v, p0, p1)` for the code ACT that the including template sets.

ACTS maps a oneDNN post-op (name, algorithm), as kfuse.kernels.conv.post_op_of gives it, to that code.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from .vecmath import VECMATH_C

C_SOURCE = Path(__file__).with_name("conv_act.c").read_text()
ACTS = {None: 0, ("relu", ""): 1, ("sigmoid", ""): 2, ("tanh", ""): 3, ("swish", ""): 4, ("gelu", "none"): 5,
        ("gelu", "erf"): 5, ("gelu", "tanh"): 6, ("leaky_relu", ""): 7, ("hardtanh", ""): 8, ("hardswish", ""): 9,
        ("hardsigmoid", ""): 10}


def template(path: Path) -> str:
    """The C template at `path` with the vector math and the activation filled in."""
    return path.read_text().replace("/*VECMATH*/", VECMATH_C).replace("/*CONV_ACT*/", C_SOURCE)


def act_code(act, kernel: str) -> tuple[int, ctypes.Array]:
    """(ACT code, its two float scalars) of a post-op (name, scalars, algorithm) or None; an activation
    without a code is NotImplementedError naming `kernel`."""
    name, scalars, alg = act if act is not None else (None, (), "")
    key = None if act is None else (name, alg or "")
    if key not in ACTS:
        raise NotImplementedError(f"{kernel} kernel: activation {act!r}")
    prm = [float(s) for s in scalars][:2] + [0.0, 0.0]
    return ACTS[key], (ctypes.c_float * 2)(*prm[:2])
