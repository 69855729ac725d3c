"""The NHWC max- and average-pool C kernels (kfuse/backends/c/pool.py) against F.max_pool2d (and, at the
end, F.avg_pool2d, whose sums and division ours repeat): a max is exact, so the
outputs must be equal, over kernels 1x1 to 5x5 (and 1x5), strides 1 to 3, padding 0 to half the kernel,
dilation 1 and 2, ceil_mode on and off, odd spatial sizes, channels 1 to 33 (a partial vector), batch 0
to 2; NaN and +-Inf where torch puts them; an `out` poisoned with NaN; non-contiguous x; 1-3 threads and
four calling threads; errors named. ResNet-50's stem pool on this kernel: tests/fusion/test_conv.py."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import in_threads

from kfuse.backends import openmp
from kfuse.backends.c.pool import AvgPoolNHWC, MaxPoolNHWC

# (kernel, stride, padding, dilation, ceil_mode)
CONFIGS = [((1, 1), (1, 1), (0, 0), (1, 1), False), ((2, 2), (2, 2), (0, 0), (1, 1), False),
           ((3, 3), (2, 2), (1, 1), (1, 1), False), ((3, 3), (2, 2), (1, 1), (1, 1), True),
           ((3, 3), (1, 1), (1, 1), (2, 2), False), ((2, 3), (3, 1), (1, 0), (1, 2), True),
           ((5, 5), (3, 3), (2, 2), (1, 1), True), ((1, 5), (1, 2), (0, 2), (1, 1), False),
           ((4, 4), (1, 3), (2, 1), (2, 1), True), ((3, 3), (3, 3), (0, 0), (1, 1), True)]
SHAPES = [(1, 1, 1, 1), (2, 7, 9, 16), (1, 12, 11, 17), (2, 5, 13, 33), (1, 8, 8, 3)]


def want(x, kernel, stride, padding, dilation, ceil_mode):
    """torch on the NCHW view of NHWC x, back to NHWC"""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel, stride, padding, dilation, ceil_mode).permute(0, 2, 3, 1)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_torch(cfg, shape):
    x = torch.randn(shape)
    try:
        ref = want(x, *cfg)
    except RuntimeError:                       # the window does not fit: we must refuse too
        with pytest.raises(ValueError, match="does not fit"):
            MaxPoolNHWC(*cfg)(x)
        return
    out = torch.full(ref.shape, float("nan"))   # poisoned: every element must be written
    got = MaxPoolNHWC(*cfg)(x, out=out)
    assert got is out and torch.equal(got, ref)


def test_nan_and_inf_reach_the_windows_that_hold_them():
    x = torch.randn(2, 9, 10, 19)
    x[0, 0, 0, :3] = float("nan")          # a corner: a window with padding
    x[0, 4, 5, 7] = float("nan")           # interior
    x[1, 2, 3, :] = float("inf")
    x[1, 6, 6, 4] = float("-inf")
    x[1, 8, 9, 18] = float("nan")          # the last element
    for cfg in CONFIGS[2:5]:
        ref = want(x, *cfg)
        got = MaxPoolNHWC(*cfg)(x)
        assert torch.equal(got.isnan(), ref.isnan()) and ref.isnan().any()
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
    allneg = torch.full((1, 4, 4, 5), float("-inf"))
    assert torch.equal(MaxPoolNHWC(3, 2, 1)(allneg), want(allneg, (3, 3), (2, 2), (1, 1), (1, 1), False))


def test_empty_batch_and_non_contiguous_input():
    assert MaxPoolNHWC(3, 2, 1)(torch.randn(0, 9, 9, 8)).shape == (0, 5, 5, 8)
    nchw = torch.randn(2, 17, 11, 13)
    x = nchw.permute(0, 2, 3, 1)           # NHWC view of NCHW memory
    assert torch.equal(MaxPoolNHWC(3, 2, 1, 1, True)(x), want(x, (3, 3), (2, 2), (1, 1), (1, 1), True))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads):
    x = torch.randn(1, 3, 7, 21)           # fewer (image, row) items than threads at stride 2
    with openmp.using(threads):
        assert torch.equal(MaxPoolNHWC(3, 2, 1)(x), want(x, (3, 3), (2, 2), (1, 1), (1, 1), False))


def test_four_threads_at_once_with_two_shapes():
    pool = MaxPoolNHWC(3, 2, 1)
    xs = [torch.randn(2, 15, 15, 24), torch.randn(1, 30, 22, 40)]
    refs = [want(x, (3, 3), (2, 2), (1, 1), (1, 1), False) for x in xs]

    def work(i):
        for _ in range(30):
            assert torch.equal(pool(xs[i % 2]), refs[i % 2])
    in_threads(4, work)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="more than half the kernel"):
        MaxPoolNHWC(3, 1, 2)
    with pytest.raises(ValueError, match="kernel"):
        MaxPoolNHWC(0, 1, 0)
    pool = MaxPoolNHWC(3, 2, 1)
    with pytest.raises(ValueError, match=r"float32 \[N, H, W, C\]"):
        pool(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="float32"):
        pool(torch.randn(1, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out must be contiguous float32 \(1, 2, 2, 4\)"):
        pool(torch.randn(1, 4, 4, 4), out=torch.empty(1, 2, 2, 5))
    with pytest.raises(ValueError, match="does not fit"):
        MaxPoolNHWC(5, 1, 0)(torch.randn(1, 3, 3, 2))
    for k, s, p, d, c in itertools.islice(CONFIGS, 1):
        assert MaxPoolNHWC(k, s, p, d, c).out_shape(1, 4, 4, 3) == (1, 4, 4, 3)


def want_avg(x, kernel, stride, padding, ceil_mode, count_include_pad):
    return F.avg_pool2d(x.permute(0, 3, 1, 2), kernel, stride, padding, ceil_mode, count_include_pad).permute(0, 2, 3, 1)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[3] == (1, 1)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("include_pad", [True, False])
def test_average_equals_torch(cfg, shape, include_pad):
    """torch's sums in torch's order, divided as torch divides: the same bits, padded windows counted with
    their padding or without, ceil_mode windows cut at the input's edge"""
    kernel, stride, padding, _, ceil_mode = cfg
    x = torch.randn(shape)
    try:
        ref = want_avg(x, kernel, stride, padding, ceil_mode, include_pad)
    except RuntimeError:
        with pytest.raises(ValueError, match="does not fit"):
            AvgPoolNHWC(kernel, stride, padding, ceil_mode, include_pad)(x)
        return
    out = torch.full(ref.shape, float("nan"))
    got = AvgPoolNHWC(kernel, stride, padding, ceil_mode, include_pad)(x, out=out)
    assert got is out and torch.equal(got, ref)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_average_non_finite_threads_and_errors(threads):
    x = torch.randn(2, 9, 10, 19)
    x[0, 0, 0, :3], x[1, 2, 3, :], x[1, 8, 9, 18] = float("nan"), float("inf"), float("-inf")
    with openmp.using(threads):
        got = AvgPoolNHWC(3, 2, 1)(x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1))   # NHWC view
    ref = want_avg(x, 3, 2, 1, False, True)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
    assert AvgPoolNHWC(2)(torch.randn(0, 4, 4, 3)).shape == (0, 2, 2, 3)
    with pytest.raises(ValueError, match="more than half the kernel"):
        AvgPoolNHWC(3, 1, 2)
    with pytest.raises(ValueError, match=r"avg_pool2d: out must be contiguous float32 \(1, 2, 2, 4\)"):
        AvgPoolNHWC(2)(torch.randn(1, 4, 4, 4), out=torch.empty(1, 2, 2, 5))


def test_average_pools_run_natively_in_a_program():
    """DenseNet's transition (BN, ReLU, 1x1, avg 2x2/2) and Inception's branch pool (avg 3x3/1, padding 1)
    on the NHWC kernel inside the native runner; the outputs eager's"""
    import kfuse

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
            self.proj = torch.nn.Conv2d(16, 8, 1)

        def forward(self, x):
            y = F.avg_pool2d(self.proj(torch.relu(self.bn(self.conv(x)))), 2)
            return self.proj(F.avg_pool2d(torch.relu(self.conv(x)), 3, 1, 1, count_include_pad=False)).sum((2, 3)) + y.sum((2, 3))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 14, 14)
    cm = kfuse.compile(model, (x,))
    for _ in range(3):
        got = cm(x)
    assert [k.backend for k in cm.report().kernels if k.name == "avg_pool2d"] == ["c:avg_pool2d"] * 2
    assert cm.report().launch.endswith("0 from Python between them"), cm.report().launch
    torch.testing.assert_close(got, model(x).detach(), atol=1e-5, rtol=1e-4)
