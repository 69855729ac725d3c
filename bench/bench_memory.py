"""Peak live memory of one inference call: kfuse against PyTorch eager on built-in models.

Live heap bytes, not RSS (RSS moved by megabytes between processes with malloc's reuse of pages):
bench/memtrack.c, built here with gcc and loaded with LD_PRELOAD into a fresh process per provider,
counts the bytes malloc has handed out and not had back (torch's CPU tensors, oneDNN's scratch, kfuse's
C kernels) and their peak. The process builds the model (kfuse: compiles it), makes two warm-up calls
under torch.no_grad() at 2 threads, then makes one call: its figure is the peak during that call minus
the bytes in use just before it, the returned output included.

kfuse's arena of planned intermediates (cm.report().peak_bytes: the bytes of its slots) is allocated
when the program is built and reused by every call, so it is in use before the call and not in that
difference: it is added to kfuse's figure. So is an output kfuse recycles from its pool of outputs of
1 MiB or more (kfuse.backends.POOL_MIN; kept between calls, so in use before the call): the bytes of
the output the call did not allocate. Weights, and kfuse's packed copies of them, are not counted.

    python bench/bench_memory.py                               # BERT batch 8 x seq 512
    python bench/bench_memory.py --model resnet50 --batch 1
    python bench/bench_memory.py --models cnn,bert-b1,llama-b1  # cnn: every built-in CNN at batch 1 and 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kfuse.models import CNN_MODELS

CHILD = r"""
import ctypes, json, os, sys, torch
del os.environ["LD_PRELOAD"]     # the tracker stays loaded here; the compilers kfuse runs need not load it
torch.set_num_threads(2)
import kfuse
from kfuse.models import build
mem = ctypes.CDLL(None)
mem.kf_mem_current.restype = mem.kf_mem_peak.restype = ctypes.c_long
provider, batch, seq, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, inputs = build(name, batch=batch, seq=seq)
fn, arena = model, 0
with torch.no_grad():
    if provider == "kfuse":
        fn = kfuse.compile(model, inputs)
        arena = fn.report().peak_bytes
    fn(*inputs)
    fn(*inputs)
    before = mem.kf_mem_current()
    mem.kf_mem_reset_peak()
    out = fn(*inputs)
    peak, after = mem.kf_mem_peak(), mem.kf_mem_current()
held = max(0, out.nbytes - (after - before))     # output bytes in use before the call: a recycled output
print(json.dumps({"extra": peak - before, "arena": arena, "held": held}))
"""


def build_tracker(folder) -> str:
    """bench/memtrack.c compiled into `folder`; the path of the shared library."""
    so = os.path.join(folder, "memtrack.so")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", str(Path(__file__).with_name("memtrack.c")), "-o", so, "-ldl"],
                   check=True)
    return so


def measure(tracker, provider, name, batch, seq, code=CHILD):
    """One fresh process running `code`: {"extra": bytes, "arena": bytes, "held": bytes} of one call."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}    # glibc's default malloc
    env["LD_PRELOAD"] = tracker
    res = subprocess.run([sys.executable, "-c", code, provider, str(batch), str(seq), name], capture_output=True,
                         text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{provider} {name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def cases(models: str, batch: int) -> list[tuple[str, int]]:
    """--models: NAME (at --batch) or NAME-bB, comma-separated; `cnn` is every built-in CNN at batch 1 and 8."""
    out = []
    for m in filter(None, models.split(",")):
        if m == "cnn":
            out += [(n, b) for n in CNN_MODELS for b in (1, 8)]
        elif "-b" in m:
            name, b = m.rsplit("-b", 1)
            out.append((name, int(b)))
        else:
            out.append((m, batch))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512, help="sequence length of the text models")
    p.add_argument("--repeats", type=int, default=1, help="processes per provider (the median is shown)")
    p.add_argument("--model", default="bert")
    p.add_argument("--models", help="several models in one table: NAME or NAME-bBATCH, comma-separated; cnn")
    a = p.parse_args()
    mib = 1 / 2 ** 20
    print(f"peak live heap bytes of one call beyond those in use before it, MiB (2 threads, text models at seq "
          f"{a.seq}, median of {a.repeats} process(es) per provider); kfuse's figure includes its arena")
    print("| model | batch | eager | kfuse (of which arena) | kfuse / eager |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tracker = build_tracker(tmp)
        for name, batch in cases(a.models or a.model, a.batch):
            peak = {}
            for prov in ("eager", "kfuse"):      # one after the other: never two models at once
                runs = sorted((r["extra"] + r["arena"] + r["held"], r["arena"])
                              for r in (measure(tracker, prov, name, batch, a.seq) for _ in range(a.repeats)))
                peak[prov] = runs[len(runs) // 2]
            (eager, _), (kf, arena) = peak["eager"], peak["kfuse"]
            print(f"| {name} | {batch} | {eager * mib:.1f} | {kf * mib:.1f} ({arena * mib:.1f}) | {kf / eager:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
