"""Compile vs load: the time a fresh process takes to compile a built-in model (capture, passes,
kernels; with a cold and with a warm kernel cache) and to load the same model from an artifact
(`kfuse.load`, with CC pointing at no compiler), each in its own process, median of a few runs.
`--baseline REV` also compiles with kfuse as of git revision REV (a temporary worktree), cold and warm,
in turns with this tree's runs (a change's effect on the first compile).

    python bench/bench_artifact.py [--model bert] [--seq 128] [--runs 3] [--baseline REV]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from common import baseline_worktree, commit, machine

COMPILE = """
import sys, time, torch, kfuse
from kfuse.models import build
model, inputs = build(sys.argv[1], batch=1, seq=int(sys.argv[2]))
t = time.perf_counter(); cm = kfuse.compile(model, inputs); t = time.perf_counter() - t
if len(sys.argv) > 3:
    cm.save(sys.argv[3])
    torch.save((inputs, cm(*inputs)), sys.argv[3] + ".io.pt")
print(t)
"""

LOAD = """
import sys, time, torch
t0 = time.perf_counter(); import kfuse; t_import = time.perf_counter() - t0
t = time.perf_counter(); cm = kfuse.load(sys.argv[1]); t = time.perf_counter() - t
inputs, want = torch.load(sys.argv[1] + ".io.pt")
assert torch.equal(cm(*inputs), want) and not cm.report().fallbacks
print(t, t_import)
"""


def run(code, args, env) -> list[float]:
    # run in the tree it imports: `python -c` puts the working directory first on sys.path
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900,
                         cwd=env["PYTHONPATH"])
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return [float(x) for x in out.stdout.split()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", metavar="REV", help="also compile with kfuse as of git revision REV")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = {**os.environ, "PYTHONPATH": root}
    load, imp = [], []
    times = {"new": {"cold": [], "warm": []}, "old": {"cold": [], "warm": []}}     # this tree's, the baseline's
    with tempfile.TemporaryDirectory() as tmp, baseline_worktree(a.baseline) as bl:
        art = os.path.join(tmp, "art")
        for r in range(a.runs):
            trees = [("new", root)] + ([("old", bl[1])] if bl else [])
            for which, tree in trees[:: 1 if r % 2 else -1]:      # the baseline first in even runs
                cache = os.path.join(tmp, f"cache-{which}{r}")    # a new, empty kernel cache: a fresh machine
                env = {**base, "PYTHONPATH": tree, "KFUSE_CACHE_DIR": cache}
                saved = [art] if which == "new" else []          # this tree's cold compile saves the artifact
                times[which]["cold"].append(run(COMPILE, [a.model, str(a.seq), *saved], env)[0])
                times[which]["warm"].append(run(COMPILE, [a.model, str(a.seq)], env)[0])
            t, ti = run(LOAD, [art], {**base, "CC": "/nonexistent/cc", "KFUSE_CACHE_DIR": os.path.join(tmp, "none")})
            load.append(t)
            imp.append(ti)
    cold, warm = times["new"]["cold"], times["new"]["warm"]
    med = statistics.median
    print(f"{machine()}, commit {commit()}; {a.model} batch 1 x seq {a.seq}; median of {a.runs} fresh processes")
    print(f"  compile, cold kernel cache   {med(cold):8.3f} s   ({min(cold):.3f}-{max(cold):.3f})")
    print(f"  compile, warm kernel cache   {med(warm):8.3f} s   ({min(warm):.3f}-{max(warm):.3f})")
    if a.baseline:
        for what in ("cold", "warm"):
            t = times["old"][what]
            print(f"  compile, {what} cache @{a.baseline:<9s}{med(t):8.3f} s   ({min(t):.3f}-{max(t):.3f})   "
                  f"this tree / baseline {med(times['new'][what]) / med(t):.3f}")
    print(f"  kfuse.load, no C compiler    {med(load):8.3f} s   ({min(load):.3f}-{max(load):.3f})"
          f"   (import kfuse {med(imp):.2f} s, not counted)")
    print(f"  load / warm compile {med(load) / med(warm):.3f}, load / cold compile {med(load) / med(cold):.3f}")
    print(f"CSV,bench_artifact,{a.model},{a.seq},{med(cold):.4f},{med(warm):.4f},{med(load):.4f},{machine()},{commit()}")


if __name__ == "__main__":
    main()
