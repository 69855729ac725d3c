"""The C implicit GEMM for convolutions and small linears (kfuse/backends/c/gemm.py) against torch in
float64: output channels around the 16-column panels and the 32-column tile (1, 15, 16, 17, 31, 32, 33,
72), input channels 1 to 1100, rows around the 8-row tile, kernels 1x1 to 7x7 with strides, paddings
and dilations (taps in the padding), every activation, with and without a residual, NaN and +-Inf
inputs, a poisoned `out`, thread counts 1-3, batch 0, non-contiguous inputs, and the source a machine
without AVX-512 builds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CONV_ACTS as ACTS
from helpers import assert_close

from kfuse.backends import openmp
from kfuse.backends.c import gemm
from kfuse.backends.c.gemm import GemmConv

TOL = {"atol": 1e-5, "rtol": 1e-5}


def reference(x, w, b, r, act, stride=1, padding=0, dilation=1):
    y = F.conv2d(x.permute(0, 3, 1, 2).double(), w.double(), None if b is None else b.double(), stride, padding,
                 dilation).permute(0, 2, 3, 1)
    if r is not None:
        y = y + r.double()
    return ACTS[act][1](y).float()


def check(n, h, w_, cin, cout, act="none", residual=False, bias=True, scale=1.0, generic=False, k=(1, 1),
          stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    x = torch.randn(n, h, w_, cin) * scale
    w, b = torch.randn(cout, cin, *k) / (cin * k[0] * k[1]) ** 0.5, (torch.randn(cout) if bias else None)
    y = F.conv2d(torch.zeros(1, cin, h, w_), w, None, stride, padding, dilation)     # the output size
    r = torch.randn(n, y.shape[2], y.shape[3], cout) if residual else None
    k = GemmConv(w, b, ACTS[act][0], residual, stride, padding, dilation, generic=generic)
    got, want = k(x, r), reference(x, w, b, r, act, stride, padding, dilation)
    assert got.shape == want.shape and got.is_contiguous()
    assert_close(got, want, **TOL)
    return k, x, r, want


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("cout", [1, 15, 16, 17, 31, 32, 33, 72])
# 10 and 11 rows: a whole register tile, then part of one
@pytest.mark.parametrize("rows", [(1, 1, 1), (1, 3, 3), (1, 2, 5), (1, 1, 11), (2, 3, 5), (1, 7, 7)])
def test_shapes(rows, cout, generic):
    check(*rows, 24, cout, act="relu6", residual=cout % 2 == 1, generic=generic)


@pytest.mark.parametrize("cin", [1, 3, 511, 512, 513, 1100])
def test_input_channels(cin):
    check(1, 5, 5, cin, 40, act="hardswish", residual=True)


# (N, H, W, Cin, Cout, (kh, kw), stride, padding, dilation)
GEOMETRY = [
    (1, 15, 15, 3, 16, (3, 3), (2, 2), (1, 1), (1, 1)),      # a MobileNet stem
    (2, 17, 13, 3, 20, (7, 7), (2, 2), (3, 3), (1, 1)),      # a ResNet stem, odd sizes
    (1, 16, 16, 3, 24, (4, 4), (4, 4), (0, 0), (1, 1)),      # a ConvNeXt patchify
    (1, 9, 11, 17, 33, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 9, 11, 17, 33, (3, 3), (1, 1), (2, 2), (2, 2)),      # dilation 2
    (1, 9, 11, 8, 16, (3, 3), (4, 4), (1, 1), (1, 1)),       # stride larger than the kernel
    (3, 7, 9, 5, 7, (1, 1), (2, 2), (0, 0), (1, 1)),         # 1x1 stride 2
    (1, 7, 9, 5, 7, (1, 1), (1, 1), (1, 1), (1, 1)),         # 1x1 with padding: border pixels are the bias
    (1, 5, 6, 4, 9, (3, 5), (2, 1), (1, 2), (1, 1)),
    (1, 2, 3, 6, 17, (3, 3), (1, 1), (1, 1), (1, 1)),        # more padding than input
    (1, 1, 1, 6, 17, (5, 5), (1, 1), (2, 2), (1, 1)),        # every tap but the centre in the padding
    (2, 12, 12, 64, 48, (3, 3), (1, 1), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,padding,dilation", GEOMETRY)
def test_geometry(n, h, w, cin, cout, k, stride, padding, dilation, generic):
    check(n, h, w, cin, cout, act="relu6", residual=cout % 2 == 1, k=k, stride=stride, padding=padding,
          dilation=dilation, generic=generic)


# (N, H, W, Cin, Cout, k, stride, padding, dilation, groups): channels per group around the 16-lane panel
# (2, 3, 12, 24, 40), a group's outputs not a whole panel, 1x1 grouped, strided, dilated
GROUPED = [
    (1, 7, 9, 12, 18, (3, 3), (1, 1), (1, 1), (1, 1), 3),
    (2, 8, 8, 48, 48, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (1, 14, 14, 336, 336, (3, 3), (1, 1), (1, 1), (1, 1), 14),      # RegNetY: groups of 24
    (1, 9, 9, 10, 20, (1, 1), (1, 1), (0, 0), (1, 1), 5),
    (1, 9, 9, 20, 40, (3, 3), (1, 1), (2, 2), (2, 2), 4),
    (1, 5, 6, 6, 9, (3, 3), (1, 1), (1, 1), (1, 1), 3),
    (3, 6, 5, 80, 120, (5, 5), (2, 1), (2, 2), (1, 1), 2),          # 40 -> 60 per group: panels past a pair
]


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,padding,dilation,groups", GROUPED)
def test_groups(n, h, w, cin, cout, k, stride, padding, dilation, groups, generic):
    x = torch.randn(n, h, w, cin)
    wt, b = torch.randn(cout, cin // groups, *k) / (cin // groups * k[0] * k[1]) ** 0.5, torch.randn(cout)
    want = F.conv2d(x.permute(0, 3, 1, 2).double(), wt.double(), b.double(), stride, padding, dilation, groups)
    r = torch.randn(want.permute(0, 2, 3, 1).shape) if cout % 2 == 0 else None
    want = want.permute(0, 2, 3, 1) + (0 if r is None else r.double())
    kern = GemmConv(wt, b, ACTS["relu6"][0], r is not None, stride, padding, dilation, groups, generic=generic)
    out = torch.full(want.shape, float("nan"))
    assert_close(kern(x, r, out=out), ACTS["relu6"][1](want).float(), **TOL)


def test_groups_errors():
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        GemmConv(torch.randn(18, 3, 3, 3), None, None, False, groups=4)
    k = GemmConv(torch.randn(16, 4, 1, 1), None, None, False, groups=2)
    with pytest.raises(ValueError, match="one group"):
        k(torch.randn(1, 2, 2, 8), scale=torch.randn(1, 8))


def test_kernel_larger_than_padded_input():
    k = GemmConv(torch.randn(4, 3, 3, 3), None, None, False)
    with pytest.raises(ValueError, match="does not fit"):
        k(torch.randn(1, 2, 5, 3))


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("residual", [False, True])
def test_activation(act, residual):
    check(1, 5, 7, 19, 33, act=act, residual=residual, scale=3.0)     # scale 3: both sides of every clamp


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads):
    with openmp.using(threads):
        check(1, 14, 14, 112, 72, act="relu")
        check(2, 7, 7, 600, 160, act="none", residual=True)
        check(1, 13, 11, 3, 40, act="silu", k=(3, 3), stride=(2, 2), padding=(1, 1))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_work_item_orders(threads, monkeypatch):
    """Row blocks first (the packed weight within half the L2) and panel pairs first (over it) give the
    same bits and the reference's numbers: several row blocks, pairs and a half pair, a residual, a 3x3
    kernel, uneven thread ranges."""
    for n, h, w_, cin, cout, k, pad, residual in [(2, 23, 21, 24, 80, (1, 1), (0, 0), True),
                                                  (1, 30, 30, 16, 40, (3, 3), (1, 1), False)]:
        x, wt, b = torch.randn(n, h, w_, cin), torch.randn(cout, cin, *k) / (cin * k[0] * k[1]) ** 0.5, torch.randn(cout)
        r = torch.randn(n, h, w_, cout) if residual else None
        got = {}
        for l2 in (0, 1 << 30):
            monkeypatch.setattr(gemm.autotune, "cache_bytes", lambda level=None, l2=l2: l2)
            kern = GemmConv(wt, b, ACTS["relu"][0], residual, padding=pad)
            with openmp.using(threads):
                got[l2] = kern(x, r)
            assert kern._plan((n, h, w_, h, w_), threads)[21] == (l2 > 0)
        assert torch.equal(got[0], got[1 << 30])
        assert_close(got[0], reference(x, wt, b, r, "relu", padding=pad), **TOL)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("hw,cin,cout,k", [(14, 576, 96, 1), (7, 576, 160, 1), (7, 960, 320, 1), (56, 144, 24, 1),
                                           (14, 256, 256, 3), (9, 40, 72, 1)])
def test_threads_get_even_shares_of_the_rows(hw, cin, cout, k, threads):
    """The plan's row blocks (gemm.c: block i is the register tiles [i T / nmb, (i + 1) T / nmb)) are a tile
    apart in size, and blocks times panel pairs is a multiple of the threads where the tiles allow, so each
    thread's own share of the items (share.c) is as large as the others': the bigger share is within a tile
    per block of the even one (14 x 14 rows by 3 pairs had been split 5 items to 4)."""
    kern = GemmConv(torch.randn(cout, cin, k, k), torch.randn(cout), ACTS["relu"][0], False, padding=k // 2)
    d = kern._plan((1, hw, hw, hw, hw), threads)
    m, nmb, rows_first = d[0], d[2], d[21]
    tiles, pairs = -(-m // gemm.MR), -(-cout // 32)
    bounds = [min(m, i * tiles // nmb * gemm.MR) for i in range(nmb + 1)]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert sum(sizes) == m and min(sizes) > 0 and max(sizes) - min(sizes) <= gemm.MR, sizes
    items = [(rb, pp) for rb in range(nmb) for pp in range(pairs)] if rows_first else \
        [(rb, pp) for pp in range(pairs) for rb in range(nmb)]
    assert len(items) % threads == 0 or nmb == tiles, (nmb, pairs)
    per = len(items) // threads
    shares = [sum(sizes[rb] for rb, _ in items[t * per:(t + 1) * per]) for t in range(threads)]
    assert max(shares) - m * pairs / threads <= gemm.MR * nmb * pairs / threads, shares
    with openmp.using(threads):
        check(1, hw, hw, cin, cout, act="relu", k=(k, k), padding=(k // 2, k // 2))


def test_no_bias():
    check(1, 5, 5, 33, 17, act="silu", bias=False)


def test_empty_batch():
    k = GemmConv(torch.randn(17, 8, 1, 1), None, None, False)
    assert k(torch.randn(0, 7, 9, 8)).shape == (0, 7, 9, 17)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("residual", [False, True])
def test_epilogue_in_registers_equals_the_portable_one_bit_for_bit(act, residual):
    """The native tiles finish a full panel in vector registers (AVX2: act8, kf_exp8; AVX-512: act16,
    kf_exp16; both for every activation but tanh and erf-GELU) and a partial one, like the portable tiles,
    from the sums in memory: the same operations in the same order, so the same bits, on every special
    value. With one input channel of weight 1 and no bias each output is its input (+ residual)
    activated: the values reach the activations exactly."""
    vals = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 6.0, 87.5, -87.5, 88.7, -88.7, 89.0,
                         -104.0, 1e4, -1e4, 3e38, -3e38, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([vals, torch.randn(37) * 20]).reshape(-1, 1)
    r = torch.randn(x.shape[0], 40) if residual else None
    w, b = torch.ones(40, 1, 1, 1), torch.zeros(40)
    native = GemmConv(w, b, ACTS[act][0], residual)(x, r)
    portable = GemmConv(w, b, ACTS[act][0], residual, generic=True)(x, r)
    assert torch.equal(native.isnan(), portable.isnan()), act
    assert torch.equal(native.nan_to_num(7.0), portable.nan_to_num(7.0)), act


@pytest.mark.parametrize("act", list(ACTS))
def test_nan_inf_propagate(act):
    """NaN and +-Inf inputs reach every output of their row, as in torch (relu and relu6 keep the NaN,
    which oneDNN's post-ops do not)"""
    cin, cout = 20, 33
    x = torch.randn(2, 3, 5, cin)
    x[0, 0, 0, 3] = float("nan")
    x[0, 1, 2, 5] = float("inf")
    x[1, 2, 4, 7] = float("-inf")
    w = torch.randn(cout, cin, 1, 1)
    w[:, 5] = w[:, 5].abs() + 0.1                    # positive weights for the +Inf channel: +Inf stays
    b = torch.randn(cout)
    r = torch.randn(2, 3, 5, cout)
    r[1, 0, 0, :4] = float("nan")
    k = GemmConv(w, b, ACTS[act][0], True)
    got, want = k(x, r), reference(x, w, b, r, act)
    assert torch.isnan(want).any()
    assert_close(got, want, **TOL)


@pytest.mark.parametrize("cout", [16, 17])
def test_out_poisoned(cout):
    k, x, r, want = check(3, 7, 9, 40, cout, act="hardswish", residual=True)
    out = torch.full(want.shape, float("nan"))
    got = k(x, r, out=out)
    assert got is out
    assert_close(out, want, **TOL)


def test_non_contiguous_input():
    x = torch.randn(2, 33, 5, 6).permute(0, 2, 3, 1)           # NHWC view of NCHW memory
    r = torch.randn(2, 17, 5, 6).permute(0, 2, 3, 1)
    w, b = torch.randn(17, 33, 1, 1), torch.randn(17)
    k = GemmConv(w, b, ("relu", (), ""), True)
    assert_close(k(x, r), reference(x, w, b, r, "relu"), **TOL)


def test_linear_form():
    """a [Cout, Cin] weight on any leading dims: act(x @ w.T + b), a linear layer"""
    x, w, b = torch.randn(3, 4, 50), torch.randn(70, 50), torch.randn(70)
    k = GemmConv(w, b, ("gelu", (), "tanh"), False)
    assert_close(k(x), F.gelu(x.double() @ w.double().T + b.double(), approximate="tanh").float(), **TOL)
    assert_close(k(x[0, 0]), F.gelu(x[0, 0].double() @ w.double().T + b.double(), approximate="tanh").float(), **TOL)


def gated_reference(x, w, b, act):
    h = x.double() @ w.double().T + (0 if b is None else b.double())
    gate, up = h.chunk(2, dim=-1)
    return (ACTS[act][1](gate) * up).float()


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("f", [1, 5, 15, 16, 17, 33, 176])
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 130])
def test_gated(rows, f, generic):
    """act(x Wgᵀ + bg) * (x Wuᵀ + bu) with the gate and up panels side by side: outputs around the
    16-column panel, rows around the 8-row tile, into a poisoned out"""
    x, w, b = torch.randn(rows, 37), torch.randn(2 * f, 37) / 37 ** 0.5, torch.randn(2 * f)
    k = GemmConv(w, b, ACTS["silu"][0], False, glu=True, generic=generic)
    out = torch.full((rows, f), float("nan"))
    assert k(x, out=out) is out
    assert_close(out, gated_reference(x, w, b, "silu"), **TOL)


