"""SwiGLU gating silu(a) * b on [M,N]: reads a and b, writes the product: 3*M*N*4 bytes.
A flat kernel: one parallel SIMD loop (inline polynomial exp, kf_exp) over all elements.
Run: python bench/bench_swiglu.py
"""
import common  # noqa: F401
import torch
import torch.nn.functional as F

from common import Bench, compiled, copy_bound, kfuse_provider
from kfuse.ir import Graph


def swiglu(a, b):
    return F.silu(a) * b


def main(m=512, n=2816):
    a, b = torch.randn(m, n), torch.randn(m, n)
    g = Graph()
    ga, gb = g.input([m, n], torch.float32), g.input([m, n], torch.float32)
    g.outputs = [g.add("mul", g.add("silu", ga), gb)]
    k = kfuse_provider(g, [a, b])
    k()
    torch.testing.assert_close(k.outputs[0], swiglu(a, b), rtol=1e-5, atol=1e-6)
    Bench("bench_swiglu", f"silu(a)*b [{m},{n}]", k.kernel.bytes).run({
        "eager": lambda: swiglu(a, b), "torch.compile": compiled(swiglu, (a, b)),
        "kfuse": k, "copy": copy_bound(k.kernel.bytes)})


if __name__ == "__main__":
    main()
