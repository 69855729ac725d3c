"""Kernels chosen by timing each candidate alone, timed again in their program.

A group whose kernel was chosen among interchangeable candidates (backends.choice.Contest: our
convolution or oneDNN's) was timed alone at compile time, with its weights and input in the caches the
timing warmed. In the program the kernels before it have passed their own data through the caches,
weights that stay in the last-level cache alone do not stay there, and a library kernel's output,
allocated per call, may be page-faulted in on every call, depending on the process's allocation history
(RegNetY-1.6GF at batch 8: 10,740 faults a call in one process, none in another). Timing every candidate
cold instead is no rule (MobileNetV2 0.94x, EfficientNet-B0 1.02-1.05x).

So the assembled program is walked kernel by kernel (Program.kernel_calls) on random inputs, each
contested group running one of its candidates per walk, in a seeded order of its own (_orders), timed where
it stands, to the next contested kernel; a candidate replaces the one chosen alone where its median in the
program, summed over the groups that pose the same problem, is lower by MARGIN (propose). The program with
the replacements is then called as a user calls it, in turn with the first, and kept only where faster
(faster; else reject). The verdicts are cached like the other choices (autotune.verdict_key): the next
compile of the same problem on this machine takes them untimed.
"""
from __future__ import annotations

import functools
import logging
import random
import time

import torch

from .. import progress
from ..backends import hugepages, openmp
from ..backends.c import autotune

MARGIN = 0.03          # a candidate replaces the one chosen alone when faster in the program by this much
ROUNDS = 15            # timed walks per candidate, at most (fewer, down to MIN_ROUNDS, where walks are slow)
MIN_ROUNDS = 3
BUDGET_S = 3.0         # timed walks, at most, unless MIN_ROUNDS take longer
CALLS_BUDGET_S = 2.0   # the two programs' calls (faster), at most, unless MIN_CALLS take longer
MIN_CALLS, MAX_CALLS = 5, 25

log = logging.getLogger("kfuse")


def propose(program) -> dict:
    """Times the contested kernels of `program` (a CPU Program, not yet called) in place, stores the
    verdicts and shows them in its report; returns {group: its Contest} of the groups whose kernel the
    verdict changes (to be made again: make_kernel then takes the verdict)."""
    contests = {gi: k.contest for gi, k in enumerate(program.kernels) if k.contest is not None}
    if not contests:
        return {}
    try:
        with progress.stage(f"timing {len(contests)} kernels' choices in the program"):
            times, load = _walks(program, contests)
    except Exception as e:          # random inputs a program cannot take: the choices made alone stand
        log.warning("kfuse: the kernels' choices were not timed in the program: %s: %s", type(e).__name__, e)
        return {}
    verdicts = {}
    for key in {c.key for c in contests.values()}:
        same = [gi for gi, c in contests.items() if c.key == key]
        names, chosen = contests[same[0]].names, contests[same[0]].chosen
        ms = [sum(_median(times[gi][n]) for gi in same) for n in names]
        best = autotune.winner(ms, MARGIN, names.index(chosen))
        autotune.remember(key, best, names, ms, load)
        # shown per kernel, like the times alone
        verdicts[key] = names[best], ", ".join(f"{n} {t / len(same):.3f}" for n, t in zip(names, ms)), len(same)
    for gi, c in contests.items():
        best, text, count = verdicts[c.key]
        info = program.report.kernels[gi]
        each = f", the mean of {count} kernels like it" if count > 1 else ""
        info.schedule = f"{best} (measured in the program: {text} ms{each}{autotune.under_load(load)}; " \
                        f"alone: {info.schedule})"
    return {gi: c for gi, c in contests.items() if verdicts[c.key][0] != c.chosen}


def faster(new, old) -> bool:
    """Whether program `new` (old's kernels with the verdicts of `propose`) is faster than `old`, both called
    as a user calls them (Program.__call__: through their native runners, made at their second call),
    in turn, on the same random inputs. A library kernel costs the runner more than the walk sees: the
    C run around it is split (and, before the forty-sixth session, its output copied) (ResNet-50 at batch 1,
    ten convolutions moved to oneDNN by their times in the walk: the program 1.10x slower, timed beside
    the first in one process). Both programs
    are called: the caller makes a fresh one of the faster (whose runner is made at its own second call);
    the report's launch line is left as it was."""
    try:
        return _faster(new, old)
    except Exception as e:          # the first program stands
        log.warning("kfuse: the program with the choices made in it was not timed: %s: %s", type(e).__name__, e)
        return False


