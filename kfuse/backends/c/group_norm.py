"""GroupNorm over an NHWC tensor, optionally with SiLU, in one C kernel (group_norm.c):

    y = F.group_norm(x.permute(0, 3, 1, 2), G, w, b, eps); y = silu(y) if silu; return y.permute(0, 2, 3, 1)

x is physical [N, H, W, C] float32, y the same layout. One OpenMP region: per-thread shifted sums (S1 and
S2 of x - x[n, 0, c], in double) over the thread's H*W rows, per-(n, group) mean and biased variance
combined over the channels with Chan's formula, and y written over the same rows each thread summed.
Bytes per call: x read twice (the second time from cache when it fits), y written once. Sizes are runtime
arguments: one compiled library serves every shape.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import openmp
from .compiler import keeps_built, load
from .nhwc import same_shape_io
from .record import c_call
from .vecmath import VECMATH_C

SOURCE = Path(__file__).with_name("group_norm.c").read_text().replace("/*VECMATH*/", VECMATH_C)


@keeps_built
def _lib():
    lib = load(SOURCE)
    fn = lib.kf_group_norm_nhwc
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_double, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return lib


def _param(t, c: int, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t).detach().to(torch.float32).contiguous().clone()
    if t.numel() != c:
        raise ValueError(f"group_norm: {what} has {t.numel()} elements, expected {c}")
    return t.reshape(c)


class GroupNormNHWC:
    """y = [silu](group_norm(x, groups, weight, bias, eps)) for x [N, H, W, C] (float32, NHWC)."""

    def __init__(self, groups: int, channels: int, weight, bias, eps: float, silu: bool):
        groups, channels = int(groups), int(channels)
        if groups < 1 or channels < 1 or channels % groups:
            raise ValueError(f"group_norm: {channels} channels are not divisible into {groups} groups")
        self.groups, self.c, self.eps, self.silu = groups, channels, float(eps), bool(silu)
        self.weight = _param(weight, channels, "weight")
        self.bias = _param(bias, channels, "bias")
        self._fn = _lib().kf_group_norm_nhwc             # compile now: a missing compiler shows at build time
        self._ptrs = (None if self.weight is None else self.weight.data_ptr(),
                      None if self.bias is None else self.bias.data_ptr())

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        given = x
        x, out = same_shape_io(x, out, self.c, "group_norm")
        n, hh, ww, c = x.shape
        if out.numel() == 0:  # N or H*W is 0: nothing to write
            return out
        w, b = self._ptrs
        rc = c_call(self._fn, x.data_ptr(), out.data_ptr(), w, b, n, hh * ww, c, self.groups, self.eps, int(self.silu),
                    openmp.threads(), keep=(x, out), record=x is given)
        if rc != 0:
            raise MemoryError("group_norm: cannot allocate the scratch buffer")
        return out
