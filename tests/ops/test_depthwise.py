"""The NHWC depthwise convolution kernel (kfuse/backends/c/depthwise.py) against torch: F.conv2d(groups=C)
and the torch activation, computed in float64, over channel counts around the 16-float vector (1, 3, 16,
17, 33, 100), kernels 1x1 to 7x7 and 3x5, strides 1-4, dilation 2, paddings 0-3, tiny and odd maps,
batch 0, 1, 3, every activation, NaN and +-Inf inputs, a poisoned `out` and a non-contiguous input."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import CONV_ACTS as ACTS
from helpers import assert_close

from kfuse.backends import openmp
from kfuse.backends.c import depthwise
from kfuse.backends.c.depthwise import DepthwiseConv, supported

# float32 sums of up to 49 products against float64: rtol 1e-5 (the brief's bound), atol for the outputs
# that cancel to about 0 (the largest absolute error measured over GEOMETRY without activation: 5.7e-6)
TOL = {"atol": 1e-5, "rtol": 1e-5}



def reference(x, w, b, stride, padding, dilation, act):
    """act(conv2d) in float64 on NHWC x, as NHWC float32."""
    y = F.conv2d(x.permute(0, 3, 1, 2).double(), w.double(), None if b is None else b.double(), stride, padding,
                 dilation, groups=w.shape[0])
    return ACTS[act][1](y).permute(0, 2, 3, 1).float().contiguous()


def check(n, h, w_, c, k, stride=(1, 1), padding=(0, 0), dilation=(1, 1), act="none", bias=True, scale=1.0):
    kh, kw = k
    x = torch.randn(n, h, w_, c) * scale
    w, b = torch.randn(c, 1, kh, kw), (torch.randn(c) if bias else None)
    dw = DepthwiseConv(w, b, stride, padding, dilation, ACTS[act][0])
    got, want = dw(x), reference(x, w, b, stride, padding, dilation, act)
    assert got.is_contiguous()
    assert_close(got, want, **TOL)
    return dw, x, want


# (N, H, W, C, (kh, kw), stride, padding, dilation)
GEOMETRY = [
    (1, 15, 15, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 15, 15, 17, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 15, 15, 1, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 7, 9, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 15, 15, 33, (5, 5), (1, 1), (2, 2), (1, 1)),
    (3, 7, 9, 100, (5, 5), (2, 2), (2, 2), (1, 1)),
    (1, 15, 15, 33, (7, 7), (1, 1), (3, 3), (1, 1)),
    (1, 7, 9, 17, (7, 7), (1, 1), (3, 3), (1, 1)),        # more border than interior
    (1, 15, 15, 100, (3, 5), (1, 1), (1, 2), (1, 1)),
    (1, 15, 15, 16, (3, 5), (2, 1), (0, 3), (1, 1)),
    (1, 15, 15, 33, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 7, 9, 17, (1, 1), (2, 2), (1, 1), (1, 1)),         # 1x1 with padding: border pixels are the bias
    (1, 15, 15, 17, (3, 3), (3, 3), (0, 0), (1, 1)),
    (1, 15, 15, 33, (3, 3), (3, 3), (2, 2), (1, 1)),       # padding > kernel // 2
    (1, 15, 15, 16, (3, 3), (4, 4), (1, 1), (1, 1)),       # stride larger than the kernel
    (3, 7, 9, 3, (3, 3), (1, 1), (3, 3), (1, 1)),          # padding 3 with a 3x3
    (1, 15, 15, 17, (3, 3), (1, 1), (2, 2), (2, 2)),       # dilation 2
    (1, 15, 15, 100, (5, 5), (2, 2), (0, 0), (2, 2)),
    (1, 15, 15, 33, (3, 3), (1, 2), (1, 0), (2, 1)),
    (1, 1, 1, 16, (3, 3), (1, 1), (1, 1), (1, 1)),         # 1x1 map: every tap but the centre is padding
    (3, 1, 1, 17, (5, 5), (2, 2), (2, 2), (1, 1)),
    (1, 2, 3, 33, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 2, 3, 3, (3, 3), (2, 2), (1, 0), (1, 1)),
    (3, 2, 3, 100, (7, 7), (1, 1), (3, 3), (1, 1)),
    (1, 15, 15, 100, (3, 3), (1, 1), (0, 0), (1, 1)),      # no padding: all interior
    (1, 40, 36, 48, (3, 3), (1, 1), (1, 1), (1, 1)),       # rows enough for one chunk per row
    # 16-channel blocks of a small padded image are copied into a zero-bordered buffer (PAD_BYTES): the
    # cases above; a larger one keeps its border pixels' tap tests
    (1, 48, 50, 32, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 7, 7, 64, (5, 5), (1, 1), (2, 2), (1, 1)),
]


@pytest.mark.parametrize("n,h,w,c,k,stride,padding,dilation", GEOMETRY)
def test_geometry(n, h, w, c, k, stride, padding, dilation):
    check(n, h, w, c, k, stride, padding, dilation, act="relu6")


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("c", [3, 17, 33])
def test_activation(act, c):
    check(2, 9, 7, c, (3, 3), (1, 1), (1, 1), act=act, scale=3.0)   # scale 3: both sides of every clamp


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c", [16, 33, 100])
def test_thread_counts(threads, c):
    """Work split by (image, 16-channel block) when those items balance over the threads, else by (image,
    output row) and channel chunks: both orders (and the channel tail of each) give torch's numbers."""
    with openmp.using(threads):
        check(1, 15, 13, c, (3, 3), (1, 1), (1, 1), act="relu6")
        check(1, 7, 7, c, (5, 5), (2, 2), (2, 2), act="relu6")      # few rows: channel chunks


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("c", [16, 33, 100])
def test_both_work_orders(monkeypatch, threads, c):
    """The work order is timed per shape and thread count (DepthwiseConv._order), with the loops' width on
    AVX-512 CPUs: each order and width it can pick gives torch's numbers, and with a register block (AVX-512,
    AVX2) both orders are candidates on more than one thread."""
    orders = DepthwiseConv._orders(1, c, threads)
    blocks = -(-c // depthwise.VB) if depthwise.VB and c >= depthwise.VB else 0     # a part block counts
    assert orders[0] == ("blocks" if blocks and (blocks % threads == 0 or blocks >= 8 * threads) else "rows")
    if blocks:
        assert sorted(orders) == ["blocks", "rows"]
    for order in orders:
        for wide in depthwise.WIDTHS:     # and each at each vector width (512 bits: on AVX-512 CPUs)
            name = order + (", 512-bit loops" if wide else "")
            monkeypatch.setattr(DepthwiseConv, "_order", lambda self, cands, nhw, t, o=name: o)
            with openmp.using(threads):
                dw, _, _ = check(1, 15, 13, c, (3, 3), (1, 1), (1, 1), act="silu")
                assert dw._plan(1, 15, 13, threads)[10] == (order == "blocks")
                assert dw.wide == wide and dw.fn is dw.fns[wide]
                check(2, 7, 7, c, (5, 5), (2, 2), (2, 2), act="relu6")


def test_work_order_timed_and_reported():
    """The order is chosen at compile time and the report's schedule line says which and on what times."""
    import kfuse
    m = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.ReLU6()).eval()
    with openmp.using(2):
        cm = kfuse.compile(m, (torch.randn(1, 32, 20, 20),))
    x = torch.randn(1, 32, 20, 20)
    assert_close(cm(x), m(x), atol=1e-5, rtol=1e-5)
    k = [k for k in cm.report().kernels if k.backend == "c:depthwise"]
    if depthwise.VB and k:
        assert re.search(r"work order (blocks|rows)(, 512-bit loops)? \(measured", k[0].schedule), k[0].schedule


