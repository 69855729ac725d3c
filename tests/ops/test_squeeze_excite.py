"""The squeeze-and-excitation C kernel (kfuse/backends/c/squeeze_excite.py) against the float64 torch
formula: every activation pair with and without biases over odd sizes (C and R not multiples of the
16-lane vectors, H*W not a multiple of the 4-row groups), batch 0, NaN/Inf propagation, an `out`
buffer poisoned with NaN, in-place use and non-contiguous x.

Tolerance: |y - ref| <= 1e-5 |ref| + 1e-6 |x|, i.e. 1e-5 relative on y plus an absolute 1e-6 on the
scale s in [0, 1] (hardsigmoid's s can sit near 0, where any absolute error in its input is a large
relative one).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from kfuse.backends.c.squeeze_excite import SqueezeExcite

ACT1 = {"relu": ((), F.relu), "silu": ((), F.silu), "gelu": ((), F.gelu), "hardswish": ((), F.hardswish),
        "leaky_relu": ((0.2,), lambda t: F.leaky_relu(t, 0.2)), "none": ((), lambda t: t)}
ACT2 = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}
RTOL, STOL = 1e-5, 1e-6


def weights(c, r):
    """w1 [r, c], b1, w2 [c, r], b2 scaled so both pre-activations span about [-5, 5]: both sides of
    every activation's bends, hardsigmoid's clamps included."""
    return (torch.randn(r, c) * 3 / c ** 0.5, torch.randn(r), torch.randn(c, r) * 2.5 / r ** 0.5, torch.randn(c))


def reference(x, w1, b1, act1, w2, b2, act2):
    d = lambda t: None if t is None else t.double()
    xd = x.double()
    h = ACT1[act1][1](F.linear(xd.mean(dim=(1, 2)), d(w1), d(b1)))
    s = ACT2[act2](F.linear(h, d(w2), d(b2)))
    return xd * s[:, None, None, :]


def check(y, ref, x):
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    y = y.double()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan), "NaN positions differ"
    err = (y - ref).abs()                                              # NaN where both are the same inf
    bound = RTOL * ref.abs() + STOL * x.abs()
    bad = ~(err <= bound) & (y != ref) & ~nan
    if bad.any():
        worst = (err[bad] / bound[bad]).max().item()
        raise AssertionError(f"{int(bad.sum())} elements out of tolerance, worst {worst:.3g} x; "
                             f"got {y[bad][:4].tolist()} want {ref[bad][:4].tolist()}")


def combos():
    return itertools.product(ACT1, ACT2, (True, False))


def se_of(w1, b1, w2, b2, a1, a2, bias):
    return SqueezeExcite(w1, b1 if bias else None, (a1, ACT1[a1][0]), w2, b2 if bias else None, (a2, ()))


@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (14, 14), (3, 5)])
@pytest.mark.parametrize("r", [1, 4, 24, 240])
@pytest.mark.parametrize("c", [1, 7, 16, 72, 100, 960])
def test_shapes_all_activations(c, r, hw, n):
    x = torch.randn(n, *hw, c) * 2 + 0.3
    w1, b1, w2, b2 = weights(c, r)
    for a1, a2, bias in combos():
        se = se_of(w1, b1, w2, b2, a1, a2, bias)
        y = se(x)
        check(y, reference(x, w1, b1 if bias else None, a1, w2, b2 if bias else None, a2), x)


@pytest.mark.parametrize("a1,a2,bias", list(combos()))
def test_nan_inf_propagate(a1, a2, bias):
    n, c, r = 4, 37, 5
    x = torch.randn(n, 5, 6, c)
    x[0, 1, 2, 3] = float("nan")                                       # batch 0: NaN mean in one channel
    x[1, 0, 0, 5] = float("inf")                                       # batch 1: +inf mean
    x[2, 4, 5, 6], x[2, 3, 1, 6] = float("inf"), float("-inf")         # batch 2: inf - inf = NaN mean
    x[3, 2, 2, 30] = float("-inf")                                     # batch 3: -inf mean
    w1, b1, w2, b2 = weights(c, r)
    y = se_of(w1, b1, w2, b2, a1, a2, bias)(x)
    check(y, reference(x, w1, b1 if bias else None, a1, w2, b2 if bias else None, a2), x)


@pytest.mark.parametrize("a1,a2", [("relu", "sigmoid"), ("hardswish", "hardsigmoid"), ("gelu", "sigmoid")])
def test_out_poisoned_with_nan_is_overwritten(a1, a2):
    x = torch.randn(3, 7, 7, 100)
    w1, b1, w2, b2 = weights(100, 24)
    out = torch.full_like(x, float("nan"))
    y = se_of(w1, b1, w2, b2, a1, a2, True)(x, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    check(out, reference(x, w1, b1, a1, w2, b2, a2), x)


def test_in_place():
    x = torch.randn(2, 14, 14, 72)
    w1, b1, w2, b2 = weights(72, 24)
    ref = reference(x, w1, b1, "silu", w2, b2, "hardsigmoid")
    x0 = x.clone()
    y = se_of(w1, b1, w2, b2, "silu", "hardsigmoid", True)(x, out=x)
    assert y.data_ptr() == x.data_ptr()
    check(y, ref, x0)


@pytest.mark.parametrize("c", [7, 72])
def test_non_contiguous_x(c):
    nchw = torch.randn(3, c, 7, 5)
    x = nchw.permute(0, 2, 3, 1)                                       # NHWC view of an NCHW tensor
    assert not x.is_contiguous()
    w1, b1, w2, b2 = weights(c, 4)
    y = se_of(w1, b1, w2, b2, "relu", "sigmoid", True)(x)
    check(y, reference(x, w1, b1, "relu", w2, b2, "sigmoid"), x)


def test_batch_zero_returns_empty():
    w1, b1, w2, b2 = weights(16, 4)
    se = se_of(w1, b1, w2, b2, "relu", "sigmoid", True)
    y = se(torch.empty(0, 7, 7, 16))
    assert y.shape == (0, 7, 7, 16) and y.dtype == torch.float32


def test_weights_are_copied():
    w1, b1, w2, b2 = weights(16, 4)
    x = torch.randn(1, 3, 3, 16)
    se = se_of(w1, b1, w2, b2, "relu", "sigmoid", True)
    ref = reference(x, w1, b1, "relu", w2, b2, "sigmoid")
    for t in (w1, b1, w2, b2):
        t.zero_()
    check(se(x), ref, x)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads):
    from kfuse.backends import openmp
    x = torch.randn(2, 5, 3, 100)
    w1, b1, w2, b2 = weights(100, 24)
    with openmp.using(threads):
        y = se_of(w1, b1, w2, b2, "gelu", "sigmoid", True)(x)
    check(y, reference(x, w1, b1, "gelu", w2, b2, "sigmoid"), x)


@pytest.mark.parametrize("shape", [(1, 13, 11, 72), (2, 9, 7, 100), (3, 5, 5, 40)])
def test_result_does_not_depend_on_the_thread_count(shape):
    """The runtime gives concurrent calls fewer threads; their outputs must equal a lone call's bit for
    bit, so each channel's sum has one order whatever the team size."""
    from kfuse.backends import openmp
    x = torch.randn(shape)
    se = se_of(*weights(shape[3], 8), "relu", "sigmoid", True)
    outs = []
    for threads in (1, 2, 3):
        with openmp.using(threads):
            outs.append(se(x))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_rejects_bad_arguments():
    w1, b1, w2, b2 = weights(16, 4)
    with pytest.raises(ValueError):
        SqueezeExcite(w1, b1, ("relu", ()), w2.t(), b2, ("sigmoid", ()))
    with pytest.raises(NotImplementedError):
        SqueezeExcite(w1, b1, ("tanh", ()), w2, b2, ("sigmoid", ()))
    with pytest.raises(NotImplementedError):
        SqueezeExcite(w1, b1, ("relu", ()), w2, b2, ("relu", ()))
    se = SqueezeExcite(w1, b1, ("relu", ()), w2, b2, ("sigmoid", ()))
    with pytest.raises(ValueError):
        se(torch.randn(1, 2, 2, 15))
    with pytest.raises(ValueError):
        se(torch.randn(1, 2, 2, 16), out=torch.empty(1, 2, 2, 16).transpose(1, 2))


