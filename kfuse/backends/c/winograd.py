"""A 3x3 stride-1 NHWC convolution (one group, dilation 1) by Winograd's F(2x2, 3x3) (winograd.c), with
bias, residual add and activation: 16 GEMMs over the 4x4 transform domain instead of the 9-tap sum, 2.25x
fewer multiply-adds, for the 3x3 convolutions of ResNets and UNets.

The same function as the direct convolution to within a few ulps of the sums (the transforms' coefficients
are 0, ±1 and 1/2; U is computed in float64), with non-finite outputs recomputed by the direct sum so that
an Inf or NaN input reaches only the outputs that read it. `backends._conv_candidates` offers it beside our
implicit GEMM and oneDNN, and the fastest call on this machine runs: it pays in extra weight bytes (16/9)
and the transforms' passes, so it wins on large maps and loses where the weight dominates (a 7x7 map of a
batch of one, its weight read from memory).

Bytes moved: x read once (each pixel by up to four tiles, from cache), the transformed weight [16, Cin,
Cout] once per block of tiles, out written once. FLOPs: 2 * 16 * tiles * Cin * Cout for the GEMMs.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from .. import openmp
from . import gemm
from .compiler import PORTABLE, keeps_built
from .conv_act import C_SOURCE, act_code, bind, cdiv, check_out, check_residual, entry, out_hw, pair

DRIVER = Path(__file__).with_name("winograd.c").read_text()
BUFFER_FLOATS = 131072    # V and M of a block of tiles per thread: 512 KB, inside a 1 MB L2
MR = gemm.MR

# U = G g Gᵀ (4x4 from 3x3), the weight transform of F(2x2, 3x3) (winograd.c has Bᵀ and Aᵀ)
G = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], dtype=torch.float64)
TILE = 2                  # outputs per tile side (winograd.c's WM)


def source(act: int, residual: bool, generic: bool = False) -> str:
    """gemm.c with an identity epilogue for the 16 GEMMs, then this kernel's activation and winograd.c"""
    return ((PORTABLE if generic else "") + "#define act tile_act\n"
            + gemm.source(0, False, tiles_only=True)
            + f"\n#undef act\n#undef ACT\n#undef RES\n#define ACT {int(act)}\n#define RES {int(bool(residual))}\n"
            + C_SOURCE + DRIVER)


@keeps_built
def _fn(act: int, residual: bool, generic: bool = False):
    f = entry(source(act, residual, generic), "kf_winograd", 7)
    f.restype = ctypes.c_int
    return f


def supported(weight_shape, groups, stride, dilation) -> bool:
    return (len(weight_shape) == 4 and tuple(weight_shape[2:]) == (3, 3) and int(groups) == 1
            and pair(stride) == (1, 1) and pair(dilation) == (1, 1))


class WinogradConv:
    """act(conv2d(x, w, b, padding=padding) [+ residual]) for a weight [Cout, Cin, 3, 3], stride 1, dilation
    1, on NHWC x [N, H, W, Cin] -> [N, OH, OW, Cout]."""

    def __init__(self, w, b, act, residual: bool, stride=1, padding=0, dilation=1, generic: bool = False):
        if not supported(w.shape, 1, stride, dilation):
            raise NotImplementedError(f"winograd kernel: weight {tuple(w.shape)}, stride {stride}, dilation "
                                      f"{dilation}: only 3x3, stride 1, dilation 1")
        cout, cin = w.shape[:2]
        self.cin, self.cout, self.act, self.residual = cin, cout, act, residual
        self.kh = self.kw = 3
        self.stride, self.dilation, self.padding = (1, 1), (1, 1), pair(padding)
        if min(self.padding) < 0:
            raise ValueError(f"winograd kernel: padding {self.padding}")
        self.act_code, self.params = act_code(act, "winograd")
        w = w.detach()
        u = torch.einsum("ak,ockl,bl->aboc", G, w.double(), G).float()        # [4, 4, Cout, Cin]
        self.weight = gemm.panels(u.reshape(16, cout, cin))                     # [16, P, Cin, 16]
        self.direct_weight = w.float().permute(0, 2, 3, 1).contiguous()        # [Cout, 3, 3, Cin]
        self.bias = gemm.bias_of(b, cout)
        self.zero = torch.zeros(max(cin, cout) + 16)
        self.fn = _fn(self.act_code, residual, generic)
        self._dims: dict = {}

    def _plan(self, n, h, w, oh, ow, threads):
        key = (n, h, w, threads)
        if key not in self._dims:
            tiles = n * cdiv(oh, TILE) * cdiv(ow, TILE)
            # tiles per block: V and M within BUFFER_FLOATS, at least two blocks a thread where there are tiles
            tb = max(MR, BUFFER_FLOATS // (16 * (self.cin + self.cout)) // MR * MR)
            tb = min(tb, max(MR, cdiv(cdiv(tiles, 2 * threads), MR) * MR))
            self._dims[key] = (ctypes.c_int64 * 10)(n, h, w, self.cin, oh, ow, self.cout, *self.padding, tb)
        return self._dims[key]

    def _shape(self, x_shape):
        if len(x_shape) != 4 or x_shape[3] != self.cin:
            raise ValueError(f"winograd kernel: x {tuple(x_shape)}, want NHWC [N, H, W, {self.cin}]")
        n, h, w, _ = x_shape
        oh, ow = out_hw(h, w, (3, 3), self.stride, self.padding, self.dilation, "winograd")
        return n, h, w, oh, ow

    def bound(self, x_shape):
        """This kernel for inputs of x_shape, its checks done once (conv_act.bind)."""
        n, h, w, oh, ow = self._shape(tuple(x_shape))
        if n == 0:
            return self
        return bind(self, torch.Size(x_shape), self.fn,
                    [None, self.weight.data_ptr(), self.direct_weight.data_ptr(), self.bias.data_ptr(), None,
                     self.zero.data_ptr(), None], (0, 4, 6),
                    lambda t: self._plan(n, h, w, oh, ow, t), openmp.threads, self.params)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
        if x.dtype != torch.float32:
            raise ValueError(f"winograd kernel: x {x.dtype} {tuple(x.shape)}, want float32 [N, H, W, {self.cin}]")
        n, h, w, oh, ow = self._shape(tuple(x.shape))
        shape = (n, oh, ow, self.cout)
        residual = check_residual(residual, self.residual, shape, "winograd")
        x = x.contiguous()
        out = check_out(out, shape, "winograd")
        if math.prod(shape) == 0:
            return out
        threads = openmp.threads()
        if self.fn(x.data_ptr(), self.weight.data_ptr(), self.direct_weight.data_ptr(), self.bias.data_ptr(),
                   0 if residual is None else residual.data_ptr(), self.zero.data_ptr(), out.data_ptr(),
                   self._plan(n, h, w, oh, ow, threads), self.params, threads):
            raise MemoryError("winograd kernel: cannot allocate its tile buffers")
        return out
