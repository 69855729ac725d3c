"""NHWC 1x1 convolution (stride 1, no padding, one group) as one C GEMM with bias, residual add and
activation in registers (pointwise.c).

The same function as backends.conv.PointwiseConv (oneDNN's linear op on the [N*H*W, C] view), for the
small GEMMs of a batch-1 MobileNet where a oneDNN call costs ~12 us before any arithmetic (a [1,8] x
[8,8] linear: 11.8 us on the project machine): the kernel is called from the generated wrapper like
every C kernel, and the post-ops keep the reference's NaN semantics (oneDNN's relu and hardtanh do
not). `backends._conv_kernel` times both per shape and runs the faster.

The weight is packed once to [ceil(Cout/16), Cin, 16] (16-column panels, zero-padded), so a tile's k-th
step loads one vector per panel and broadcasts one input channel per row: 8 rows x 2 panels is 16
accumulators, one FMA per load pair. Bytes moved: x read once per pair of panels (from cache after the
first), the packed weight once per row block, out written once (partial sums re-read only when Cin
exceeds KC). FLOPs: 2 M K N.
"""
from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from .. import openmp
from .compiler import load
from .conv_act import act_code, template

TEMPLATE = template(Path(__file__).with_name("pointwise.c"))
MR = 8              # rows per register tile (pointwise.c)
KC = 512            # products per pass: a tile's 8 x KC inputs stay in L1/L2 while both panels stream
SERIAL_FMAS = 1 << 17    # below this many multiply-adds the call runs on one thread (no team start)


def source(act: int, residual: bool, generic: bool = False) -> str:
    """pointwise.c with its constants filled in; `generic`: without the AVX-512 tiles (for tests)."""
    return ("#undef __AVX512F__\n" if generic else "") + TEMPLATE % {"act": int(act), "res": int(bool(residual))}


@functools.lru_cache(maxsize=None)
def _fn(act: int, residual: bool, generic: bool = False):
    f = load(source(act, residual, generic)).kf_pointwise
    f.argtypes = [ctypes.c_void_p] * 5 + [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float), ctypes.c_int]
    f.restype = None
    return f


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PointwiseC:
    """act(conv2d(x, w, b) [+ residual]) for a 1x1 weight [Cout, Cin, 1, 1] on NHWC x [N, H, W, Cin];
    with a [Cout, Cin] weight, act(x @ w.T + b) on x [..., Cin] (a linear layer)."""

    backend = "c:pointwise"
    post_op_fused = residual_fused = True

    def __init__(self, w, b, act, residual: bool, generic: bool = False):
        cout, cin = w.shape[:2]
        if tuple(w.shape[2:]) not in ((1, 1), ()):
            raise NotImplementedError(f"pointwise kernel: weight {tuple(w.shape)} is not 1x1")
        self.cin, self.cout, self.act, self.residual = cin, cout, act, residual
        self.act_code, self.params = act_code(act, "pointwise")
        panels = _cdiv(cout, 16)
        wp = torch.zeros(panels * 16, cin)
        wp[:cout] = w.detach().float().reshape(cout, cin)
        self.weight = wp.reshape(panels, 16, cin).transpose(1, 2).contiguous()     # [P, Cin, 16]
        self.bias = (torch.zeros(cout) if b is None else b.detach().float().reshape(cout)).contiguous()
        self.fn = _fn(self.act_code, residual, generic)
        self._dims: dict = {}

    def _plan(self, m: int, threads: int):
        key = (m, threads)
        if key not in self._dims:
            pairs = _cdiv(_cdiv(self.cout, 16), 2)
            # enough row blocks for ~4 items a thread, at most 256 rows each, whole register tiles
            mb = _cdiv(_cdiv(m, max(1, _cdiv(4 * threads, pairs))), MR) * MR
            self._dims[key] = (ctypes.c_int64 * 5)(m, self.cin, self.cout, max(MR, min(mb, 256)), KC)
        return self._dims[key]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
        """x [..., Cin] (NHWC for a convolution, any rows for a linear) -> [..., Cout]."""
        if x.dtype != torch.float32 or x.dim() < 1 or x.shape[-1] != self.cin:
            raise ValueError(f"pointwise kernel: x {x.dtype} {tuple(x.shape)}, want float32 [..., {self.cin}]")
        shape = (*x.shape[:-1], self.cout)
        if (residual is not None) != self.residual:
            raise ValueError(f"pointwise kernel: built {'with' if self.residual else 'without'} a residual")
        if residual is not None:
            if tuple(residual.shape) != shape or residual.dtype != torch.float32:
                raise ValueError(f"pointwise kernel: residual {residual.dtype} {tuple(residual.shape)}, want float32 {shape}")
            residual = residual.contiguous()
        x = x.contiguous()
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        m = math.prod(shape[:-1])
        if m == 0:
            return out
        threads = 1 if m * self.cin * self.cout < SERIAL_FMAS else openmp.threads()
        self.fn(x.data_ptr(), self.weight.data_ptr(), self.bias.data_ptr(),
                0 if residual is None else residual.data_ptr(), out.data_ptr(), self._plan(m, threads),
                self.params, threads)
        return out
