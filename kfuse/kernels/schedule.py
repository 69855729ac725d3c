"""Scheduling a kernel's values into passes: phase, varies, and which values to stash.

Each value has a *phase* (how many reductions it sits behind: the pass in which it can first be
computed) and *varies* (whether it depends on j; if not it is a per-row scalar, computed once per
row outside the inner loop). A value computed in one pass and needed in a later one is either
recomputed from its arguments (when that is a cheap op of loads) or stashed in a per-thread row
buffer (`stash`): rows are short enough to stay in L1, so only pass 0 reads DRAM.
"""
from __future__ import annotations

from .ir import REDUCTIONS, TRANSCENDENTAL, FusedKernel


def _schedule(k: FusedKernel):
    """Phase and varies of each value, and which values to stash for later passes.

    Walking consumers before producers, each varying value learns the passes that evaluate it
    (an output's pass, a reduction's pass, or a consumer's passes). A value needed in a pass after
    its own is stashed, unless it is a cheap op whose arguments are loads, literals or row
    scalars: recomputing that costs no more than reading it back from the stash."""
    for v in k.values:
        if v.op in ("load", "lit"):
            k.phase.append(0)
            k.varies.append(v.op == "load" and k.strides[v.attr][-1] != 0)
        elif v.op in REDUCTIONS:
            k.phase.append(k.phase[v.args[0]] + 1)
            k.varies.append(False)
        else:
            k.phase.append(max(k.phase[a] for a in v.args))
            k.varies.append(any(k.varies[a] for a in v.args))
    live = k.live
    need: dict[int, set[int]] = {i: set() for i in live}
    for i in k.out_values:
        need[i].add(k.phase[i])
    for i in reversed(live):
        v = k.values[i]
        if v.op in REDUCTIONS:
            need[v.args[0]].add(k.phase[v.args[0]])
            continue
        if not k.varies[i] or v.op in ("load", "lit"):
            continue
        cheap = v.op not in TRANSCENDENTAL and all(
            k.values[a].op in ("load", "lit") or not k.varies[a] for a in v.args)
        if max(need[i]) > k.phase[i] and not cheap:
            k.stash.add(i)
        for a in v.args:
            need[a] |= {k.phase[i]} if i in k.stash else need[i]
