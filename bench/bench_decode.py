"""Decode-step attention: one query against a KV cache, split-KV vs unsplit kernel vs torch SDPA.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python bench/bench_decode.py

Batch 1, one query, KV length 4096, head dim 64, fp32, 2 threads (KFUSE_NUM_THREADS /
OMP_NUM_THREADS / torch.set_num_threads). Rows H/Hkv: 8/8 (MHA), 8/2 (GQA), 8/1 (MQA), 4/1, 1/1,
3/3, 5/5. Unsplit, the row kernel has B * Hkv * ceil(H/Hkv / 4) tasks (4 query rows of one kv head
per task): 8, 2, 2, 1, 1, 3, 5. Where they fill the threads' rounds unevenly (1 task on 2 threads
leaves one idle, 3 leave one idle for half the time), splitting the keys gives the idle thread work;
at 8 tasks for 2 threads there is nothing to gain but load balance (kfuse/kernels/attention.py's rule).
Then few-task block-kernel rows (prefill-sized query blocks: 3, 5 and 7 heads of 64 queries over 2048
keys, causal 48 queries over 4096 and 64 over 2048, i.e. 3 and 4 tasks of 16 queries), where the rule
splits below 0.9 of the threads' rounds filled.
Timing as in bench_attention.py: blocks of calls per provider, order rotated, median per call.
"""
from __future__ import annotations

import os

THREADS = int(os.environ.get("KFUSE_NUM_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("KFUSE_NUM_THREADS", str(THREADS))

import argparse
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import timeit  # noqa: E402

from kfuse.backends.c.attention import attention, block_q, plan  # noqa: E402

torch.set_num_threads(THREADS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--kv-len", type=int, default=4096)
    args = ap.parse_args()
    B, H, L, D = 1, 8, args.kv_len, 64
    print(f"# decode attention fp32, {THREADS} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, B={B} H={H} Lq=1 Lk={L} D={D}")
    print(f"# load average before: {os.getloadavg()}; median per call over rounds, then the fastest round")
    print(f"{'H/Hkv':>20s} {'split ms':>9s} {'unsplit ms':>10s} {'auto ms':>9s} {'sdpa ms':>9s} "
          f"{'unsplit/split':>13s} {'sdpa/split':>10s} {'sdpa/auto':>9s}  auto plan (kernel, chunks, keys/chunk)")
    # decode rows (one query, the row kernel), then a few-task block-kernel rows (H, Hkv, Lq, Lk, causal)
    cases = [(H, hkv, 1, L, False) for H, hkv in ((8, 8), (8, 2), (8, 1), (4, 1), (1, 1), (3, 3), (5, 5))]
    cases += [(3, 3, 64, 2048, False), (5, 5, 64, 2048, False), (7, 7, 64, 2048, False), (1, 1, 48, 4096, True),
              (1, 1, 64, 2048, True)]
    for H, hkv, lq, lk, causal in cases:
        q = torch.randn(B, H, lq, D)
        k, v = torch.randn(B, hkv, lk, D), torch.randn(B, hkv, lk, D)
        out = torch.empty_like(q)
        s = D ** -0.5
        # kfuse's causal attention aligns the last query with the last key (SDPA's is_causal the first)
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if causal else None
        fns = {
            "split": lambda: attention(q, k, v, scale=s, causal=causal, out=out, split_kv=True),
            "unsplit": lambda: attention(q, k, v, scale=s, causal=causal, out=out, split_kv=False),
            "auto": lambda: attention(q, k, v, scale=s, causal=causal, out=out),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s, enable_gqa=hkv != H),
        }
        ref = fns["sdpa"]()
        for n in ("split", "unsplit", "auto"):
            err = (fns[n]() - ref).abs().max().item()
            assert err < 1e-4, f"{n} disagrees with sdpa by {err}"
        res = timeit(fns, args.rounds, block_s=0.05, max_calls=200)
        r = {n: t for n, (t, _, _) in res.items()}
        best = {n: t for n, (_, t, _) in res.items()}
        name = f"{H}/{hkv}" if lq == 1 else f"{H}/{hkv} {lq}x{lk}{' causal' if causal else ''}"
        print(f"{name:>20s} {r['split'] * 1e3:9.4f} {r['unsplit'] * 1e3:10.4f} {r['auto'] * 1e3:9.4f} "
              f"{r['sdpa'] * 1e3:9.4f} {r['unsplit'] / r['split']:13.2f} {r['sdpa'] / r['split']:10.2f} "
              f"{r['sdpa'] / r['auto']:9.2f}  {plan(B, H, lq, lk, Hkv=hkv, threads=THREADS, bq=block_q(causal, False))}")
        print(f"{'  best':20s} {best['split'] * 1e3:9.4f} {best['unsplit'] * 1e3:10.4f} {best['auto'] * 1e3:9.4f} "
              f"{best['sdpa'] * 1e3:9.4f} {best['unsplit'] / best['split']:13.2f} {best['sdpa'] / best['split']:10.2f} "
              f"{best['sdpa'] / best['auto']:9.2f}  (fastest round)")
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
