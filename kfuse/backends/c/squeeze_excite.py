"""Squeeze-and-excitation over an NHWC tensor in one C kernel (squeeze_excite.c):

    m = x.mean(dim=(1, 2)); h = act1(m @ w1.T + b1); s = act2(h @ w2.T + b2); y = x * s[:, None, None, :]

x is physical [N, H, W, C] float32. One OpenMP region: the means (channels split across threads, so
each sum has one order whatever the thread count), the two GEMVs (R outputs, then C outputs, split
across threads) and y = x * s (rows split). Weights are packed once: w1 stays [R, C] (dot products
along contiguous C), w2 is stored transposed in blocks of CB output channels, [ceil(C / CB), R, CB]
(each output block accumulates contiguous rows, so small R still vectorises, and reads one contiguous
stream). Bytes per call: x read twice (the second time from cache when it fits), y written once, the
weights read once. Sizes are runtime arguments: one compiled library serves every shape.
"""
from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path

import torch

from .. import openmp
from .compiler import keeps_built, load
from .nhwc import nhwc_input, same_shape_io
from .record import c_call
from .vecmath import VECMATH_C

SOURCE = Path(__file__).with_name("squeeze_excite.c").read_text().replace("/*VECMATH*/", VECMATH_C)
CB = int(re.search(r"#define CB (\d+)", SOURCE)[1])      # the second GEMV's block of output channels

ACT1 = {"none": 0, "relu": 1, "silu": 2, "gelu": 3, "hardswish": 4, "leaky_relu": 5}
ACT2 = {"sigmoid": 6, "hardsigmoid": 7}


@keeps_built
def _lib():
    lib = load(SOURCE)
    fn = lib.kf_squeeze_excite
    fn.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int64])
    fn.restype = ctypes.c_int
    return lib


def _act(spec, table: dict[str, int], which: str) -> tuple[int, float]:
    """(code, slope) of an IR activation spec ("name", params); a bare name is taken as ("name", ())."""
    name, params = (spec, ()) if isinstance(spec, str) else spec
    params = tuple(params)
    if name not in table:
        raise NotImplementedError(f"squeeze_excite: {which} {name!r} not in {sorted(table)}")
    if name == "leaky_relu":
        return table[name], float(params[0]) if params else 0.01
    if name == "gelu" and params and params[0] not in ("none", None):
        raise NotImplementedError(f"squeeze_excite: gelu approximate={params[0]!r}")
    return table[name], 0.0


def _weight(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(torch.float32).contiguous().clone()


class SqueezeExcite:
    """y = x * act2(act1(mean_hw(x) @ w1.T + b1) @ w2.T + b2) for x [N, H, W, C] (float32, NHWC)."""

    def __init__(self, w1, b1, act1, w2, b2, act2):
        self.w1 = _weight(w1)                              # [R, C]
        r, c = self.w1.shape
        w2 = _weight(w2)
        if tuple(w2.shape) != (c, r):
            raise ValueError(f"squeeze_excite: w1 {tuple(self.w1.shape)} and w2 {tuple(w2.shape)} do not match")
        nb = -(-c // CB)
        self.w2b = torch.nn.functional.pad(w2.t(), (0, nb * CB - c)).reshape(r, nb, CB).transpose(0, 1).contiguous()
        self.b1 = None if b1 is None else _weight(b1).reshape(r)
        self.b2 = None if b2 is None else _weight(b2).reshape(c)
        self.r, self.c = r, c
        self.act1, self.slope = _act(act1, ACT1, "act1")
        self.act2, _ = _act(act2, ACT2, "act2")
        self._fn = _lib().kf_squeeze_excite               # compile now: a missing compiler shows at build time
        self._ptrs = (self.w1.data_ptr(), None if self.b1 is None else self.b1.data_ptr(), self.w2b.data_ptr(),
                      None if self.b2 is None else self.b2.data_ptr())

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x, out = same_shape_io(x, out, self.c, "squeeze_excite")
        if out.numel():       # N, H*W or C is 0: nothing to write
            self._run(x, out, None)
        return out

    def bound(self, x_shape, gate: bool = False):
        """call(x, out): this kernel for inputs of x_shape, its checks done once (the Python around the C
        call cost more than a small gate's C); another shape, a strided x or no `out` goes through
        __call__, checked. With `gate`: call(x), the gate [N, C] alone (self.gate), into a new tensor."""
        full = self.gate if gate else self
        if len(x_shape) != 4 or x_shape[3] != self.c or not math.prod(x_shape):
            return full
        shape, n = torch.Size(x_shape), x_shape[0]

        def call(x, out=None):
            if x.shape != shape or not x.is_contiguous() or (not gate and (
                    out is None or out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous())):
                return full(x) if gate else full(x, out=out)
            s = torch.empty(n, self.c) if gate else None
            self._run(x, None if gate else out, s, record=True)
            return s if gate else out
        return call

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate s [N, C] alone (y = x * s[:, None, None, :] is then left to the 1x1 convolution
        that reads y: gemm.GemmConv's `scale`)."""
        x = nhwc_input(x, self.c, "squeeze_excite")
        s = torch.empty(x.shape[0], self.c)
        if s.numel():
            self._run(x, None, s)
        return s

    def _run(self, x, out, gate, record: bool = False):
        n, hh, ww, c = x.shape
        w1, b1, w2b, b2 = self._ptrs
        rc = c_call(self._fn, x.data_ptr(), None if out is None else out.data_ptr(),
                    None if gate is None else gate.data_ptr(), w1, b1, w2b, b2, n, hh * ww, c, self.r, self.act1,
                    self.act2, self.slope, openmp.threads(), keep=(x, out, gate), record=record)
        if rc != 0:
            raise MemoryError("squeeze_excite: cannot allocate the scratch buffer")


class SqueezeExcitePointwise:
    """pw(se(x)) [+ residual] for a squeeze-excitation `se` and a 1x1 stride-1 gemm.GemmConv `pw`: the gate
    alone (se.gate), then pw scaling its inputs by it as it reads them, so y = x * s is never written
    (its rounding is the same: the result equals pw(se(x)) bit for bit)."""

    def __init__(self, se: SqueezeExcite, pw):
        self.se, self.pw = se, pw

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
        return self.pw(x, residual, out=out, scale=self.se.gate(x))

    def bound(self, x_shape):
        """This pair for inputs of x_shape, both halves' checks done once (the Python around the two C
        calls had cost 20-40 us a call, a tenth of a 7x7x960 pair's time)."""
        if len(x_shape) != 4 or not math.prod(x_shape[:3]):
            return self
        gate, pw = self.se.bound(x_shape, gate=True), self.pw.bound(x_shape, scaled=True)

        def call(x, residual=None, out=None):
            return pw(x, residual, out=out, scale=gate(x))
        return call
