"""The bound kernel calls (backends/c/conv_act.bind) measured through the call a user makes, side by side
in one process (the providers rotated block by block, common.measure): kfuse as built, kfuse with every
kernel called through its checked call, eager.

    python bench/bench_cnn_calls.py [--models mobilenetv2,mobilenetv3,efficientnet_b0] [--batch 1]

Per model:
  kfuse           the program as compiled (bound kernel calls, the stem as the autotuner chose)
  kfuse:checked   the same choices, every kernel called through its checked __call__ (no bind)
  eager           the module in torch
The two kfuse programs make the same kernel choices (the autotuner's cache) and must agree bit for bit.
ONNX Runtime is timed by bench_models.py (in its own process: its thread pool and torch's slow each
other in one).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import commit, machine, measure, print_csv, print_side_by_side  # noqa: E402  (re-executes with the malloc/thread env)

import torch  # noqa: E402

import kfuse  # noqa: E402
from kfuse.backends.c import depthwise, dwpw, gemm  # noqa: E402
from kfuse.models import build  # noqa: E402

OURS = (gemm.GemmConv, depthwise.DepthwiseConv, dwpw.DepthwisePointwise)


def _checked(model, inputs):
    """The program compiled with every kernel's bound() returning the kernel itself (its checked call)."""
    saved = {c: c.bound for c in OURS}
    for c in OURS:
        c.bound = lambda self, shape: self
    try:
        return kfuse.compile(model, inputs)
    finally:
        for c, f in saved.items():
            c.bound = f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenetv2,mobilenetv3,efficientnet_b0")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    print(f"{machine()}, commit {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.models.split(","):
        model, inputs = build(name, batch=args.batch)
        cm, checked = kfuse.compile(model, inputs), _checked(model, inputs)
        with torch.no_grad():
            want = cm(*inputs)
            assert torch.equal(checked(*inputs), want), f"{name}: the checked calls differ"
        res = measure({"kfuse": lambda: cm(*inputs), "kfuse:checked": lambda: checked(*inputs),
                       "eager": lambda: model(*inputs)})
        print_side_by_side(f"{name},b{args.batch}", f"{name} b{args.batch}", res, "kfuse:checked", rows)
    print_csv(rows)


if __name__ == "__main__":
    main()
