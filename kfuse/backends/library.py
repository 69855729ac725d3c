"""Linear layers with constant weights through a GEMM library: oneDNN, MKL's packed GEMM, or torch.addmm
(the fallback).

    lin = pack_linear(w_kn, bias, act="gelu")   # packs the weight once
    y = lin(x)                                  # act(x @ w_kn + bias), x [..., K] float32 -> [..., N]
    lin(x, out=buf)                             # into a preallocated buffer
    lin(x, residual=r)                          # act(x @ w_kn + bias) + r

Why oneDNN: on the project's 2-core AVX-512 Zen 5 machine, oneDNN's fp32 GEMM on a pre-reordered weight
ran at about 470-520 GFLOP/s, MKL's unpacked (`torch.addmm`/`F.linear`) at about 200 (bench/README.md).
MKL's GEMM on a packed weight (`torch.ops.mkl._mkl_linear`, Inductor's fp32 path after freezing) times
like oneDNN's alone on the Intel VM and faster inside programs there, so it is a candidate too
(backends/linear.py), probed like oneDNN's op. PyTorch reaches oneDNN only through the private op
Inductor uses after freezing,
`torch.ops.mkldnn._linear_pointwise(x, w_packed, b, attr, scalars, algorithm)`, with the weight
packed by `torch.ops.mkldnn._reorder_linear_weight(w_nk, batch_size)` (see Inductor's
fx_passes/mkldnn_fusion.py, `pack_linear_weight`). Being private, it is used only after a probe
has called it once on a tiny odd-shaped problem and matched the reference; otherwise every layer
falls back to `torch.addmm` + an in-place activation, which computes the same function.

Epilogue. The activation runs as a oneDNN post-op (eltwise applied to each output tile while it
is still in cache): relu, gelu (erf), gelu_tanh, silu (oneDNN "swish"), sigmoid, tanh. Measured
with bench/bench_linear_act.py, 2 threads: at [128,384]x[384,1536] plain oneDNN linear 0.318 ms,
with the gelu post-op 0.334 ms (95%), oneDNN linear then our in-place gelu_ 0.344 ms; at
[1024,384]x[384,1536] 2.404 / 2.532 / 2.585 ms (the second pass re-reads a 6 MB output that no
longer fits in cache). So the post-op is kept: 2-3% faster, and one pass over memory fewer. A
post-op whose probe fails runs as oneDNN linear + our in-place activation (`post_op_fused` False).

Residual. `_linear_pointwise.binary(x, other, w, b, "add")` fuses `+ other` into the GEMM; it
has no unary post-op, so it is used only for act == "none" and an `other` of exactly the output
shape (no broadcasting: oneDNN rejects it). Every other case adds the residual in place after.

Precision: fp32 only. oneDNN blocks the K loop differently from MKL/`torch.matmul`, so results
differ from the reference by reordered accumulation, not by bit: about 1e-6 relative for small
K, up to a few 1e-5 absolute at K >= 384 with O(10) outputs. Tests use atol = rtol = 1e-4 there.
Inference only: no autograd through the oneDNN op.

Threads: both libraries run on PyTorch's intra-op pool, so torch.get_num_threads() (set by the
caller from KFUSE_NUM_THREADS) governs them.
"""
from __future__ import annotations

import functools

import torch

from ..errors import KfuseError
from ..ops.reference import ACTIVATIONS
from . import openmp

__all__ = ["pack_linear", "PackedLinear", "HAVE_ONEDNN", "onednn_supports", "mkl_packed_supported",
           "reset_capabilities"]

# kfuse activation name -> oneDNN post-op (attr, scalars, algorithm) as Inductor spells it.
ONEDNN_POST_OPS = {
    "none": ("none", [], ""),
    "relu": ("relu", [], ""),
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
    "silu": ("swish", [], ""),
    "sigmoid": ("sigmoid", [], ""),
    "tanh": ("tanh", [], ""),
}

