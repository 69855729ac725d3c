"""Random small CNNs (convolutions of every form with activations, squeeze-excitation, GroupNorm, pools,
residual adds, channel concats, ConvNeXt-style permutes around a LayerNorm, three heads) through the
channels-last pass, each against eager: the layout pass checked on graphs no test names."""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import compiled

ACTS = [F.relu, F.relu6, F.silu, F.hardswish, torch.sigmoid, F.gelu, lambda x: F.leaky_relu(x, 0.1), lambda x: x]
BLOCKS = ["conv", "dw", "pw", "se", "gn", "pool", "res", "cat", "perm"]


class Net(nn.Module):
    """3-7 blocks drawn by `rng` on `c` input channels; `ops` lists them with their modules' indices."""

    def __init__(self, rng, c):
        super().__init__()
        self.ops, self.mods = [], nn.ModuleList()

        def add(*mods):
            self.mods.extend(mods)
            return len(self.mods) - len(mods)
        for _ in range(rng.randint(3, 7)):
            kind = rng.choice(BLOCKS)
            if kind in ("conv", "dw", "pw"):
                k = 1 if kind == "pw" else rng.choice([1, 3, 5])
                groups = c if kind == "dw" else rng.choice([1] + ([2] if c % 2 == 0 else []))
                cout = c if kind == "dw" else rng.choice([4, 6, 8, 12, 16])
                cout = cout if cout % groups == 0 else 2 * groups
                stride, dil = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
                conv = nn.Conv2d(c, cout, k, stride, dil * (k // 2), dil, groups, bias=rng.random() < 0.8)
                self.ops.append(("conv", add(conv), rng.choice(ACTS)))
                c = cout
            elif kind == "se":
                r = max(1, c // 4)
                i = add(nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1))
                self.ops.append(("se", i, rng.choice([F.relu, F.silu]), rng.choice([torch.sigmoid, F.hardsigmoid])))
            elif kind == "gn" and c % 2 == 0:
                gn = nn.GroupNorm(rng.choice([1, 2, c // 2]), c)
                with torch.no_grad():
                    gn.weight.uniform_(0.5, 1.5)
                    gn.bias.uniform_(-1, 1)
                self.ops.append(("gn", add(gn), rng.choice([F.silu, lambda x: x])))
            elif kind == "pool":
                self.ops.append(("pool", rng.choice([F.max_pool2d, F.avg_pool2d])))
            elif kind == "res":
                self.ops.append(("res", add(nn.Conv2d(c, c, 3, padding=1)), rng.choice([F.relu, lambda x: x])))
            elif kind == "cat":
                self.ops.append(("cat", add(nn.Conv2d(c, 4, 1))))
                c += 4
            elif kind == "perm":
                self.ops.append(("perm", add(nn.LayerNorm(c))))
        self.head = rng.choice(["mean", "flat", "none"])
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        m = self.mods
        for op in self.ops:
            kind, i = op[0], op[1]
            if kind in ("conv", "gn"):
                x = op[2](m[i](x))
            elif kind == "se":
                x = x * op[3](m[i + 1](op[2](m[i](x.mean((2, 3), keepdim=True)))))
            elif kind == "pool" and min(x.shape[-2:]) >= 2:
                x = i(x, 2)
            elif kind == "res":
                x = op[2](m[i](x) + x)
            elif kind == "cat":
                x = torch.cat([x, m[i](x)], 1)
            elif kind == "perm":
                x = m[i](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.head == "mean":
            return self.fc(x.mean((2, 3)))
        return x.flatten(1) if self.head == "flat" else x


@pytest.mark.parametrize("seed", range(16))
def test_random_cnn_matches_eager(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cin = rng.choice([3, 4, 8])
    net = Net(rng, cin).eval()
    x = torch.randn(rng.choice([1, 2]), cin, rng.choice([7, 9, 12, 16]), rng.choice([7, 8, 11, 16]))
    cm = compiled(net, x, rtol=1e-4, atol=1e-4)
    if any(op[0] == "conv" for op in net.ops):
        assert cm.report().rules.get("nhwc_layout", 0) > 0
