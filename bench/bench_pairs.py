"""Pairs with a 1x1 convolution (depthwise -> pointwise, pointwise -> depthwise, squeeze-excitation ->
pointwise) measured through the call a user makes, side by side in one process (the providers rotated
block by block, common.measure):

    python bench/bench_pairs.py [--models efficientnet_b0,mobilenetv3,regnety_1_6gf] [--batch 1]
                                [--disable squeeze_excite_pointwise]
    python bench/bench_pairs.py --models mobilenetv2,mobilenetv3,efficientnet_b0 --disable pointwise_depthwise

Per model:
  kfuse            the program as compiled (each pair fused where its fused kernel measured faster)
  kfuse:disabled   the same model compiled with disable=[--disable]: those pairs stay two kernels
  eager            the module in torch
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

import kfuse  # noqa: E402
from kfuse.models import build  # noqa: E402

PAIRS = ("dwconv_pwconv", "pwconv_dwconv", "se_pwconv")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_b0,mobilenetv3,regnety_1_6gf")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--disable", default="squeeze_excite_pointwise")
    args = ap.parse_args()
    print(f"{machine()}, commit {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"kfuse:disabled = disable=[{args.disable!r}]")
    rows = []
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
