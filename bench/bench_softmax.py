"""Scale + additive mask + softmax over the last axis of attention scores [B,H,L,L], mask [B,1,1,L].

Bytes: read scores and the (small) mask, write probabilities: 2*B*H*L*L*4 + B*L*4.
One kernel, rows of L: pass 1 max (scaled, masked values stashed in L1), pass 2 exp and sum
(exp stashed), pass 3 divide and write. The inline exp has no slow path for the -inf lanes.
Each provider runs in its own process (bench/common.py main); "kfuse" is `cm(x, mask)`.
Run: python bench/bench_softmax.py
"""
import common  # noqa: F401
import torch

from common import Case, main
from kfuse.ir import Graph


class ScaleMaskSoftmax(torch.nn.Module):
    def forward(self, x, mask):
        return torch.softmax(x * 0.125 + mask, dim=-1)


def scale_mask_softmax(b=8, h=12, seq=128):
    x = torch.randn(b, h, seq, seq)
    mask = torch.where(torch.rand(b, 1, 1, seq) < 0.2, float("-inf"), 0.0)
    g = Graph()
    gx, gm = g.input(list(x.shape), torch.float32), g.input(list(mask.shape), torch.float32)
    g.outputs = [g.add("softmax", g.add("add", g.add("mul", gx, g.const(0.125)), gm), axis=-1)]
    return Case(ScaleMaskSoftmax().eval(), [x, mask], g, atol=1e-6)


CASES = {"scale+mask+softmax [8,12,128,128]": scale_mask_softmax}

if __name__ == "__main__":
    main("bench_softmax", CASES)
