"""Residual add + LayerNorm, and RMSNorm: kfuse vs eager vs torch.compile vs the copy bound.

add+LayerNorm [M,N]: reads x, r (2*M*N*4 bytes) and w, b, writes y (M*N*4): one kernel, 3 passes
over each row (sum, centred sum of squares, write), only the first from DRAM.
RMSNorm [M,N]: reads x, writes y: 2*M*N*4 bytes, 2 passes per row.
Each provider runs in its own process (bench/common.py main); "kfuse" is the compiled module called
as a user calls it (`cm(x, r)`, output allocated per call), "kfuse kernel" the bare kernel into a
preallocated output.
Run: python bench/bench_norm.py [case ...] [--providers eager,kfuse,...]
"""
import common  # noqa: F401  (re-executes with the malloc/thread environment first)
import torch
import torch.nn.functional as F

from common import Case, main
from kfuse.ir import Graph


class AddLayerNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.randn(n)), torch.nn.Parameter(torch.randn(n))

    def forward(self, x, r):
        return F.layer_norm(x + r, self.w.shape, self.w, self.b, 1e-5)


class RMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


def add_layer_norm(m, n):
    mod = AddLayerNorm(n).eval()
    x, r = torch.randn(m, n), torch.randn(m, n)
    g = Graph()
    gx, gr = g.input([m, n], torch.float32), g.input([m, n], torch.float32)
    h = g.add("add", gx, gr)
    g.outputs = [g.add("layer_norm", h, g.const(mod.w.detach()), g.const(mod.b.detach()), eps=1e-5)]
    return Case(mod, [x, r], g, weights=True)


def rms_norm(m, n):
    mod = RMSNorm(n).eval()
    x = torch.randn(m, n)
    g = Graph()
    gx = g.input([m, n], torch.float32)
    g.outputs = [g.add("rms_norm", gx, g.const(mod.w.detach()), eps=1e-6)]
    return Case(mod, [x], g, weights=True)


CASES = {"add+layernorm [1024,384]": lambda: add_layer_norm(1024, 384),
         "add+layernorm [8192,1024]": lambda: add_layer_norm(8192, 1024),
         "rmsnorm [1024,4096]": lambda: rms_norm(1024, 4096)}

if __name__ == "__main__":
    main("bench_norm", CASES)
