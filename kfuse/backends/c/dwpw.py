"""A depthwise and a 1x1 convolution, one reading the other, in one C kernel (dwpw.c), in either order:
- DepthwisePointwise: a block of the depthwise output's rows is computed into a per-thread buffer that
  stays in L2 and the 1x1 GEMM's register tiles read it there;
- PointwiseDepthwise (an inverted residual block's expand 1x1, then its depthwise): each expanded input
  row is computed once into a per-thread buffer of rows sliding down the image, and the depthwise rows
  read it there;
so the tensor between them (MobileNet's widest, six times the block's channels) never goes to memory.
The expand reads its input where it is when its pixels are evenly spaced (a channel slice of a wider
map: ShuffleNet's `chunk`), not a copy made first.

The source is gemm.c, then depthwise.c (without a second copy of the vector math), each with its
activation function renamed, then the driver: the row and tile functions are those of the two
separate kernels, so the fused kernel computes the same sums in the same order as they do, bit for
bit. Whether it is faster than the two kernels depends on the shape (the 1x1 weight is read once per
block of rows, not once per row block of the whole map; a thread's first rows of the expanded map are
computed twice, by it and by the thread before): backends.split_pairs times both.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from .. import openmp
from . import depthwise, gemm
from .compiler import PORTABLE, keeps_built
from .conv_act import bind, cdiv, check_out, check_residual, entry
from .nhwc import row_stride
from .record import c_call
from .vecmath import VECMATH_C

DRIVER = Path(__file__).with_name("dwpw.c").read_text()
BUFFER_FLOATS = 16384        # depthwise output per thread buffer: 64 KB, well inside a 1 MB L2
EXPAND_FLOATS = 65536        # expanded rows per thread buffer (at least a depthwise window): 256 KB


def source(dw_args: tuple, pw_act: int, residual: bool, generic: bool = False) -> str:
    """The fused kernel's C: dw_args are depthwise.source's (kh, kw, stride, dilation, act)."""
    pw = gemm.source(pw_act, residual, tiles_only=True)
    # the depthwise part's loops 512 bits wide where depthwise.WIDTHS offers it: the pairs of EfficientNet-B0
    # and MobileNetV2 ran 2-7% faster so (bench/README.md, forty-fifth session)
    dw = depthwise.source(*dw_args, wide=depthwise.WIDTHS[-1]).replace(VECMATH_C, "")
    return ((PORTABLE if generic else "") + "#define act pw_act\n" + pw
            + "\n#undef act\n#undef ACT\n#define act dw_act\n" + dw + "\n#undef act\n" + DRIVER)


@keeps_built
def _fn(dw_args: tuple, pw_act: int, residual: bool, generic: bool, name: str, pointers: int):
    f = entry(source(dw_args, pw_act, residual, generic), name, pointers)
    f.restype = ctypes.c_int
    return f


class _Pair:
    """What both kernels share: the depthwise and 1x1 kernels they are made of, the activations' scalars
    (the depthwise's, then the 1x1's), and the C entry `name` called with `args`, its pointer arguments:
    weights filled in, None at `slots` (x, residual or None, out), as conv_act.bind takes them."""

    def __init__(self, dw: depthwise.DepthwiseConv, pw: gemm.GemmConv, generic: bool, name: str, cin: int,
                 args: list, slots: tuple):
        if (pw.kh, pw.kw, pw.stride, pw.padding) != (1, 1, (1, 1), (0, 0)):
            raise NotImplementedError(f"{self.what} kernel: the pointwise convolution is not a 1x1 stride-1 unpadded one")
        self.dw, self.pw, self.cin, self.args, self.slots = dw, pw, cin, args, slots
        self.dw_args = (dw.kh, dw.kw, dw.stride, dw.dilation, dw.act_code)
        self.fn = _fn(self.dw_args, pw.act_code, pw.residual, generic, name, len(args))
        self.params = (ctypes.c_float * 4)(*dw.params, *pw.params)
        self._dims: dict = {}

    def source(self) -> str:
        return source(self.dw_args, self.pw.act_code, self.pw.residual)

    def bound(self, x_shape):
        """This kernel for inputs of x_shape, its checks done once (conv_act.bind)."""
        n, h, w, c = x_shape
        if c != self.cin or 0 in self.dw.out_shape(n, h, w):
            return self
        return bind(self, torch.Size(x_shape), self.fn, self.args, self.slots, lambda t: self._plan(n, h, w, t),
                    openmp.threads, self.params)

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[3] != self.cin:
            raise ValueError(f"{self.what} kernel: x {x.dtype} {tuple(x.shape)}, want float32 [N, H, W, {self.cin}]")
        return x.contiguous()

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor, record: bool,
             *plan) -> torch.Tensor:
        """The C call on checked tensors (contiguous, but where `plan`, _plan's further arguments, says
        otherwise); `record`: they are the caller's, not copies."""
        if out.numel() == 0:
            return out
        ix, ir, io = self.slots
        a = list(self.args)
        a[ix], a[io] = x.data_ptr(), out.data_ptr()
        if ir is not None:
            a[ir] = 0 if residual is None else residual.data_ptr()
        threads = openmp.threads()
        if c_call(self.fn, *a, self._plan(*x.shape[:3], threads, *plan), self.params, threads, keep=(x, residual, out),
                  record=record):
            raise MemoryError(f"{self.what} kernel: cannot allocate its row buffers")
        return out


