"""Max and average pooling over an NHWC tensor in one C kernel each (pool.c), writing into the buffer it
is given:

    y = F.max_pool2d(x.permute(0, 3, 1, 2), kernel, stride, padding, dilation, ceil_mode).permute(0, 2, 3, 1)
    y = F.avg_pool2d(x.permute(0, 3, 1, 2), kernel, stride, padding, ceil_mode, count_include_pad).permute(...)

x is physical [N, H, W, C] float32 (the layout pass's channels-last region), y the same layout. Per
output pixel, the taps inside the input are gathered once and each channel vector takes their maximum;
a NaN tap makes the output NaN, as in torch. torch's channels-last max_pool2d allocates its output (and
ResNet-50's stem pool ran as torch's with_indices op, computing int64 indices nobody read): this kernel
writes into the program's planned arena instead. Bytes: x read once (taps shared by neighbouring
windows from cache), y written once. Sizes are runtime arguments: one library serves every shape.
Average pooling sums the taps in torch's order and divides as torch does (the same bits); through torch
it was a Python step between the native runner's C runs (runtime/native.py): DenseNet's transitions,
Inception's branch pools.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import openmp
from .compiler import keeps_built, load
from .conv_act import pair
from .nhwc import nhwc_input
from .record import c_call

SOURCE = Path(__file__).with_name("pool.c").read_text()
MAX_TAPS = 256         # kernel positions (pool.c)


@keeps_built
def _lib():
    lib = load(SOURCE)
    for fn in (lib.kf_max_pool_nhwc, lib.kf_avg_pool_nhwc):      # MaxPoolNHWC.entry, AvgPoolNHWC.entry
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
        fn.restype = None
    return lib


def pooled_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's output size of one pooled dimension (a ceil_mode window must start inside the input or
    its left padding)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


class MaxPoolNHWC:
    """y = max_pool2d(x, kernel, stride, padding, dilation, ceil_mode) for x [N, H, W, C] (float32, NHWC)."""
    what, entry = "max_pool2d", "kf_max_pool_nhwc"

    def __init__(self, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
        self.kernel, self.padding, self.dilation = pair(kernel), pair(padding), pair(dilation)
        self.stride = pair(stride) if stride not in (None, (), []) else self.kernel
        self.ceil_mode = bool(ceil_mode)
        (kh, kw), (ph, pw) = self.kernel, self.padding
        if min(*self.kernel, *self.stride, *self.dilation) < 1 or min(ph, pw) < 0:
            raise ValueError(f"{self.what}: kernel {self.kernel}, stride {self.stride}, dilation {self.dilation}, "
                             f"padding {self.padding}")
        if ph > kh // 2 or pw > kw // 2:       # torch's rule
            raise ValueError(f"{self.what}: padding {self.padding} is more than half the kernel {self.kernel}")
        if kh * kw > MAX_TAPS:
            raise NotImplementedError(f"{self.what} kernel: at most {MAX_TAPS} kernel positions, got {kh}x{kw}")
        self._fn = getattr(_lib(), self.entry)       # compile now: a missing compiler shows at build time
        self._dims: dict = {}

    def out_shape(self, n: int, h: int, w: int, c: int) -> tuple[int, int, int, int]:
        oh, ow = (pooled_size(size, k, s, p, d, self.ceil_mode)
                  for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.padding, self.dilation))
        if oh < 1 or ow < 1:
            raise ValueError(f"{self.what}: a {self.kernel} window does not fit the {h}x{w} input")
        return n, oh, ow, c

    def _last_dims(self) -> tuple:
        """what the C kernel's dims hold after the padding"""
        return self.dilation

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self.what}: x must be float32 [N, H, W, C], got {x.dtype} {tuple(x.shape)}")
        given, x = x, nhwc_input(x, x.shape[3], self.what)
        shape = self.out_shape(*x.shape)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"{self.what}: out must be contiguous float32 {shape}, got {out.dtype} {tuple(out.shape)}")
        if out.numel() == 0:
            return out
        key = (tuple(x.shape), shape)
        dims = self._dims.get(key)
        if dims is None:
            last = self._last_dims()
            dims = self._dims[key] = (ctypes.c_int64 * (12 + len(last)))(*x.shape[:3], x.shape[3], *shape[1:3],
                                                                         *self.kernel, *self.stride, *self.padding, *last)
        c_call(self._fn, x.data_ptr(), out.data_ptr(), dims, openmp.threads(), keep=(x, out), record=x is given)
        return out


class AvgPoolNHWC(MaxPoolNHWC):
    """y = avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad) for x [N, H, W, C] (float32,
    NHWC)."""
    what, entry = "avg_pool2d", "kf_avg_pool_nhwc"

    def __init__(self, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        super().__init__(kernel, stride, padding, 1, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def _last_dims(self) -> tuple:
        return (int(self.count_include_pad),)
