"""ONNX LSTM and GRU (torch.nn exports, bidirectional): kfuse against ONNX Runtime and eager, each
provider in its own process (ONNX Runtime's spinning pool threads slow whatever shares the cores).

    python bench/bench_recurrent.py [--seq 32] [--batch 4] [--input 64] [--hidden 128] [--rounds 7]
    KFUSE_BENCH_THREADS=1 python bench/bench_recurrent.py    # one thread each: steadier on a busy machine

Each child builds its provider once, warms it up, then times rounds of 20 calls: the median and the
spread of the per-call means over rounds. The outputs are compared with ONNX Runtime's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import torch
from common import THREADS, commit, machine

CHILD = r"""
import json, sys, time, torch
provider, cell, path, out, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
threads = int(sys.argv[6])
torch.set_num_threads(threads)
x = torch.load(path + ".x.pt")
if provider == "kfuse":
    import kfuse
    cm = kfuse.compile(path, (x,))
    fn = lambda: cm(x)
elif provider == "ort":
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: x.numpy()}
    fn = lambda: torch.from_numpy(sess.run(None, feeds)[0])
else:
    model = torch.load(path + ".model.pt", weights_only=False)
    fn = lambda: model(x)[0]
with torch.no_grad():
    y = fn()
    for _ in range(10):
        fn()
    ms = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(20):
            fn()
        ms.append((time.perf_counter() - t) / 20 * 1e3)
y = y[0] if isinstance(y, (tuple, list)) else y
torch.save(y, out)
print(json.dumps(sorted(ms)))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    print(f"{machine()}, commit {commit()}, torch {torch.__version__}, {THREADS} threads; bidirectional, "
          f"[seq {a.seq}, batch {a.batch}, input {a.input}] hidden {a.hidden}; median ms per call (p10-p90 of rounds)")
    print(f"{'cell':<6}{'kfuse':>18}{'ONNX Runtime':>18}{'eager':>18}{'kfuse/ORT':>11}{'max err vs ORT':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for cell in ("LSTM", "GRU"):
            torch.manual_seed(0)
            model = getattr(torch.nn, cell)(a.input, a.hidden, bidirectional=True).eval()
            x = torch.randn(a.seq, a.batch, a.input)
            path = os.path.join(tmp, f"{cell}.onnx")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
            torch.save(x, path + ".x.pt")
            torch.save(model, path + ".model.pt")
            res, outs = {}, {}
            for provider in ("kfuse", "ort", "eager"):
                outs[provider] = os.path.join(tmp, f"{cell}.{provider}.pt")
                p = subprocess.run([sys.executable, "-c", CHILD, provider, cell, path, outs[provider], str(a.rounds),
                                    THREADS], capture_output=True, text=True, timeout=900)
                if p.returncode:
                    raise SystemExit(f"{cell} {provider} failed:\n{p.stderr[-3000:]}")
                res[provider] = json.loads(p.stdout.strip().splitlines()[-1])
            med = {k: v[len(v) // 2] for k, v in res.items()}
            cell_txt = {k: f"{med[k]:.3f} ({v[len(v) // 10]:.2f}-{v[-1 - len(v) // 10]:.2f})" for k, v in res.items()}
            err = float((torch.load(outs["kfuse"]) - torch.load(outs["ort"])).abs().max())
            print(f"{cell:<6}{cell_txt['kfuse']:>18}{cell_txt['ort']:>18}{cell_txt['eager']:>18}"
                  f"{med['kfuse'] / med['ort']:>10.2f}x{err:>16.2e}")
            print(f"CSV,bench_recurrent,{cell},{med['kfuse']:.4f},{med['ort']:.4f},{med['eager']:.4f},{machine()},{commit()}")


if __name__ == "__main__":
    main()
