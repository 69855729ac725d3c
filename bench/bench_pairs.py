"""Pairs with a 1x1 convolution (depthwise -> pointwise, pointwise -> depthwise, squeeze-excitation ->
pointwise) measured through the call a user makes, side by side in one process (the providers rotated
block by block, common.measure):

    python bench/bench_pairs.py [--models efficientnet_b0,mobilenetv3,regnety_1_6gf] [--batch 1]
                                [--disable squeeze_excite_pointwise]
    python bench/bench_pairs.py --models mobilenetv2,mobilenetv3,efficientnet_b0 --disable pointwise_depthwise
    python bench/bench_pairs.py --kernels      # the expand 1x1 -> depthwise kernel alone, on the models' shapes

Per model:
  kfuse            the program as compiled (each pair fused where its fused kernel measured faster)
  kfuse:disabled   the same model compiled with disable=[--disable]: those pairs stay two kernels
  eager            the module in torch
With --kernels, per shape of an inverted residual block (MobileNetV2's and EfficientNet-B0's): the fused
expand 1x1 -> depthwise kernel ("kfuse"), our two kernels one after the other, the first writing into a
held buffer ("two kernels", as split_pairs times them), and torch's two channels-last convolutions.
Both kfuse programs must agree with each other within float32 rounding (the pair kernels are bit-exact
to their halves; other kernels may choose differently between the two compiles). ONNX Runtime is timed
by bench_models.py, in its own process.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import commit, machine, measure, print_csv, print_side_by_side  # noqa: E402  (re-executes with the malloc/thread env)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kfuse  # noqa: E402
from kfuse.backends.c import depthwise, dwpw, gemm  # noqa: E402
from kfuse.models import build  # noqa: E402

PAIRS = ("dwconv_pwconv", "pwconv_dwconv", "se_pwconv")
# (batch, H, W, input channels, expanded channels, depthwise kernel, stride, activation)
EXPAND_SHAPES = [(1, 112, 112, 16, 96, 3, 2, "relu6"), (1, 56, 56, 24, 144, 3, 1, "relu6"),
                 (1, 28, 28, 32, 192, 3, 1, "relu6"), (1, 14, 14, 96, 576, 3, 1, "relu6"),
                 (1, 7, 7, 160, 960, 3, 1, "relu6"), (1, 28, 28, 40, 240, 5, 1, "silu"),
                 (1, 14, 14, 112, 672, 5, 1, "silu"), (8, 56, 56, 24, 144, 3, 1, "relu6"),
                 (8, 28, 28, 32, 192, 3, 1, "relu6")]
ACTS = {"relu6": (("hardtanh", (0.0, 6.0), ""), lambda t: t.clamp_(0, 6)), "silu": (("swish", (), ""), F.silu)}


def kernels(rows):
    """The expand 1x1 -> depthwise kernel against our two kernels and torch's, per shape."""
    for n, h, w, ci, c, k, st, act in EXPAND_SHAPES:
        post, torch_act = ACTS[act]
        w1, b1, w2, b2 = torch.randn(c, ci, 1, 1) / ci ** 0.5, torch.randn(c), torch.randn(c, 1, k, k), torch.randn(c)
        pw, dw = gemm.GemmConv(w1, b1, post, False), depthwise.DepthwiseConv(w2, b2, st, k // 2, 1, post)
        fused = dwpw.PointwiseDepthwise(pw, dw)
        x = torch.randn(n, h, w, ci)
        out, mid, out2 = torch.empty(dw.out_shape(n, h, w)), torch.empty(n, h, w, c), torch.empty(dw.out_shape(n, h, w))
        f, p, d = fused.bound(tuple(x.shape)), pw.bound(tuple(x.shape)), dw.bound((n, h, w, c))
        xt = x.permute(0, 3, 1, 2)              # channels-last memory, as NCHW for torch
        torch.testing.assert_close(f(x, out=out), d(p(x, out=mid), out=out2), rtol=0, atol=0)
        res = measure({"kfuse": lambda: f(x, out=out), "two kernels": lambda: d(p(x, out=mid), out=out2),
                       "eager": lambda: torch_act(F.conv2d(torch_act(F.conv2d(xt, w1, b1)), w2, b2, st, k // 2, 1, c))})
        key = f"[{n},{h},{w},{ci}]->{c} {k}x{k}/{st} {act}"
        print_side_by_side(key, f"expand 1x1 -> depthwise {key}", res, "two kernels", rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_b0,mobilenetv3,regnety_1_6gf")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--disable", default="squeeze_excite_pointwise")
    ap.add_argument("--kernels", action="store_true", help="the expand 1x1 -> depthwise kernel alone, per shape")
    args = ap.parse_args()
    print(f"{machine()}, commit {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"kfuse:disabled = disable=[{args.disable!r}]")
    rows = []
    if args.kernels:
        kernels(rows)
        print_csv(rows)
        return
    for name in args.models.split(","):
        model, inputs = build(name, batch=args.batch)
        cm, off = kfuse.compile(model, inputs), kfuse.compile(model, inputs, disable=[args.disable])
        with torch.no_grad():
            torch.testing.assert_close(off(*inputs), cm(*inputs), rtol=1e-4, atol=1e-5)
        pairs = {p: sum(k.name.startswith(p) for k in cm.report().kernels) for p in PAIRS}
        split = sum(w.code == "measured_slower" for w in cm.report().why_not)
        res = measure({"kfuse": lambda: cm(*inputs), "kfuse:disabled": lambda: off(*inputs),
                       "eager": lambda: model(*inputs)})
        print_side_by_side(f"{name},b{args.batch}", f"{name} b{args.batch}: fused pairs {pairs}, pairs split by "
                           f"measurement {split}", res, "kfuse:disabled", rows)
    print_csv(rows)


if __name__ == "__main__":
    main()
