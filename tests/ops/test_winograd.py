"""The Winograd F(2x2, 3x3) convolution (kfuse/backends/c/winograd.py) against torch in float64: odd and
even output sizes (tiles past the edge), paddings 0-2 (taps in the padding), input and output channels
around the 16-lane groups and 32-column tiles, tiles around the 8-row register tile and the per-thread
block, every activation, with and without a residual, NaN and +-Inf inputs (landing only where the
direct convolution puts them), a poisoned `out`, thread counts 1-3, batch 0, non-contiguous inputs,
errors, and the source a machine without AVX-512 builds."""
from __future__ import annotations

import pytest
import torch
from helpers import CONV_ACTS as ACTS
from helpers import assert_close
from helpers import in_threads
from test_gemm import reference

from kfuse.backends import openmp
from kfuse.backends.c import winograd
from kfuse.backends.c.gemm import GemmConv
from kfuse.backends.c.winograd import WinogradConv

TOL = {"atol": 2e-5, "rtol": 2e-5}


def check(n, h, w_, cin, cout, act="none", residual=False, bias=True, padding=1, scale=1.0, generic=False, out=None):
    x = torch.randn(n, h, w_, cin) * scale
    w, b = torch.randn(cout, cin, 3, 3) / (cin * 9) ** 0.5, (torch.randn(cout) if bias else None)
    oh, ow = h + 2 * padding - 2, w_ + 2 * padding - 2
    r = torch.randn(n, oh, ow, cout) if residual else None
    k = WinogradConv(w, b, ACTS[act][0], residual, 1, padding, 1, generic=generic)
    want = reference(x, w, b, r, act, 1, padding, 1)
    if out is not None:
        out = torch.full(want.shape, out)
    got = k(x, r, out=out)
    assert got.shape == want.shape and got.is_contiguous() and (out is None or got is out)
    assert_close(got, want, **TOL)
    return got


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("cout", [1, 15, 16, 17, 33, 72])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (8, 8), (7, 9), (14, 14)])
def test_shapes(hw, cout, generic):
    check(1, *hw, 24, cout, act="relu", residual=cout % 2 == 1, generic=generic)


@pytest.mark.parametrize("cin", [1, 3, 16, 17, 130])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_channels_and_padding(cin, padding):
    check(2, 6, 7, cin, 40, act="hardswish", residual=True, padding=padding)


@pytest.mark.parametrize("n,side", [(1, 29), (3, 17), (5, 8)])
def test_many_tiles(n, side):
    """more tiles than one per-thread block: blocks of whole and partial register tiles"""
    check(n, side, side, 64, 64, act="relu", out=float("nan"))


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("residual", [False, True])
def test_activation(act, residual):
    check(1, 5, 7, 19, 33, act=act, residual=residual, scale=3.0)     # scale 3: both sides of every clamp


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads):
    with openmp.using(threads):
        check(1, 14, 14, 48, 40, act="relu")
        check(2, 7, 7, 100, 70, residual=True)


def test_no_bias():
    check(1, 5, 5, 33, 17, act="silu", bias=False)


def test_wide_layers_stay_within_the_verify_tolerance():
    """ResNet's widest 3x3 layer: the rounding grows with the channels summed (F(4x4)'s went past it)"""
    check(2, 7, 7, 512, 512, act="relu")


def test_empty_batch():
    k = WinogradConv(torch.randn(17, 8, 3, 3), None, None, False, padding=1)
    assert k(torch.randn(0, 7, 9, 8)).shape == (0, 7, 9, 17)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("act", ["none", "relu", "silu"])