# The same activations in place, for the fallback and for post-ops that fail their probe.
# Each computes exactly what kfuse.ops.reference.ACTIVATIONS computes out of place.
INPLACE_ACTS = {
    "none": None,
    "relu": torch.relu_,
    "gelu": lambda t: torch.ops.aten.gelu_(t, approximate="none"),
    "gelu_tanh": lambda t: torch.ops.aten.gelu_(t, approximate="tanh"),
    "silu": torch.ops.aten.silu_,
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
}

assert set(ONEDNN_POST_OPS) == set(INPLACE_ACTS) == set(ACTIVATIONS)


def _onednn_ops():
    """(unary, binary) overloads of the private op, or None where this torch build lacks them."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packet = torch.ops.mkldnn._linear_pointwise
        reorder = torch.ops.mkldnn._reorder_linear_weight
        return packet.default, packet.binary, reorder.default
    except (AttributeError, RuntimeError):
        return None


def _probe_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    x[1, 2] = float("nan")                      # NaN must propagate (oneDNN's relu post-op maps it to 0)
    w = torch.randn(5, 7, generator=g)          # [K, N]: K, N odd on purpose
    b = torch.randn(7, generator=g)
    r = torch.randn(3, 7, generator=g)
    return x, w, b, r


def _mkl_packed_ops():
    """(linear, reorder) of MKL's packed GEMM (Inductor's fp32 linear after freezing), or None where this
    torch build lacks them or kfuse cannot set MKL's thread count per calling thread (openmp.MKL_THREADS)."""
    if not (torch.backends.mkl.is_available() and openmp.MKL_THREADS):
        return None
    try:
        return torch.ops.mkl._mkl_linear.default, torch.ops.mkl._mkl_reorder_linear_weight.default
    except (AttributeError, RuntimeError):
        return None


def _shape_only(N: int, K: int) -> torch.Tensor:
    """The [N, K] weight argument of MKL's op where only its sizes and dtype are read (the packed row
    count's path): a view of one float, so no copy of the weight is held for it."""
    return torch.zeros(1).expand(N, K)


@functools.cache
def mkl_packed_supported() -> bool:
    """Whether MKL's packed GEMM exists and gives the reference result on the probe (NaN included), called
    as PackedLinear calls it: the packed row count, the [N, K] argument a view of one float."""
    ops = _mkl_packed_ops()
    if ops is None:
        return False
    linear, reorder = ops
    x, w, b, _ = _probe_problem()
    want = x.double() @ w.double() + b.double()
    try:
        with torch.no_grad():
            got = linear(x, reorder(w.t().contiguous(), x.shape[0]), _shape_only(*w.t().shape), b, x.shape[0])
    except Exception:  # a private op may fail in any way
        return False
    return (isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == want.shape
            and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True))


@functools.cache
def onednn_supports(feature: str) -> bool:
    """Whether the oneDNN op exists and a tiny call gives the reference result, once per feature:
    an activation name from ONEDNN_POST_OPS, or "residual" for the fused add. Cached."""
    ops = _onednn_ops()
    if ops is None:
        return False
    unary, binary, reorder = ops
    x, w, b, r = _probe_problem()
    try:
        with torch.no_grad():
            wp = reorder(w.t().contiguous(), None)
            if feature == "residual":
                got, want = binary(x, r, wp, b, "add"), x.double() @ w.double() + b.double() + r.double()
            else:
                attr, scalars, algorithm = ONEDNN_POST_OPS[feature]
                got = unary(x, wp, b, attr, scalars, algorithm)
                want = ACTIVATIONS[feature](x.double() @ w.double() + b.double())
    except Exception:  # a private op may fail in any way: missing kernel, changed schema, ...
        return False
    return (isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == torch.float32
            and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True))


def reset_capabilities() -> None:
    """Forget the probes' results (tests use it after patching the private ops)."""
    for clear in _clear_probes:
        clear()


