"""Counts of ONNX's node-test suite through kfuse and through ONNX Runtime.

    python -m tests.onnx.report                 # the table (about a minute on 2 cores)
    python -m tests.onnx.report --list wrong    # also each case of a status, with why
    python -m tests.onnx.report --expected      # the clear errors as lines of expected_errors.txt
    python -m tests.onnx.report --strict-rounding    # no allowance for a float16/float32 reference's own rounding

kfuse's outcome of each case (pass / clear error / wrong / crash, see node_cases.py) is counted
over all cases and over the cases ONNX Runtime passes; ONNX Runtime's over all cases. --jobs runs
cases in that many processes (default: the number of cores, at most 4).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import node_cases  # noqa: E402

STATUSES = ("pass", "error", "wrong", "crash")


def _run(names, strict_rounding=False):
    node_cases.ROUNDING_ALLOWANCE = not strict_rounding
    cases = node_cases.cases()
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            k = node_cases.run_kfuse(cases[name], d)
            o = node_cases.run_ort(cases[name])
            out.append((name, k.status, k.detail, o.status, o.detail))
    return out


def run_all(jobs: int, strict_rounding=False) -> list[tuple]:
    names = sorted(node_cases.cases())
    if jobs <= 1:
        return _run(names, strict_rounding)
    chunks = [names[i::jobs * 8] for i in range(jobs * 8)]
    with ProcessPoolExecutor(jobs) as pool:
        parts = pool.map(_run, chunks, [strict_rounding] * len(chunks))
        return sorted(r for part in parts for r in part)


def category(detail: str) -> str:
    """A short reason for a clear error, for expected_errors.txt: the op, input or type it is about."""
    m = re.search(r"unsupported ONNX op '([^']+)' at node '[^']*'(?:: (.*))?", detail)
    if m:
        return f"unsupported op {m.group(1)}" + (f" ({m.group(2)[:100]})" if m.group(2) else "")
    m = re.search(r"ONNX graph (input|output) '[^']*' is an? (\w+)", detail)
    if m:
        return f"{m.group(2)} {m.group(1)}"
    m = re.search(r"ONNX graph (input|output) '[^']*' has element type (\w+)", detail)
    if m:
        return f"{m.group(2).lower()} {m.group(1)}"
    m = re.search(r"ONNX tensor '[^']*': element type (\w+)", detail)
    if m:
        return f"{m.group(1).lower()} constant"
    text = re.sub(r"^\w+Error: ", "", detail)
    text = re.sub(r"ONNX node '[^']*' \((\w+)\): ", r"\1: ", text)
    return text[:120]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--list", action="append", default=[], choices=STATUSES + ("ort-fail",))
    ap.add_argument("--expected", action="store_true", help="print the clear errors as expected_errors.txt lines")
    ap.add_argument("--strict-rounding", action="store_true",
                    help="hold float16 and float32 outputs to the case's tolerance only "
                         "(no allowance for the reference's rounding)")
    args = ap.parse_args(argv)
    t = time.time()
    rows = run_all(args.jobs, args.strict_rounding)
    took = time.time() - t
    if args.expected:
        for name, k, detail, _, _ in rows:
            if k == "error":
                print(f"{name}  {category(detail)}")
        return
    every = collections.Counter(r[1] for r in rows)
    ort_pass = [r for r in rows if r[3] == "pass"]
    on_ort = collections.Counter(r[1] for r in ort_pass)
    ort = collections.Counter(r[3] for r in rows)
    print(f"ONNX node-test suite: {len(rows)} cases ({took:.0f} s, {args.jobs} processes)")
    print(f"{'':34}{'pass':>7}{'error':>7}{'wrong':>7}{'crash':>7}")
    print(f"{'kfuse, all cases':34}" + "".join(f"{every[s]:>7}" for s in STATUSES))
    print(f"{'kfuse, cases ONNX Runtime passes':34}" + "".join(f"{on_ort[s]:>7}" for s in STATUSES))
    print(f"ONNX Runtime: pass {ort['pass']}, fail {ort['fail']}")
    if ort_pass:
        print(f"kfuse passes {on_ort['pass'] / len(ort_pass):.1%} of the cases ONNX Runtime passes")
    allowed = [r for r in rows if r[1] == "pass" and r[2]]
    ort_allowed = [r for r in rows if r[3] == "pass" and r[4]]
    if allowed or ort_allowed:
        print(f"passing only by the rounding allowance (node_cases.rounding_mismatch): kfuse {len(allowed)} "
              f"({', '.join(r[0] for r in allowed)}), ONNX Runtime {len(ort_allowed)} ({', '.join(r[0] for r in ort_allowed)})")
    for status in args.list:
        print(f"\n-- {status}")
        for name, k, detail, o, odetail in rows:
            if (status == "ort-fail" and o == "fail") or k == status:
                print(f"{name}: {odetail if status == 'ort-fail' else detail}")


if __name__ == "__main__":
    main()