def test_non_finite_inputs_stay_where_the_direct_sum_puts_them(act, generic):
    """A transform spreads an Inf or NaN over its whole 4x4 patch; the outputs of such tiles are computed
    again directly, so each non-finite input reaches only the outputs whose window holds it"""
    cin, cout = 20, 33
    x = torch.randn(2, 9, 8, cin)
    x[0, 0, 0, 3] = float("nan")             # a corner pixel: one output of its tile reads it
    x[0, 4, 5, 5] = float("inf")
    x[1, 8, 7, 7] = float("-inf")
    w = torch.randn(cout, cin, 3, 3)
    w[:, 5] = w[:, 5].abs() + 0.1            # positive weights for the +Inf channel: +Inf stays
    b = torch.randn(cout)
    r = torch.randn(2, 9, 8, cout)
    k = WinogradConv(w, b, ACTS[act][0], True, padding=1, generic=generic)
    got, want = k(x, r), reference(x, w, b, r, act, 1, 1, 1)
    assert torch.isnan(want).any() and torch.isfinite(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert_close(got, want, **TOL)


@pytest.mark.parametrize("act", ["none", "relu"])
def test_overflow_like_the_direct_sum(act):
    """a finite input whose products overflow: the tiles holding it computed directly, in float32, so the
    outputs are those of our direct kernel (gemm.c) where float32 overflows"""
    x = torch.randn(1, 8, 8, 16)
    x[0, 3, 4, 2] = 3e38
    w, b = torch.randn(24, 16, 3, 3), torch.randn(24)
    got = WinogradConv(w, b, ACTS[act][0], False, padding=1)(x)
    want = GemmConv(w, b, ACTS[act][0], False, 1, 1, 1)(x)
    assert not torch.isfinite(want).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert_close(got, want, **TOL)


def test_non_contiguous_input():
    x = torch.randn(2, 33, 5, 6).permute(0, 2, 3, 1)           # NHWC view of NCHW memory
    r = torch.randn(2, 17, 5, 6).permute(0, 2, 3, 1)
    w, b = torch.randn(17, 33, 3, 3), torch.randn(17)
    k = WinogradConv(w, b, ("relu", (), ""), True, padding=1)
    assert_close(k(x, r), reference(x, w, b, r, "relu", 1, 1, 1), **TOL)


def test_bound_call_matches():
    w, b = torch.randn(24, 16, 3, 3), torch.randn(24)
    k = WinogradConv(w, b, None, False, padding=1)
    x = torch.randn(2, 10, 11, 16)
    out = torch.full((2, 10, 11, 24), float("nan"))
    k.bound(tuple(x.shape))(x, out=out)
    assert_close(out, reference(x, w, b, None, "none", 1, 1, 1), **TOL)


def test_errors():
    with pytest.raises(NotImplementedError, match="only 3x3"):
        WinogradConv(torch.randn(16, 8, 5, 5), None, None, False)
    with pytest.raises(NotImplementedError, match="only 3x3"):
        WinogradConv(torch.randn(16, 8, 3, 3), None, None, False, stride=2)
    with pytest.raises(NotImplementedError, match="only 3x3"):
        WinogradConv(torch.randn(16, 8, 3, 3), None, None, False, dilation=2)
    k = WinogradConv(torch.randn(16, 8, 3, 3), None, None, False)
    with pytest.raises(ValueError, match="want float32"):
        k(torch.randn(1, 4, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="NHWC"):
        k(torch.randn(1, 4, 4, 9))
    with pytest.raises(ValueError, match="does not fit"):
        k(torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="without a residual"):
        k(torch.randn(1, 4, 4, 8), torch.randn(1, 2, 2, 16))
    kr = WinogradConv(torch.randn(16, 8, 3, 3), None, None, True, padding=1)
    with pytest.raises(ValueError, match="residual"):
        kr(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 16))
    with pytest.raises(NotImplementedError, match="activation"):
        WinogradConv(torch.randn(16, 8, 3, 3), None, ("elu", (1.0,), ""), False)


def test_supported():
    assert winograd.supported((8, 8, 3, 3), 1, (1, 1), 1)
    assert not winograd.supported((8, 8, 3, 3), 2, 1, 1)
    assert not winograd.supported((8, 8, 1, 1), 1, 1, 1)
    assert not winograd.supported((8, 8, 3, 3), 1, (1, 2), 1)


def test_generic_source_differs():
    assert "#undef __AVX512F__" in winograd.source(0, False, generic=True)
    assert "#undef __AVX512F__" not in winograd.source(0, False)


def test_calls_from_four_threads_at_once():
    """one kernel (its bound call and its checked call, as a compiled model shared by threads has them) on
    four threads, each its own input and output: the serial answers (the tile buffers are per call)"""
    w, b = torch.randn(40, 24, 3, 3) / 15, torch.randn(40)
    k = WinogradConv(w, b, ("relu", (), ""), False, padding=1)
    xs = [torch.randn(2, 13, 11, 24) for _ in range(4)]
    bound = k.bound(tuple(xs[0].shape))
    want = [k(x) for x in xs]
    got = [[] for _ in xs]

    def run(i):
        for _ in range(20):
            out = torch.full_like(want[i], float("nan"))
            got[i].append(bound(xs[i], out=out) if i % 2 else k(xs[i]))
    in_threads(4, run)
    for i, outs in enumerate(got):
        assert all(torch.equal(o, want[i]) for o in outs)
