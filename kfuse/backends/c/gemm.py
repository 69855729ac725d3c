"""NHWC convolution (any groups, kernel up to 11x11, any stride, padding, dilation) and linear layer as
one C implicit GEMM with bias, residual add and activation in registers (gemm.c).

The same function as oneDNN's convolution (backends.conv.PackedConv) or its linear op on the [N*H*W, C]
view of a 1x1 convolution (PointwiseConv) and of a linear layer (library.PackedLinear), for the small
GEMMs of a batch-1 CNN and of a decode step, where a oneDNN call costs ~12 us before any arithmetic (a
[1,8] x [8,8] linear: 11.8 us on the project machine): this kernel is called from the generated wrapper
like every C kernel, and its activations keep the reference's NaN semantics (oneDNN's relu and hardtanh
do not). `backends._conv_kernel` and `backends.linear` time it against oneDNN per shape and run the faster.

The weight is packed once to [ceil(Cout/16), KH*KW*Cin, 16] (16-column panels, zero-padded, taps
outermost), so a tile's k-th step loads one vector per panel and broadcasts one input per row: 8 rows x
2 panels is 16 accumulators, one FMA per load pair (AVX-512); with AVX2, 6 rows x 1 panel (two 8-float
vectors) is 12, the panels of a pair in turn. A tile's rows gather their taps through pointers
(a tap in the padding points at a row of zeros): no im2col buffer. Bytes moved: x read once per pair of
panels (from cache after the first), the packed weight once per row block, out written once. FLOPs:
2 M KH KW Cin Cout.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from .. import openmp
from . import autotune
from .compiler import PORTABLE, keeps_built
from .conv_act import act_code, bind, cdiv, check_out, check_residual, entry, out_hw, pair, template
from .record import c_call

TEMPLATE = template(Path(__file__).with_name("gemm.c"))
MR = 6 if autotune.vector_isa() == "avx2" else 8      # rows per register tile (gemm.c: AVX2 6, else 8)
MAX_TAPS = 121           # kernel positions, 11 x 11 (gemm.c)
SERIAL_FMAS = 1 << 17    # below this many multiply-adds the call runs on one thread (no team start)
NCHW_MAX_C = 8           # input channels up to which an NCHW input is read in place (gemm.c tile_nchw)


def source(act: int, residual: bool, generic: bool = False, glu: bool = False, tiles_only: bool = False) -> str:
    """gemm.c with its constants filled in; `generic`: the portable tiles, without AVX-512 or AVX2 (for tests); `tiles_only`:
    for a kernel that appends it for its register tiles, the driver kf_gemm_conv static and unused, so gcc
    drops it (a depthwise + 1x1 kernel's build 4.1 -> 1.4 s)."""
    return ((PORTABLE if generic else "")
            + ("#define KF_GEMM_ENTRY static __attribute__((unused))\n" if tiles_only else "")
            + TEMPLATE % {"act": int(act), "res": int(bool(residual)), "glu": int(glu)})


def panels(w: torch.Tensor) -> torch.Tensor:
    """Weight rows [..., Cout, K] as gemm.c's 16-column panels [..., ceil(Cout / 16), K, 16], float32, zero
    past Cout: a tile's k-th step loads one vector per panel."""
    *lead, cout, k = w.shape
    p = cdiv(cout, 16)
    wp = torch.zeros(*lead, p * 16, k)
    wp[..., :cout, :] = w.detach().float()
    return wp.reshape(*lead, p, 16, k).transpose(-1, -2).contiguous()


def bias_of(b, cout: int) -> torch.Tensor:
    """The bias as the kernels read it: float32 [cout], zeros where there is none."""
    return (torch.zeros(cout) if b is None else b.detach().float().reshape(cout)).contiguous()


@keeps_built
def _fn(act: int, residual: bool, generic: bool = False, glu: bool = False):
    f = entry(source(act, residual, generic, glu), "kf_gemm_conv", 7)
    f.restype = ctypes.c_int
    return f


class GemmConv:
    """act(conv2d(x, w, b, stride, padding, dilation, groups) [+ residual]) for a weight [Cout, Cin / groups,
    KH, KW] on NHWC x [N, H, W, Cin]; with a [Cout, Cin] weight, act(x @ w.T + b) on x [..., Cin] (a linear
    layer). With `glu`, a gated linear (SwiGLU, GeGLU): w [2F, Cin] and b [2F] hold the gate's rows then
    the up projection's, and the output is act(x @ w[:F].T + b[:F]) * (x @ w[F:].T + b[F:]), [..., F]: each
    16-column gate panel is packed beside its up panel, so one register tile holds both and the gated
    half is never written."""

    def __init__(self, w, b, act, residual: bool, stride=1, padding=0, dilation=1, groups: int = 1,
                 generic: bool = False, glu: bool = False):
        if w.dim() == 2:
            w = w.reshape(*w.shape, 1, 1)
        cols, cin_g, kh, kw = w.shape          # the weight's output columns
        cout = cols // 2 if glu else cols      # the kernel's
        groups = int(groups)
        if glu and (w.shape[2:] != (1, 1) or cols % 2 or groups != 1 or residual):
            raise ValueError(f"gemm kernel: a gated linear takes a [2F, Cin] weight, no groups or residual, "
                             f"not {tuple(w.shape)}")
        if not 1 <= kh * kw <= MAX_TAPS:
            raise NotImplementedError(f"gemm kernel: weight {tuple(w.shape)}: at most {MAX_TAPS} kernel positions")
        if groups < 1 or cout % groups:
            raise ValueError(f"gemm kernel: {cout} output channels do not split into {groups} groups")
        cin = cin_g * groups
        self.cin, self.cout, self.kh, self.kw, self.act, self.residual = cin, cout, kh, kw, act, residual
        self.groups, self.glu = groups, glu
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"stride {self.stride}, dilation {self.dilation}, padding {self.padding}")
        self.act_code, self.params = act_code(act, "gemm")
        rows = w.detach().permute(0, 2, 3, 1).reshape(groups, cols // groups, -1)      # k = (tap, channel)
        bias = bias_of(b, cols)
        if glu:         # gate panel p beside up panel p; the bias likewise, as panels of one row
            self.weight = panels(rows.reshape(2, cout, -1)).transpose(0, 1).flatten(0, 1)     # [2P, Cin, 16]
            self.bias = panels(bias.reshape(2, cout, 1)).transpose(0, 1).reshape(-1)         # [P, 2, 1, 16]
        else:
            self.weight = panels(rows).flatten(0, 1)                                   # [G*P, KH*KW*Cin/G, 16]
            self.bias = bias
        self.wcols = self.weight.shape[0] * 16 if glu else cols     # gemm.c's Cout
        self.zero = torch.zeros(kw * cin)     # a tap, or a kernel row, in the padding
        self.fn = _fn(self.act_code, residual, generic, glu)
        self._rows = (kh, kw, self.stride, self.padding) == (1, 1, (1, 1), (0, 0))    # out row m reads x row m
        self._dims: dict = {}

    def _plan(self, geometry, threads: int, nchw: bool = False, rows_per_scale: int = 0):
        key = (geometry, threads, nchw, rows_per_scale)
        if key not in self._dims:
            n, h, w, oh, ow = geometry
            m = n * oh * ow
            pairs = self.groups * cdiv(cdiv(self.wcols // self.groups, 16), 2)
            # enough row blocks for ~4 items a thread, at most 256 rows each, whole register tiles
            # (with a scale, at most 64: the block's scaled rows stay in a per-thread buffer in cache)
            mb = cdiv(cdiv(m, max(1, cdiv(4 * threads, pairs))), MR) * MR
            mb = max(MR, min(mb, 64 if rows_per_scale else 256))
            # A thread's items share a row block (all its panel pairs in turn), not a panel pair, where the
            # packed weight fits in half the L2: the block's output rows are then written whole, once, and
            # its inputs read once, where panel pairs first wrote each output row in 32-column pieces, one
            # pass over the output (and residual) per pair. [8,56,56,64] -> 256 1x1 + residual + ReLU 45 ->
            # 62 GFLOP/s on one thread. A larger weight keeps pairs first: every thread would read all of it.
            # With a scale, always: a block is scaled once for all its pairs.
            rows_first = bool(rows_per_scale) or self.weight.numel() * 4 <= autotune.cache_bytes(2) // 2
            # gemm.c splits the rows' register tiles evenly over the blocks (sizes a tile apart at most), and
            # each thread first takes a contiguous share of the items (share.c): as many blocks as make the
            # items a multiple of the threads (rows first: whole blocks a thread). Blocks of mb rows had
            # left the last one short: 196 rows as 72, 72, 52 by 3 pairs gave one thread 5 items of 9.
            tiles = cdiv(m, MR)
            step = threads if rows_first else threads // math.gcd(threads, pairs)
            nmb = max(1, min(tiles, cdiv(cdiv(m, mb), step) * step))
            self._dims[key] = (ctypes.c_int64 * 22)(m, self.wcols, nmb, n, h, w, self.cin, oh, ow,
                                                    self.kh, self.kw, *self.stride, *self.padding, *self.dilation,
                                                    int(nchw), rows_per_scale, self.groups, self.cout, rows_first)
        return self._dims[key]

    def _geometry(self, x_shape) -> tuple[tuple, tuple]:
        """(geometry for _plan, output shape) of an input of x_shape; ValueError where it does not fit."""
        if len(x_shape) < 1 or x_shape[-1] != self.cin:
            raise ValueError(f"gemm kernel: x {tuple(x_shape)}, want float32 [..., {self.cin}]")
        if self._rows:                                 # a row reads one row
            return (math.prod(x_shape[:-1]), 1, 1, 1, 1), (*x_shape[:-1], self.cout)
        if len(x_shape) != 4:
            raise ValueError(f"gemm kernel: x {tuple(x_shape)}, want NHWC [N, H, W, {self.cin}]")
        n, h, w, _ = x_shape
        oh, ow = out_hw(h, w, (self.kh, self.kw), self.stride, self.padding, self.dilation, "gemm")
        return (n, h, w, oh, ow), (n, oh, ow, self.cout)

    def _threads(self, rows: int):
        """() -> the thread count for `rows` output rows: one below SERIAL_FMAS (no team start)"""
        if rows * self.cin * self.kh * self.kw * self.wcols < SERIAL_FMAS:
            return lambda: 1
        return openmp.threads

    def bound(self, x_shape, scaled: bool = False):
        """This kernel for inputs of x_shape, its checks done once (conv_act.bind); `scaled`: each call
        gives a `scale` (see __call__)."""
        geometry, shape = self._geometry(x_shape)
        rows = math.prod(shape[:-1])
        if rows == 0:
            return self
        rows_per_scale = 0
        if scaled:
            self._check_scaled(len(x_shape))
            rows_per_scale = x_shape[1] * x_shape[2]
        return bind(self, torch.Size(x_shape), self.fn,
                    [None, self.weight.data_ptr(), self.bias.data_ptr(), None, self.zero.data_ptr(), None, None],
                    (0, 3, 5, 6) if scaled else (0, 3, 5),
                    lambda t: self._plan(geometry, t, False, rows_per_scale), self._threads(rows), self.params,
                    torch.Size((x_shape[0], self.cin)) if scaled else None)

    def _check_scaled(self, rank: int):
        if not self._rows or rank != 4 or self.groups > 1:
            raise ValueError("gemm kernel: a scale needs a 1x1 stride-1 unpadded kernel of one group on NHWC x")

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None):
        """x NHWC [N, H, W, Cin] -> [N, OH, OW, Cout]; for a 1x1 stride-1 unpadded kernel x may be any
        [..., Cin] (rows of a linear layer) -> [..., Cout]. scale [N, Cin] (a 1x1 stride-1 unpadded kernel
        on NHWC x only): the convolution of x * scale[:, None, None, :], that product never stored."""
        if x.dtype != torch.float32:
            raise ValueError(f"gemm kernel: x {x.dtype} {tuple(x.shape)}, want float32 [..., {self.cin}]")
        geometry, shape = self._geometry(tuple(x.shape))
        rows_per_scale, given = 0, (x, residual, scale)
        if scale is not None:
            self._check_scaled(x.dim())
            if tuple(scale.shape) != (x.shape[0], self.cin) or scale.dtype != torch.float32:
                raise ValueError(f"gemm kernel: scale {scale.dtype} {tuple(scale.shape)}, want float32 "
                                 f"{(x.shape[0], self.cin)}")
            scale, rows_per_scale = scale.contiguous(), x.shape[1] * x.shape[2]
        residual = check_residual(residual, self.residual, shape, "gemm")
        nchw = self._reads_nchw(x)
        x = x if nchw else x.contiguous()
        out = check_out(out, shape, "gemm")
        m = math.prod(shape[:-1])
        if m == 0:
            return out
        threads = self._threads(m)()
        if c_call(self.fn, x.data_ptr(), self.weight.data_ptr(), self.bias.data_ptr(),
                  0 if residual is None else residual.data_ptr(), self.zero.data_ptr(), out.data_ptr(),
                  None if scale is None else scale.data_ptr(), self._plan(geometry, threads, nchw, rows_per_scale),
                  self.params, threads, keep=(x, residual, out, scale),
                  record=all(a is b for a, b in zip((x, residual, scale), given))):
            raise MemoryError("gemm kernel: cannot allocate its buffers")
        return out

    def _reads_nchw(self, x: torch.Tensor) -> bool:
        """Whether x, an NHWC view of NCHW memory with few channels (a network's input after the layout
        pass), is read in place, each tap's inputs broadcast from their channel planes (gemm.c tile_nchw),
        instead of a copy of the whole tensor first."""
        return (x.dim() == 4 and self.cin <= NCHW_MAX_C and not self._rows and self.groups == 1
                and not x.is_contiguous() and x.permute(0, 3, 1, 2).is_contiguous())