_clear_probes = (onednn_supports.cache_clear, mkl_packed_supported.cache_clear)     # bound here: tests patch the names


HAVE_ONEDNN: bool = onednn_supports("none")


class PackedLinear:
    """act(x @ w + b) for one constant weight, packed once. Call: lin(x, out=None, residual=None).

    x: [..., K] float32, contiguous or any strided 2-D view. Returns [..., N].
    out: a buffer of the output's shape. On the mkl backend the GEMM writes straight into it when
      it is contiguous. On the onednn backend the private op has no out= form, so the result is
      copied into it: one extra pass over the output (about 3% at [128,384]x[384,1536]).
    residual: a tensor of the output's shape, added after the activation: act(x @ w + b) + r.
      Fused into the GEMM (oneDNN binary post-op) when act == "none" on the onednn backend.
    Attributes: backend ("onednn" | "mkl-packed" | "mkl"), post_op_fused (the activation runs inside the
      oneDNN call), residual_fused, act, in_features, out_features.

    Backends: "onednn" (oneDNN's GEMM on its reordered weight, the activation a post-op); "mkl-packed"
    (MKL's GEMM on a weight packed for the call's row count, as Inductor runs fp32 linears after freezing:
    no post-ops, so the activation runs in place after); "mkl" (torch.addmm, the fallback).
    """

    __slots__ = ("backend", "act", "post_op_fused", "residual_fused", "in_features", "out_features",
                 "_w", "_b", "_unary", "_binary", "_attr", "_inplace_act", "_rows", "_w_nk", "__weakref__")

    def __init__(self, w_kn, bias, act, batch_hint, prefer):
        if act not in ONEDNN_POST_OPS:
            raise KfuseError(f"pack_linear: unknown activation {act!r}; known: {sorted(ONEDNN_POST_OPS)}")
        if prefer not in ("onednn", "mkl-packed", "mkl"):
            raise KfuseError(f"pack_linear: prefer must be 'onednn', 'mkl-packed' or 'mkl', got {prefer!r}")
        if w_kn.dim() != 2 or w_kn.dtype != torch.float32:
            raise KfuseError(f"pack_linear: weight must be a 2-D float32 [K, N] tensor, got "
                             f"{tuple(w_kn.shape)} {w_kn.dtype}")
        K, N = w_kn.shape
        if bias is not None and (bias.shape != (N,) or bias.dtype != torch.float32):
            raise KfuseError(f"pack_linear: bias must be float32 [{N}], got {tuple(bias.shape)} {bias.dtype}")
        self.act, self.in_features, self.out_features = act, K, N
        self._b = None if bias is None else bias.detach().contiguous().clone()
        use_onednn = prefer == "onednn" and onednn_supports("none")
        self.backend = "onednn" if use_onednn else "mkl-packed" if prefer == "mkl-packed" and mkl_packed_supported() \
            else "mkl"
        self.post_op_fused = use_onednn and act != "none" and onednn_supports(act)
        self.residual_fused = use_onednn and act == "none" and onednn_supports("residual")
        self._inplace_act = None if self.post_op_fused else INPLACE_ACTS[act]
        with torch.no_grad():
            if use_onednn:
                unary, binary, reorder = _onednn_ops()
                # oneDNN wants the weight as [N, K]; the reorder makes an opaque blocked copy.
                self._w = reorder(w_kn.detach().t().contiguous(), batch_hint)
                self._unary, self._binary = unary, binary
                self._attr = ONEDNN_POST_OPS[act if self.post_op_fused else "none"]
            elif self.backend == "mkl-packed":
                # MKL's copy packed for batch_hint rows, the only copy kept (Inductor keeps the [N, K] weight
                # too, which the op reads for another row count: _call_mkl_packed pads or splits instead)
                self._unary, reorder = _mkl_packed_ops()
                self._rows = batch_hint or 1
                self._w = reorder(w_kn.detach().t().contiguous(), self._rows)
                self._w_nk = _shape_only(N, K)
                self._binary = self._attr = None
            else:
                self._w = w_kn.detach().contiguous().clone()   # a snapshot, as the oneDNN copy is
                self._unary = self._binary = self._attr = None

    def __repr__(self):
        return (f"PackedLinear({self.in_features}->{self.out_features}, act={self.act!r}, "
                f"backend={self.backend!r}, post_op_fused={self.post_op_fused})")

    def __call__(self, x, out=None, residual=None):
        if self.backend == "onednn":
            return self._call_onednn(x, out, residual)
        if self.backend == "mkl-packed":
            return self._call_mkl_packed(x, out, residual)
        return self._call_mkl(x, out, residual)

    def _call_onednn(self, x, out, residual):
        if residual is not None and self.residual_fused and residual.shape == (*x.shape[:-1], self.out_features):
            y = self._binary(x, residual, self._w, self._b, "add")
            residual = None
        else:
            attr, scalars, algorithm = self._attr
            y = self._unary(x, self._w, self._b, attr, scalars, algorithm)
        if self._inplace_act is not None:
            self._inplace_act(y)
        if residual is not None:
            y.add_(residual)
        if out is None:
            return y
        return out.copy_(y)

    def _call_mkl_packed(self, x, out, residual):
        # detached: the op has no autograd formula (an input needing gradients gets an output that warns)
        linear, rows, x = self._unary, self._rows, x.detach()
        if x.numel() == rows * self.in_features:
            y = linear(x, self._w, self._w_nk, self._b, rows)
        else:       # the pack serves `rows` rows: blocks of them, the last one padded with zeros
            x2 = x.reshape(-1, self.in_features)
            y = x2.new_empty(x2.shape[0], self.out_features)
            for i in range(0, x2.shape[0], rows):
                part = x2[i:i + rows]
                if part.shape[0] < rows:
                    part = torch.cat([part, part.new_zeros(rows - part.shape[0], self.in_features)])
                y[i:i + rows] = linear(part, self._w, self._w_nk, self._b, rows)[:y.shape[0] - i]
            y = y.view(*x.shape[:-1], self.out_features)
        if self._inplace_act is not None:
            self._inplace_act(y)
        if residual is not None:
            y.add_(residual)
        return y if out is None else out.copy_(y)

    def _call_mkl(self, x, out, residual):
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        direct = out is not None and out.is_contiguous()
        o2 = out.view(-1, self.out_features) if direct else None
        if self._b is None:
            y = torch.mm(x2, self._w, out=o2) if direct else torch.mm(x2, self._w)
        else:
            y = torch.addmm(self._b, x2, self._w, out=o2) if direct else torch.addmm(self._b, x2, self._w)
        if self._inplace_act is not None:
            self._inplace_act(y)
        if direct:
            y = out
        elif x.dim() != 2:
            y = y.view(*lead, self.out_features)
        if residual is not None:
            y.add_(residual)
        if out is not None and not direct:
            return out.copy_(y)
        return y


def pack_linear(w_kn: torch.Tensor, bias: torch.Tensor | None, act: str = "none",
                batch_hint: int | None = None, prefer: str = "onednn") -> PackedLinear:
    """Pack a constant [K, N] weight (and [N] bias) once; return a callable computing act(x @ w + b).

    act: one of kfuse.ops.reference.ACTIVATIONS. batch_hint: the expected number of rows M, passed
    to oneDNN's weight reorder (measured: no difference for fp32 at M = 128 and 1024; kept because
    Inductor passes it), and the row count MKL's packed weight is made for (another runs in blocks of
    that many rows, the last padded).
    prefer="mkl" forces the torch.addmm fallback (tests, comparisons); "onednn" and "mkl-packed" use
    their library when its probe passes, and fall back silently to "mkl" otherwise: check .backend.
    """
    return PackedLinear(w_kn, bias, act, batch_hint, prefer)
