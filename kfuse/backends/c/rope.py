"""Rotary position embedding in one C kernel: out = x * cos + rotate_half(x) * sin.

x is [..., S, D] with any strides whose last dim is contiguous (q and k arrive as head-split views
of the projection output, so no copy is made); cos and sin broadcast against x by strides. The
output is a contiguous [..., S, D] buffer. Bytes moved: x read once, cos/sin read once per row
(they stay in cache: S x D floats), out written once.
"""
from __future__ import annotations

import ctypes

import torch

from .compiler import keeps_built, load
from .record import c_call

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


@keeps_built
def _lib():
    lib = load(SOURCE)
    lib.kf_rope.restype = None
    return lib


def _strides4(t: torch.Tensor, shape) -> tuple[int, ...] | None:
    """Leading strides of t broadcast to `shape` (rank <= 4) seen as [n0, n1, n2, D]; None when
    its last dim is not contiguous (then it is copied)."""
    st = t.expand(shape).stride()
    if st[-1] != 1 and shape[-1] > 1:
        return None
    return ((0,) * (4 - len(shape)) + tuple(st))[:3]


_plans: dict = {}


def _plan(x, cos, sin):
    """ctypes arguments for one layout of x, cos, sin (the same on every call of a compiled model),
    or None when one of them must be copied first."""
    key = (x.shape, x.stride(), cos.shape, cos.stride(), sin.shape, sin.stride())
    if key not in _plans:
        if len(_plans) > 4096:      # many shapes seen (dynamic sequence lengths): start over
            _plans.clear()
        shape = tuple(x.shape)
        st = [_strides4(t, shape) for t in (x, cos, sin)]
        i64 = ctypes.c_int64 * 3
        _plans[key] = None if None in st else (
            i64(*((1,) * (4 - len(shape)) + shape)[:3]), *(i64(*s) for s in st), ctypes.c_int64(shape[-1]))
    return _plans[key]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if x.dtype != torch.float32 or x.shape[-1] % 2 or x.dim() > 4:
        raise NotImplementedError("rope kernel takes float32 x of rank <= 4 with an even last dim")
    given = (x, cos, sin)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    plan = _plan(x, cos, sin)
    if plan is None:    # a last dim that is not contiguous: copy what needs it, broadcast to x
        x, cos, sin = (t if _strides4(t, x.shape) else t.expand(x.shape).contiguous() for t in (x, cos, sin))
        plan = _plan(x, cos, sin)
    out = torch.empty(x.shape, dtype=x.dtype) if out is None else out
    c_call(_lib().kf_rope, ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(cos.data_ptr()),
           ctypes.c_void_p(sin.data_ptr()), ctypes.c_void_p(out.data_ptr()), *plan, keep=(x, cos, sin, out),
           record=all(a is b for a, b in zip((x, cos, sin), given)))
    return out
