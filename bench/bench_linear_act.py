"""Linear + bias + GELU: kfuse's packed oneDNN layer against eager, Inductor and the bare GEMM.

    python bench/bench_linear_act.py [--rounds 15] [--block-ms 40] [--csv rows.csv]

Providers, side by side in one process, same inputs, 2 threads:
  eager           F.gelu(F.linear(x, w, b))                        (MKL GEMM + separate GELU)
  inductor-static torch.compile, freezing=True, dynamic=False
  inductor-dyn    torch.compile, freezing=True, dynamic=True        (picks oneDNN; design.md)
  onednn-bound    mkldnn._linear_pointwise(x, w_packed, b, "none")  (no activation: the bound)
  onednn+gelu_    the same, then our in-place gelu_                 (the unfused alternative)
  kfuse           pack_linear(w, b, "gelu")(x)                      (GELU as a oneDNN post-op)
  kfuse-out       the same into a preallocated out= buffer           (one extra copy on oneDNN)
  kfuse-mkl       pack_linear(..., prefer="mkl")                    (the fallback path)

Timing: each round runs every provider for a block of calls (about --block-ms), in an order
rotated between rounds so no provider always follows the same neighbour; the time is the median
over rounds of the per-call mean in a block ("best": the fastest block, shown because the machine
is shared and other jobs' load inflates medians; ratios within one run remain comparable). Minor page faults per
call are printed next to it:
more than a handful means malloc is mapping fresh pages per call, and the time is not the kernel's.
The process re-executes itself with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised, because
glibc's default thresholds make that happen to eager code after a torch.compile (design.md).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
if any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
    os.environ.update(_MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402  (after the re-exec on purpose)
import torch.nn.functional as F  # noqa: E402

from kfuse.backends.library import HAVE_ONEDNN, pack_linear  # noqa: E402

THREADS = 2
SHAPES = [(128, 384, 1536), (1024, 384, 1536)]     # (M, K, N)
BOUND = "onednn-bound"


def compiled(w_kn, b, dynamic):
    import torch._inductor.config as cfg
    cfg.freezing = True        # options={"freezing": True} is silently ignored (torch 2.13)
    mod = torch.nn.Sequential(torch.nn.Linear(*w_kn.shape), torch.nn.GELU()).eval()
    with torch.no_grad():
        mod[0].weight.copy_(w_kn.t())
        mod[0].bias.copy_(b)
    return torch.compile(mod, dynamic=dynamic)


def providers(x, w_kn, b):
    w_nk = w_kn.t().contiguous()
    lp = torch.ops.mkldnn._linear_pointwise.default
    w_packed = torch.ops.mkldnn._reorder_linear_weight(w_nk, x.shape[0])
    kf = pack_linear(w_kn, b, "gelu", batch_hint=x.shape[0])
    assert kf.backend == "onednn" and kf.post_op_fused, kf
    kf_mkl = pack_linear(w_kn, b, "gelu", prefer="mkl")
    out = torch.empty(x.shape[0], w_kn.shape[1])
    p = {
        "eager": lambda: F.gelu(F.linear(x, w_nk, b)),
        "inductor-static": compiled(w_kn, b, dynamic=False),
        "inductor-dyn": compiled(w_kn, b, dynamic=True),
        BOUND: lambda: lp(x, w_packed, b, "none", [], ""),
        "onednn+gelu_": lambda: torch.ops.aten.gelu_(lp(x, w_packed, b, "none", [], "")),
        "kfuse": lambda: kf(x),
        "kfuse-out": lambda: kf(x, out=out),
        "kfuse-mkl": lambda: kf_mkl(x),
    }
    for name in ("inductor-static", "inductor-dyn"):
        p[name] = (lambda m: lambda: m(x))(p[name])
    z = x.double() @ w_kn.double() + b.double()
    for name, f in p.items():                         # warm up (compiles) and check every provider
        err = (f().double() - (z if name == BOUND else F.gelu(z))).abs().max().item()
        assert err < 1e-3, (name, err)
    return p


def block(f, n):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t = (time.perf_counter() - t0) / n
    return t, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n


def measure(p, rounds, block_ms):
    names = list(p)
    reps = {}
    for name in names:                                # calls per block, from one timed call
        t, _ = block(p[name], 3)
        reps[name] = max(3, int(block_ms / 1e3 / t))
    times = {k: [] for k in names}
    faults = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order.reverse()
        for name in order:
            t, pf = block(p[name], reps[name])
            times[name].append(t)
            faults[name].append(pf)
    return {k: (statistics.median(times[k]), min(times[k]), statistics.median(faults[k])) for k in names}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block-ms", type=float, default=40.0)
    ap.add_argument("--csv", help="append one row per (shape, provider) to this file")
    args = ap.parse_args()
    if not HAVE_ONEDNN:
        sys.exit("oneDNN linear op unavailable in this torch build: nothing to compare")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    machine = f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    print(f"torch {torch.__version__}, {THREADS} threads, {machine}, commit {commit or '?'}; "
          f"median of {args.rounds} rounds, ~{args.block_ms:.0f} ms blocks; "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    with torch.no_grad():
        for M, K, N in SHAPES:
            x = torch.randn(M, K)
            w = torch.randn(K, N) / K ** 0.5
            b = torch.randn(N)
            res = measure(providers(x, w, b), args.rounds, args.block_ms)
            flop = 2 * M * K * N
            bound, eager = res[BOUND][0], res["eager"][0]
            bound_best = res[BOUND][1]
            print(f"\n[{M},{K}]x[{K},{N}] + bias + GELU   ({flop / 1e6:.0f} MFLOP)")
            print(f"{'provider':16s} {'ms':>8s} {'GFLOP/s':>8s} {'% bound':>8s} {'vs eager':>8s} "
                  f"{'faults/call':>11s} | {'best ms':>8s} {'GFLOP/s':>8s} {'% bound':>8s}")
            for name, (t, tb, pf) in res.items():
                print(f"{name:16s} {t * 1e3:8.3f} {flop / t / 1e9:8.0f} {100 * bound / t:7.0f}% "
                      f"{eager / t:7.2f}x {pf:11.1f} | {tb * 1e3:8.3f} {flop / tb / 1e9:8.0f} "
                      f"{100 * bound_best / tb:7.0f}%")
                rows.append(dict(bench="linear_act", shape=f"{M}x{K}x{N}", provider=name, ms=t * 1e3,
                                 best_ms=tb * 1e3,
                                 gflops=flop / t / 1e9, pct_bound=100 * bound / t, faults_per_call=pf,
                                 threads=THREADS, machine=machine, commit=commit, torch=torch.__version__))
            best_ind = min(res["inductor-static"][0], res["inductor-dyn"][0])
            dyn_best = res['inductor-dyn'][0] <= res['inductor-static'][0]
            print(f"best inductor = {'inductor-dyn' if dyn_best else 'inductor-static'}")
            print(f"kfuse / bound = {bound / res['kfuse'][0]:.2f}   kfuse vs best inductor = "
                  f"{best_ind / res['kfuse'][0]:.2f}x   post-op vs own gelu_ = "
                  f"{res['onednn+gelu_'][0] / res['kfuse'][0]:.2f}x")
    load = os.getloadavg()[0]
    print(f"\nload average at the end {load:.1f}" + (
        f": other processes share the {os.cpu_count()} cores; these times are not the kernels'"
        if load > os.cpu_count() + 0.5 else ""))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                wr.writeheader()
            wr.writerows(rows)


if __name__ == "__main__":
    main()
