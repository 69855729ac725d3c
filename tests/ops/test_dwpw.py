"""The fused depthwise -> 1x1 and 1x1 -> depthwise convolution kernels (kfuse/backends/c/dwpw.py): bit for
bit the two kernels each fuses (depthwise.DepthwiseConv and gemm.GemmConv; the same row and tile
functions, the same sums in the same order), which tests/ops/test_depthwise.py and test_gemm.py check
against torch; and against torch here too. Channels off the 16-float vector, kernels 1x1 to 7x7, strides
1 to 3, dilation 2, padding smaller and larger than the kernel's half, maps of one row to many row
blocks (the 1x1 -> depthwise kernel's sliding row buffer moving many times), batches 0 to 3, residual or
not, NaN inputs, thread counts 1-3, the source without AVX-512."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CONV_ACTS as ACTS
from helpers import assert_close
from helpers import in_threads
from helpers import recorded_flags

from kfuse.backends import openmp
from kfuse.backends.c.depthwise import DepthwiseConv
from kfuse.backends.c.dwpw import BUFFER_FLOATS, DepthwisePointwise, PointwiseDepthwise
from kfuse.backends.c.gemm import GemmConv


def make(c, cout, k, stride, act1, act2, residual, generic=False):
    wd, bd = torch.randn(c, 1, k, k), torch.randn(c)
    wp, bp = torch.randn(cout, c, 1, 1) / c ** 0.5, torch.randn(cout)
    dw = DepthwiseConv(wd, bd, stride, k // 2, 1, ACTS[act1][0])
    pw = GemmConv(wp, bp, ACTS[act2][0], residual)
    return dw, pw, DepthwisePointwise(dw, pw, generic=generic), (wd, bd, wp, bp)


def check(n, h, w, c, cout, k=3, stride=1, act1="relu6", act2="none", residual=False, generic=False):
    dw, pw, fused, (wd, bd, wp, bp) = make(c, cout, k, stride, act1, act2, residual, generic)
    x = torch.randn(n, h, w, c)
    y = dw(x)
    r = torch.randn(*y.shape[:3], cout) if residual else None
    got = fused(x, r)
    assert got.shape == (*y.shape[:3], cout)
    assert torch.equal(got, pw(y, r))                 # the two kernels, bit for bit
    t = ACTS[act1][1](F.conv2d(x.permute(0, 3, 1, 2).double(), wd.double(), bd.double(), stride, k // 2, 1, c))
    t = F.conv2d(t, wp.double(), bp.double()).permute(0, 2, 3, 1)
    want = ACTS[act2][1](t + r.double() if residual else t).float()
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    return fused, x, r


SHAPES = [  # n, h, w, c, cout, k, stride
    (1, 14, 14, 32, 16, 3, 1), (1, 15, 13, 33, 17, 3, 2), (2, 9, 11, 17, 40, 5, 1), (1, 1, 1, 16, 8, 3, 1),
    (3, 7, 7, 48, 72, 7, 1), (1, 64, 40, 24, 24, 3, 1),      # many row blocks
]


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n,h,w,c,cout,k,stride", SHAPES)
def test_matches_the_two_kernels_and_torch(n, h, w, c, cout, k, stride, residual, generic):
    check(n, h, w, c, cout, k, stride, residual=residual, generic=generic)


@pytest.mark.parametrize("act1,act2", [("hardswish", "none"), ("silu", "relu"), ("relu", "gelu")])
def test_activations(act1, act2):
    check(1, 9, 9, 24, 20, act1=act1, act2=act2, residual=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads):
    with openmp.using(threads):
        check(2, 17, 9, 40, 24, residual=True)
        check(1, 7, 7, 96, 32, stride=2)


@pytest.mark.parametrize("n,hw,c,threads", [(1, 14, 384, 2), (1, 7, 960, 2), (3, 14, 240, 2), (1, 28, 144, 3)])
def test_depthwise_pointwise_bands_split_evenly(n, hw, c, threads):
    """kf_dwpw's work items are bands of the depthwise output's rows a row apart in size (dwpw.c), as many as
    make the items a multiple of the threads where the rows allow: 14 rows had been 5 bands of 3 and 2,
    3 to one thread, 2 to the other."""
    fused = make(c, 24, 3, 1, "relu6", "none", False)[2]
    d = fused._plan(n, hw, hw, threads)
    nrb = d[9]
    sizes = [(i + 1) * hw // nrb - i * hw // nrb for i in range(nrb)]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and max(sizes) * hw * c <= BUFFER_FLOATS, sizes
    assert (n * nrb) % threads == 0 or nrb == hw, nrb
    with openmp.using(threads):
        check(n, hw, hw, c, 24)


def test_nan_propagates():
    dw, pw, fused, _ = make(16, 8, 3, 1, "relu6", "none", False)
    x = torch.randn(1, 6, 6, 16)
    x[0, 2, 3, 5] = float("nan")
    got = fused(x)
    assert torch.equal(got.isnan(), pw(dw(x)).isnan()) and got.isnan().any()


def test_empty_batch_and_errors():
    dw, pw, fused, _ = make(16, 8, 3, 1, "relu6", "none", False)
    assert fused(torch.randn(0, 5, 5, 16)).shape == (0, 5, 5, 8)
    with pytest.raises(ValueError, match="want float32"):
        fused(torch.randn(1, 5, 5, 15))
    with pytest.raises(ValueError, match="without a residual"):
        fused(torch.randn(1, 5, 5, 16), torch.randn(1, 5, 5, 8))
    with pytest.raises(NotImplementedError, match="1x1"):
        DepthwisePointwise(dw, GemmConv(torch.randn(8, 16, 3, 3), None, None, False))


def concurrent_mismatches(call, xs) -> list:
    """(thread, call) pairs where `call` from four threads at once on the inputs xs did not give its serial
    answer"""
    want = [call(x) for x in xs]
    bad = []

    def worker(t):
        for c in range(40):
            if not torch.equal(call(xs[(t + c) % len(xs)]), want[(t + c) % len(xs)]):
                bad.append((t, c))
    in_threads(4, worker)
    return bad


def test_concurrent_calls_have_their_own_row_buffers():
    """One kernel called from four threads at once on four inputs of one shape: each call's answer is the
    serial one (the per-thread row buffers once lived in a cache shared by every call of that shape)."""
    _, _, fused, _ = make(48, 24, 3, 1, "relu6", "none", False)
    assert not concurrent_mismatches(fused, [torch.randn(1, 20, 20, 48) for _ in range(4)])


def test_bound_calls_equal_checked_calls():
    """kernel.bound(shape), the call a compiled program makes (checks done once): the same bits as the
    checked call into the same `out`; another shape, a strided input or no `out` take the checked path."""
    dw, pw, fused, _ = make(24, 40, 3, 2, "relu6", "none", True)
    x = torch.randn(2, 9, 7, 24)
    y = dw(x)
    r = torch.randn(*y.shape[:3], 40)
    cases = [(dw, x, ()), (pw, y, (r,)), (fused, x, (r,))]
    for k, inp, rest in cases:
        call = k.bound(tuple(inp.shape))
        want = k(inp, *rest)
        out = torch.full_like(want, float("nan"))
        assert call(inp, *rest, out=out) is out and torch.equal(out, want)
        assert torch.equal(call(inp, *rest), want)                                   # no out: allocates
        strided = inp.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        assert torch.equal(call(strided, *rest, out=torch.empty_like(want)), want)
        other = inp[:1]
        rest1 = tuple(t[:1] for t in rest)
        assert torch.equal(call(other, *rest1, out=torch.empty_like(want[:1])), k(other, *rest1))


# 1x1 -> depthwise (an inverted residual block's expand convolution, then its depthwise one)

def make_pwdw(cin, c, k, stride, padding, dilation, act1, act2, generic=False):
    wp, bp = torch.randn(c, cin, 1, 1) / cin ** 0.5, torch.randn(c)
    wd, bd = torch.randn(c, 1, k, k), torch.randn(c)
    pw = GemmConv(wp, bp, ACTS[act1][0], False)
    dw = DepthwiseConv(wd, bd, stride, padding, dilation, ACTS[act2][0])
    return pw, dw, PointwiseDepthwise(pw, dw, generic=generic), (wp, bp, wd, bd)


def check_pwdw(n, h, w, cin, c, k=3, stride=1, padding=None, dilation=1, act1="relu6", act2="relu6",
               generic=False):
    padding = k // 2 if padding is None else padding
    pw, dw, fused, (wp, bp, wd, bd) = make_pwdw(cin, c, k, stride, padding, dilation, act1, act2, generic)
    x = torch.randn(n, h, w, cin)
    want_two = dw(pw(x))
    got = torch.full_like(want_two, float("nan"))
    assert fused(x, out=got) is got
    assert torch.equal(got, want_two)                  # the two kernels, bit for bit
    t = ACTS[act1][1](F.conv2d(x.permute(0, 3, 1, 2).double(), wp.double(), bp.double()))
    t = F.conv2d(t, wd.double(), bd.double(), stride, padding, dilation, c)
    assert_close(got, ACTS[act2][1](t).permute(0, 2, 3, 1).float(), atol=1e-5, rtol=1e-5)
    return fused, x


PWDW_SHAPES = [  # n, h, w, cin, c, k, stride, padding, dilation
    (1, 14, 14, 16, 96, 3, 1, 1, 1), (1, 15, 13, 5, 37, 3, 2, 1, 1), (2, 9, 11, 24, 40, 5, 1, 2, 1),
    (1, 1, 1, 16, 8, 3, 1, 1, 1), (3, 7, 7, 8, 48, 7, 1, 3, 1), (1, 8, 6, 3, 20, 3, 2, 0, 2),
    (1, 17, 19, 8, 33, 3, 3, 4, 1), (2, 6, 5, 2, 16, 1, 1, 0, 1), (1, 9, 9, 8, 24, 3, 1, 2, 2),
    (1, 90, 40, 16, 96, 3, 1, 1, 1), (2, 71, 33, 8, 144, 5, 2, 2, 1),      # the row buffer slides many times
    (1, 5, 5, 12, 100, 3, 1, 1, 1), (1, 3, 4, 7, 70, 5, 2, 2, 1),          # channel chunks (few rows)
]


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("n,h,w,cin,c,k,stride,padding,dilation", PWDW_SHAPES)
def test_pointwise_depthwise_matches_the_two_kernels_and_torch(n, h, w, cin, c, k, stride, padding, dilation,
                                                               generic):
    check_pwdw(n, h, w, cin, c, k, stride, padding, dilation, generic=generic)


@pytest.mark.parametrize("act1,act2", [("silu", "silu"), ("hardswish", "none"), ("none", "relu"), ("gelu", "sigmoid")])
def test_pointwise_depthwise_activations(act1, act2):
    check_pwdw(1, 11, 10, 12, 40, act1=act1, act2=act2)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pointwise_depthwise_thread_counts(threads):
    """each thread's first rows of the expanded map are its own (computed again where two threads' rows meet)"""
    with openmp.using(threads):
        check_pwdw(2, 17, 9, 24, 40)
        check_pwdw(1, 7, 7, 32, 96, stride=2)
        check_pwdw(1, 5, 4, 8, 16)         # fewer rows than threads have items


def test_pointwise_depthwise_nan_empty_and_errors():
    pw, dw, fused, _ = make_pwdw(16, 32, 3, 1, 1, 1, "relu6", "none")
    x = torch.randn(1, 6, 6, 16)
    x[0, 2, 3, 5] = float("nan")
    got = fused(x)
    assert torch.equal(got.isnan(), dw(pw(x)).isnan()) and got.isnan().any()
    assert fused(torch.randn(0, 5, 5, 16)).shape == (0, 5, 5, 32)
    with pytest.raises(ValueError, match="want float32"):
        fused(torch.randn(1, 5, 5, 15))
    with pytest.raises(ValueError, match="want contiguous float32"):
        fused(torch.randn(1, 5, 5, 16), out=torch.empty(1, 5, 5, 31))
    with pytest.raises(NotImplementedError, match="1x1"):
        PointwiseDepthwise(GemmConv(torch.randn(32, 16, 3, 3), None, None, False), dw)
    with pytest.raises(NotImplementedError, match="1x1"):
        PointwiseDepthwise(GemmConv(torch.randn(32, 16, 1, 1), None, None, True), dw)     # a residual


def test_pointwise_depthwise_bound_and_concurrent_calls():
    """the bound call (checks done once) gives the checked call's bits; four threads calling one kernel at
    once each get the serial answer (each call has its own row buffers)"""
    _, _, fused, _ = make_pwdw(24, 48, 3, 1, 1, 1, "relu6", "relu6")
    xs = [torch.randn(1, 20, 20, 24) for _ in range(4)]
    call = fused.bound(tuple(xs[0].shape))
    out = torch.full((1, 20, 20, 48), float("nan"))
    assert call(xs[0], out=out) is out and torch.equal(out, fused(xs[0]))
    assert torch.equal(call(xs[1][:, :, :19].contiguous(), out=torch.empty(1, 20, 19, 48)), fused(xs[1][:, :, :19]))
    assert not concurrent_mismatches(lambda x: call(x, out=torch.empty(1, 20, 20, 48)), xs)


@pytest.mark.parametrize("threads", [1, 2])
def test_expand_reads_a_channel_slice_in_place(threads):
    """the pointwise + depthwise pair on a channel slice of a wider NHWC map (ShuffleNet's chunk) reads its
    pixels where they are, the call recorded for the native runner, the same bits as on a contiguous copy;
    a broadcast input (pixels overlapping) is copied first"""
    from kfuse.backends.c import dwpw
    pw = GemmConv(torch.randn(40, 24, 1, 1) / 5, torch.randn(40), ("relu", (), ""), False)
    dw = DepthwiseConv(torch.randn(40, 1, 3, 3), torch.randn(40), 2, 1, 1, ("relu", (), ""))
    pair = PointwiseDepthwise(pw, dw)
    wide = torch.randn(2, 11, 9, 48)
    with recorded_flags(dwpw) as recorded, openmp.using(threads):
        for x in (wide[..., 24:], wide[..., 3:27], torch.randn(1, 1, 1, 24).expand(2, 11, 9, 24)):
            assert torch.equal(pair(x), pair(x.contiguous()))
    assert recorded == [True, True, True, True, False, True]
