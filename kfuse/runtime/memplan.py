"""Memory planning: intermediate buffers reused by liveness.

Kernels that write into a buffer they are given (C kernels, attention) get one from a small set of
arena slots. An arena (one tensor per slot, each planned value a view at the start of its slot)
is allocated per concurrent caller and reused (kfuse.runtime.Program keeps a pool of them). A slot
is free again after the last kernel that reads the value or anything that may alias it (views, and
torch-run groups, which may return views of their inputs). Values that reach a graph output never
live in a slot: the caller keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Plan:
    slot_of: dict            # planned Node -> its slot
    slot_bytes: list         # size of each slot
    peak_bytes: int          # bytes of all slots (what the planned intermediates occupy at most)
    unplanned_bytes: int     # bytes the same values would take with no reuse
    last_use: dict           # Node -> index of the last group that reads it (for freeing others early)

    @property
    def planned(self) -> list:
        """The planned values, in the order new_arena() returns their buffers."""
        return list(self.slot_of)

    def new_arena(self) -> list:
        """Fresh buffers for one caller: one tensor per planned value (views into shared slots)."""
        slots = [torch.empty(size, dtype=torch.uint8) for size in self.slot_bytes]
        return [slots[s][: o.nbytes].view(o.dtype).view(o.shape) for o, s in self.slot_of.items()]

    @property
    def buffers(self) -> dict:
        """Node -> a buffer of one new arena (for inspection and tests)."""
        return dict(zip(self.slot_of, self.new_arena()))


def plan(groups, graph, writes_into: list[bool], aliases: list[bool]) -> Plan:
    """groups: in execution order; writes_into[i]: group i's kernel writes outputs into given buffers;
    aliases[i]: group i's outputs may be views of its inputs."""
    roots: dict = {}              # value -> planned values whose storage it may share
    candidates = []
    for gi, g in enumerate(groups):
        for o in g.outputs:
            if writes_into[gi]:
                roots[o] = {o}
                candidates.append((gi, o))
            elif aliases[gi]:
                roots[o] = set().union(*(roots.get(i, set()) for i in g.inputs))
            else:
                roots[o] = set()
    escaped = set().union(*(roots.get(o, set()) for o in graph.outputs)) if graph.outputs else set()
    last_use: dict = {}
    for gi, g in enumerate(groups):
        for i in g.inputs:
            last_use[i] = gi
            for r in roots.get(i, ()):
                last_use[r] = max(last_use.get(r, gi), gi)

    slots: list[int] = []          # slot sizes in bytes
    free: list[int] = []
    slot_of: dict = {}
    by_group: dict[int, list] = {}
    for gi, o in candidates:
        if o not in escaped:
            by_group.setdefault(gi, []).append(o)
    dying: dict[int, list] = {}
    for gi, outs in sorted(by_group.items()):
        for d in [d for d in dying if d < gi]:      # values whose last reader ran already
            free.extend(slot_of[o] for o in dying.pop(d))
        for o in outs:
            size = max(o.nbytes, 1)
            fit = min((s for s in free if slots[s] >= size), key=lambda s: slots[s], default=None)
            if fit is None and free:                 # grow the largest free slot rather than add one
                fit = max(free, key=lambda s: slots[s])
            if fit is None:
                slots.append(0)
                fit = len(slots) - 1
            else:
                free.remove(fit)
            slots[fit] = max(slots[fit], size)
            slot_of[o] = fit
            dying.setdefault(last_use.get(o, gi), []).append(o)
    unplanned = sum(o.nbytes for o in slot_of)
    return Plan(slot_of, slots, sum(slots), unplanned, last_use)