# -- the gate alone, folded into the 1x1 convolution after it (SqueezeExcitePointwise) -------------------

@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,hw,c,cout,act,residual", [
    (1, (7, 5), 24, 40, None, False), (3, (4, 4), 144, 24, ("relu", (), ""), True), (2, (9, 11), 33, 17, None, True),
    (1, (1, 1), 7, 5, ("swish", (), ""), False), (2, (13, 9), 100, 70, None, False)])
def test_gate_folded_into_the_pointwise_conv_is_bit_exact(n, hw, c, cout, act, residual, threads):
    """The gate alone, then our GEMM scaling each input row by its image's gate as it reads it: the
    product is rounded as y = x * s is, so the result equals pw(se(x)) bit for bit; NaN in one image
    stays in that image; rows of several images share register tiles and row blocks."""
    from kfuse.backends import openmp
    from kfuse.backends.c.gemm import GemmConv
    from kfuse.backends.c.squeeze_excite import SqueezeExcitePointwise
    x = torch.randn(n, *hw, c)
    if n > 1:
        x[1, 0, 0, 2] = float("nan")
    se = se_of(*weights(c, max(1, c // 4)), "silu", "sigmoid", True)
    pw = GemmConv(torch.randn(cout, c, 1, 1) / c ** 0.5, torch.randn(cout), act, residual)
    r = (torch.randn(n, *hw, cout),) if residual else ()
    with openmp.using(threads):
        s = se.gate(x)
        assert s.shape == (n, c) and same(x * s[:, None, None, :], se(x))
        want = pw(se(x), *r)
        out = torch.full((n, *hw, cout), float("nan"))
        got = SqueezeExcitePointwise(se, pw)(x, *r, out=out)
        # as a program runs it: both halves bound to x's shape, their checks done once
        bound = SqueezeExcitePointwise(se, pw).bound(tuple(x.shape))
        out2 = torch.full((n, *hw, cout), float("nan"))
        got2 = bound(x, *r, out=out2)
        y = torch.full_like(x, float("nan"))
        got_se = se.bound(tuple(x.shape))(x, out=y)
    assert got.data_ptr() == out.data_ptr() and same(got, want)
    assert got2.data_ptr() == out2.data_ptr() and same(got2, want)
    assert got_se.data_ptr() == y.data_ptr() and same(got_se, se(x))
    if n > 1:
        assert got[1].isnan().all() and not got[0].isnan().any()


def same(a, b) -> bool:
    """equal bit for bit, NaN where NaN"""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_gemm_scale_needs_a_pointwise_kernel_and_an_image_gate():
    from kfuse.backends.c.gemm import GemmConv
    x, s = torch.randn(2, 5, 5, 8), torch.rand(2, 8)
    with pytest.raises(ValueError, match="1x1 stride-1"):
        GemmConv(torch.randn(4, 8, 3, 3), None, None, False, padding=1)(x, scale=s)
    with pytest.raises(ValueError, match="1x1 stride-1"):
        GemmConv(torch.randn(4, 8), None, None, False)(x.reshape(50, 8), scale=s)      # a linear's rows
    with pytest.raises(ValueError, match="scale"):
        GemmConv(torch.randn(4, 8, 1, 1), None, None, False)(x, scale=torch.rand(1, 8))


def test_bound_kernels_take_the_checked_path_for_other_inputs():
    """A kernel bound to a program's shape still serves (or rejects, clearly) other inputs: another shape,
    a strided x, no `out`; the gate and scale it passes itself are checked where they do not fit."""
    from kfuse.backends.c.gemm import GemmConv
    from kfuse.backends.c.squeeze_excite import SqueezeExcitePointwise
    se = se_of(*weights(24, 6), "relu", "hardsigmoid", True)
    pw = GemmConv(torch.randn(8, 24, 1, 1), torch.randn(8), None, False)
    pair = SqueezeExcitePointwise(se, pw).bound((2, 5, 5, 24))
    for x in (torch.randn(3, 4, 6, 24), torch.randn(2, 5, 24, 5).transpose(2, 3), torch.randn(2, 5, 5, 24)):
        assert same(pair(x), pw(se(x)))
        assert same(se.bound((2, 5, 5, 24))(x), se(x))
        assert same(se.bound((2, 5, 5, 24), gate=True)(x), se.gate(x))
    with pytest.raises(ValueError, match=r"x must be float32 \[N, H, W, 24\]"):
        pair(torch.randn(2, 5, 5, 23), out=torch.empty(2, 5, 5, 8))
    scaled = pw.bound((2, 5, 5, 24), scaled=True)
    with pytest.raises(ValueError, match="scale"):
        scaled(torch.randn(2, 5, 5, 24), out=torch.empty(2, 5, 5, 8), scale=torch.rand(1, 24))
    with pytest.raises(ValueError, match="1x1 stride-1"):
        GemmConv(torch.randn(4, 24, 3, 3), None, None, False, padding=1).bound((2, 5, 5, 24), scaled=True)
