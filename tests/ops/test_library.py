"""kfuse.backends.library: packed linear layers against the reference `_linear`, on both backends.

Tolerance: fp32. oneDNN blocks the K reduction differently from torch.matmul, so the two agree
to reordered-accumulation error, not bit for bit: rtol = atol = 1e-5 for K < 384 and
1e-4 for K >= 384 (measured worst about 3e-5 absolute at K = 384 with outputs of size ~30).
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from kfuse.backends import library, openmp
from kfuse.backends.library import HAVE_ONEDNN, pack_linear
from kfuse.errors import KfuseError
from kfuse.ops.reference import ACTIVATIONS, _linear

BACKENDS = [pytest.param("onednn", marks=pytest.mark.skipif(not HAVE_ONEDNN, reason="no oneDNN op")),
            pytest.param("mkl-packed", marks=pytest.mark.skipif(not library.mkl_packed_supported(),
                                                                reason="no packed MKL op")),
            "mkl"]
ACTS = list(ACTIVATIONS)


def tol(K):
    return 1e-4 if K >= 384 else 1e-5


def check(got, want, K):
    t = tol(K)
    assert_close(got, want, atol=t, rtol=t, msg=f"K = {K}, tol {t}")


def problem(M, K, N, bias=True, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g)
    w = torch.randn(K, N, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b


@pytest.fixture
def fresh_probes():
    library.reset_capabilities()
    yield
    library.reset_capabilities()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_every_activation(backend, act, bias):
    x, w, b = problem(127, 77, 93, bias)
    lin = pack_linear(w, b, act, prefer=backend)
    assert lin.backend == backend
    # oneDNN's relu post-op maps NaN to 0, so the probe keeps relu as our own in-place pass
    assert lin.post_op_fused == (backend == "onednn" and act not in ("none", "relu"))
    check(lin(x), _linear(x, w, b, act=act), 77)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
def test_nan_propagates_through_every_activation(act):
    x, w, b = problem(4, 9, 5, True)
    x[2, 3] = float("nan")
    got = pack_linear(w, b, act)(x)
    assert torch.isnan(got[2]).all() and not torch.isnan(got[[0, 1, 3]]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [1, 7, 127, 1000])
@pytest.mark.parametrize("K,N", [(5, 3), (33, 47), (384, 1536), (400, 250)])
def test_odd_shapes(backend, M, K, N):
    x, w, b = problem(M, K, N, seed=M + K)
    lin = pack_linear(w, b, "gelu", batch_hint=128, prefer=backend)
    check(lin(x), _linear(x, w, b, act="gelu"), K)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "gelu_tanh", "silu"])
def test_3d_input(backend, act):
    x, w, b = problem(13, 384, 100, lead=(3,))
    lin = pack_linear(w, b, act, prefer=backend)
    y = lin(x)
    assert y.shape == (3, 13, 100)
    check(y, _linear(x, w, b, act=act), 384)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    big, w, b = problem(64, 120, 50)
    xs = big[:, 10:110]                       # row-strided 2-D view, K = 100
    w = w[:100]
    lin = pack_linear(w, b, "relu", prefer=backend)
    check(lin(xs), _linear(xs, w, b, act="relu"), 100)
    xt = torch.randn(100, 64).t()             # column-major
    check(lin(xt), _linear(xt, w, b, act="relu"), 100)
    x3 = torch.randn(64, 4, 100).transpose(0, 1)   # non-contiguous 3-D
    check(lin(x3), _linear(x3, w, b, act="relu"), 100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_out_into_poisoned_buffer(backend, act, lead):
    x, w, b = problem(31, 384, 70, lead=lead)
    lin = pack_linear(w, b, act, prefer=backend)
    out = torch.full((*lead, 31, 70), float("nan"))
    y = lin(x, out=out)
    assert y is out
    check(out, _linear(x, w, b, act=act), 384)
    nc = torch.full((70, *lead, 31), float("nan")).movedim(0, -1)   # non-contiguous out: copied into
    assert lin(x, out=nc) is nc
    check(nc, _linear(x, w, b, act=act), 384)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_residual(backend, act, bias):
    x, w, b = problem(17, 384, 64, bias, lead=(2,))
    r = torch.randn(2, 17, 64)
    lin = pack_linear(w, b, act, prefer=backend)
    assert lin.residual_fused == (backend == "onednn" and act == "none")
    want = _linear(x, w, b, act=act) + r
    check(lin(x, residual=r), want, 384)
    out = torch.full_like(r, float("nan"))
    assert lin(x, out=out, residual=r) is out
    check(out, want, 384)
    rb = torch.randn(64)                      # broadcast residual: not fusable, added after
    check(lin(x, residual=rb), _linear(x, w, b, act=act) + rb, 384)


def test_weight_is_snapshot():
    x, w, b = problem(8, 16, 8)
    want = _linear(x, w, b, act="relu")
    lins = [pack_linear(w, b, "relu", prefer=p) for p in ("onednn", "mkl-packed", "mkl")]
    w.zero_()
    b.zero_()
    for lin in lins:
        check(lin(x), want, 16)


def test_bad_arguments():
    w = torch.randn(4, 3)
    with pytest.raises(KfuseError, match="activation"):
        pack_linear(w, None, "swish")
    with pytest.raises(KfuseError, match="float32"):
        pack_linear(w.double(), None)
    with pytest.raises(KfuseError, match="bias"):
        pack_linear(w, torch.randn(4))
    with pytest.raises(KfuseError, match="prefer"):
        pack_linear(w, None, prefer="cuda")


class _RaisingOp:
    """Stands in for torch.ops.mkldnn._linear_pointwise: both overloads raise."""

    def __init__(self, result=None):
        self.result = result

    def _call(self, *args):
        if self.result is None:
            raise RuntimeError("mkldnn::_linear_pointwise: no kernel")
        return self.result(*args)

    default = binary = property(lambda self: self._call)


@pytest.mark.parametrize("fake", [_RaisingOp(), _RaisingOp(lambda x, w, *rest: torch.zeros(x.shape[0], 7))],
                         ids=["raises", "wrong-result"])
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_probe_failure_falls_back(monkeypatch, fresh_probes, fake, act):
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fake)
    assert not library.onednn_supports("none")
    x, w, b = problem(127, 384, 99)
    lin = pack_linear(w, b, act)               # asks for oneDNN, gets the fallback
    assert lin.backend == "mkl" and not lin.post_op_fused
    check(lin(x), _linear(x, w, b, act=act), 384)


@pytest.mark.skipif(not HAVE_ONEDNN, reason="no oneDNN op")
def test_post_op_probe_failure_keeps_onednn_gemm(monkeypatch, fresh_probes):
    real = library.onednn_supports.__wrapped__
    monkeypatch.setattr(library, "onednn_supports", lambda f: f != "gelu" and real(f))
    x, w, b = problem(50, 384, 99)
    lin = pack_linear(w, b, "gelu")
    assert lin.backend == "onednn" and not lin.post_op_fused
    check(lin(x), _linear(x, w, b, act="gelu"), 384)


def test_one_thread():
    x, w, b = problem(64, 384, 256)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = pack_linear(w, b, "gelu")(x)
    finally:
        torch.set_num_threads(n)
    check(y1, _linear(x, w, b, act="gelu"), 384)


@pytest.mark.skipif(not library.mkl_packed_supported(), reason="no packed MKL op")
@pytest.mark.parametrize("M", [0, 1, 5, 64, 150])
def test_mkl_packed_row_counts(M):
    """MKL's weight is packed for one row count (64 here); any other in blocks of 64 rows, the last padded
    with zeros; the pack is the only copy (a snapshot: the weight changed after packing changes nothing)."""
    x, w, b = problem(M, 384, 70)
    lin = pack_linear(w, b, "silu", batch_hint=64, prefer="mkl-packed")
    w.zero_()
    y = lin(x)
    assert y.shape == (M, 70)
    check(y, _linear(x, problem(M, 384, 70)[1], b, act="silu"), 384)


@pytest.mark.parametrize("fake", [_RaisingOp(), _RaisingOp(lambda x, *rest: torch.zeros(x.shape[0], 7))],
                         ids=["raises", "wrong-result"])
def test_mkl_packed_probe_failure_falls_back(monkeypatch, fresh_probes, fake):
    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", fake)
    assert not library.mkl_packed_supported()
    x, w, b = problem(33, 384, 99)
    lin = pack_linear(w, b, "gelu", batch_hint=33, prefer="mkl-packed")
    assert lin.backend == "mkl"
    check(lin(x), _linear(x, w, b, act="gelu"), 384)


@pytest.mark.skipif(not openmp.MKL_THREADS, reason="MKL's per-thread count cannot be set")
def test_mkl_obeys_the_calling_threads_count():
    """MKL keeps its own thread count (torch.set_num_threads sets it for all threads): openmp.using sets
    the calling thread's and gives it back, so a packed MKL GEMM runs on the count kfuse runs with."""
    import ctypes
    from pathlib import Path
    get = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Get_Max_Threads
    before = get()
    with openmp.using(1):
        assert get() == 1
        x, w, b = problem(40, 384, 64)
        if library.mkl_packed_supported():
            check(pack_linear(w, b, "none", batch_hint=40, prefer="mkl-packed")(x), _linear(x, w, b, act="none"), 384)
    assert get() == before
