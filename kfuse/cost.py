"""The cost model: bytes moved and FLOPs per op or group, and a predicted time from a machine's rates.

predicted time = max(bytes / bandwidth, flops / rate) over the threads the kernel can use, plus a
fixed launch cost. The model is pure: the rates (`Machine`) are measured by the backends
(kfuse.backends.calibrate: a 64 MB copy, a 512³ GEMM through the library path the linears use) and
passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .ir import Kind, Node

LAUNCH_MS = 0.004          # Python + ctypes cost of one kernel call, measured on the runtime
ELEMENTWISE_GFLOPS = 20.0  # per thread, for simple SIMD arithmetic; transcendentals count 10 flops


@dataclass(frozen=True)
class Machine:
    """The rates the model predicts with, measured by the backend that runs the kernels
    (kfuse.backends.calibrate): DRAM bandwidth, the GEMM library's rate, and the threads kernels use."""
    bandwidth_gbs: float
    gemm_gflops: float
    threads: int


HEAVY = {"exp", "log", "erf", "tanh", "sigmoid", "gelu", "silu", "softmax", "log_softmax", "pow", "sin", "cos",
         "rsqrt", "sqrt", "log1p", "expm1", "softplus"}


def flops(n: Node) -> int:
    """Floating-point operations of one node (a multiply-add counts 2)."""
    if n.op in ("linear", "matmul", "gated_linear"):
        k = n.inputs[0].shape[-1]
        return 2 * n.numel * k * (2 if n.op == "gated_linear" else 1)
    if n.op == "attention":
        q, k = n.inputs[0], n.inputs[1]
        return 4 * q.numel // q.shape[-1] * k.shape[-2] * q.shape[-1]
    if n.op in ("conv2d", "conv3d"):
        w = n.inputs[1]
        return 2 * n.numel * w.numel // w.shape[0]
    if n.op in ("conv_transpose2d", "conv_transpose3d"):     # each input element times its Cout/g x taps weights
        w = n.inputs[1]
        return 2 * n.inputs[0].numel * w.numel // w.shape[0]
    if n.kind in (Kind.INJECTIVE, Kind.SOURCE):
        return 0
    size = max([n.numel] + [i.numel for i in n.inputs])
    return size * (10 if n.op in HEAVY else 1)


def op_bytes(n: Node) -> int:
    """Bytes one op moves run unfused: its inputs read once, its output written once; composite ops
    made by pattern rules count the ops they replaced (each intermediate written and read back)."""
    plain = sum(i.nbytes for i in n.inputs) + n.nbytes
    if n.op == "linear":
        steps = (len(n.inputs) == 3) + (n.attrs["act"] != "none")
        return plain + 2 * n.nbytes * steps
    if n.op == "gated_linear":
        # the GEMM writes both halves; a bias add reads and writes them; the activation reads and
        # writes the gate; the product reads the activated gate and the up half
        return plain + n.nbytes * (2 + 4 * (len(n.inputs) == 3) + 2 + 2)
    if n.op == "attention":
        q, k = n.inputs[0], n.inputs[1]
        scores = q.nbytes // q.shape[-1] * k.shape[-2]
        # q·kᵀ writes S; scale, mask and softmax each read and write it; ·v reads it
        return plain + scores * (1 + 2 + 2 * (len(n.inputs) == 4) + 2 + 1)
    return plain


def predicted_ms(m: Machine, nbytes: int, nflops: int, contraction: bool, threads_used: int | None = None) -> float:
    # a zero-size tensor has no rows: it still runs (and costs) as one launch on one thread
    share = 1.0 if threads_used is None else min(1.0, max(1, threads_used) / max(1, m.threads))
    rate = m.gemm_gflops if contraction else ELEMENTWISE_GFLOPS * m.threads
    return LAUNCH_MS + max(nbytes / (m.bandwidth_gbs * share * 1e6), nflops / (rate * share * 1e6))


def rows_of(nodes) -> int:
    """Independent rows a row kernel over these nodes can spread across threads."""
    widest = max(nodes, key=lambda n: n.numel)
    reduces = any(n.kind == Kind.REDUCTION for n in nodes)
    return math.prod(widest.shape[:-1]) if reduces and widest.shape else max(1, widest.numel // 1024)
