"""The fused attention kernel's tiling and its split-KV plan (FlashDecoding), backend-neutral.

The fission pass records the plan, the C kernel (kfuse/backends/c/attention.py) runs it: one rule.
Split when the unsplit kernel has fewer tasks than threads and Lk >= 2 * SPLIT_MIN_CHUNK; the
number of chunks brings the task count to SPLIT_TASKS_PER_THREAD per thread, each chunk keeping
at least SPLIT_MIN_CHUNK keys (measurements in kfuse/backends/c/attention.py and bench/README.md).
"""
from __future__ import annotations

import math

from .. import config

BLOCK_Q, BLOCK_K, ROW_GROUP = 64, 64, 4
ROW_KERNEL_MAX_LQ = 8
SPLIT_TASKS_PER_THREAD = 4
SPLIT_MIN_CHUNK = 512


def num_threads() -> int:
    return config.threads()


def plan(B, H, Lq, Lk, *, Hkv=None, split_kv=None, threads=None, kernel=None):
    """(kernel, nsplit, chunk): kernel "block" or "row"; nsplit > 0 means split-KV into nsplit
    chunks of `chunk` keys (nsplit == 0: unsplit)."""
    Hkv = H if Hkv is None else Hkv
    threads = num_threads() if threads is None else threads
    if kernel is None:
        kernel = "row" if Lq <= ROW_KERNEL_MAX_LQ else "block"
    if kernel == "block":
        tasks = B * H * math.ceil(Lq / BLOCK_Q)
    else:
        tasks = B * Hkv * math.ceil((H // Hkv) * Lq / ROW_GROUP)
    want = math.ceil(SPLIT_TASKS_PER_THREAD * threads / tasks)
    if split_kv is None:
        split_kv = tasks < threads and Lk >= 2 * SPLIT_MIN_CHUNK
        nsplit = min(want, Lk // SPLIT_MIN_CHUNK)
    else:
        nsplit = max(2, want)
    if not split_kv:
        return kernel, 0, Lk
    chunk = math.ceil(math.ceil(Lk / nsplit) / BLOCK_K) * BLOCK_K
    return kernel, math.ceil(Lk / chunk), chunk


def peak_extra_bytes(B, H, Lq, Lk, D, *, Hkv=None, split_kv=None, threads=None, kernel=None) -> int:
    """Scratch memory of one call beyond q, k, v, mask and out: per-thread tiles (on the stack)
    plus the split-KV partials. Grows with Lq (partials only), never with Lq * Lk."""
    threads = num_threads() if threads is None else threads
    kern, nsplit, _ = plan(B, H, Lq, Lk, Hkv=Hkv, split_kv=split_kv, threads=threads, kernel=kernel)
    dp = math.ceil(D / 16) * 16
    if kern == "block":
        per_thread = (2 * D * BLOCK_Q + BLOCK_K * BLOCK_Q + 2 * BLOCK_Q) * 4
    else:
        per_thread = (ROW_GROUP * BLOCK_K + 2 * ROW_GROUP * dp) * 4
    return threads * per_thread + nsplit * B * H * Lq * (D + 2) * 4
