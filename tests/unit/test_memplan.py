"""The memory planner (kfuse.runtime.memplan.plan) on hand-built chains of groups: which values share
an arena slot, the peak bytes, how far views stretch a value's life, and that values reaching a graph
output are never planned."""
from __future__ import annotations

import torch

from kfuse.ir import Graph, Group
from kfuse.runtime.memplan import plan

F32 = torch.float32


def one_op_groups(g: Graph):
    """One group per op of g, in order."""
    return [Group([n], [n]) for n in g.nodes if n.op not in ("input", "const")]


def share(buffers, a, b) -> bool:
    """Whether planned values a and b live in one slot (of one arena: `buffers` = plan.buffers)."""
    return buffers[a].untyped_storage().data_ptr() == buffers[b].untyped_storage().data_ptr()


def test_a_chain_reuses_the_slot_two_steps_back():
    """a -> b -> c -> d, each written into a given buffer: b is written while a is read, so they
    need two slots; c reuses a's. d is the output: the caller keeps it, so it is not planned."""
    g = Graph()
    x = g.input((256,), F32)
    a = g.add("exp", x)
    b = g.add("neg", a)
    c = g.add("tanh", b)
    d = g.add("relu", c)
    g.outputs = [d]
    p = plan(one_op_groups(g), g, [True] * 4, [False] * 4)
    bufs = p.buffers
    assert set(bufs) == {a, b, c}
    assert share(bufs, a, c) and not share(bufs, a, b) and not share(bufs, b, c)
    assert p.peak_bytes == 2 * 1024 and p.unplanned_bytes == 3 * 1024
    assert {n: p.last_use[n] for n in (x, a, b, c)} == {x: 0, a: 1, b: 2, c: 3}
    for n, buf in bufs.items():
        assert buf.shape == n.shape and buf.dtype == n.dtype


def test_a_value_shares_the_slot_of_a_bigger_one_it_never_meets():
    """1 KB -> 2 KB -> 4 KB: the first and the third value share one slot of 4 KB."""
    g = Graph()
    x = g.input((256,), F32)
    a = g.add("exp", x)
    b = g.add("concat", a, a, axis=0)
    c = g.add("concat", b, b, axis=0)
    g.outputs = [g.add("reduce_sum", c, axes=(0,))]
    p = plan(one_op_groups(g), g, [True] * 4, [False] * 4)
    bufs = p.buffers
    assert set(bufs) == {a, b, c} and share(bufs, a, c) and not share(bufs, b, c)
    assert p.peak_bytes == 4096 + 2048 and p.unplanned_bytes == 1024 + 2048 + 4096


def test_a_long_lived_small_value_does_not_cost_a_second_big_slot():
    """Two 4 KB values, apart in time, with a small value r alive from between them to the end (a
    residual, as in ConvNeXt's blocks): the big ones share one slot and r takes a small one. Placed in
    schedule order, r went into the first big slot (free by then), and the second big value needed
    another: 8.25 KB of arena where 4.5 KB are live at once."""
    g = Graph()
    x = g.input((4, 64), F32)
    h1 = g.add("concat", x, x, x, x, axis=0)              # 4 KB, read by a only
    a = g.add("reduce_sum", h1, axes=(0,))               # 256 B
    r = g.add("exp", a)                                  # 256 B, read at the end
    b = g.add("neg", r)
    h2 = g.add("concat", *[b] * 16, axis=0)              # 4 KB, while r lives
    s = g.add("reduce_sum", h2, axes=(0,))
    g.outputs = [g.add("add", r, s)]
    p = plan(one_op_groups(g), g, [True] * 7, [False] * 7)
    bufs = p.buffers
    assert set(bufs) == {h1, a, r, b, h2, s}
    assert share(bufs, h1, h2) and not share(bufs, r, h1)
    assert p.peak_bytes == 4096 + 256 + 256              # h2, r and b live together: no better plan


def test_where_schedule_order_packs_better_it_is_kept():
    """A chain 3 KB -> 2 KB -> 1 KB -> 2 KB: in order, c takes a's slot and d b's (5 KB); largest
    first would pair a with d and leave c a slot of its own (6 KB)."""
    g = Graph()
    x = g.input((768,), F32)
    a = g.add("exp", x)
    b = g.add("slice", a, axis=0, start=0, end=512)
    c = g.add("slice", b, axis=0, start=0, end=256)
    d = g.add("concat", c, c, axis=0)
    g.outputs = [g.add("exp", d)]
    p = plan(one_op_groups(g), g, [True] * 5, [False] * 5)
    bufs = p.buffers
    assert share(bufs, a, c) and share(bufs, b, d)
    assert p.peak_bytes == 3072 + 2048


def test_a_view_keeps_its_source_alive():
    """v = reshape(a) is read at the last step: a's slot stays taken until then, so b, written in
    between, must not reuse it."""
    g = Graph()
    x = g.input((4, 64), F32)
    a = g.add("exp", x)
    v = g.add("reshape", a, shape=(256,))
    b = g.add("neg", g.add("reshape", x, shape=(256,)))
    g.outputs = [g.add("add", v, b)]
    groups = one_op_groups(g)                  # exp, reshape (a view), reshape (a view), neg, add
    kinds = [n.op for grp in groups for n in grp.nodes]
    assert kinds == ["exp", "reshape", "reshape", "neg", "add"]
    writes = [k not in ("reshape",) for k in kinds]
    p = plan(groups, g, writes, [not w for w in writes])
    assert p.last_use[a] == 4                  # stretched from 1 (the reshape) to 4 (the add reading v)
    bufs = p.buffers
    assert set(bufs) == {a, b} and not share(bufs, a, b)
    assert p.peak_bytes == 2 * 1024


def test_values_reaching_an_output_are_never_planned():
    """a reaches the output through a view, c directly; only b, read by neither, is planned; values
    of groups that neither write into buffers nor alias (torch-run) are never planned either."""
    g = Graph()
    x = g.input((8, 32), F32)
    a = g.add("exp", x)
    va = g.add("transpose", a, perm=(1, 0))
    b = g.add("neg", x)
    c = g.add("mul", b, x)
    t = g.add("sin", c)
    g.outputs = [va, c, t]
    groups = one_op_groups(g)                  # exp, transpose, neg, mul, sin
    p = plan(groups, g, [True, False, True, True, False], [False, True, False, False, False])
    assert set(p.buffers) == {b}
    assert p.peak_bytes == p.unplanned_bytes == 8 * 32 * 4


def test_nothing_to_plan():
    g = Graph()
    x = g.input((3,), F32)
    g.outputs = [g.add("exp", x)]
    p = plan(one_op_groups(g), g, [True], [False])
    assert p.buffers == {} and p.peak_bytes == 0 and p.unplanned_bytes == 0
