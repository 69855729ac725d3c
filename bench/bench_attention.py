"""Fused attention (kfuse C kernel) vs torch SDPA vs eager matmul-softmax-matmul, fp32, side by side.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python bench/bench_attention.py
    python bench/bench_attention.py --baseline HEAD~3 --no-memory   # also the kernel of an older commit

--baseline REV adds the provider "kfuse@REV": attention.c as it was at git revision REV, compiled and
called through today's argument struct (its layout must be unchanged), with the mask handed over as
that kernel expected it (a float mask copied queries-fastest on each call, as its Python did).

Threads: 2 for everyone (torch.set_num_threads and OMP_NUM_THREADS), or KFUSE_NUM_THREADS.
Each provider is timed in blocks of calls (never interleaved call by call), the order of the
providers rotating between rounds; the figure is the median over rounds of the per-call time,
with minor page faults per call next to it. Then, in fresh subprocesses, the peak extra memory
of one call at seq 4096 (ru_maxrss delta) against the size of the materialised score matrix.
Self-contained for now (bench/common.py will take the harness over).
"""
from __future__ import annotations

import os

THREADS = int(os.environ.get("KFUSE_NUM_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("KFUSE_NUM_THREADS", str(THREADS))

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kfuse.backends.c import attention as c_attention
from kfuse.backends.c.attention import attention, peak_extra_bytes
from kfuse.backends.c.compiler import load

torch.set_num_threads(THREADS)


def eager(q, k, v, mask, scale, causal):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    if causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v)


def providers(q, k, v, mask, scale, causal, baseline=None):
    out = torch.empty_like(q)
    fns = {
        "kfuse": lambda: attention(q, k, v, mask, scale=scale, causal=causal, out=out),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale),
        "eager": lambda: eager(q, k, v, mask, scale, causal),
    }
    if baseline:
        fns[f"kfuse@{baseline}"] = old_kernel(baseline, q, k, v, mask, scale, causal)
    return fns


def old_kernel(rev, q, k, v, mask, scale, causal):
    """attention.c of git revision `rev` on these inputs, through today's argument struct"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:kfuse/backends/c/attention.c"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    fn = load(f"#define HD {q.shape[-1]}\n" + src).attn_forward
    fn.argtypes, fn.restype = [c_attention.ctypes.POINTER(c_attention._Args), c_attention.ctypes.c_int], None
    out = torch.empty_like(q)

    def run():
        m = mask
        if m is not None and m.dim() >= 2 and m.shape[-2] > 1 and m.stride(-2) != 1:     # its Python's rule
            m = c_attention._query_major(m)
        a, keep, kern = c_attention._args(q, k, v, m, out, scale=scale, causal=causal, split_kv=None, kernel=None)
        fn(c_attention.ctypes.byref(a), kern)
        return out
    return run


def timeit(fns: dict, rounds: int, block_s: float = 0.25, max_calls: int = 20):
    """Per provider: (median seconds per call, fastest round's seconds per call, minor faults per call)."""
    calls = {}
    for name, f in fns.items():      # warm up, and size the blocks
        f()
        t = time.perf_counter()
        f()
        t = time.perf_counter() - t
        calls[name] = max(1, min(max_calls, int(block_s / max(t, 1e-6))))
    times = {n: [] for n in fns}
    faults = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            f, n = fns[name], calls[name]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[name].append((time.perf_counter() - t0) / n)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n)
    return {n: (statistics.median(times[n]), min(times[n]), statistics.median(faults[n])) for n in fns}


