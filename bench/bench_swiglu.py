"""SwiGLU gating silu(a) * b on [M,N]: reads a and b, writes the product: 3*M*N*4 bytes.
A flat kernel: one parallel SIMD loop (inline polynomial exp, kf_exp) over all elements.
Run: python bench/bench_swiglu.py
"""
import common  # noqa: F401
import torch
import torch.nn.functional as F

from common import kernel_vs_torch
from kfuse.ir import Graph


def swiglu(a, b):
    return F.silu(a) * b


def main(m=512, n=2816):
    a, b = torch.randn(m, n), torch.randn(m, n)
    g = Graph()
    ga, gb = g.input([m, n], torch.float32), g.input([m, n], torch.float32)
    g.outputs = [g.add("mul", g.add("silu", ga), gb)]
    kernel_vs_torch("bench_swiglu", f"silu(a)*b [{m},{n}]", g, swiglu, [a, b], atol=1e-6)


if __name__ == "__main__":
    main()
