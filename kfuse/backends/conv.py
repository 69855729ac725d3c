"""Convolutions with constant weights through oneDNN (2-D and 3-D, plain and transposed): the weight packed
once, the activation and a residual add as post-ops; torch's convolution plus in-place epilogue ops where
the probe says no.

    conv = pack_conv(w, b, attrs, act=("relu", (), ""), residual=False, input_size=[1, 64, 56, 56])
    y = conv(x)                 # act(conv2d(x, w, b)), channels-last output on the oneDNN path
    y = conv(x, r)              # act(conv2d(x, w, b) + r)

The ops are the private ones Inductor's freezing uses (torch/_inductor/fx_passes/mkldnn_fusion.py):
`torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation, groups, input_size)` and
`torch.ops.mkldnn._convolution_pointwise(x, W, b, padding, stride, dilation, groups, attr, scalars,
algorithm)` (padding before stride, the reverse of aten), `.binary(x, other, W, b, padding, stride,
dilation, groups, "add", alpha, unary_attr, unary_scalars, unary_algorithm)` for the residual;
`_reorder_convolution_transpose_weight` and `_convolution_transpose_pointwise` take output_padding after
padding (no binary form: a transposed convolution's residual is added in place).
oneDNN computes in the channels-last layout: x is converted once if it is not, and the output is
channels-last (channels_last_3d for a 3-D convolution). The binary form needs channels-last x and
groups == 1, so only then is the residual fused. Each post-op is probed once on a tiny odd problem (stride
1x2, so swapped arguments show, and a NaN, which oneDNN's relu, hardtanh and hardsigmoid turn into a number)
and used only if it matches the reference; hardswish passes (oneDNN computes x * min(max(x / 6 + 1/2, 0), 1),
within an ulp or two).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CL = torch.channels_last
FORMAT = {2: CL, 3: torch.channels_last_3d}       # by the number of spatial dims


def torch_conv(x, w, b, stride, padding, dilation, groups, output_padding=None):
    """torch's convolution of x (2-D or 3-D by x's rank; transposed where output_padding is given)."""
    nd = x.dim() - 2
    if output_padding is None:
        return (F.conv2d if nd == 2 else F.conv3d)(x, w, b, stride, padding, dilation, groups)
    return (F.conv_transpose2d if nd == 2 else F.conv_transpose3d)(x, w, b, stride, padding, output_padding, groups,
                                                                  dilation)

# the same activations in place, where a post-op is not available (exactly the reference's functions)
INPLACE = {
    "relu": lambda y, s, a: torch.relu_(y),
    "sigmoid": lambda y, s, a: torch.sigmoid_(y),
    "tanh": lambda y, s, a: torch.tanh_(y),
    "swish": lambda y, s, a: torch.ops.aten.silu_(y),
    "gelu": lambda y, s, a: torch.ops.aten.gelu_(y, approximate=a),
    "leaky_relu": lambda y, s, a: F.leaky_relu_(y, s[0]),
    "hardtanh": lambda y, s, a: F.hardtanh_(y, s[0], s[1]),
    "hardswish": lambda y, s, a: F.hardswish(y, inplace=True),
    "hardsigmoid": lambda y, s, a: F.hardsigmoid(y, inplace=True),
}
REFERENCE = {
    "relu": lambda y, s, a: torch.relu(y),
    "sigmoid": lambda y, s, a: torch.sigmoid(y),
    "tanh": lambda y, s, a: torch.tanh(y),
    "swish": lambda y, s, a: F.silu(y),
    "gelu": lambda y, s, a: F.gelu(y, approximate=a),
    "leaky_relu": lambda y, s, a: F.leaky_relu(y, s[0]),
    "hardtanh": lambda y, s, a: F.hardtanh(y, s[0], s[1]),
    "hardswish": lambda y, s, a: F.hardswish(y),
    "hardsigmoid": lambda y, s, a: F.hardsigmoid(y),
}


def _private(op: str, reorder: str):
    """(unary, binary, reorder) overloads of a private oneDNN op Inductor's freezing uses, or None where
    this torch build lacks them."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        pointwise = getattr(torch.ops.mkldnn, op)
        return pointwise.default, pointwise.binary, getattr(torch.ops.mkldnn, reorder).default
    except (AttributeError, RuntimeError):
        return None


def _ops():
    return _private("_convolution_pointwise", "_reorder_convolution_weight")


def _transpose_ops():
    """(unary, None, reorder) of oneDNN's transposed convolution (it has no binary form), where _ops has them."""
    if _ops() is None:
        return None
    try:
        return (torch.ops.mkldnn._convolution_transpose_pointwise.default, None,
                torch.ops.mkldnn._reorder_convolution_transpose_weight.default)
    except (AttributeError, RuntimeError):
        return None


def geometry(stride, padding, dilation, groups, output_padding=None) -> list:
    """The arguments oneDNN's ops and weight reorders take after the weight (and bias): padding before
    stride, output_padding between them for a transposed convolution."""
    pads = [list(padding)] + ([] if output_padding is None else [list(output_padding)])
    return pads + [list(stride), list(dilation), int(groups)]


