"""The growable KV cache (kfuse/runtime/kvcache.py) measured through Hugging Face generate() on
`torch.compile(model.forward, backend="kfuse")`, three ways alternated round by round in one process on
one compiled model: "in kernel" (as built: the new rows go into the buffer's spare rows, written by the
attention kernel), "copied" (the same buffers, the rows copied by torch before the kernel, as before the
ninth session) and "copy" (buffers of exactly the rows needed: every token copies the whole cache into a
new buffer, as torch.cat does).

    python bench/bench_kvcache.py [--models gpt2,llama] [--prompt 128] [--new 128] [--rounds 4]

Decode ms/token = (t(generate N) - t(generate 1)) / (N - 1), median over rounds; the tokens of every
way must be equal. Models as bench_generate.py builds them (6 layers, hidden 512, random weights).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import THREADS, commit, machine  # noqa: E402

import torch  # noqa: E402

from bench_generate import build  # noqa: E402
from kfuse.runtime import kvcache  # noqa: E402

_capacity, _reserve = kvcache.capacity, kvcache.reserve


def _copied(tensors, dim=0):
    """kvcache.reserve with the pending rows written here, by torch: nothing left to the kernel."""
    out, pending = _reserve(tensors, dim)
    if pending:
        kvcache.write_rows(out, tensors[1], dim)
    return out, False


WAYS = {"in kernel": (_capacity, _reserve), "copied": (_capacity, _copied), "copy": (lambda rows: rows, _copied)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(int(THREADS))
    print(f"{machine()}, commit {commit()}, torch {torch.__version__}, {THREADS} threads; 6 layers, hidden 512, "
          f"prompt {args.prompt} -> {args.new} new tokens, dynamic KV cache")
    for arch in args.models.split(","):
        model = build(arch, 6, 512, args.prompt, args.new)
        ids = torch.randint(0, 8192, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        model.forward = torch.compile(model.forward, backend="kfuse")

        def generate(n):
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            return time.perf_counter() - t, out
        ms, tokens = {w: [] for w in WAYS}, {}
        for r in range(args.rounds + 1):            # round 0 warms up (compiles) every way
            for way in (list(WAYS) if r % 2 else list(WAYS)[::-1]):
                kvcache.capacity, kvcache.reserve = WAYS[way]
                one = statistics.median(generate(1)[0] for _ in range(3))
                t, tokens[way] = generate(args.new)
                if r:
                    ms[way].append((t - one) / (args.new - 1) * 1e3)
        kvcache.capacity, kvcache.reserve = WAYS["in kernel"]
        assert all(torch.equal(tokens["in kernel"], t) for t in tokens.values()), f"{arch}: the tokens differ"
        med = {w: statistics.median(v) for w, v in ms.items()}
        print(f"{arch}: decode ms/token " + ", ".join(f"{w} {med[w]:.3f} ({min(ms[w]):.3f}-{max(ms[w]):.3f})"
                                                      for w in WAYS)
              + "; in kernel / " + ", ".join(f"{w} {med['in kernel'] / med[w]:.3f}x" for w in list(WAYS)[1:])
              + "; tokens equal")


if __name__ == "__main__":
    main()
