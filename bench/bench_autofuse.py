"""Automatic (kind-based) fusion alone against the full pipeline, side by side in one run.

    python bench/bench_autofuse.py

Built-in BERT (MiniLM size) at batch 1 x seq 128: kfuse with every pattern rule on, kfuse with
`patterns=False` (the kind-based fuser only: GEMM epilogues, elementwise chains, row reductions),
and PyTorch eager. Also a custom activation chain x * sigmoid(1.702 x) + 0.5 * r on [1024, 1536]
against eager and torch.compile: the fuser must make it one kernel. Per kernel kind, the cost
model's predicted time is printed next to the measured one.
"""
from __future__ import annotations

from common import commit, compiled, machine, measure  # re-executes with the malloc/thread env first

import torch

import kfuse
from kfuse.models import build


def predicted_vs_measured(cm, inputs):
    prog = cm._last
    prog.profile(list(inputs), reps=10)
    rows: dict = {}
    for k in prog.report.kernels:
        if k.backend == "view":
            continue
        r = rows.setdefault(k.backend.split("+")[0], [0, 0.0, 0.0])
        r[0] += 1
        r[1] += k.predicted_ms
        r[2] += k.measured_ms
    print(f"  {'backend':<22}{'kernels':>8}{'predicted ms':>14}{'measured ms':>13}")
    for b, (n, p, m) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        print(f"  {b:<22}{n:>8}{p:>14.3f}{m:>13.3f}")


def main():
    model, inputs = build("bert", batch=1, seq=128)
    full = kfuse.compile(model, inputs)
    auto = kfuse.compile(model, inputs, patterns=False)
    for name, cm in (("patterns", full), ("autofuse only", auto)):
        assert cm.verify(*inputs).ok
        print(f"{name}: {len([k for k in cm.report().kernels if k.backend != 'view'])} kernels, "
              f"fusions {cm.report().fusions}")
    res = measure({"eager": lambda: model(*inputs), "kfuse patterns": lambda: full(*inputs),
                   "kfuse autofuse only": lambda: auto(*inputs)}, block_s=0.1)
    print(f"\nbuilt-in BERT batch 1 x seq 128, {torch.get_num_threads()} threads ({machine()}, {commit()})")
    for n, r in res.items():
        print(f"  {n:<22}{r['ms']:>9.2f} ms  (p10-p90 {r['p10']:.2f}-{r['p90']:.2f})")
    ratio = res["kfuse patterns"]["ms"] / res["kfuse autofuse only"]["ms"]
    print(f"  autofuse-only speed = {ratio * 100:.0f}% of the pattern pipeline's (target >= 80%)")
    for name, cm in (("patterns", full), ("autofuse only", auto)):
        print(f"\npredicted vs measured per kernel kind, {name}:")
        predicted_vs_measured(cm, inputs)

    x, r = torch.randn(1024, 1536), torch.randn(1024, 1536)

    class Chain(torch.nn.Module):
        def forward(self, x, r):
            return x * torch.sigmoid(1.702 * x) + 0.5 * r
    chain = Chain()
    cm = kfuse.compile(chain, (x, r))
    ops = [k.ops for k in cm.report().kernels]
    print(f"\ncustom chain x*sigmoid(1.702x) + 0.5r [1024,1536]: kfuse kernels {ops}")
    res = measure({"eager": lambda: chain(x, r), "torch.compile": compiled(chain, (x, r)),
                   "kfuse": lambda: cm(x, r)})
    best = min(res["eager"]["ms"], res["torch.compile"]["ms"])
    for n, rr in res.items():
        print(f"  {n:<22}{rr['ms']:>9.3f} ms  {best / rr['ms']:.2f}x the faster of eager and torch.compile")


if __name__ == "__main__":
    main()
