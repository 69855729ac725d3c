"""Differential fuzzing: random graphs compiled by kfuse against the unfused reference interpreter.

    from kfuse.testing.fuzz import random_graph, check_graph
    case = random_graph(seed)               # a Case: graph, input maker, fuzzed options
    failure = check_graph(case)             # None, or a Failure saying what went wrong

    python -m kfuse.testing.fuzz --graphs 2000 --seed 7

The parts, one module each: generate.py (the random graph generator: random_graph, Case,
make_inputs), check.py (check_graph: the pipeline with checks, the program against the reference
interpreter and its float64 evaluation, by kfuse.verify's policy), minimise.py (minimize: a failing
case shrunk), and here the loop over seeds and the command line.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from ..verify import mismatch as compare
from .check import Failure, check_graph, copy_graph, reference64
from .generate import Case, make_inputs, random_graph
from .minimise import minimize

__all__ = ["Case", "Failure", "check_graph", "compare", "copy_graph", "fuzz", "main", "make_inputs", "minimize",
           "random_graph", "reference64"]


def fuzz(n_graphs: int, seed: int = 0, *, verbose: bool = False, stop_after: int | None = None, trace: bool = False):
    """Check `n_graphs` random graphs from seeds seed, seed+1, ...; returns the list of Failures."""
    failures = []
    t0 = time.perf_counter()
    for k in range(n_graphs):
        s = seed + k
        if trace:                    # a kernel that corrupts memory kills the process: name the seed first
            print(f"seed {s}", flush=True)
        try:
            case = random_graph(s)
        except Exception as e:       # the generator itself must only build well-formed graphs
            failures.append(Failure(s, "generator", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"))
            continue
        f = check_graph(case)
        if f is not None:
            failures.append(f)
            if verbose:
                print(f"FAIL {f}\n", flush=True)
            if stop_after and len(failures) >= stop_after:
                break
        if verbose and (k + 1) % 50 == 0:
            print(f"{k + 1}/{n_graphs} graphs, {len(failures)} failures, {time.perf_counter() - t0:.1f} s", flush=True)
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kfuse.testing.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--graphs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many failures")
    p.add_argument("--trace", action="store_true", help="print each seed before checking it")
    p.add_argument("--minimize", type=int, default=None, metavar="SEED", help="minimise the failing graph of SEED")
    a = p.parse_args(argv)
    if a.minimize is not None:
        case = minimize(random_graph(a.minimize))
        print(check_graph(case) or "passes")
        return 0
    t0 = time.perf_counter()
    failures = fuzz(a.graphs, a.seed, verbose=True, stop_after=a.stop_after, trace=a.trace)
    kinds: dict[str, int] = {}
    for f in failures:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    print(f"\n{a.graphs} graphs from seed {a.seed} in {time.perf_counter() - t0:.1f} s: {len(failures)} failures "
          + (str(kinds) if kinds else ""))
    if failures:
        print("failing seeds:", " ".join(str(f.seed) for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