def case(shape, variant):
    """q, k, v, mask, scale, causal. Variants: none; padding (a [B,1,1,L] -inf mask); causal (the kernel's
    flag); mask (causal as a model builds it: a float [1,1,L,L] mask of 0 and finfo.min, keys fastest)."""
    B, H, L, D = shape
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    mask = None
    if variant == "mask":
        keep = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
        mask = torch.zeros(1, 1, L, L).masked_fill(~keep, torch.finfo(torch.float32).min)
    if variant == "padding":
        keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
        for b in range(B):
            keep[b, ..., L - (b * 7 + L // 8) % (L // 2):] = False      # varied padding per batch
        mask = torch.zeros(B, 1, 1, L).masked_fill(~keep, float("-inf"))
    return q, k, v, mask, D ** -0.5, variant == "causal"


def memory_child(provider, B, H, L, D):
    """Run in a subprocess: ru_maxrss growth (bytes) over one call, inputs and warm-up excluded."""
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    fn = providers(q, k, v, None, D ** -0.5, False)[provider]
    small = [t[..., :64, :] for t in (q, k, v)]                 # warm code paths and pools small
    providers(*small, None, D ** -0.5, False)[provider]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta": (after - before) * 1024}))


def memory_table(B=1, H=8, L=4096, D=64):
    rows = []
    scores = B * H * L * L * 4
    for p in ("kfuse", "sdpa", "eager"):
        res = subprocess.run([sys.executable, __file__, "--memory-child", p, str(B), str(H), str(L), str(D)],
                             capture_output=True, text=True, env=os.environ)
        delta = json.loads(res.stdout.strip().splitlines()[-1])["delta"] if res.returncode == 0 else float("nan")
        rows.append((p, delta))
    print(f"\npeak extra memory of one call, [B,H,L,D] = [{B},{H},{L},{D}], no mask "
          f"(ru_maxrss delta in a fresh process; materialised score matrix = {scores / 2**20:.0f} MiB)")
    print(f"  kfuse scratch by construction (peak_extra_bytes): {peak_extra_bytes(B, H, L, L, D) / 2**10:.0f} KiB")
    for p, d in rows:
        print(f"  {p:6s} RSS growth {d / 2**20:8.1f} MiB   ({d / scores:.3f} x the score matrix)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--baseline", metavar="REV", help="also time attention.c as of this git revision")
    args = ap.parse_args()
    print(f"# load average before: {os.getloadavg()}")
    print(f"# attention fp32, {THREADS} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}")
    print(f"{'shape [B,H,L,D]':18s} {'variant':8s} {'kfuse ms':>9s} {'sdpa ms':>9s} {'eager ms':>9s} "
          f"{'sdpa/kf':>8s} {'eager/kf':>8s} {'GFLOP/s kf':>10s}  best-round ms kf,sdpa,eager (sdpa/kf)  faults/call")
    base = f"kfuse@{args.baseline}" if args.baseline else None
    for shape in ((8, 12, 128, 32), (1, 8, 128, 64), (1, 32, 1024, 64)):
        for variant in ("none", "padding", "causal", "mask"):
            q, k, v, mask, scale, causal = case(shape, variant)
            fns = providers(q, k, v, mask, scale, causal, args.baseline)
            ref = fns["eager"]()
            got = fns["kfuse"]()
            err = (got - ref).abs().max().item()
            assert err < 1e-4, f"kfuse disagrees with eager by {err}"
            r = timeit(fns, args.rounds)
            B, H, L, D = shape
            flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
            kf, sd, ea = (r[p][0] for p in ("kfuse", "sdpa", "eager"))
            print(f"{str(list(shape)):18s} {variant:8s} {kf * 1e3:9.3f} {sd * 1e3:9.3f} {ea * 1e3:9.3f} "
                  f"{sd / kf:8.2f} {ea / kf:8.2f} {flops / kf / 1e9:10.1f}  "
                  f"{r['kfuse'][1] * 1e3:.3f},{r['sdpa'][1] * 1e3:.3f},{r['eager'][1] * 1e3:.3f} "
                  f"({r['sdpa'][1] / r['kfuse'][1]:.2f})  {r['kfuse'][2]:.0f},{r['sdpa'][2]:.0f},{r['eager'][2]:.0f}"
                  + (f"  {base} {r[base][0] * 1e3:.3f} ms (kfuse/{base} {kf / r[base][0]:.3f})" if base else ""))
    print(f"# load average after: {os.getloadavg()}")
    if not args.no_memory:
        memory_table()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], *map(int, sys.argv[3:7]))
    else:
        main()