@pytest.mark.parametrize("act", ["none", "relu", "sigmoid", "gelu", "gelu_tanh", "silu"])
def test_gated_activations_nan_inf_threads(act):
    x, w, b = torch.randn(3, 5, 70) * 3, torch.randn(96, 70) / 70 ** 0.5, torch.randn(96)
    x[0, 1, 3], x[2, 4, 9], x[1, 0, 0] = float("nan"), float("inf"), float("-inf")
    want = gated_reference(x, w, b, act)
    assert torch.isnan(want).any()
    for threads in (1, 3):
        with openmp.using(threads):
            assert_close(GemmConv(w, b, ACTS[act][0], False, glu=True)(x), want, **TOL)
    assert_close(GemmConv(w, None, ACTS[act][0], False, glu=True)(x), gated_reference(x, w, None, act), **TOL)


def test_gated_errors():
    with pytest.raises(ValueError, match="gated linear"):
        GemmConv(torch.randn(33, 8), None, None, False, glu=True)          # an odd number of columns
    with pytest.raises(ValueError, match="gated linear"):
        GemmConv(torch.randn(32, 8), None, None, True, glu=True)           # a residual
    with pytest.raises(ValueError, match="gated linear"):
        GemmConv(torch.randn(32, 8, 3, 3), None, None, False, glu=True)    # not 1x1


