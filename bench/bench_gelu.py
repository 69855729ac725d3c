"""Bias + GELU (erf) on [M,N] with bias [N]: reads x (M*N*4) and the bias, writes M*N*4 bytes.
Rows of N (the bias is indexed by j), inline polynomial erf (kf_erf): compute-bound, not bandwidth-bound.
Run: python bench/bench_gelu.py
"""
import common  # noqa: F401
import torch
import torch.nn.functional as F

from common import kernel_vs_torch
from kfuse.ir import Graph


class BiasGelu(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.b = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return F.gelu(x + self.b)


def main(m=1024, n=1536):
    mod = BiasGelu(n).eval()
    x = torch.randn(m, n)
    g = Graph()
    gx = g.input([m, n], torch.float32)
    g.outputs = [g.add("gelu", g.add("add", gx, g.const(mod.b.detach())))]
    kernel_vs_torch("bench_gelu", f"bias+gelu [{m},{n}]", g, mod, [x], module_with_weights=True)


if __name__ == "__main__":
    main()