def _linear_ops():
    return _private("_linear_pointwise", "_reorder_linear_weight")


def _agrees(call, want: torch.Tensor, act) -> bool:
    """Whether call() (a oneDNN op on the probe problem) equals act(want) (float64): the same NaNs, the
    rest within float32 reordering."""
    if act is not None:
        want = REFERENCE[act[0]](want, act[1], act[2])
    try:
        with torch.no_grad():
            got = call()
    except (RuntimeError, TypeError):
        return False
    if got.shape != want.shape or not torch.equal(got.isnan(), want.isnan()):
        return False
    ok = ~want.isnan()
    return bool(torch.allclose(got.double()[ok], want[ok], rtol=1e-4, atol=1e-5))


@functools.cache
def supports(act: tuple | None, residual: bool, nd: int = 2, transposed: bool = False) -> bool:
    """Whether oneDNN computes act(conv(x) + b [+ r]) like the reference on a tiny odd problem with nd
    spatial dims (stride 1 then 2, output_padding 0 then 1 where transposed, so swapped arguments show)."""
    ops = _transpose_ops() if transposed else _ops()
    if ops is None or residual and transposed:
        return False
    unary, binary, reorder = ops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *(3,) * (nd - 2), 5, 7, generator=g)
    x[(0, 1) + (1,) * (nd - 2) + (2, 3)] = float("nan")
    w, b = torch.randn(*((3, 4) if transposed else (4, 3)), *(3,) * nd, generator=g), torch.randn(4, generator=g)
    stride, pad, dil = [1] * (nd - 1) + [2], [1] * nd, [1] * nd
    out_pad = [0] * (nd - 1) + [1] if transposed else None
    want = torch_conv(x.double(), w.double(), b.double(), stride, pad, dil, 1, out_pad)
    if residual:
        r = torch.randn(want.shape, generator=g)
        want = want + r.double()
    args = geometry(stride, pad, dil, 1, out_pad)

    def call():
        wp = reorder(w, *args, list(x.shape))
        xc = x.contiguous(memory_format=FORMAT[nd])
        if residual:
            a = act or (None, (), None)
            return binary(xc, r.contiguous(memory_format=FORMAT[nd]), wp, b, *args, "add", None, a[0], list(a[1]), a[2])
        a = act or ("none", (), "")
        return unary(xc, wp, b, *args, a[0], list(a[1]), a[2])
    return _agrees(call, want, act)


class PackedConv:
    """act(conv(x, W, b) [+ residual]) for one constant weight: 2-D or 3-D by x's rank, transposed where attrs
    has output_padding. Attributes: backend ("onednn" or "torch"), post_op_fused, residual_fused (what runs
    inside the oneDNN call)."""

    def __init__(self, w, b, attrs, act, residual: bool, input_size):
        # layout "nhwc": x, the residual and the output are [N, H, W, C] (kfuse/passes/layout.py); they
        # are the channels-last NCHW tensors oneDNN reads and writes, seen through a permute
        self.nhwc = attrs.get("layout") == "nhwc"
        if self.nhwc:
            input_size = [input_size[i] for i in (0, 3, 1, 2)]
        nd, self.transposed = len(input_size) - 2, "output_padding" in attrs
        self.format = FORMAT[nd]
        self.stride, self.padding = list(attrs["stride"]), list(attrs["padding"])
        self.dilation, self.groups = list(attrs["dilation"]), int(attrs["groups"])
        self.output_padding = list(attrs["output_padding"]) if self.transposed else None
        self.geometry = geometry(self.stride, self.padding, self.dilation, self.groups, self.output_padding)
        self.act = act
        self._b = None if b is None else b.detach().float().contiguous().clone()
        t = self.transposed
        onednn = supports(None, False, nd, t)
        self.backend = "onednn" if onednn else "torch"
        self.residual_fused = onednn and residual and self.groups == 1 and supports(None, True, nd, t)
        self.post_op_fused = act is not None and onednn and (
            supports(act, True, nd, t) if self.residual_fused else not residual and supports(act, False, nd, t))
        with torch.no_grad():
            if onednn:
                self._unary, self._binary, reorder = _transpose_ops() if t else _ops()
                self._w = reorder(w.detach().contiguous(), *self.geometry, list(input_size))
            else:
                self._w = w.detach().contiguous().clone()

    def __call__(self, x, residual=None):
        if not self.nhwc:
            return self._nchw(x, residual)
        return self._nchw(x.permute(0, 3, 1, 2), None if residual is None else residual.permute(0, 3, 1, 2)) \
            .permute(0, 2, 3, 1)

    def _nchw(self, x, residual):
        act, fused_act = self.act, self.post_op_fused
        if self.backend == "torch":
            y = torch_conv(x, self._w, self._b, self.stride, self.padding, self.dilation, self.groups,
                           self.output_padding)
        elif residual is not None and self.residual_fused:
            a = act if fused_act else (None, (), None)
            y = self._binary(x.contiguous(memory_format=self.format), residual.contiguous(memory_format=self.format),
                             self._w, self._b, *self.geometry, "add", None, a[0], list(a[1]), a[2])
            residual = None
        else:
            a = act if fused_act else ("none", (), "")
            y = self._unary(x.contiguous(memory_format=self.format), self._w, self._b, *self.geometry, a[0],
                            list(a[1]), a[2])
        if residual is not None:
            y.add_(residual)
        if act is not None and not fused_act:
            INPLACE[act[0]](y, act[1], act[2])
        return y