@pytest.mark.parametrize("act", ["none", "relu6"])
def test_no_bias(act):
    check(1, 15, 15, 33, (5, 5), (2, 2), (2, 2), act=act, bias=False)


def test_empty_batch():
    dw = DepthwiseConv(torch.randn(17, 1, 3, 3), torch.randn(17), (1, 1), (1, 1), (1, 1), None)
    assert dw(torch.randn(0, 7, 9, 17)).shape == (0, 7, 9, 17)


@pytest.mark.parametrize("act", list(ACTS))
def test_nan_inf_propagate(act):
    """NaN, +Inf and -Inf at chosen input pixels (interior and border) reach the outputs they feed as in
    torch: NaN, +-Inf and their positions equal (an Inf meeting weights of both signs in one sum is NaN)."""
    c = 33
    x = torch.randn(2, 9, 11, c)
    x[0, 0, 0, :5] = float("nan")
    x[0, 4, 5, 5:20] = float("inf")
    x[1, 8, 10, 3:30] = float("-inf")
    x[1, 3, 0, :] = float("nan")
    w = torch.randn(c, 1, 3, 3).abs() + 0.1          # positive weights, so an Inf stays an Inf
    b = torch.randn(c)
    dw = DepthwiseConv(w, b, (1, 1), (1, 1), (1, 1), ACTS[act][0])
    got, want = dw(x), reference(x, w, b, (1, 1), (1, 1), (1, 1), act)
    assert torch.isnan(want).any()
    assert_close(got, want, **TOL)
    w[::2] = -w[::2]                                  # mixed signs too
    dw = DepthwiseConv(w, b, (2, 2), (1, 1), (1, 1), ACTS[act][0])
    assert_close(dw(x), reference(x, w, b, (2, 2), (1, 1), (1, 1), act), **TOL)


