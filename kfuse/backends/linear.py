"""Linear layers: the library's GEMM (oneDNN, the activation as a post-op) or our C GEMM with the
epilogue in registers, whichever is measured faster per shape; and gated linears (SwiGLU, GeGLU): our
GEMM with the gating in its epilogue, or the library's GEMM with the gating after it."""
from __future__ import annotations

import torch

from ..kernels.linear import as_linear
from ..ops.reference import ACTIVATIONS
from . import choice
from .c import CompileError
from .c import gemm as c_gemm
from .c.autotune import pick
from .c.autotune import problem as problem_key
from .constants import shared
from .library import pack_linear

# a linear's activation as the convolution post-op our C GEMM takes
POST_OPS = {"none": None, "relu": ("relu", (), ""), "gelu": ("gelu", (), "none"),
            "gelu_tanh": ("gelu", (), "tanh"), "silu": ("swish", (), ""), "sigmoid": ("sigmoid", (), ""),
            "tanh": ("tanh", (), "")}


def linear_candidates(x, w, b, act) -> dict:
    """{backend name: kernel} of the kernels computing a linear (kernels.linear.as_linear's parts): the
    library's, and our GEMM."""
    # oneDNN packs a weight for one row (a GEMV) its own way, for any other count the same way
    # (outputs bit-equal for 2..1024 rows): one packed copy serves every prefill length
    lin = shared(pack_linear, w, b, act, batch_hint=1 if x.numel == x.shape[-1] else None)
    cands = {f"library:{lin.backend}" + ("+post-op" if lin.post_op_fused else ""): lin}
    if act in POST_OPS:     # our C GEMM: no library call to pay, where the GEMM is small
        try:
            cands["c:gemm"] = shared(c_gemm.GemmConv, w.t(), b, POST_OPS[act], False)
        except CompileError:        # no C compiler: the library alone
            pass
    return cands


def linear_kernel(nodes):
    x, w, b, act = as_linear(nodes)
    return _fastest(linear_candidates(x, w, b, act), ("linear", tuple(w.shape), x.shape, act, b is not None), x.shape)


class _GatedLibrary:
    """act(gate) * up after the library's GEMM of both halves (what our gated GEMM is timed against)."""

    def __init__(self, w, b, act):
        self.lin, self.act = shared(pack_linear, w, b, "none"), ACTIVATIONS[act]
        self.backend = self.lin.backend

    def __call__(self, x):
        gate, up = self.lin(x).chunk(2, dim=-1)
        return self.act(gate).mul_(up)


def gated_parts(node) -> tuple:
    """(x, w, b, act) of a gated_linear node: act(x @ w_gate + b_gate) * (x @ w_up + b_up), w = [w_gate |
    w_up] [K, 2F], b likewise or None."""
    return node.inputs[0], node.inputs[1].value, node.inputs[2].value if len(node.inputs) == 3 else None, \
        node.attrs["act"]


def gated_linear_candidates(w, b, act) -> dict:
    """{backend name: kernel} of the kernels computing a gated linear (gated_parts): the library's GEMM
    then the gating, and our gated GEMM."""
    lib = _GatedLibrary(w, b, act)
    cands = {f"library:{lib.backend}+torch": lib}
    try:
        cands["c:gemm"] = shared(c_gemm.GemmConv, w.t(), b, POST_OPS[act], False, glu=True)
    except CompileError:
        pass
    return cands


def gated_linear_kernel(node):
    x, w, b, act = gated_parts(node)
    return _fastest(gated_linear_candidates(w, b, act), ("gated_linear", tuple(w.shape), x.shape, act, b is not None),
                    x.shape)


def _fastest(cands: dict, problem: tuple, x_shape):
    """(fn, backend name) of the candidate measured fastest: fn(x, *weights) -> (y,), or, for ours,
    fn(bufs, x, *weights) writing into the planned buffer (backends._conv_call says why)."""
    schedule = ""
    if len(cands) > 1:
        best, schedule = pick(problem_key(*problem), choice.timed(cands), lambda: [torch.randn(x_shape)])
        cands = {best: cands[best]}
    (backend, k), = cands.items()
    if choice.takes_out(k):
        run = k.bound(tuple(x_shape)) if hasattr(k, "bound") else k
        fn = lambda bufs, x, *_: (run(x, out=bufs[0]),)   # noqa: E731
        fn.writes_into = True
    else:
        fn = lambda x, *_: (k(x),)   # noqa: E731
    fn.schedule, fn.weights = schedule, k
    fn.sources = lambda: choice.conv_sources(k)
    return fn, backend
