"""The reduction over a block of middle axes (kfuse/backends/c/reduce_mid.py) against torch: sum, mean,
max and min over consecutive axes before the last (an NHWC global average pool, a mean over the batch),
inner sizes around the 64-value block, keepdim or not, NaN and +-Inf inputs, an empty reduced axis, a
poisoned `out`, thread counts 1-3 bit for bit, a non-contiguous input; and in a compiled model, the
global average pool of a channels-last CNN runs as this kernel, not on torch."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import kfuse
from kfuse.backends import openmp
from kfuse.backends.c.reduce_mid import ReduceMiddle, middle_block

TORCH = {"reduce_sum": torch.sum, "reduce_mean": torch.mean, "reduce_max": torch.amax, "reduce_min": torch.amin}
CASES = [((2, 7, 7, 1280), (1, 2)), ((1, 3, 5, 17), (1, 2)), ((3, 4, 64), (1,)), ((5, 65), (0,)),
         ((2, 3, 4, 5, 63), (1, 2, 3)), ((1, 1, 1, 1), (1, 2)), ((4, 300, 129), (0, 1))]


def want(op, x, axes, keepdim):
    return TORCH[op](x.double(), dim=axes, keepdim=keepdim).float()


@pytest.mark.parametrize("op", sorted(TORCH))
@pytest.mark.parametrize("shape,axes", CASES)
@pytest.mark.parametrize("keepdim", [False, True])
def test_against_torch(op, shape, axes, keepdim):
    x = torch.randn(shape) * 3
    k = ReduceMiddle(op, axes, keepdim)
    out = torch.full(k.out_shape(shape), float("nan"))        # poisoned: every value must be written
    got = k(x, out=out)
    assert got is out
    assert_close(got, want(op, x, axes, keepdim), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", sorted(TORCH))
def test_nan_and_inf(op):
    x = torch.randn(2, 5, 6, 70)
    x[0, 1, 2, 3] = float("nan")
    x[1, 4, 0, 69] = float("inf")
    x[1, 0, 0, 10] = -float("inf")
    got = ReduceMiddle(op, (1, 2), False)(x)
    ref = TORCH[op](x, dim=(1, 2))
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()
    assert torch.equal(got.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert_close(got[fin], ref[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_bit_for_bit(threads):
    x = torch.randn(3, 40, 40, 200)       # above the one-thread threshold
    k = ReduceMiddle("reduce_mean", (1, 2), False)
    base = k(x)
    with openmp.using(threads):
        assert torch.equal(k(x), base)


def test_empty_axes_and_errors():
    k = ReduceMiddle("reduce_mean", (1,), False)
    assert k(torch.randn(0, 4, 8)).shape == (0, 8)
    assert torch.isnan(k(torch.randn(2, 0, 8))).all()              # the mean of nothing, as torch
    assert torch.equal(ReduceMiddle("reduce_sum", (1,), False)(torch.randn(2, 0, 8)), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="none of them"):
        ReduceMiddle("reduce_max", (1,), False)(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="before the last"):
        ReduceMiddle("reduce_mean", (2,), False)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="want float32"):
        k(torch.randn(2, 3, 4).double())
    with pytest.raises(ValueError, match="want contiguous float32"):
        k(torch.randn(2, 3, 4), out=torch.empty(2, 5))
    with pytest.raises(NotImplementedError, match="reduce_prod"):
        ReduceMiddle("reduce_prod", (1,), False)
    assert middle_block((2, 3, 4), (2,)) is None and middle_block((2, 3, 4), (0, 2)) is None
    assert middle_block((2, 3, 4), (-2,)) == (2, 3, 4)


def test_non_contiguous_input():
    x = torch.randn(2, 9, 9, 48).permute(0, 2, 1, 3)
    assert_close(ReduceMiddle("reduce_mean", (1, 2), True)(x), x.mean((1, 2), keepdim=True), atol=1e-6, rtol=1e-5)


def test_cnn_global_average_pool_runs_in_c():
    """conv -> ReLU -> mean over H, W -> linear: channels-last, the pool is the C kernel, not torch."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 40, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(40, 10)).eval()
    x = torch.randn(2, 3, 13, 11)
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)
    backends = [k.backend for k in cm.report().kernels]
    assert "c:reduce_mid" in backends and "torch" not in backends, backends