def test_errors():
    k = GemmConv(torch.randn(16, 8, 1, 1), None, None, False)
    with pytest.raises(ValueError, match="want float32"):
        k(torch.randn(1, 2, 2, 9))
    with pytest.raises(ValueError, match="without a residual"):
        k(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 16))
    kr = GemmConv(torch.randn(16, 8, 1, 1), None, None, True)
    with pytest.raises(ValueError, match="residual"):
        kr(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 3, 16))
    with pytest.raises(NotImplementedError, match="kernel positions"):
        GemmConv(torch.randn(16, 8, 12, 11), None, None, False)
    with pytest.raises(ValueError, match="NHWC"):
        GemmConv(torch.randn(16, 8, 3, 3), None, None, False)(torch.randn(5, 8))
    with pytest.raises(NotImplementedError, match="activation"):
        GemmConv(torch.randn(16, 8, 1, 1), None, ("elu", (1.0,), ""), False)


def test_generic_source_differs():
    assert "#undef __AVX512F__" in gemm.source(0, False, generic=True)
    assert "#undef __AVX512F__" not in gemm.source(0, False)


# (N, Cin, H, W, Cout, (kh, kw), stride, padding, dilation): inputs read in place from NCHW memory
NCHW = [
    (1, 3, 15, 15, 16, (3, 3), (2, 2), (1, 1), (1, 1)),     # a MobileNet stem
    (2, 3, 17, 13, 20, (7, 7), (2, 2), (3, 3), (1, 1)),     # a ResNet stem, odd sizes
    (1, 3, 16, 16, 24, (4, 4), (4, 4), (0, 0), (1, 1)),     # a ConvNeXt patchify
    (1, 2, 9, 11, 33, (3, 3), (1, 1), (2, 2), (2, 2)),      # dilation 2 (taps one by one)
    (3, 4, 7, 9, 7, (3, 5), (2, 1), (1, 2), (1, 1)),
    (1, 8, 5, 6, 40, (5, 5), (3, 3), (4, 4), (1, 1)),       # more padding than the kernel reaches
    (1, 2, 1, 2, 17, (3, 3), (1, 1), (1, 1), (1, 1)),       # a one-row input: most taps in the padding
    (2, 3, 6, 45, 32, (3, 3), (1, 1), (1, 1), (1, 1)),      # whole tiles inside the row, a partial one at its end
]


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("n,cin,h,w,cout,k,stride,padding,dilation", NCHW)
def test_nchw_view_read_in_place(n, cin, h, w, cout, k, stride, padding, dilation, generic):
    """An NHWC view of NCHW memory (a network's input after the layout pass) is read in place, each tap
    from its channel plane, not copied first: the same bits as the contiguous input, through the checked
    and the bound call."""
    xc = torch.randn(n, cin, h, w)
    x = xc.permute(0, 2, 3, 1)
    wt, b = torch.randn(cout, cin, *k), torch.randn(cout)
    kern = GemmConv(wt, b, ACTS["relu6"][0], False, stride, padding, dilation, generic=generic)
    assert kern._reads_nchw(x)
    want = kern(x.contiguous())
    out = torch.full_like(want, float("nan"))
    assert torch.equal(kern(x, out=out), want)
    assert torch.equal(kern.bound(tuple(x.shape))(x, out=torch.empty_like(want)), want)
    assert_close(want, reference(x, wt, b, None, "relu6", stride, padding, dilation), **TOL)
    with openmp.using(3):
        assert torch.equal(kern(x), want)


def test_nchw_view_of_many_channels_is_copied():
    kern = GemmConv(torch.randn(8, 16, 3, 3), None, None, False, 1, 1)
    x = torch.randn(1, 16, 6, 6).permute(0, 2, 3, 1)
    assert not kern._reads_nchw(x)
    assert torch.equal(kern(x), kern(x.contiguous()))