class DepthwisePointwise(_Pair):
    """pw(dw(x)) [+ residual] on NHWC x: dw a depthwise.DepthwiseConv, pw a 1x1 stride-1 gemm.GemmConv."""
    what = "depthwise + pointwise"

    def __init__(self, dw: depthwise.DepthwiseConv, pw: gemm.GemmConv, generic: bool = False):
        if pw.cin != dw.c:
            raise NotImplementedError("depthwise + pointwise kernel: the 1x1 does not read the depthwise output")
        super().__init__(dw, pw, generic, "kf_dwpw", dw.c,
                         [None, dw.weight.data_ptr(), dw.bias.data_ptr(), dw.zero.data_ptr(), pw.weight.data_ptr(),
                          pw.bias.data_ptr(), None, None], (0, 6, 7))

    def _plan(self, n, h, w, threads):
        """the kernel's dims (read-only, so shared by concurrent calls; the row buffers are per call)"""
        key = (n, h, w, threads)
        if key not in self._dims:
            _, oh, ow, c = self.dw.out_shape(n, h, w)
            rb = max(1, min(oh, BUFFER_FLOATS // (ow * c)))
            while rb > 1 and n * -(-oh // rb) < 2 * threads:      # work items for every thread
                rb //= 2
            # bands a row apart in size (dwpw.c), as many as make the items a multiple of the threads where
            # the rows allow: 14 rows in bands of 3 had been 5 items, 3 to one thread and 2 to the other
            nrb, whole = cdiv(oh, rb), threads // math.gcd(n, threads)
            if cdiv(nrb, whole) * whole <= oh:
                nrb = cdiv(nrb, whole) * whole
            self._dims[key] = (ctypes.c_int64 * 10)(n, h, w, c, oh, ow, *self.dw.padding, self.pw.cout, nrb)
        return self._dims[key]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None):
        given = (x, residual)
        x = self._check_x(x)
        n, h, w, _ = x.shape
        _, oh, ow, _ = self.dw.out_shape(n, h, w)
        shape = (n, oh, ow, self.pw.cout)
        residual = check_residual(residual, self.pw.residual, shape, self.what)
        return self._run(x, residual, check_out(out, shape, self.what), x is given[0] and residual is given[1])


class PointwiseDepthwise(_Pair):
    """dw(pw(x)) on NHWC x: pw a 1x1 stride-1 gemm.GemmConv without a residual, dw a depthwise.DepthwiseConv
    over its output channels."""
    what = "pointwise + depthwise"

    def __init__(self, pw: gemm.GemmConv, dw: depthwise.DepthwiseConv, generic: bool = False):
        if pw.residual or pw.cout != dw.c:
            raise NotImplementedError("pointwise + depthwise kernel: the depthwise does not read the 1x1 output alone")
        super().__init__(dw, pw, generic, "kf_pwdw", pw.cin,
                         [None, pw.weight.data_ptr(), pw.bias.data_ptr(), dw.weight.data_ptr(), dw.bias.data_ptr(),
                          dw.zero.data_ptr(), None], (0, None, 6))

    def _plan(self, n, h, w, threads, xs: int = 0):
        """the kernel's dims (read-only, so shared by concurrent calls; the row buffers are per call); xs:
        x's pixel stride where it is not its channel count"""
        key = (n, h, w, threads, xs)
        if key not in self._dims:
            _, oh, ow, c = self.dw.out_shape(n, h, w)
            window = (self.dw.kh - 1) * self.dw.dilation[0] + 1
            rb = max(min(window, h), min(h, EXPAND_FLOATS // (w * c)))
            nck, pairs = 1, cdiv(c, 32)      # channel chunks are whole panel pairs
            if n * oh < depthwise.ROWS_PER_THREAD * threads:     # rows fewer than 8 a thread (7x7 maps)
                nck = min(pairs, cdiv(depthwise.ROWS_PER_THREAD * threads, max(1, n * oh)))
            # threads' ranges meeting inside an (image, chunk) compute the rows there twice: where the
            # panel pairs divide evenly, as many chunks as make every range whole (image, chunk) items
            whole = threads // math.gcd(n, threads)
            k = cdiv(nck, whole) * whole
            if 1 < k <= pairs and pairs % k == 0:
                nck = k
            ck = cdiv(cdiv(c, nck), 32) * 32
            self._dims[key] = (ctypes.c_int64 * 13)(n, h, w, self.pw.cin, c, oh, ow, *self.dw.padding, rb,
                                                    cdiv(c, ck), ck, xs or self.pw.cin)
        return self._dims[key]

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None):
        # a channel slice of a wider NHWC map (ShuffleNet's chunk) is read in place, its pixels xs apart;
        # overlapping pixels (a broadcast) and any other layout are copied (_check_x), xs 0
        xs = 0
        if x.dim() == 4 and x.dtype == torch.float32 and x.shape[3] == self.cin and not x.is_contiguous():
            xs = row_stride(x, 3) or 0
            xs = xs if xs >= self.cin else 0
        given, x = x, x if xs else self._check_x(x)
        return self._run(x, None, check_out(out, self.dw.out_shape(*x.shape[:3]), self.what), x is given, xs)
