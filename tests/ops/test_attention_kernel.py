"""The fused C attention kernel against the reference `_attention` (the oracle), fp32.

Random inputs come from the fixed per-test seed of tests/conftest.py: the same on every run.
"""
import math

import pytest
import torch
from helpers import SMALL_TOL, assert_close

from kfuse.backends.c import attention as A
from kfuse.ops.reference import _attention


def close(got, want):
    """NaN where the reference has NaN (fully masked rows), and nowhere else; SMALL_TOL: one kernel whose
    outputs are softmax-weighted averages of v (|out| < 4), measured worst 1.5e-6 absolute over every
    shape, mask, kernel and split here."""
    assert_close(got, want, **SMALL_TOL)


def run(q, k, v, mask=None, *, causal=False, split_kv=None, kernel=None, out=None, scale=None, zero_masked=False):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    want = _attention(q, k, v, mask, scale=scale, causal=causal, zero_masked=zero_masked)
    if out is None:
        out = torch.full(want.shape, float("nan"))        # poisoned: every element must be written
    got = A.attention(q, k, v, mask, scale=scale, causal=causal, split_kv=split_kv, kernel=kernel, out=out,
                      zero_masked=zero_masked)
    assert got is out
    close(got, want)
    return got, want


def qkv(B, H, Hkv, Lq, Lk, D):
    return torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)


@pytest.mark.parametrize("D", [8, 16, 24, 32, 64, 72, 80])
@pytest.mark.parametrize("Lq", [1, 7, 127, 130])
@pytest.mark.parametrize("Lk", [1, 7, 127, 130])
def test_shapes(Lq, Lk, D):
    """Odd shapes, both kernels, split-KV forced on and off, MHA; head dims not a multiple of 16 (the block
    kernel moves queries in and out of its transposed block 16 x 16 at a time, the last chunk partial)."""
    q, k, v = qkv(2, 3, 3, Lq, Lk, D)
    for kernel in ("block", "row"):
        for split in (False, True):
            run(q, k, v, kernel=kernel, split_kv=split)