@functools.cache
def linear_supports(act: tuple | None, residual: bool) -> bool:
    """Whether oneDNN's linear op computes act(x W^T + b [+ r]) like the reference (the conv's post-op
    spelling, which the linear op shares), probed once on a tiny odd problem with a NaN."""
    ops = _linear_ops()
    if ops is None or residual and act is not None:
        return False
    unary, binary, reorder = ops
    g = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g), torch.randn(7, generator=g),
                  torch.randn(3, 7, generator=g))
    x[1, 2] = float("nan")
    want = x.double() @ w.double().t() + b.double() + (r.double() if residual else 0)
    a = act or ("none", (), "")
    return _agrees(lambda: binary(x, r, reorder(w, 3), b, "add") if residual
                   else unary(x, reorder(w, 3), b, a[0], list(a[1]), a[2]), want, act)


def pointwise(attrs, w) -> bool:
    """A 1x1 convolution with stride 1, no padding, one group, on channels-last tensors: a GEMM of
    [N*H*W, Cin] by [Cin, Cout]."""
    return attrs.get("layout") == "nhwc" and tuple(w.shape[2:]) == (1, 1) and int(attrs["groups"]) == 1 \
        and tuple(attrs["stride"]) == (1, 1) and tuple(attrs["padding"]) == (0, 0)


class PointwiseConv:
    """A `pointwise` convolution run as oneDNN's linear op on the [N*H*W, C] view of its NHWC input:
    the same function as PackedConv, and cheaper to call (measured at ~25 vs ~32 us for MobileNet's
    small 1x1 convolutions on the project machine); `backends.make_kernel` times both per shape."""

    def __init__(self, w, b, act, residual: bool, rows: int):
        unary, binary, reorder = _linear_ops()
        self.act, self.cout = act, w.shape[0]
        self.residual_fused = residual and linear_supports(None, True)
        self.post_op_fused = act is not None and not self.residual_fused and linear_supports(act, False)
        self.backend = "onednn-linear"
        self._unary, self._binary = unary, binary
        self._b = None if b is None else b.detach().float().contiguous().clone()
        with torch.no_grad():
            self._w = reorder(w.detach().reshape(w.shape[0], -1).contiguous(), max(1, rows))

    def __call__(self, x, residual=None):
        n, h, w, c = x.shape
        x2 = x.reshape(n * h * w, c)
        act = self.act if self.post_op_fused else ("none", (), "")
        if residual is not None and self.residual_fused:
            y = self._binary(x2, residual.reshape(n * h * w, self.cout), self._w, self._b, "add")
            residual = None
        else:
            y = self._unary(x2, self._w, self._b, act[0], list(act[1]), act[2])
        if residual is not None:
            y.add_(residual.reshape(y.shape))
        if self.act is not None and not self.post_op_fused:
            INPLACE[self.act[0]](y, self.act[1], self.act[2])
        return y.view(n, h, w, self.cout)


def pack_conv(w, b, attrs, act=None, residual=False, input_size=None) -> PackedConv:
    return PackedConv(w, b, attrs, act, residual, input_size)


def frame_wise(weight, attrs) -> tuple | None:
    """(the 2-D weight, the 2-D attrs) of a 3-D convolution whose kernel spans one frame (kernel depth 1,
    depth stride 1, no depth padding: R(2+1)D's and MC3's 1x3x3), or None."""
    if weight.dim() != 5 or weight.shape[2] != 1 or "output_padding" in attrs \
            or attrs["stride"][0] != 1 or attrs["padding"][0] != 0:
        return None
    return weight[:, :, 0], {"stride": tuple(attrs["stride"][1:]), "padding": tuple(attrs["padding"][1:]),
                             "dilation": tuple(attrs["dilation"][1:]), "groups": attrs["groups"], "layout": "nhwc"}


class FrameConv:
    """A frame_wise 3-D convolution as a 2-D NHWC kernel of ours over the N * D frames: x [N, C, D, H, W]
    in channels_last_3d memory (NDHWC: each frame an NHWC image; other memory is converted first), the
    output likewise (what oneDNN's 3-D convolutions read and write). The kernel is k(x, [residual])."""

    def __init__(self, k):
        self.k = k

    @staticmethod
    def _frames(t):
        n, c, d, h, w = t.shape
        return t.permute(0, 2, 3, 4, 1).contiguous().view(n * d, h, w, c)     # a view of NDHWC memory

    def __call__(self, x, residual=None):
        n, d = x.shape[0], x.shape[2]
        y = self.k(self._frames(x)) if residual is None else self.k(self._frames(x), self._frames(residual))
        return y.view(n, d, *y.shape[1:]).permute(0, 4, 1, 2, 3)
