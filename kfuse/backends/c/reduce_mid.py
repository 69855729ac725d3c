"""A reduction over a block of middle axes (reduce_mid.c): reduce_sum / mean / max / min of a float32
tensor over consecutive axes that stop before the last one, as [outer, R, inner] -> [outer, inner]. The
global average pool of a channels-last CNN (mean over H and W of [N, H, W, C]) is the common case; the
row kernels reduce only along the last axis, so before this it ran on torch (~17 us a call for a
[1, 7, 7, 1280] mean, most of it dispatch). Bytes: x read once, out written once. Each output is summed
by one thread in one order: the same bits at any thread count.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from .. import openmp
from .compiler import keeps_built, load
from .conv_act import check_out
from .record import c_call

SOURCE = Path(__file__).with_name("reduce_mid.c").read_text()
OPS = {"reduce_sum": 0, "reduce_mean": 1, "reduce_max": 2, "reduce_min": 3}
SERIAL_VALUES = 1 << 16      # below this many inputs one thread (no team start)


@keeps_built
def _fn():
    f = load(SOURCE).kf_reduce_mid
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                  ctypes.c_int]
    f.restype = None
    return f


def middle_block(shape, axes) -> tuple[int, int, int] | None:
    """(outer, R, inner) when `axes` are consecutive, non-empty, and stop before the last axis of
    `shape`; else None."""
    nd = len(shape)
    axes = sorted({a % nd for a in axes}) if nd else []
    if not axes or axes != list(range(axes[0], axes[-1] + 1)) or axes[-1] >= nd - 1:
        return None
    return (math.prod(shape[:axes[0]]), math.prod(shape[axes[0]:axes[-1] + 1]), math.prod(shape[axes[-1] + 1:]))


class ReduceMiddle:
    """op (a key of OPS) of float32 x over `axes` (consecutive, before the last axis), keepdim or not."""

    def __init__(self, op: str, axes, keepdim: bool):
        if op not in OPS:
            raise NotImplementedError(f"middle-axes reduction: {op!r} not in {sorted(OPS)}")
        self.op, self.axes, self.keepdim = op, tuple(axes), bool(keepdim)
        self.fn = _fn()          # compile now: a missing compiler shows at build time

    def out_shape(self, shape) -> tuple[int, ...]:
        nd = len(shape)
        axes = {a % nd for a in self.axes}
        return tuple(1 if d in axes else s for d, s in enumerate(shape) if self.keepdim or d not in axes)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        block = middle_block(tuple(x.shape), self.axes) if x.dim() else None
        if x.dtype != torch.float32 or block is None:
            raise ValueError(f"{self.op} over axes {self.axes}: x {x.dtype} {tuple(x.shape)}, want float32 with those "
                             f"axes consecutive and before the last")
        outer, r, inner = block
        if r == 0 and self.op in ("reduce_max", "reduce_min"):
            raise ValueError(f"{self.op} over axes {self.axes}: x {tuple(x.shape)} has none of them to reduce")
        shape = self.out_shape(tuple(x.shape))
        out = check_out(out, shape, self.op)
        if out.numel() == 0:
            return out
        given, x = x, x.contiguous()
        threads = 1 if x.numel() < SERIAL_VALUES else openmp.threads()
        c_call(self.fn, x.data_ptr(), out.data_ptr(), outer, r, inner, OPS[self.op], threads, keep=(x, out),
               record=x is given)
        return out
