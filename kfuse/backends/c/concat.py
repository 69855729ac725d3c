"""torch.cat(xs, axis) as one C call (concat.c) writing into the buffer it is given: a copy of each input's
rows into its place in every output row, for any dtype; an input whose rows are evenly spaced (a channel
slice of an NHWC map, as ShuffleNet's `chunk` makes) is read in place, any other copied first. As a C
kernel the concatenation runs inside the native runner's C runs (runtime/native.py); through torch it
broke them into a Python step each, and DenseNet-121 has 58 of them (every layer concatenates the block's
features so far). Bytes: each input read once, the output written once. Sizes are runtime arguments: one
library serves every shape.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from .. import openmp
from .compiler import keeps_built, load
from .nhwc import row_stride
from .record import c_call

SOURCE = Path(__file__).with_name("concat.c").read_text()
# below this many bytes in all, one thread copies (a team's start costs more than such a copy)
SERIAL_BYTES = 1 << 16


@keeps_built
def _lib():
    lib = load(SOURCE)
    fn = lib.kf_concat
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    fn.restype = None
    return lib


class Concat:
    """out = torch.cat(xs, axis) for tensors of one dtype whose shapes differ only at `axis`."""

    def __init__(self, axis: int):
        self.axis = int(axis)
        self._fn = _lib().kf_concat                  # compile now: a missing compiler shows at build time
        self._plans: dict = {}

    def out_shape(self, xs) -> tuple:
        if not xs:
            raise ValueError("concat: no inputs")
        first = xs[0]
        rank, a = first.dim(), self.axis
        if not -rank <= a < rank:
            raise ValueError(f"concat: axis {a} of a rank-{rank} input")
        a %= rank
        others = (first.shape[:a], first.shape[a + 1:])
        for x in xs:
            if x.dtype != first.dtype or x.dim() != rank or (x.shape[:a], x.shape[a + 1:]) != others:
                raise ValueError(f"concat: inputs {[f'{t.dtype} {tuple(t.shape)}' for t in xs]} differ at an axis "
                                 f"other than {self.axis}")
        return (*first.shape[:a], sum(x.shape[a] for x in xs), *first.shape[a + 1:])

    def __call__(self, *xs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        key = (*(tuple(x.shape) for x in xs), *(x.stride() for x in xs), *(x.dtype for x in xs))
        plan = self._plans.get(key)
        if plan is None:        # shapes checked once per shape and stride set
            shape = self.out_shape(xs)
            a, size = self.axis % len(shape), xs[0].element_size()
            rows = math.prod(shape[:a])
            parts = [x for x in xs if x.numel()]     # an empty input adds nothing
            rb = [x.numel() // rows * size for x in parts]
            off = [sum(rb[:i]) for i in range(len(rb))]
            ss = [row_stride(x, a) for x in parts]
            copied = [s is None for s in ss]
            ss = [b if s is None else s * size for s, b in zip(ss, rb)]
            serial = math.prod(shape) * size < SERIAL_BYTES
            plan = self._plans[key] = (shape, (ctypes.c_int64 * (3 + 3 * len(rb)))(rows, len(rb), sum(rb), *rb, *off, *ss),
                                       serial, copied)
        shape, dims, serial, copied = plan
        dtype = xs[0].dtype
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"concat: out must be contiguous {dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
        if out.numel() == 0:
            return out
        parts = [x.contiguous() if c else x for x, c in zip((x for x in xs if x.numel()), copied)]
        c_call(self._fn, (ctypes.c_void_p * len(parts))(*[x.data_ptr() for x in parts]), out.data_ptr(), dims,
               1 if serial else openmp.threads(), keep=(*parts, out), record=not any(copied))
        return out