@pytest.mark.parametrize("c", [16, 17])
def test_out_poisoned(c):
    dw, x, want = check(3, 7, 9, c, (5, 5), (2, 2), (2, 2), act="hardswish")
    out = torch.full(dw.out_shape(*x.shape[:3]), float("nan"))
    got = dw(x, out=out)
    assert got is out
    assert_close(out, want, **TOL)


def test_kernel_larger_than_padded_input():
    """torch raises when the kernel does not fit the padded input, and so does the kernel"""
    dw = DepthwiseConv(torch.randn(3, 1, 3, 3), None, (1, 1), (0, 0), (1, 1), None)
    with pytest.raises(ValueError):
        dw(torch.randn(1, 2, 5, 3))


def test_out_wrong_shape():
    dw = DepthwiseConv(torch.randn(16, 1, 3, 3), None, (1, 1), (1, 1), (1, 1), None)
    with pytest.raises(ValueError):
        dw(torch.randn(1, 5, 5, 16), out=torch.empty(1, 4, 5, 16))


def test_non_contiguous_input():
    c = 33
    x_nchw = torch.randn(2, c, 11, 13)
    x = x_nchw.permute(0, 2, 3, 1)                   # NHWC view of NCHW memory: not contiguous
    assert not x.is_contiguous()
    w, b = torch.randn(c, 1, 3, 3), torch.randn(c)
    dw = DepthwiseConv(w, b, (2, 2), (1, 1), (1, 1), ("relu", (), ""))
    assert_close(dw(x), reference(x, w, b, (2, 2), (1, 1), (1, 1), "relu"), **TOL)


@pytest.mark.parametrize("act", ["none", "relu6", "gelu"])
def test_generic_path(act):
    """The source without its register-block row kernel (what a machine without AVX-512 or AVX2 builds):
    every channel takes the per-pixel `omp simd` path."""
    dw, x, want = check(3, 7, 9, 33, (5, 5), (2, 2), (2, 2), act=act)
    dw.fn = depthwise._fn(5, 5, (2, 2), (1, 1), dw.act_code, generic=True)
    assert_close(dw(x), want, **TOL)


def test_supported():
    assert supported((32, 1, 3, 3), 32, 32)
    assert supported((7, 1, 3, 5), 7, 7)
    assert supported((8, 1, 11, 11), 8, 8)
    assert not supported((64, 1, 3, 3), 32, 32)      # channel multiplier 2
    assert not supported((32, 2, 3, 3), 16, 32)      # two input channels per group
    assert not supported((32, 1, 3, 3), 1, 32)       # a dense convolution
    assert not supported((32, 1, 12, 3), 32, 32)     # kernel over 11
    assert not supported((32, 1, 3, 3), 32, 16)
    with pytest.raises(NotImplementedError):
        DepthwiseConv(torch.randn(32, 2, 3, 3), None, (1, 1), (1, 1), (1, 1), None)


def test_unknown_activation():
    with pytest.raises(NotImplementedError):
        DepthwiseConv(torch.randn(16, 1, 3, 3), None, (1, 1), (1, 1), (1, 1), ("elu", (1.0,), ""))
