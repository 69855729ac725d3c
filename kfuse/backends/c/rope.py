"""Rotary position embedding in one C kernel: out = x * cos + rotate_half(x) * sin.

x is [..., S, D] with any strides whose last dim is contiguous (q and k arrive as head-split views
of the projection output, so no copy is made); cos and sin broadcast against x by strides. The
output is a contiguous [..., S, D] buffer. Bytes moved: x read once, cos/sin read once per row
(they stay in cache: S x D floats), out written once.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .compiler import load

SOURCE = r"""
#include <stdint.h>
/* out[r, :] for rows r of the flattened leading dims; xs/cs/ss: per-leading-dim strides (4 dims). */
void kf_rope(const float *x, const float *c, const float *s, float *o, const int64_t *shape,
             const int64_t *xs, const int64_t *cs, const int64_t *ss, int64_t d)
{
    int64_t n0 = shape[0], n1 = shape[1], n2 = shape[2], h = d / 2;
    #pragma omp parallel for collapse(3) schedule(static)
    for (int64_t a = 0; a < n0; a++)
        for (int64_t b = 0; b < n1; b++)
            for (int64_t i = 0; i < n2; i++) {
                const float *xr = x + a * xs[0] + b * xs[1] + i * xs[2];
                const float *cr = c + a * cs[0] + b * cs[1] + i * cs[2];
                const float *sr = s + a * ss[0] + b * ss[1] + i * ss[2];
                float *orow = o + ((a * n1 + b) * n2 + i) * d;
                #pragma omp simd
                for (int64_t j = 0; j < h; j++) {
                    orow[j] = xr[j] * cr[j] + (-xr[j + h]) * sr[j];
                    orow[j + h] = xr[j + h] * cr[j + h] + xr[j] * sr[j + h];
                }
            }
}
"""


@functools.lru_cache(maxsize=None)
def _lib():
    lib = load(SOURCE)
    lib.kf_rope.restype = None
    return lib


def _as4(t: torch.Tensor, shape) -> torch.Tensor:
    """t broadcast to `shape` (rank <= 4) and viewed as [n0, n1, n2, D] by strides."""
    t = t.expand(shape)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if x.dtype != torch.float32 or x.shape[-1] % 2 or x.dim() > 4:
        raise NotImplementedError("rope kernel takes float32 x of rank <= 4 with an even last dim")
    shape = tuple(x.shape)
    x4, c4, s4 = (_as4(t, shape) for t in (x, cos.to(x.dtype), sin.to(x.dtype)))
    out = torch.empty(shape, dtype=x.dtype) if out is None else out
    i64 = ctypes.c_int64 * 3
    _lib().kf_rope(ctypes.c_void_p(x4.data_ptr()), ctypes.c_void_p(c4.data_ptr()), ctypes.c_void_p(s4.data_ptr()),
                   ctypes.c_void_p(out.data_ptr()), i64(*x4.shape[:3]), i64(*x4.stride()[:3]),
                   i64(*c4.stride()[:3]), i64(*s4.stride()[:3]), ctypes.c_int64(shape[-1]))
    return out
