"""The NHWC GroupNorm(+SiLU) C kernel (kfuse/backends/c/group_norm.py) against F.group_norm in float64:
every (C, G) of C in {4, 32, 64, 96, 192}, G in {1, 2, 32, C} over four spatial sizes, batch 0/1/3, with
and without weight and bias, SiLU on and off; a large common offset (the variance must not cancel);
NaN/Inf confined to their own (n, group); an `out` poisoned with NaN; in-place use; non-contiguous x;
1, 2 and 3 threads.

Tolerance: |y - ref| <= 1e-5 |ref| + 1e-5 (y is normalised, so the absolute term is 1e-5 of its scale);
1e-4 of both for the offset inputs.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from kfuse.backends import openmp
from kfuse.backends.c.group_norm import GroupNormNHWC

EPS = 1e-5
CG = [(c, g) for c in (4, 32, 64, 96, 192) for g in sorted({1, 2, 32, c}) if c % g == 0]
SPATIAL = [(1, 1), (3, 5), (8, 8), (17, 9)]


def params(c, affine):
    return (torch.randn(c) * 0.5 + 1, torch.randn(c)) if affine else (None, None)


def two_pass(x, g, w, b, eps=EPS):
    """Group norm of NCHW float64 x by the two-pass formula (mean, then the mean squared deviation)."""
    n = x.shape[0]
    var, mean = torch.var_mean(x.reshape(n, g, -1), dim=2, unbiased=False, keepdim=True)
    y = ((x.reshape(n, g, -1) - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return y * (1 if w is None else w[:, None, None]) + (0 if b is None else b[:, None, None])


def reference(x, g, w, b, silu, eps=EPS, exact=False):
    """F.group_norm(+silu) in float64, or the two-pass formula: where a group holds one value (N = 1, 1x1,
    G = C: F.group_norm raises "Expected more than 1 value per channel", the kernel gives y = b), and with
    exact=True: F.group_norm's own float64 statistics cancel (E[x^2] - E[x]^2, by the size of the error) for
    x * 0.01 + 1000, off by 1.4e-4 in y where the kernel is off by 5e-7."""
    d = lambda t: None if t is None else t.double()
    xl = x.double().permute(0, 3, 1, 2)
    if exact or x.numel() // g == 1:
        y = two_pass(xl, g, d(w), d(b), eps)
    else:
        y = F.group_norm(xl, g, d(w), d(b), eps)
    return (F.silu(y) if silu else y).permute(0, 2, 3, 1)


def check(y, ref, tol=1e-5):
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    y = y.double()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan), "NaN positions differ"
    err = (y - ref).abs()
    bad = ~(err <= tol * ref.abs() + tol) & (y != ref) & ~nan         # y != ref: the same inf
    if bad.any():
        raise AssertionError(f"{int(bad.sum())} elements out of tolerance, worst error {err[bad].max().item():.3g}; "
                             f"got {y[bad][:4].tolist()} want {ref[bad][:4].tolist()}")


@pytest.mark.parametrize("hw", SPATIAL)
@pytest.mark.parametrize("c,g", CG)
def test_shapes(c, g, hw):
    for n, affine, silu in itertools.product((0, 1, 3), (True, False), (True, False)):
        x = torch.randn(n, *hw, c) * 2 + 0.3
        w, b = params(c, affine)
        y = GroupNormNHWC(g, c, w, b, EPS, silu)(x)
        check(y, reference(x, g, w, b, silu))


@pytest.mark.parametrize("scale", [1.0, 0.01])
@pytest.mark.parametrize("c,g,hw", [(64, 32, (8, 8)), (96, 2, (17, 9)), (192, 1, (3, 5)), (4, 4, (1, 1))])
def test_large_offset(c, g, hw, scale):
    """x + 1000 (std 1, and std 0.01: 1e5 standard deviations of offset): float32 sum-of-squares would
    lose everything (torch's float32 group_norm is off by 1 and 16 in y); the result must match the exact
    float64 statistics of the same float32 input."""
    x = torch.randn(3, *hw, c) * scale + 1000
    w, b = params(c, True)
    for silu in (True, False):
        check(GroupNormNHWC(g, c, w, b, EPS, silu)(x), reference(x, g, w, b, silu, exact=True), tol=1e-4)


@pytest.mark.parametrize("silu", [True, False])
def test_nan_inf_stay_in_their_group(silu):
    n, c, g = 4, 64, 4                                                 # 16 channels a group
    x = torch.randn(n, 5, 6, c)
    x[0, 1, 2, 3] = float("nan")                                       # (0, 0)
    x[1, 0, 0, 20] = float("inf")                                      # (1, 1): in the shift row K
    x[2, 4, 5, 40], x[2, 3, 1, 41] = float("inf"), float("-inf")       # (2, 2)
    x[3, 2, 2, 63] = float("-inf")                                     # (3, 3)
    w, b = params(c, True)
    y = GroupNormNHWC(g, c, w, b, EPS, silu)(x)
    ref = reference(x, g, w, b, silu)
    check(y, ref)
    hit = torch.isnan(y).reshape(n, -1, g, c // g).all(dim=(1, 3))
    assert torch.equal(hit, torch.eye(4, dtype=torch.bool))            # exactly the affected (n, group)s
    assert torch.isfinite(y.reshape(n, -1, g, c // g)[~hit.unsqueeze(1).expand(n, 30, g)]).all()


@pytest.mark.parametrize("silu", [True, False])
def test_out_poisoned_with_nan_is_overwritten(silu):
    x = torch.randn(3, 17, 9, 96)
    w, b = params(96, True)
    out = torch.full_like(x, float("nan"))
    y = GroupNormNHWC(32, 96, w, b, EPS, silu)(x, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    check(out, reference(x, 32, w, b, silu))


def test_in_place():
    x = torch.randn(2, 8, 8, 64)
    w, b = params(64, True)
    ref = reference(x, 32, w, b, True)
    y = GroupNormNHWC(32, 64, w, b, EPS, True)(x, out=x)
    assert y.data_ptr() == x.data_ptr()
    check(y, ref)


@pytest.mark.parametrize("c,g", [(4, 2), (96, 32)])
def test_non_contiguous_x(c, g):
    x = torch.randn(3, c, 7, 5).permute(0, 2, 3, 1)                    # NHWC view of an NCHW tensor
    assert not x.is_contiguous()
    w, b = params(c, True)
    check(GroupNormNHWC(g, c, w, b, EPS, True)(x), reference(x, g, w, b, True))


@pytest.mark.parametrize("shape,g", [((2, 5, 3, 96), 32), ((1, 3, 5, 64), 1), ((3, 1, 1, 32), 2)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads, shape, g):
    """Row ranges that cut an image, fewer (n, group) pairs than threads, fewer rows than threads."""
    x = torch.randn(*shape)
    w, b = params(shape[3], True)
    with openmp.using(threads):
        y = GroupNormNHWC(g, shape[3], w, b, EPS, True)(x)
    check(y, reference(x, g, w, b, True))


def test_eps_and_constant_groups():
    """A constant group has var 0: y = b (rstd = 1 / sqrt(eps) times 0)."""
    x = torch.randn(2, 4, 4, 8)
    x[0, :, :, 0:4] = 3.0
    w, b = params(8, True)
    for eps in (1e-5, 0.1):
        check(GroupNormNHWC(2, 8, w, b, eps, False)(x), reference(x, 2, w, b, False, eps))


def test_batch_zero_and_empty_spatial():
    gn = GroupNormNHWC(2, 16, None, None, EPS, True)
    for shape in ((0, 7, 7, 16), (2, 0, 3, 16)):
        y = gn(torch.empty(shape))
        assert y.shape == shape and y.dtype == torch.float32


def test_weights_are_copied():
    w, b = params(16, True)
    x = torch.randn(1, 3, 3, 16)
    gn = GroupNormNHWC(4, 16, w, b, EPS, True)
    ref = reference(x, 4, w, b, True)
    w.zero_()
    b.zero_()
    check(gn(x), ref)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        GroupNormNHWC(3, 16, None, None, EPS, False)
    with pytest.raises(ValueError):
        GroupNormNHWC(4, 16, torch.ones(15), None, EPS, False)
    gn = GroupNormNHWC(4, 16, None, None, EPS, False)
    with pytest.raises(ValueError):
        gn(torch.randn(1, 2, 2, 15))
    with pytest.raises(ValueError):
        gn(torch.randn(1, 2, 2, 16).double())
    with pytest.raises(ValueError):
        gn(torch.randn(1, 2, 2, 16), out=torch.empty(1, 2, 2, 16).transpose(1, 2))
