"""Depthwise convolution + bias + ReLU6 on NHWC data: kfuse's C kernel (kfuse/backends/c/depthwise.py)
against the bare oneDNN convolution, eager F.conv2d on channels-last input and a copy of the same bytes,
on MobileNetV2/V3 and EfficientNet shapes (2 threads).

    python bench/bench_depthwise.py [--rounds 9]
    KFUSE_BENCH_THREADS=1 python bench/bench_depthwise.py     # 1 thread, with CPU times (busy machines)

Providers, side by side in one process, same inputs, rotated rounds (bench/common.py measure):
  kfuse (out)    DepthwiseConv(x, out=out): into a preallocated output, as the kfuse runtime calls it
  kfuse          DepthwiseConv(x): allocating its output
  onednn-bare    mkldnn._convolution_pointwise(x_cl, W, b, "none"): the convolution alone, no activation
  eager          F.hardtanh(F.conv2d(x_cl, w, b, groups=C), 0, 6) on channels-last x
  copy           out.copy_(inp) over the bytes the kernel must move: x once, out once, w and b
The target: kfuse (out) at >= 85% of the copy, and faster than onednn-bare and eager. A KxK depthwise
convolution also does K*K FMAs per output: where those take longer than the copy at this machine's FMA
peak (fma_peak_gflops, measured here), the copy's speed is out of reach; each case's line gives that
bound too: "bound ms" = max(copy, FMAs at the peak), and kfuse (out)'s share of it.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import commit, copy_bound, fma_peak_gflops, machine, measure

from kfuse.backends.c.depthwise import DepthwiseConv

# (N, H=W, C, kernel, stride): MobileNetV2 (3x3), MobileNetV3 / EfficientNet (5x5) depthwise layers
CASES = [(1, 112, 32, 3, 1), (1, 112, 96, 3, 2), (1, 56, 144, 3, 1), (1, 28, 240, 5, 1), (1, 14, 672, 5, 2),
         (1, 7, 960, 5, 1), (1, 14, 480, 3, 1), (8, 56, 144, 3, 1), (8, 14, 672, 5, 2)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    peak = fma_peak_gflops()
    print(f"{machine()}, commit {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fp32 FMA peak {peak:.0f} GFLOP/s")
    names = ("kfuse (out)", "kfuse", "onednn-bare", "eager", "copy")
    # with KFUSE_BENCH_THREADS=1 common.measure also takes the calling thread's CPU time, which a busy
    # machine's other processes do not inflate: printed as "cpu ms" with its own ratios
    print(f"{'case':<28}{'provider':<13}{'median ms':>10}{'GB/s':>8}{'copy/this':>10}{'onednn/this':>12}"
          f"{'cpu ms':>9}{'copy/this':>10}{'onednn/this':>12}")
    for n, hw, c, k, s in CASES:
        g = torch.Generator().manual_seed(0)
        p = k // 2
        x = torch.randn(n, hw, hw, c, generator=g)                        # physical NHWC
        xcl = x.permute(0, 3, 1, 2)                                        # the same memory as NCHW channels-last
        w, b = torch.randn(c, 1, k, k, generator=g), torch.randn(c, generator=g)
        dw = DepthwiseConv(w, b, (s, s), (p, p), (1, 1), ("hardtanh", (0.0, 6.0), ""))
        out = torch.empty(dw.out_shape(n, hw, hw))
        nbytes = 4 * (x.numel() + out.numel() + w.numel() + b.numel())
        wp = torch.ops.mkldnn._reorder_convolution_weight(w, [p, p], [s, s], [1, 1], c, list(xcl.shape))
        bare = torch.ops.mkldnn._convolution_pointwise
        want = F.hardtanh(F.conv2d(xcl, w, b, s, p, 1, c), 0.0, 6.0).permute(0, 2, 3, 1)
        assert torch.allclose(dw(x), want, atol=1e-4, rtol=1e-4), "kfuse depthwise disagrees with eager"
        res = measure({
            "kfuse (out)": lambda: dw(x, out),
            "kfuse": lambda: dw(x),
            "onednn-bare": lambda: bare(xcl, wp, b, [p, p], [s, s], [1, 1], c, "none", [], ""),
            "eager": lambda: F.hardtanh(F.conv2d(xcl, w, b, s, p, 1, c), 0.0, 6.0),
            "copy": copy_bound(nbytes),
        }, a.rounds)
        case = f"[{n},{hw},{hw},{c}] {k}x{k}/{s}"
        flop_ms = 2 * k * k * out.numel() / peak / 1e6 if peak else 0.0
        cp, ours = res["copy"]["ms"], res["kfuse (out)"]["ms"]
        bound = max(cp, flop_ms)
        print(f"{case:<28}bound {bound:.4f} ms ({'FMAs' if flop_ms > cp else 'copy'}: copy {cp:.4f}, FMAs at peak "
              f"{flop_ms:.4f}); kfuse (out) at {bound / ours * 100:.0f}% of it, {cp / ours * 100:.0f}% of the copy")
        for name in names:
            ms = res[name]["ms"]
            cpu, ccopy, cdnn = res[name]["cpu"], res["copy"]["cpu"], res["onednn-bare"]["cpu"]
            print(f"{case if name == names[0] else '':<28}{name:<13}{ms:>10.4f}{nbytes / ms / 1e6:>8.1f}"
                  f"{res['copy']['ms'] / ms:>10.2f}{res['onednn-bare']['ms'] / ms:>12.2f}"
                  + (f"{cpu:>9.4f}{ccopy / cpu:>10.2f}{cdnn / cpu:>12.2f}" if cpu else ""))
        print("CSV,bench_depthwise," + case + "," + ",".join(f"{res[m]['ms']:.5f}" for m in names)
              + f",{machine()},{commit()}")


if __name__ == "__main__":
    main()
