"""The fused attention kernel's tiling and its split-KV plan (FlashDecoding), backend-neutral.

The fission pass records the plan, the C kernel (kfuse/backends/c/attention.py) runs it: one rule.
Split when the unsplit kernel's tasks (block_q queries each) fill less than SPLIT_BALANCE[kernel] of
the threads' rounds (1 task on 2 threads fills half, 3 fill three quarters) and Lk >= 2 * SPLIT_MIN_CHUNK;
the number of chunks brings the task count to SPLIT_TASKS_PER_THREAD per thread, each chunk keeping
at least SPLIT_MIN_CHUNK keys (measurements in kfuse/backends/c/attention.py and bench/README.md).
Measured on 2 threads (Zen 4, split vs unsplit, the kernel alone): with 3 tasks the block kernel split
1.10-1.14x faster (causal [1,1,48,4096], [1,3,64,2048]), the row kernel (decode, reading the cache at
memory speed) 0.95-1.26x ([1,3,1,4096]; [1,12,1,4096] with 3 kv heads; bench_decode.py's 3/3 row);
with 5 tasks (0.83 filled) the block kernel split 1.08-1.19x faster ([1,5,64,2048], [1,5,64,4096]), the
row kernel 0.91-1.10x ([1,5,1,2048], [1,5,1,8192], the 5/5 row: a wash); with 7 (0.875) block 1.05x
([1,7,64,2048]), row 0.98x ([1,7,1,4096]): hence 0.9 for the compute-bound block kernel, 0.8 for the
row kernel. 4 causal 16-query blocks of [1,1,64,2048] unsplit 1.03-1.05x faster than split.
"""
from __future__ import annotations

import math

from .. import config

BLOCK_Q, BLOCK_K, ROW_GROUP = 64, 64, 4
BLOCK_Q_DIAGONAL = 16
ROW_KERNEL_MAX_LQ = 8
SPLIT_TASKS_PER_THREAD = 4
SPLIT_MIN_CHUNK = 512
SPLIT_BALANCE = {"block": 0.9, "row": 0.8}


def num_threads() -> int:
    return config.threads()


def block_q(causal: bool, query_mask: bool) -> int:
    """Queries per block-kernel task. Where the mask differs along the queries (causal, or a mask tensor
    varying by query), blocks of 16 let each skip the keys past its own last visible one (the tail is
    trimmed 16 keys at a time), where a block of 64 computes its diagonal 64 x 64 tile whole; elsewhere 64,
    the larger register tiles. Measured (Zen 4, 2 threads, the kernel alone, alternated in one process):
    causal [1,8,128,64] with 2 kv heads 0.76-0.79x the time of 64, by a float mask 0.83-0.86x, [1,8,512,64]
    0.96-0.99x; without a mask 16 took 1.03-1.09x (so not there), and 32 was slower than 64 in every case."""
    return BLOCK_Q_DIAGONAL if causal or query_mask else BLOCK_Q


def plan(B, H, Lq, Lk, *, Hkv=None, split_kv=None, threads=None, kernel=None, bq=BLOCK_Q):
    """(kernel, nsplit, chunk): kernel "block" or "row"; nsplit > 0 means split-KV into nsplit
    chunks of `chunk` keys (nsplit == 0: unsplit). bq: the block kernel's queries per task (block_q)."""
    Hkv = H if Hkv is None else Hkv
    threads = num_threads() if threads is None else threads
    if kernel is None:
        kernel = "row" if Lq <= ROW_KERNEL_MAX_LQ else "block"
    if kernel == "block":
        tasks = B * H * math.ceil(Lq / bq)
    else:
        tasks = B * Hkv * math.ceil((H // Hkv) * Lq / ROW_GROUP)
    want = math.ceil(SPLIT_TASKS_PER_THREAD * threads / tasks)
    if split_kv is None:
        # the share of the threads' rounds the tasks fill: 3 tasks on 2 threads leave one idle half the time
        balance = tasks / (threads * math.ceil(tasks / threads))
        split_kv = balance < SPLIT_BALANCE[kernel] and Lk >= 2 * SPLIT_MIN_CHUNK
        nsplit = min(want, Lk // SPLIT_MIN_CHUNK)
    else:
        nsplit = max(2, want)
    if not split_kv:
        return kernel, 0, Lk
    chunk = math.ceil(math.ceil(Lk / nsplit) / BLOCK_K) * BLOCK_K
    return kernel, math.ceil(Lk / chunk), chunk


def peak_extra_bytes(B, H, Lq, Lk, D, *, Hkv=None, split_kv=None, threads=None, kernel=None, bq=BLOCK_Q,
                     Dv=None) -> int:
    """Scratch memory of one call beyond q, k, v, mask and out: per-thread tiles (on the stack)
    plus the split-KV partials. Grows with Lq (partials only), never with Lq * Lk. Dv: v's head dim
    where it differs from D."""
    threads = num_threads() if threads is None else threads
    kern, nsplit, _ = plan(B, H, Lq, Lk, Hkv=Hkv, split_kv=split_kv, threads=threads, kernel=kernel, bq=bq)
    Dv = D if Dv is None else Dv
    if kern == "block":
        per_thread = ((D + Dv) * bq + BLOCK_K * bq + 2 * bq) * 4
    else:
        per_thread = (ROW_GROUP * BLOCK_K + ROW_GROUP * 16 * (math.ceil(D / 16) + math.ceil(Dv / 16))) * 4
    return threads * per_thread + nsplit * B * H * Lq * (Dv + 2) * 4
