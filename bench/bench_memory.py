"""Peak memory of one inference call: kfuse against PyTorch eager on a built-in model (BERT by default).

Each provider runs in a fresh subprocess with glibc's default malloc settings: build, compile (kfuse)
and warm up once, then reset the kernel's peak-RSS mark (/proc/self/clear_refs, "5"), run one call,
and take VmHWM minus the RSS just before the call: the extra memory the call itself needed
(activations, scratch, temporaries). kfuse's arena of planned intermediates is allocated once at
compile time and stays resident, so it is added to kfuse's figure: peak = extra + arena.

    python bench/bench_memory.py                    # BERT batch 8 x seq 512
    python bench/bench_memory.py --batch 1 --seq 128
    python bench/bench_memory.py --model resnet50 --batch 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, torch
torch.set_num_threads(2)
import kfuse
from kfuse.models import build
provider, batch, seq, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, inputs = build(name, batch=batch, seq=seq)
fn, planned = model, 0
with torch.no_grad():
    if provider == "kfuse":
        cm = kfuse.compile(model, inputs)
        fn, planned = cm, cm.report().peak_bytes
    fn(*inputs)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with torch.no_grad():
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    out = fn(*inputs)
    peak = status("VmHWM")
print(json.dumps({"extra": peak - before, "planned": planned, "out": out.nbytes}))
"""


def run(provider, batch, seq, name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run([sys.executable, "-c", CHILD, provider, str(batch), str(seq), name], capture_output=True,
                         text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{provider} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="bert")
    a = p.parse_args()
    rows = {prov: [run(prov, a.batch, a.seq, a.model) for _ in range(a.repeats)] for prov in ("eager", "kfuse")}
    mb = 1 / 2 ** 20
    print(f"built-in {a.model} batch {a.batch} x seq {a.seq}: extra memory of one call (median of {a.repeats} processes)")
    med = {}
    for prov, rs in rows.items():
        peaks = sorted(r["extra"] + r["planned"] for r in rs)
        med[prov] = peaks[len(peaks) // 2]
        arena = f", of which arena {rs[0]['planned'] * mb:.1f} MiB" if prov == "kfuse" else ""
        print(f"  {prov:<6} {med[prov] * mb:8.1f} MiB  (runs: {', '.join(f'{e * mb:.1f}' for e in peaks)}; "
              f"output {rs[0]['out'] * mb:.1f} MiB{arena})")
    print(f"  kfuse / eager: {med['kfuse'] / med['eager']:.2f}")


if __name__ == "__main__":
    main()