@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("Lq,Lk", [(1, 130), (7, 127), (130, 127), (127, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa_causal(H, Hkv, Lq, Lk, causal):
    """Grouped-query and multi-query heads; causal with Lq != Lk (bottom-right aligned; Lq > Lk
    leaves the first rows with no key at all: NaN like the reference)."""
    q, k, v = qkv(2, H, Hkv, Lq, Lk, 32)
    for kernel in ("block", "row"):
        for split in (False, True):
            run(q, k, v, causal=causal, kernel=kernel, split_kv=split)


@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("mshape", ["B11K", "B1QK", "QK", "BHQK", "K"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks(kind, mshape, causal):
    B, H, Lq, Lk, D = 2, 4, 33, 130, 64
    q, k, v = qkv(B, H, 2, Lq, Lk, D)
    shape = {"B11K": (B, 1, 1, Lk), "B1QK": (B, 1, Lq, Lk), "QK": (Lq, Lk), "BHQK": (B, H, Lq, Lk), "K": (Lk,)}[mshape]
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
    else:
        mask = torch.randn(shape) + torch.where(torch.rand(shape) > 0.3, 0.0, float("-inf"))
    for kernel in ("block", "row"):
        for split in (False, True):
            run(q, k, v, mask, causal=causal, kernel=kernel, split_kv=split)


def test_padding_mask_fully_masked_rows():
    """A batch whose every key is masked out gives NaN rows, like torch.softmax of all -inf;
    the other batch is untouched. Also a bool mask masking a whole query row."""
    B, H, Lq, Lk, D = 2, 4, 20, 300, 32
    q, k, v = qkv(B, H, H, Lq, Lk, D)
    keep = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    keep[0] = False
    keep[1, ..., 200:] = False
    add = torch.zeros(B, 1, 1, Lk).masked_fill(~keep, float("-inf"))
    row = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    row[:, :, 3] = False
    for mask in (keep, add, row):
        nan_rows = torch.zeros(B, H, Lq, dtype=torch.bool)       # [B, H, Lq]: every key masked
        if mask is row:
            nan_rows[:, :, 3] = True
        else:
            nan_rows[0] = True
        for kernel in ("block", "row"):
            for split in (False, True):
                got, want = run(q, k, v, mask, kernel=kernel, split_kv=split)
                assert torch.equal(got.isnan().all(-1), nan_rows) and torch.equal(got.isnan().any(-1), nan_rows)
                # torch's SDPA semantics: those rows are 0, and no NaN anywhere
                got, want = run(q, k, v, mask, kernel=kernel, split_kv=split, zero_masked=True)
                assert not got.isnan().any() and torch.equal((got == 0).all(-1), nan_rows)
                if mask.dtype == torch.bool:
                    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("fill", ["min", "-inf", "bool"])
@pytest.mark.parametrize("L", [64, 65, 130, 200])
def test_hard_masked_tiles_are_skipped_exactly(L, fill):
    """A causal + padding mask as models build it (finfo.min or -inf where masked, or a bool keep): the block
    kernel drops the trailing key tiles every row of a query block has masked. Right padding, left padding
    (rows masked everywhere: finfo.min makes them a uniform average over all keys, -inf NaN, which the kernel
    must reproduce rather than average over the keys it kept), a batch masked everywhere, and a padded tail
    that ends a block's keys exactly."""
    B, H, D = 4, 2, 32
    q, k, v = qkv(B, H, H, L, L, D)
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[0, L - L // 3:] = False             # right padding
    pad[1, :L // 2] = False                 # left padding: rows 0 .. L/2 - 1 see no key
    pad[2] = False                          # everything masked
    pad[3, 64:] = False                     # the padding starts at a tile boundary
    keep = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    if fill == "bool":
        mask = keep
    else:
        value = torch.finfo(torch.float32).min if fill == "min" else float("-inf")
        mask = torch.zeros(keep.shape).masked_fill(~keep, value)
    for split in (False, True):
        got, want = run(q, k, v, mask, kernel="block", split_kv=split)
    if fill == "min":       # the uniform rows: the mean of every value row, masked ones included
        assert_close(got[2], v[2].mean(-2, keepdim=True).expand(H, L, D), **SMALL_TOL)
    else:
        assert got[2].isnan().all() and not got[0].isnan().any()


@pytest.mark.parametrize("Lq,Lk", [(15, 15), (17, 17), (63, 63), (65, 65), (129, 129), (37, 130), (130, 200)])
@pytest.mark.parametrize("how", ["causal", "float", "bool"])
def test_diagonal_blocks_of_16(Lq, Lk, how, monkeypatch):
    """Where the mask differs along the queries (causal, or a causal mask tensor) the block kernel takes 16
    queries a task and trims each task's keys 16 at a time; the result is the reference's with either block
    size, around every 16- and 64-boundary, with more keys than queries (the causal offset) and GQA."""
    assert A.block_q(True, False) == A.block_q(False, True) == 16 and A.block_q(False, False) == A.BLOCK_Q
    q, k, v = qkv(2, 4, 2, Lq, Lk, 64)
    keep = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)[None, None]
    mask = None if how == "causal" else keep if how == "bool" else \
        torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    outs = []
    for bq in (None, A.BLOCK_Q):
        A._TEMPLATES.clear()
        if bq:
            monkeypatch.setattr(A, "block_q", lambda *_: bq)
        outs.append(run(q, k, v, mask, causal=how == "causal", kernel="block")[0])
    A._TEMPLATES.clear()
    assert_close(outs[0], outs[1], **SMALL_TOL)


def test_strided_views_fold_transposes():
    """q, k, v as head-split views of [B, L, H, D] buffers and out as a view of a [B, Lq, H, D]
    buffer (the merge transpose folds into the store); the buffer around out is left alone."""
    B, H, Hkv, Lq, Lk, D = 2, 8, 2, 37, 130, 64
    qb = torch.randn(B, Lq, H, D)
    kvb = torch.randn(B, Lk, 2, Hkv, D)               # fused KV buffer: k = [..., 0, :, :]
    q, k, v = qb.transpose(1, 2), kvb[:, :, 0].transpose(1, 2), kvb[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    for kernel in ("block", "row"):
        for split in (False, True):
            ob = torch.full((B, Lq, H + 1, D), float("nan"))
            out = ob[:, :, :H].transpose(1, 2)
            run(q, k, v, causal=True, kernel=kernel, split_kv=split, out=out)
            assert ob[:, :, H].isnan().all()


def test_auto_choices():
    """The automatic plan: row kernel for decode; split-KV when tasks leave threads idle and Lk is long."""
    assert A.plan(1, 32, 1024, 1024, threads=2)[:2] == ("block", 0)
    assert A.plan(1, 8, 1, 4096, threads=2)[:2] == ("row", 0)       # 8 tasks: enough
    assert A.plan(1, 8, 1, 4096, Hkv=1, threads=2)[:2] == ("row", 0)  # 2 row groups: enough
    kern, nsplit, chunk = A.plan(1, 4, 1, 4096, Hkv=1, threads=2)     # 1 task for 2 threads
    assert kern == "row" and nsplit > 1 and chunk * nsplit >= 4096
    assert A.plan(1, 1, 64, 8192, threads=2)[1] > 1                   # block kernel splits too
    assert A.plan(1, 1, 64, 8192, threads=2, bq=16)[1] == 0           # its 4 causal blocks: enough
    assert A.plan(1, 1, 64, 8192, threads=8, bq=16)[1] == 8           # 4 tasks for 8 threads: 8 chunks
    assert A.plan(1, 4, 1, 100, Hkv=1, threads=2)[1] == 0             # too short to split
    assert A.plan(1, 3, 1, 4096, Hkv=3, threads=2)[1] == 3            # 3 tasks fill 3/4 of 2 threads' rounds
    assert A.plan(1, 5, 1, 4096, Hkv=5, threads=2)[1] == 0            # 5 fill 5/6: unsplit (row kernel)
    assert A.plan(1, 5, 64, 4096, threads=2)[1] == 2                  # ... split where compute-bound (block)
    q, k, v = qkv(1, 4, 1, 1, 4096, 64)
    run(q, k, v)
    run(q, k, v, causal=True)


def test_prepared_call_reuses_buffers():
    q, k, v = qkv(1, 8, 2, 1, 300, 64)
    out = torch.full((1, 8, 1, 64), float("nan"))
    step = A.prepare(q, k, v, scale=0.125, out=out, split_kv=True)
    for _ in range(2):                                      # new values in the same buffers
        for t in (q, k, v):
            t.normal_()
        assert step() is out
        close(out, _attention(q, k, v, scale=0.125))


def test_scratch_does_not_grow_with_seq_squared():
    small = A.peak_extra_bytes(1, 8, 1024, 1024, 64)
    big = A.peak_extra_bytes(1, 8, 4096, 4096, 64)
    assert big <= 4 * small + 1                            # at most linear in L
    assert big < 1 * 8 * 4096 * 4096 * 4 // 100            # vs the materialised score matrix
    forced = A.peak_extra_bytes(1, 8, 4096, 4096, 64, split_kv=True)
    assert forced < 8 * 4096 * 4096 * 4 // 10


def test_exp_accuracy_and_specials():
    """The kernel's own exp polynomial: <= 2 ulp against float64 over the softmax range, exact
    at the specials (exp(-inf) = 0, exp(0) = 1, NaN propagates)."""
    x = torch.cat([torch.linspace(-104, 88.5, 2_000_003), -torch.rand(100_000) * 20])
    got = A.vexp(x).double()
    want = torch.exp(x.double())
    normal = want > 1.2e-38
    err = (got - want)[normal].abs() / (want[normal] * 2.0**-23)   # in units of float32 ulp

    assert err.max() <= 2.0, f"max ulp error {err.max():.2f}"
    # nothing under the least normal float: exactly 0 instead (a denormal result costs a microcode assist;
    # -1e9-masked keys ran the block kernel 1.8x slower)
    tiny = got[got != 0].abs().min()
    assert tiny >= 2.0**-126 and (got[want < 2.0**-126] == 0).all(), tiny
    sp = torch.tensor([float("-inf"), 0.0, float("nan"), float("inf"), -200.0, 200.0, -1e9, -87.4])
    e = A.vexp(sp)
    assert e[0] == 0 and e[1] == 1 and e[2].isnan() and e[3] == float("inf") and e[4] == 0 and e[5] == float("inf")
    assert e[6] == 0 and e[7] == 0


def test_nan_inputs_propagate():
    q, k, v = qkv(1, 2, 2, 20, 70, 32)
    q[0, 1, 5, 3] = float("nan")
    for kernel in ("block", "row"):
        got, want = run(q, k, v, kernel=kernel)
        assert got[0, 1, 5].isnan().all() and not got[0, 0].isnan().any()


def test_empty():
    q, k, v = qkv(2, 2, 2, 5, 0, 16)
    run(q, k, v)                                            # no keys: zeros, like the reference
    q, k, v = qkv(2, 2, 2, 0, 5, 16)
    assert A.attention(q, k, v, scale=1.0).shape == (2, 2, 0, 16)


def test_errors():
    q, k, v = qkv(1, 4, 3, 8, 8, 16)
    with pytest.raises(ValueError):
        A.attention(q, k, v, scale=1.0)                     # 4 heads not a multiple of 3
    q, k, v = qkv(1, 4, 4, 8, 8, 16)
    with pytest.raises(ValueError):
        A.attention(q.transpose(-1, -2), k, v, scale=1.0)  # last dim not contiguous
    with pytest.raises(TypeError):
        A.attention(q.double(), k, v, scale=1.0)


@pytest.mark.parametrize("isa", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2")])
def test_vector_layers_without_avx512(isa):
    """The AVX2 layer (two 8-lane halves, one query vector per register tile) and the portable one (GCC
    vector extensions, libm exp) compile and agree: causal, split-KV, both kernels."""
    from kfuse.backends.c.compiler import FLAGS
    flags = tuple(FLAGS) + isa
    lib = A.library(32, flags)
    q, k, v = qkv(1, 4, 2, 70, 130, 32)
    want = _attention(q, k, v, scale=0.2, causal=True)
    for kernel in (0, 1):
        for split in (False, True):
            out = torch.full_like(want, float("nan"))
            a, keep, kern = A._args(q, k, v, None, out, scale=0.2, causal=True, split_kv=split,
                                    kernel="block" if kernel == 0 else "row")
            lib.attn_forward(A.ctypes.byref(a), kern)
            close(out, want)
    e = A.vexp(torch.tensor([float("-inf"), 0.0, 1.0, float("nan"), -1e9, -87.4, -87.3]), flags)
    assert e[0] == 0 and e[1] == 1 and math.isclose(e[2].item(), math.e, rel_tol=1e-6) and e[3].isnan()
    if "-mno-avx2" not in isa:      # the AVX2 layer flushes as the AVX-512 one does; libm's expf does not
        assert e[4] == 0 and e[5] == 0 and e[6] >= 2.0**-126


def test_float_mask_keys_fastest_read_in_place():
    """A float mask stored keys-fastest with a row stride wider than Lk (a slice of a bigger buffer) is
    added by the block kernel's 16x16 transposes, not copied: values, a fully masked query row (NaN, or 0
    with zero_masked) and partial 16-query and 16-key blocks."""
    B, H, Lq, Lk, D = 1, 3, 37, 70, 32
    q, k, v = qkv(B, H, H, Lq, Lk, D)
    wide = torch.randn(B, 1, Lq, Lk + 9)
    mask = wide[..., 3:3 + Lk]                       # strides (.., Lk + 9, 1)
    mask[0, 0, 5] = float("-inf")
    assert mask.stride(-1) == 1 and mask.stride(-2) == Lk + 9
    got, _ = run(q, k, v, mask, kernel="block", split_kv=False)
    assert got[0, :, 5].isnan().all() and not got[0, :, 4].isnan().any()
    got, _ = run(q, k, v, mask, kernel="block", split_kv=False, zero_masked=True)
    assert (got[0, :, 5] == 0).all()


@pytest.mark.parametrize("B,H,Hkv,Lq,Lnew,Lk", [(1, 8, 2, 1, 1, 37), (2, 4, 4, 1, 1, 300), (3, 6, 3, 5, 5, 12),
                                              (2, 8, 1, 1, 3, 3)])
def test_new_rows_written_into_the_cache_first(B, H, Hkv, Lq, Lnew, Lk):
    """new=(k_new, v_new): the kernel writes them into the last Lnew rows of k and v (views into a larger
    buffer, as a growable KV cache hands them out), then attends over the whole; other rows untouched.
    The new rows come strided (the transposed output of a projection)."""
    D = 32
    buf_k, buf_v = torch.randn(B, Hkv, Lk + 9, D), torch.randn(B, Hkv, Lk + 9, D)
    k, v = buf_k[:, :, :Lk], buf_v[:, :, :Lk]
    k_new = torch.randn(B, Lnew, Hkv, D).transpose(1, 2)
    v_new = torch.randn(B, Lnew, Hkv, D).transpose(1, 2)
    want_k, want_v = k.clone(), v.clone()
    want_k[:, :, Lk - Lnew:], want_v[:, :, Lk - Lnew:] = k_new, v_new
    spare = buf_k[:, :, Lk:].clone()
    q = torch.randn(B, H, Lq, D)
    for kernel in ("block", "row"):
        k[:, :, Lk - Lnew:] = float("nan")      # poisoned: the kernel must write them before reading
        v[:, :, Lk - Lnew:] = float("nan")
        got = A.attention(q, k, v, scale=0.125, kernel=kernel, new=(k_new, v_new))
        assert torch.equal(k, want_k) and torch.equal(v, want_v) and torch.equal(buf_k[:, :, Lk:], spare)
        close(got, _attention(q, want_k, want_v, None, scale=0.125, causal=False))


@pytest.mark.parametrize("mask_kind", [None, "float", "bool", "per_head"])
def test_growing_key_length_over_one_buffer(mask_kind):
    """A decode loop: q of one row, k and v views of one buffer one key longer each call (a template shared
    across key lengths, the split-KV plan and the mask's strides per call), across the lengths where the
    split starts; every call against the reference, the output poisoned."""
    B, H, Hkv, D = 1, 4, 1, 16          # one row-kernel task: split by the plan once the keys are many
    buf_k, buf_v = torch.randn(B, Hkv, 1100, D), torch.randn(B, Hkv, 1100, D)
    q = torch.randn(B, H, 1, D)
    splits = set()
    for Lk in [*range(1, 40), *range(1000, 1100, 9)]:
        k, v = buf_k[:, :, :Lk], buf_v[:, :, :Lk]
        mask = None
        if mask_kind == "float":
            mask = torch.randn(1, 1, 1, Lk)
        elif mask_kind == "bool":
            mask = torch.rand(1, 1, 1, Lk) < 0.8
            mask[..., 0] = True
        elif mask_kind == "per_head":
            mask = torch.randn(B, H, 1, Lk)
        for split in (None, True, False):
            run(q, k, v, mask, split_kv=split)
        splits.add(A.plan(B, H, 1, Lk, Hkv=Hkv, threads=2)[1] > 0)
    assert splits == {False, True}


@pytest.mark.parametrize("shape", [(), (1,), (9,), (1, 9)])
def test_masks_of_few_dims_broadcast(shape):
    """A 0-d (a scalar added to every score), 1-d or 2-d mask broadcast to [B, H, Lq, Lk], as ONNX's and torch's
    attention allow."""
    q, k, v = qkv(2, 4, 2, 5, 9, 16)
    for kernel in ("block", "row"):
        run(q, k, v, torch.randn(shape), kernel=kernel)


def test_new_rows_without_a_kernel_call_and_errors():
    k, v = torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16)
    new = (torch.ones(1, 2, 1, 16), torch.full((1, 2, 1, 16), 2.0))
    A.attention(torch.randn(1, 2, 0, 16), k, v, scale=1.0, new=new)       # no query: the rows still land
    assert k[0, :, 3].eq(1).all() and v[0, :, 3].eq(2).all() and k[0, :, :3].eq(0).all()
    with pytest.raises(ValueError, match="not rows of k"):
        A.attention(torch.randn(1, 2, 1, 16), k, v, scale=1.0, new=(torch.ones(1, 2, 5, 16),) * 2)


@pytest.mark.parametrize("H,Hkv,Lq,Lk,D,DV", [(4, 4, 70, 130, 16, 32), (4, 2, 1, 300, 192, 128), (6, 2, 3, 77, 24, 40),
                                             (2, 1, 33, 33, 64, 16), (3, 3, 5, 200, 8, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_v_head_dim_differs_from_qs(H, Hkv, Lq, Lk, D, DV, causal):
    """v's head dim other than q's and k's (DeepSeek's MLA: 192 and 128; LeViT: 16 and 32 or 64): both
    kernels, split-KV on and off, a float mask, and new rows appended to k and v of their own widths"""
    q, k, v = torch.randn(2, H, Lq, D), torch.randn(2, Hkv, Lk, D), torch.randn(2, Hkv, Lk, DV)
    mask = torch.randn(2, 1, Lq, Lk)
    for kernel in ("block", "row"):
        for split in (False, True):
            got, _ = run(q, k, v, mask, causal=causal, kernel=kernel, split_kv=split)
            assert got.shape == (2, H, Lq, DV)
    k_new, v_new = torch.randn(2, Hkv, 1, D), torch.randn(2, Hkv, 1, DV)
    want_k, want_v = k.clone(), v.clone()
    want_k[:, :, -1:], want_v[:, :, -1:] = k_new, v_new
    got = A.attention(q, k, v, scale=0.125, causal=causal, new=(k_new, v_new))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    close(got, _attention(q, want_k, want_v, None, scale=0.125, causal=causal))
    with pytest.raises(ValueError, match="v_new has shape"):
        A.attention(q, k, v, scale=0.125, new=(k_new, torch.randn(2, Hkv, 1, D + 1)))
