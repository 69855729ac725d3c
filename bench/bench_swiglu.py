"""SwiGLU gating silu(a) * b on [M,N]: reads a and b, writes the product: 3*M*N*4 bytes.
A flat kernel: one parallel SIMD loop (inline polynomial exp, kf_exp) over all elements.
Each provider runs in its own process (bench/common.py main); "kfuse" is `cm(a, b)`.
Run: python bench/bench_swiglu.py
"""
import common  # noqa: F401
import torch
import torch.nn.functional as F

from common import Case, main
from kfuse.ir import Graph


class SwiGLU(torch.nn.Module):
    def forward(self, a, b):
        return F.silu(a) * b


def swiglu(m=512, n=2816):
    a, b = torch.randn(m, n), torch.randn(m, n)
    g = Graph()
    ga, gb = g.input([m, n], torch.float32), g.input([m, n], torch.float32)
    g.outputs = [g.add("mul", g.add("silu", ga), gb)]
    return Case(SwiGLU().eval(), [a, b], g, atol=1e-6)


CASES = {"silu(a)*b [512,2816]": swiglu}

if __name__ == "__main__":
    main("bench_swiglu", CASES)
