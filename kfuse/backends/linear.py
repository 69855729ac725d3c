"""Linear layers: a library's GEMM (oneDNN, the activation as a post-op; MKL's on a packed weight, the
activation after) or our C GEMM with the epilogue in registers, whichever is measured faster per shape,
alone and then in the program (runtime/settle.py); and gated linears (SwiGLU, GeGLU): our GEMM with the
gating in its epilogue, or a library's GEMM with the gating after it.

Why both libraries: in a program each GEMM finds its weight out of the caches the kernels before it
used, and there MKL's packed GEMM ran the no-activation linears of MiniLM, GPT-2- and Llama-style
models faster than oneDNN's (the models 0.91-0.96x the time with every linear on MKL, Intel Xeon VM,
2 threads), though the two time alike alone; oneDNN's GELU post-op kept its GELU linears ahead. So
neither is a rule: both are candidates, and the program decides (bench/README.md, forty-sixth
session)."""
from __future__ import annotations

import math

import torch

from ..kernels.linear import as_linear
from ..ops.reference import ACTIVATIONS
from . import choice
from .c import CompileError
from .c import gemm as c_gemm
from .c.autotune import pick
from .c.autotune import problem as problem_key
from .constants import first_claim, shared
from .library import mkl_packed_supported, pack_linear

# a linear's activation as the convolution post-op our C GEMM takes
POST_OPS = {"none": None, "relu": ("relu", (), ""), "gelu": ("gelu", (), "none"),
            "gelu_tanh": ("gelu", (), "tanh"), "silu": ("swish", (), ""), "sigmoid": ("sigmoid", (), ""),
            "tanh": ("tanh", (), "")}


def linear_candidates(x, w, b, act) -> dict:
    """{backend name: kernel} of the kernels computing a linear (kernels.linear.as_linear's parts): the
    libraries', and our GEMM."""
    rows = _rows(x.shape)
    # oneDNN packs a weight for one row (a GEMV) its own way, for any other count the same way
    # (outputs bit-equal for 2..1024 rows): one packed copy serves every prefill length
    lin = shared(pack_linear, w, b, act, batch_hint=1 if rows == 1 else None)
    cands = {f"library:{lin.backend}" + ("+post-op" if lin.post_op_fused else ""): lin}
    if act in POST_OPS:     # our C GEMM: no library call to pay, where the GEMM is small
        try:
            cands["c:gemm"] = shared(c_gemm.GemmConv, w.t(), b, POST_OPS[act], False)
        except CompileError:        # no C compiler: the library alone
            pass
    if lin.backend == "onednn" and _mkl_rows(w, rows):
        cands["library:mkl-packed"] = shared(pack_linear, w, b, act, batch_hint=rows, prefer="mkl-packed")
    return cands


def _mkl_rows(w, rows: int) -> bool:
    """Whether MKL's packed GEMM is a candidate for weight w at `rows` rows. Its pack serves one row count,
    so a weight gets one for the first row count of at least FEW_ROWS that a program asks for and for no
    other: each signature of a model (a prompt length) would otherwise hold another copy of every weight,
    where oneDNN's pack and ours serve all (constants.py)."""
    return rows >= FEW_ROWS and mkl_packed_supported() and first_claim(w, "mkl-packed rows", rows) == rows


def _rows(x_shape) -> int:
    """The rows of a linear's input (all dims but the last), at least 1."""
    return max(1, math.prod(x_shape[:-1]))


# Fewer rows (a decode step's, one per sequence of the batch): the product reads its weight for a handful of
# rows, MKL's pack is not offered and the choice made alone is not timed again in the program, because a
# library kernel in a decode step keeps it from running as one C call (dynamo_step), which neither timing sees.
FEW_ROWS = 16


def linear_kernel(nodes):
    x, w, b, act = as_linear(nodes)
    return _fastest(lambda: linear_candidates(x, w, b, act), ("linear", tuple(w.shape), x.shape, act, b is not None),
                    x.shape)


class _GatedLibrary:
    """act(gate) * up after a library's GEMM of both halves (what our gated GEMM is timed against)."""

    def __init__(self, w, b, act, rows=None, prefer="onednn"):
        self.lin, self.act = shared(pack_linear, w, b, "none", batch_hint=rows, prefer=prefer), ACTIVATIONS[act]
        self.backend = self.lin.backend

    def __call__(self, x):
        gate, up = self.lin(x).chunk(2, dim=-1)
        return self.act(gate).mul_(up)


def gated_parts(node) -> tuple:
    """(x, w, b, act) of a gated_linear node: act(x @ w_gate + b_gate) * (x @ w_up + b_up), w = [w_gate |
    w_up] [K, 2F], b likewise or None."""
    return node.inputs[0], node.inputs[1].value, node.inputs[2].value if len(node.inputs) == 3 else None, \
        node.attrs["act"]


def gated_linear_candidates(x, w, b, act) -> dict:
    """{backend name: kernel} of the kernels computing a gated linear (gated_parts): a library's GEMM
    then the gating, and our gated GEMM."""
    lib = _GatedLibrary(w, b, act)
    cands = {f"library:{lib.backend}+torch": lib}
    try:
        cands["c:gemm"] = shared(c_gemm.GemmConv, w.t(), b, POST_OPS[act], False, glu=True)
    except CompileError:
        pass
    rows = _rows(x.shape)
    if lib.backend == "onednn" and _mkl_rows(w, rows):
        cands["library:mkl-packed+torch"] = _GatedLibrary(w, b, act, rows, "mkl-packed")
    return cands


def gated_linear_kernel(node):
    x, w, b, act = gated_parts(node)
    return _fastest(lambda: gated_linear_candidates(x, w, b, act),
                    ("gated_linear", tuple(w.shape), x.shape, act, b is not None), x.shape)


def _fastest(make, problem: tuple, x_shape):
    """(fn, backend name) of the candidate measured fastest among make()'s; where it was timed alone, fn
    carries a choice.Contest (settle.py times the candidates again in the program)."""
    cands, schedule, key = make(), "", problem_key(*problem)
    best = next(iter(cands))
    if len(cands) > 1:
        best, schedule = pick(key, choice.timed(cands), lambda: [torch.randn(x_shape)])
    fn = _as_fn(cands[best], x_shape)
    fn.schedule = schedule
    if _rows(x_shape) >= FEW_ROWS:
        fn.contest = choice.contest(key, list(cands), best, lambda: {n: _as_fn(k, x_shape) for n, k in make().items()})
    return fn, best


def _as_fn(k, x_shape):
    """Kernel k as a group's fn: fn(x, *weights) -> (y,), or, for ours, fn(bufs, x, *weights) writing into the
    planned buffer (backends._conv_call says why)."""
    if choice.takes_out(k):
        run = k.bound(tuple(x_shape)) if hasattr(k, "bound") else k
        fn = lambda bufs, x, *_: (run(x, out=bufs[0]),)   # noqa: E731
        fn.writes_into = True
    else:
        fn = lambda x, *_: (k(x),)   # noqa: E731
    fn.weights = k
    fn.sources = lambda: choice.conv_sources(k)
    return fn
