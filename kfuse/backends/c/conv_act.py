"""What the C convolution kernels (depthwise, gemm, dwpw) share: the activation after a convolution
(conv_act.c defines `act(v, p0, p1)` for the code ACT that the including template sets; ACTS maps a
oneDNN post-op (name, algorithm), as kfuse.kernels.conv.post_op_of gives it, to that code), the output
size, the check of a given output (reduce_mid's too), the loading of an entry point, the bound call, and
the work items a kernel's team shares (share.c, `kf_take`: each thread's own contiguous share first, then
what the others left).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .compiler import load
from .record import c_call
from .vecmath import EXP8_C, EXP16_C, VECMATH_C

C_SOURCE = Path(__file__).with_name("conv_act.c").read_text()
SHARE_C = Path(__file__).with_name("share.c").read_text()     # kf_take: work items shared by a team
ACTS = {None: 0, ("relu", ""): 1, ("sigmoid", ""): 2, ("tanh", ""): 3, ("swish", ""): 4, ("gelu", "none"): 5,
        ("gelu", "erf"): 5, ("gelu", "tanh"): 6, ("leaky_relu", ""): 7, ("hardtanh", ""): 8, ("hardswish", ""): 9,
        ("hardsigmoid", ""): 10}


# the bounds conv_act.c reads from p0, p1 where the activation has no scalars of its own (a clamp to a
# variable compiles to one vmaxps or vminps)
CLAMP_BOUNDS = {"relu": (0.0, 0.0), "hardswish": (0.0, 6.0), "hardsigmoid": (0.0, 6.0)}


def template(path: Path) -> str:
    """The C template at `path` with the vector math, the activation and, where it marks their places,
    kf_exp8, kf_exp16 and the shared work items (share.c) filled in."""
    return (path.read_text().replace("/*VECMATH*/", VECMATH_C).replace("/*CONV_ACT*/", C_SOURCE)
            .replace("/*EXP8*/", EXP8_C).replace("/*EXP16*/", EXP16_C).replace("/*SHARE*/", SHARE_C))


def act_code(act, kernel: str) -> tuple[int, ctypes.Array]:
    """(ACT code, its two float scalars) of a post-op (name, scalars, algorithm) or None; an activation
    without a code is NotImplementedError naming `kernel`."""
    name, scalars, alg = act if act is not None else (None, (), "")
    key = None if act is None else (name, alg or "")
    if key not in ACTS:
        raise NotImplementedError(f"{kernel} kernel: activation {act!r}")
    prm = [float(s) for s in scalars][:2] + list(CLAMP_BOUNDS.get(name, (0.0, 0.0)))[len(scalars):]
    return ACTS[key], (ctypes.c_float * 2)(*prm[:2])


def entry(source: str, name: str, pointers: int):
    """The C function `name` of `source`, taking `pointers` tensor pointers, then int64 dims, float
    scalars and the thread count (every convolution kernel's signature)."""
    f = getattr(load(source), name)
    f.argtypes = [ctypes.c_void_p] * pointers + [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float),
                                                 ctypes.c_int]
    f.restype = None
    return f


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def out_hw(h: int, w: int, k: tuple[int, int], stride, padding, dilation, kernel: str) -> tuple[int, int]:
    """The output height and width of a convolution; ValueError naming `kernel` where it does not fit."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{kernel} kernel: a {kh}x{kw} kernel (dilation {tuple(dilation)}) does not fit the {h}x{w} "
                         f"input padded by {tuple(padding)}")
    return oh, ow


def check_out(out, shape, kernel: str):
    """`out` if it is a contiguous float32 tensor of `shape`, a new one if None; else ValueError."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"{kernel} kernel: out {out.dtype} {tuple(out.shape)}, want contiguous float32 {tuple(shape)}")
    return out


def check_residual(residual, built_with: bool, shape, kernel: str):
    """`residual` contiguous, or None; ValueError naming `kernel` where it is given to a kernel built without
    one (or missing from one built with it), or is not float32 of the output's `shape`."""
    if (residual is not None) != built_with:
        raise ValueError(f"{kernel} kernel: built {'with' if built_with else 'without'} a residual")
    if residual is None:
        return None
    if tuple(residual.shape) != tuple(shape) or residual.dtype != torch.float32:
        raise ValueError(f"{kernel} kernel: residual {residual.dtype} {tuple(residual.shape)}, want float32 {tuple(shape)}")
    return residual.contiguous()


def bind(full, shape, fn, args: list, slots: tuple, plan, threads, params, scale_shape=None):
    """call(x, residual=None, out=None[, scale]): kernel `full` for inputs of one shape (a compiled
    program's) with its argument checks and plan lookup done here, once. At the call only the pointers of
    x, the residual and out are read (the Python around a C call had cost ~3.7 us of a 1x1 convolution's
    28, on every one of a MobileNet's ~50 kernels). args: the C function's pointer arguments, weights
    filled in, None at slots (x, residual or None, out[, scale]); plan(t): its dims for t threads;
    threads(): the count to run; scale_shape: with a fourth slot, the shape of the float32 `scale` every
    call then gives (gemm's squeeze-excitation gate). Another shape, a strided input or no `out` goes
    through full, checked."""
    ix, ir, io = slots[:3]

    def call(x, residual=None, out=None, **scale):
        s = scale.get("scale")
        if out is None or x.shape != shape or not x.is_contiguous() or (
                residual is not None and not residual.is_contiguous()) or (s is None) != (scale_shape is None) or (
                s is not None and (s.shape != scale_shape or s.dtype != torch.float32 or not s.is_contiguous())):
            return full(x, residual, out=out, **scale) if ir is not None else full(x, out=out, **scale)
        a = list(args)
        a[ix], a[io] = x.data_ptr(), out.data_ptr()
        if ir is not None:
            a[ir] = 0 if residual is None else residual.data_ptr()
        if s is not None:
            a[slots[3]] = s.data_ptr()
        t = threads()
        if c_call(fn, *a, plan(t), params, t, keep=(x, residual, out, s)):
            raise MemoryError("convolution kernel: cannot allocate its buffers")
        return out
    return call

