"""Convolution + bias + activation (+ residual): kfuse's packed oneDNN kernel against eager and the bare
oneDNN convolution, on ResNet-50's shapes (batch 1, 2 threads).

    python bench/bench_conv.py [--rounds 9]

Then ResNet-50's stem max pool (3x3, stride 2, padding 1, channels-last) at batch 1 and 8: our C kernel
into a held output (as the program runs it, in its arena), torch's F.max_pool2d on the channels-last
tensor (allocating its output), and a copy of the bytes the pool must move (its input once, its output once).

Then the 3x3 stride-1 convolutions of ResNet-50 at batch 1 and 8 (+ bias + relu, NHWC): our Winograd
F(2x2, 3x3) kernel, our implicit GEMM and oneDNN's convolution (the three a program chooses between), each
called directly into a held output (oneDNN allocating its own), with the effective GFLOP/s of the direct
algorithm (2 Cin Cout 9 per output pixel) and Winograd's time over the faster direct one.

Providers, side by side in one process, same inputs, rotated rounds (bench/common.py measure):
  eager        F.relu(F.conv2d(x, w, b) [+ r])              torch's own dispatch
All inputs are channels-last, as inside a network where the previous convolution wrote them.
  onednn-bare  mkldnn._convolution_pointwise(x_cl, W, b, "none")    the bound: no epilogue at all
  kfuse        the whole compiled model (kfuse.compile of the same module), called as a user does
The kfuse ratio to onednn-bare is the target (>= 90%): the epilogue (relu in place, since oneDNN's
relu post-op maps NaN to 0; the residual as a binary post-op) must cost little beyond the conv.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import commit, copy_bound, machine, measure

import kfuse
from kfuse.backends.c.gemm import GemmConv
from kfuse.backends.c.pool import MaxPoolNHWC
from kfuse.backends.c.winograd import WinogradConv
from kfuse.backends.conv import pack_conv

# (Cin, H=W, Cout, kernel, stride, residual): ResNet-50 layers
CASES = [(64, 56, 64, 3, 1, False), (64, 56, 256, 1, 1, True), (256, 56, 64, 1, 1, False),
         (128, 28, 128, 3, 1, False), (512, 28, 128, 1, 1, False), (256, 14, 1024, 1, 1, True),
         (512, 7, 512, 3, 1, False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    print(f"{machine()}, commit {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':<34}{'eager ms':>10}{'bare ms':>10}{'kfuse ms':>10}{'GFLOP/s':>9}{'kfuse/bare':>11}{'vs eager':>9}")
    for cin, hw, cout, k, s, res in CASES:
        g = torch.Generator().manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, k, s, k // 2)
        # channels-last inputs, as inside a network where the previous convolution wrote them
        x = torch.randn(1, cin, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
        r = torch.randn(1, cout, hw // s, hw // s, generator=g).contiguous(memory_format=torch.channels_last) \
            if res else None

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = conv

            def forward(self, x, *rest):
                y = self.conv(x)
                return F.relu(y + rest[0] if rest else y)
        m = M().eval()
        inputs = (x, r) if res else (x,)
        cm = kfuse.compile(m, inputs)
        w = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach(), [k // 2] * 2, [s] * 2, [1, 1], 1,
                                                          list(x.shape))
        xc, b = x.contiguous(memory_format=torch.channels_last), conv.bias.detach()
        bare = torch.ops.mkldnn._convolution_pointwise
        res_ms = measure({
            "eager": lambda: m(*inputs),
            "onednn-bare": lambda: bare(xc, w, b, [k // 2] * 2, [s] * 2, [1, 1], 1, "none", [], ""),
            "kfuse": lambda: cm(*inputs),
        }, a.rounds)
        flops = 2 * cout * cin * k * k * (hw // s) ** 2
        e, bb, kf = (res_ms[n]["ms"] for n in ("eager", "onednn-bare", "kfuse"))
        case = f"[{cin},{hw},{hw}] {k}x{k}/{s} -> {cout}" + (" +res" if res else "")
        print(f"{case:<34}{e:>10.3f}{bb:>10.3f}{kf:>10.3f}{flops / kf / 1e6:>9.1f}{bb / kf * 100:>10.0f}%{e / kf:>8.2f}x")
        print(f"CSV,bench_conv,{case},{e:.4f},{bb:.4f},{kf:.4f},{machine()},{commit()}")
    pools(a.rounds)
    winograd(a.rounds)


def winograd(rounds: int):
    relu = ("relu", (), "")
    print(f"\n{'3x3/1 + relu, NHWC':<30}{'winograd ms':>12}{'gemm ms':>10}{'onednn ms':>10}{'wino GF/s':>10}"
          f"{'wino/best':>10}")
    for n in (1, 8):
        for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, hw, hw, c, generator=g)
            w, b = torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5, torch.randn(c, generator=g)
            out = torch.empty(n, hw, hw, c)
            wino, gemm = (k(w, b, relu, False, 1, 1, 1).bound(tuple(x.shape)) for k in (WinogradConv, GemmConv))
            dnn = pack_conv(w, b, {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
                                   "layout": "nhwc"}, relu, False, list(x.shape))
            want = dnn(x)
            assert (wino(x, out=out) - want).abs().max() <= 1e-4 * want.abs().max()
            res = measure({"winograd": lambda: wino(x, out=out), "gemm": lambda: gemm(x, out=out),
                           "onednn": lambda: dnn(x)}, rounds)
            wi, ge, dn = (res[k]["ms"] for k in ("winograd", "gemm", "onednn"))
            case = f"[{n},{hw},{hw},{c}] -> {c}"
            print(f"{case:<30}{wi:>12.3f}{ge:>10.3f}{dn:>10.3f}{2 * 9 * c * c * n * hw * hw / wi / 1e6:>10.0f}"
                  f"{wi / min(ge, dn):>10.2f}")
            print(f"CSV,bench_conv_winograd,{case},{wi:.4f},{ge:.4f},{dn:.4f},{machine()},{commit()}")


def pools(rounds: int):
    print(f"\n{'max pool 3x3/2 pad 1':<34}{'torch ms':>10}{'kfuse ms':>10}{'copy ms':>10}{'vs torch':>9}{'% of copy':>10}")
    for n in (1, 8):
        x = torch.randn(n, 64, 112, 112).contiguous(memory_format=torch.channels_last)
        xh = x.permute(0, 2, 3, 1)                                  # the same memory as NHWC
        pool = MaxPoolNHWC(3, 2, 1)
        out = torch.empty(pool.out_shape(*xh.shape))
        assert torch.equal(pool(xh, out=out), F.max_pool2d(x, 3, 2, 1).permute(0, 2, 3, 1))
        res = measure({"torch": lambda: F.max_pool2d(x, 3, 2, 1), "kfuse": lambda: pool(xh, out=out),
                       "copy": copy_bound(4 * (x.numel() + out.numel()))}, rounds)
        t, kf, cp = (res[k]["ms"] for k in ("torch", "kfuse", "copy"))
        case = f"[{n},112,112,64] -> [{n},56,56,64]"
        print(f"{case:<34}{t:>10.3f}{kf:>10.3f}{cp:>10.3f}{t / kf:>8.2f}x{cp / kf * 100:>9.0f}%")
        print(f"CSV,bench_conv_pool,{case},{t:.4f},{kf:.4f},{cp:.4f},{machine()},{commit()}")


if __name__ == "__main__":
    main()
