"""Bias + GELU (erf) on [M,N] with bias [N]: reads x (M*N*4) and the bias, writes M*N*4 bytes.
Rows of N (the bias is indexed by j), inline polynomial erf (kf_erf): compute-bound, not bandwidth-bound.
Each provider runs in its own process (bench/common.py main); "kfuse" is `cm(x)`.
Run: python bench/bench_gelu.py
"""
import common  # noqa: F401
import torch
import torch.nn.functional as F

from common import Case, main
from kfuse.ir import Graph


class BiasGelu(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.b = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return F.gelu(x + self.b)


def bias_gelu(m=1024, n=1536):
    mod = BiasGelu(n).eval()
    x = torch.randn(m, n)
    g = Graph()
    gx = g.input([m, n], torch.float32)
    g.outputs = [g.add("gelu", g.add("add", gx, g.const(mod.b.detach())))]
    return Case(mod, [x], g, weights=True)


CASES = {"bias+gelu [1024,1536]": bias_gelu}

if __name__ == "__main__":
    main("bench_gelu", CASES)
