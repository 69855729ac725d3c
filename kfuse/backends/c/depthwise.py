"""NHWC depthwise 2-D convolution (channel multiplier 1) with bias and activation fused, in one C kernel
(depthwise.c).

out[n, oh, ow, c] = act(b[c] + sum_{i,j} x[n, oh*sh - ph + i*dh, ow*sw - pw + j*dw, c] * w[c, 0, i, j]),
zero outside the input: torch's conv2d(groups=C) on channels-last data. The weight is packed once to
[kh, kw, C], so every tap reads a contiguous channel vector. The source is rendered per (kh, kw, stride,
dilation, activation) as numeric constants, so the taps unroll. Two paths in depthwise.c:
- with AVX-512 (AVX2), each 16-channel (8-channel) block of an output row runs in vector registers: its
  kh kw weight vectors loaded once per row, TW output pixels a tile (tile_width), each tile's row of
  input vectors loaded into registers once where they fit (IN_REGS in depthwise.c), else read by each
  FMA (rowv);
- the channels past the last whole block: the block ending at the last channel, shifted back over
  channels already done and storing only its new lanes (so no load leaves the pixel: no masked loads,
  no second build of the row kernel);
- fewer channels than a block, or every channel on a machine with neither: per pixel, `omp simd` over
  the channels (row_simd).
Border pixels test each tap (rowv) or read a row of C zeros for taps outside the input (row_simd);
interior pixels address the input directly. In the block-major order (next), a small padded image's
channel block (up to PAD_BYTES padded) is first copied into a zero-bordered per-thread buffer, so every
pixel is an interior one: at 7x7 outputs half the pixels are border pixels, and their tap tests had made
[1,14,14,672] 5x5/2 take 24 us against 3 us of FMAs (16 us with the copy).
Threads split (image, channel block), each item running its rows in order so the kh input rows a row
reads are still in L1 (block-major: 1 thread, [1,112,112,96] 3x3/2 0.081 -> 0.067 ms CPU), or (n, output
row), and a row's channels too, in whole vectors, when rows are fewer than 8 per thread (7x7 maps). Which
is faster is timed per shape and thread count at compile time (_order; autotune.pick caches it); untimed,
block-major where its items balance over the threads.

The taps are FMAs, so 3x3 and 5x5 run near the FMA throughput (one zmm FMA a cycle on Zen 4): 1 thread,
[1,28,28,240] 5x5: 0.092 ms of CPU for 294k vector FMAs (0.080 ms at 3.7 GHz); the per-pixel `omp simd`
form (all weights reloaded every pixel, two loads per FMA) took 0.15 ms, oneDNN 0.11 ms.

Bytes moved: x read once (each input row is reused by kh output rows from cache), out written once,
w and b (kh kw C + C floats, from cache after the first row). FLOPs: 2 kh kw per output element.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import openmp
from .autotune import pick, vector_isa
from .autotune import problem as problem_key
from .compiler import PORTABLE, keeps_built
from .conv_act import act_code, bind, cdiv, check_out, entry, out_hw, pair, template
from .render import WIDE

TEMPLATE = template(Path(__file__).with_name("depthwise.c"))
MAX_KERNEL = 11
# Output pixels per register tile (rowv), by column stride: stride 1, where neighbours share input
# vectors, 2, 4 and 6 timed alike on the bench shapes (1 thread); stride 2 gains little from sharing and
# the tile's addresses cost registers: [8,14,14,672] 5x5/2, CPU ms: TW 1 0.214, 2 0.244, 3 0.254, 4 0.283.
def tile_width(sw: int) -> int:
    return 4 if sw == 1 else 1


VL = 16                 # channel chunks are multiples of it
# channels of depthwise.c's register block (rowv): a vector of AVX-512 or AVX2; 0: none (per-pixel form only)
VB = {"avx512": 16, "avx2": 8}.get(vector_isa(), 0)
ROWS_PER_THREAD = 8     # below this many (n, output row) items per thread, rows are split by channels too
# The kernel is also built with its `omp simd` loops 512 bits wide on an AVX-512 CPU (render.WIDE: gcc's
# -march=native tuning for Intel prefers 256), and the width timed with the work order: EfficientNet-B0's
# depthwise + SiLU kernels ran 8-10% faster wide in its program, MobileNetV3's 1-4% slower (bench/README.md,
# forty-fifth session)
WIDTHS = (False, True) if vector_isa() == "avx512" else (False,)


def supported(weight_shape, groups, in_channels) -> bool:
    """Whether DepthwiseConv runs this convolution: depthwise with multiplier 1, kernel at most 11x11."""
    ws = tuple(weight_shape)
    return (len(ws) == 4 and groups == in_channels == ws[0] and ws[1] == 1
            and 1 <= ws[2] <= MAX_KERNEL and 1 <= ws[3] <= MAX_KERNEL)


def source(kh: int, kw: int, stride, dilation, act: int, generic: bool = False, wide: bool = False) -> str:
    """depthwise.c with its constants filled in (all ints formatted here); `generic`: without the register
    block row kernel, as a machine without AVX-512 or AVX2 builds it (for tests); `wide`: its loops 512 bits
    wide (WIDTHS)."""
    vals = dict(kh=kh, kw=kw, sh=stride[0], sw=stride[1], dh=dilation[0], dw=dilation[1], act=act,
                tw=tile_width(stride[1]))
    text = TEMPLATE % {k: int(v) for k, v in vals.items()}
    return (PORTABLE if generic else "") + (WIDE[0] + text + WIDE[1] if wide else text)


@keeps_built
def _fn(kh: int, kw: int, stride, dilation, act: int, generic: bool = False, wide: bool = False):
    return entry(source(kh, kw, stride, dilation, act, generic, wide), "kf_depthwise", 5)


class DepthwiseConv:
    """act(conv2d(x, weight, bias, stride, padding, dilation, groups=C)) on NHWC x, into NHWC out."""

    def __init__(self, weight, bias, stride, padding, dilation, act):
        c, one, kh, kw = weight.shape
        if not supported(weight.shape, c, c):
            raise NotImplementedError(f"depthwise kernel: weight {tuple(weight.shape)} is not [C, 1, k<=11, k<=11]")
        self.c, self.kh, self.kw = c, kh, kw
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"stride {self.stride}, dilation {self.dilation}, padding {self.padding}")
        self.weight = weight.detach().float().reshape(c, kh, kw).permute(1, 2, 0).contiguous()   # [kh, kw, C]
        self.bias = (torch.zeros(c) if bias is None else bias.detach().float().reshape(c)).contiguous()
        self.zero = torch.zeros(c)
        self.act_code, self.params = act_code(act, "depthwise")
        self.fns = {wide: _fn(kh, kw, self.stride, self.dilation, self.act_code, wide=wide) for wide in WIDTHS}
        self.fn, self.wide = self.fns[False], None       # the width: timed with the first shape's work order
        self._dims: dict = {}
        self.order_text: dict = {}      # (n, h, w, threads) -> the timed order choice, for the report

    def out_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        return (n, *out_hw(h, w, (self.kh, self.kw), self.stride, self.padding, self.dilation, "depthwise"), self.c)

    def _plan(self, n, h, w, threads):
        key = (n, h, w, threads)
        if key not in self._dims:
            _, oh, ow, c = self.out_shape(n, h, w)
            nck = 1
            if n * oh < ROWS_PER_THREAD * threads:
                nck = min(cdiv(c, VL), cdiv(ROWS_PER_THREAD * threads, max(1, n * oh)))
            ck = cdiv(cdiv(c, nck), VL) * VL          # channels per chunk, whole vectors
            nck = cdiv(c, ck)
            dims = {o: (ctypes.c_int64 * 11)(n, h, w, c, oh, ow, *self.padding, nck, ck, o == "blocks")
                    for o in self._orders(n, c, threads)}
            # each order at each width until one is chosen (the first candidate: the untimed choice)
            widths = WIDTHS if self.wide is None else (self.wide,)
            cands = {(o + ", 512-bit loops" if wide else o): (dims[o], wide) for wide in widths for o in dims}
            self._dims[key], wide = cands[self._order(cands, (n, h, w), threads)]
            if self.wide is None:
                self.fn, self.wide = self.fns[wide], wide
        return self._dims[key]

    @staticmethod
    def _orders(n: int, c: int, threads: int) -> list[str]:
        """The work orders worth timing, the one expected faster first (the choice untimed): block-major
        (AVX-512 or AVX2 only; items (image, VB-channel block)) where those items balance over the threads, else
        rows; both where there is a whole block and more than one thread. The rule alone misjudged this
        machine: [1,112,112,32] 3x3 on 2 threads (two blocks, so block-major) took 0.080 ms, by rows 0.048."""
        blocks = n * cdiv(c, VB) if VB and c >= VB else 0      # a last part block runs shifted back (dw_row)
        if blocks < 1:
            return ["rows"]
        first = ["blocks", "rows"] if blocks % threads == 0 or blocks >= 8 * threads else ["rows", "blocks"]
        return first if threads > 1 else first[:1]

    def _order(self, orders: dict, nhw, threads: int) -> str:
        """The faster of `orders` ({name: (dims, wide)}) on this machine (autotune.pick: timed once, cached)."""
        names = list(orders)
        if len(names) == 1:
            return names[0]
        weights = (self.weight.data_ptr(), self.bias.data_ptr(), self.zero.data_ptr())
        cands = {o: (lambda a, d=d, f=self.fns[wide]: f(a[0].data_ptr(), *weights, a[1].data_ptr(), d, self.params, threads))
                 for o, (d, wide) in orders.items()}
        problem = problem_key("depthwise order", self.kh, self.kw, self.stride, self.dilation, self.padding,
                              (*nhw, self.c), self.act_code)
        best, self.order_text[(*nhw, threads)] = pick(
            problem, cands, lambda: [torch.randn(*nhw, self.c), torch.empty(self.out_shape(*nhw))], threads)
        return best

    def bound(self, x_shape):
        """This kernel for inputs of x_shape, its checks done once (conv_act.bind)."""
        n, h, w, c = x_shape
        if c != self.c or 0 in self.out_shape(n, h, w):
            return self
        self._plan(n, h, w, openmp.threads())       # the work order timed now, at compile time
        return bind(self, torch.Size(x_shape), self.fn,
                    [None, self.weight.data_ptr(), self.bias.data_ptr(), self.zero.data_ptr(), None], (0, None, 4),
                    lambda t: self._plan(n, h, w, t), openmp.threads, self.params)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[3] != self.c:
            raise ValueError(f"depthwise kernel: x {x.dtype} {tuple(x.shape)}, want float32 [N, H, W, {self.c}]")
        if not x.is_contiguous():
            x = x.contiguous()
        n, h, w, _ = x.shape
        shape = self.out_shape(n, h, w)
        out = check_out(out, shape, "depthwise")
        if out.numel() == 0:
            return out
        threads = openmp.threads()
        dims = self._plan(n, h, w, threads)         # (the first plan chooses self.fn)
        self.fn(x.data_ptr(), self.weight.data_ptr(), self.bias.data_ptr(), self.zero.data_ptr(), out.data_ptr(),
                dims, self.params, threads)
        return out