def _faster(new, old) -> bool:
    from . import NATIVE_AFTER       # (the package imports this module)
    with autotune.own_rng():
        inputs = autotune.random_values(old.graph.inputs)
    launch = old.report.launch
    with torch.no_grad():
        first = []
        for p in (old, new):
            for _ in range(NATIVE_AFTER):
                p(inputs)
            t = time.perf_counter()
            p(inputs)
            first.append(time.perf_counter() - t)
        calls = max(MIN_CALLS, min(MAX_CALLS, int(CALLS_BUDGET_S / max(sum(first), 1e-9))))
        ts = {old: [], new: []}
        for i in range(calls):
            for p in (old, new) if i % 2 == 0 else (new, old):
                t = time.perf_counter()
                p(inputs)
                ts[p].append(time.perf_counter() - t)
    old.report.launch = launch
    return _median(ts[new]) < _median(ts[old])


def reject(contests: dict, program) -> None:
    """The changes `propose` made, measured slower in the whole program (faster): the choices made alone
    become the verdicts, and the report says so."""
    for gi, c in contests.items():
        autotune.remember(c.key, c.names.index(c.chosen), c.names, [], 0.0)
        info = program.report.kernels[gi]
        info.schedule = f"{c.chosen} (kept: the program measured slower with the choice in it; {info.schedule})"


def _walks(program, contests: dict) -> tuple[dict, float]:
    """{group: {candidate: [seconds]}} from walks of `program`, each contested group running its candidates in
    an order of its own (_orders), each timed from its start to the next contested kernel's; and the
    timing's disturbance (autotune.waited's fraction)."""
    graph = program.graph
    buffers = program.arena_buffers()
    runs, times = {}, {}
    for gi, c in contests.items():
        group, runs[gi], times[gi] = program.groups[gi], {}, {}
        for name, fn in c.make().items():
            hugepages.back_object(getattr(fn, "weights", None))
            if getattr(fn, "writes_into", False):    # into the planned buffer, or one it will have
                bufs = tuple(buffers[o] if o in buffers else None if o in graph.outputs
                             else torch.empty(o.shape, dtype=o.dtype) for o in group.outputs)
                fn = functools.partial(fn, bufs)
            runs[gi][name], times[gi][name] = fn, []
    with autotune.own_rng():
        inputs = autotune.random_values(graph.inputs)
    n = max(len(r) for r in runs.values())
    state = {"walk": 0, "timed": False, "open": None}
    order: dict = {}

    def close():
        # a candidate's time runs from its start to the next contested kernel's (or the walk's end): what it
        # costs the kernels after it is its own (which caches, which core's, it leaves its output in)
        if state["open"] is not None and state["timed"]:
            gi, name, t = state["open"]
            times[gi][name].append(time.perf_counter() - t)
        state["open"] = None

    def call(gi, group, fn, args):
        if gi not in runs:
            return fn(*args)
        close()
        names = list(runs[gi])
        name = order[gi][state["walk"]] if state["timed"] else names[(state["walk"] + gi) % len(names)]
        state["open"] = (gi, name, time.perf_counter())
        return runs[gi][name](*args)

    threads = openmp.threads()
    with torch.no_grad():
        t = time.perf_counter()
        for state["walk"] in range(n):          # untimed: each candidate's first call (oneDNN makes its primitive)
            program.kernel_calls(inputs, buffers, call, drop=True)
            close()
        per_walk = (time.perf_counter() - t) / n
        rounds = max(MIN_ROUNDS, min(ROUNDS, int(BUDGET_S / max(per_walk * n, 1e-9))))
        order.update(_orders(runs, rounds * n))
        state["timed"] = True
        w, t = autotune.waited(), time.perf_counter()
        for state["walk"] in range(rounds * n):
            program.kernel_calls(inputs, buffers, call, drop=True)
            close()
        load = (autotune.waited() - w) / max((time.perf_counter() - t) * 1e9 * threads, 1.0)
    return times, load


def _orders(runs: dict, walks: int) -> dict:
    """{group: the candidate it runs in each of `walks` walks}: each candidate equally often, in a seeded order
    of the group's own. In rotation (group gi's candidate k in walk w where k = (w + gi) mod the count) each
    candidate of a group met one and the same candidate of the group before it: the Llama-style model's
    FFN-down GEMM on MKL always ran after our gated GEMM, on ours after oneDNN's, and our GEMM was chosen
    3% faster in the walks where the program was 2% slower with it (the same programs alternated in one
    process, on Python or the native runner)."""
    rng = random.Random(0)
    order = {}
    for gi, r in runs.items():
        seq: list = []
        while len(seq) < walks:
            block = list(r)
            rng.shuffle(block)
            seq += block
        order[gi] = seq[:walks]
    return order


def _median(ts: list) -> float:
    return sorted(ts)[len(ts) // 2] * 1e3
