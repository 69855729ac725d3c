"""Differential fuzzing of the whole compiler (kfuse.testing.fuzz) and one regression test per bug
it found, each a small graph reproducing it.

The random graphs use a fixed range of seeds, so their kernels are the same from run to run and
come from the on-disk kernel cache after the first run. KFUSE_FUZZ_SEED moves the range (to
explore), KFUSE_FUZZ_GRAPHS changes how many graphs run (at least 500 in CI).
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close

from kfuse.ir import Graph
from kfuse.kernels import lower
from kfuse.ops.reference import run as reference
from kfuse.runtime import build_program
from kfuse.testing.fuzz import Case, check_graph, fuzz, random_graph

SEED = int(os.environ.get("KFUSE_FUZZ_SEED", "0"))
GRAPHS = int(os.environ.get("KFUSE_FUZZ_GRAPHS", "500"))
CHUNK = 100


# a warning torch gives inside a compiled program is a failure: torch.matmul(vector, matrix, out=) resized
# a planned buffer with only a deprecation warning (seeds 424251.., tests/unit/test_torch_out.py)
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("start", range(0, GRAPHS, CHUNK))
def test_random_graphs(start):
    failures = fuzz(min(CHUNK, GRAPHS - start), SEED + start)
    assert not failures, "\n\n".join(str(f) for f in failures[:3]) + \
        f"\n\nfailing seeds: {[f.seed for f in failures]} (python -m kfuse.testing.fuzz --minimize SEED)"


def test_generator_is_deterministic():
    a, b = random_graph(12345), random_graph(12345)
    assert [(n.op, n.shape, n.dtype) for n in a.graph.nodes] == [(n.op, n.shape, n.dtype) for n in b.graph.nodes]
    assert a.options == b.options
    assert all(torch.equal(x, y) for x, y in zip(a.inputs(), b.inputs()))


def _ok(g: Graph, **options):
    failure = check_graph(Case(0, g, options))
    assert failure is None, str(failure)


# -- bugs fixed in the scheduler ----------------------------------------------------------------------

def test_groups_do_not_form_a_cycle():
    """Seed 75: sub(ls, p) joined p's group and minimum(p, ls) joined ls's group, so each kernel
    read the other's output ("groups form a cycle"). The cycle check looked at node paths only;
    it now follows paths through the members of groups already formed."""
    g = Graph()
    a, b, c = (g.input((5, 1, 7), torch.float32) for _ in range(3))
    p = g.add("pow", g.add("add", g.add("abs", b), g.const(0.5)), c)
    ls = g.add("log_softmax", a, axis=2)
    g.outputs = [g.add("sub", ls, p), g.add("minimum", p, ls)]
    _ok(g)
    _ok(g, horizontal=False)


def test_horizontal_merge_of_scalar_and_vector_groups():
    """Seed 1030: sub(x[1], c) and maximum(y[7], x[1]) read the same input and were merged
    horizontally into a flat kernel of 7 points that wrote the [1] output 7 times: a heap
    overflow (glibc: "free(): invalid next size"). The flat kernel now writes it once
    (test_flat_kernel_with_broadcast_output)."""
    g = Graph()
    x, y = g.input((1,), torch.float32), g.input((7,), torch.float32)
    g.outputs = [g.add("sub", x, g.const([0.5])), g.add("maximum", y, x)]
    _ok(g)


def test_producer_consumer_with_scalar_output():
    """The same overflow through producer-consumer fusion: a = x[1] - c is an output and feeds
    a + y[7] in one flat kernel."""
    g = Graph()
    x, y = g.input((1, 1), torch.float32), g.input((1, 7), torch.float32)
    a = g.add("sub", x, g.const([[0.5]]))
    g.outputs = [a, g.add("add", a, y)]
    _ok(g)
    assert all(k.backend == "c" for k in build_program(g, {"backend": "cpu"}).report.kernels)


def test_softmax_of_a_row_broadcast_into_a_wider_loop():
    """Seed 1340: softmax(r[13]) - y[13, 13] in one row kernel placed the softmax output, of shape
    [13], as "one value per row" of the [13, 13] loop and wrote 13 values at each row's offset:
    wrong values and a heap overflow. lower() now refuses such groups
    (test_row_kernel_with_softmax_output_broadcast_along_rows)."""
    g = Graph()
    x, y = g.input((13, 1), torch.float32), g.input((13, 13), torch.float32)
    s = g.add("softmax", g.add("reduce_max", x, axes=(1,), keepdim=False), axis=-1)
    g.outputs = [g.add("sub", s, y), g.add("expm1", s)]
    _ok(g, horizontal=False)
    _ok(g)


# -- bugs fixed in the kernel IR / C backend (kfuse/kernels, kfuse/backends/c) --------------------------

def _guarded_run(g, nodes, outputs, inputs):
    """Run the C kernel of the ops `nodes` of graph g directly, each output followed by a guard zone; returns the outputs
    and whether any guard was overwritten."""
    from kfuse.backends.c import build
    fk = lower(nodes, outputs)
    fn = build(fk)
    pad = 256
    bufs = [torch.full((o.numel + pad,), -7.0).to(o.dtype) for o in fk.outputs]
    outs = [b[:o.numel].view(o.shape) for b, o in zip(bufs, fk.outputs)]
    by_node = dict(zip(g.inputs, inputs))
    fn([by_node[n].contiguous() for n in fk.inputs], outs)
    overflow = any(not bool((b[o.numel:] == -7).all()) for b, o in zip(bufs, fk.outputs))
    return [outs[fk.outputs.index(o)] for o in outputs], overflow


def test_flat_kernel_with_broadcast_output():
    """A flat kernel wrote an output of stride 0 (a [1] value in a [7] loop) at every point, past
    its end. It is loop-invariant (lower() refuses it otherwise) and is now written once."""
    g = Graph()
    x, y = g.input((1,), torch.float32), g.input((7,), torch.float32)
    a = g.add("sub", x, g.const([0.5]))
    b = g.add("maximum", y, x)
    g.outputs = [a, b]
    xs = [torch.randn(1), torch.randn(7)]
    (ga, gb), overflow = _guarded_run(g, [a, b], [a, b], xs)
    want = reference(g, xs)
    assert not overflow, "the kernel wrote past the end of an output"
    assert torch.equal(ga, want[0]) and torch.equal(gb, want[1])
    _ok(g)


def test_flat_kernel_refuses_a_varying_value_in_a_broadcast_output():
    """The same layout, but the [1] output's value would vary along the loop: not one kernel."""
    from kfuse.kernels import FusedKernel, NotFusable, _check_outputs
    g = Graph()
    x, y = g.input((1,), torch.float32), g.input((7,), torch.float32)
    a = g.add("sub", x, g.const([0.5]))
    b = g.add("maximum", y, x)
    k = lower([a, b], [a, b])
    bad = FusedKernel(k.nodes, k.inputs, [a, b], k.shape, k.strides, k.values, [k.out_values[1], k.out_values[1]],
                      k.phase, k.varies, k.stash)
    with pytest.raises(NotFusable, match="varies along"):
        _check_outputs(bad)


def test_row_kernel_with_softmax_output_broadcast_along_rows():
    """A softmax output of shape [R] in an [R, N] loop was taken as one value per row (every
    REDUCTION-kind op was): it is [1, N] broadcast across the rows, which each row would write
    again, so lower() refuses it; the program runs it as two kernels."""
    from kfuse.kernels import NotFusable
    g = Graph()
    r, y = g.input((13,), torch.float32), g.input((13, 13), torch.float32)
    s = g.add("softmax", r, axis=-1)
    d = g.add("sub", s, y)
    g.outputs = [s, d]
    with pytest.raises(NotFusable, match="broadcast across the rows"):
        lower([s, d], [s, d])
    k = lower([s, d], [d])                   # s not an output: one kernel, s recomputed per row
    assert k.shape == (13, 13)
    xs = [torch.randn(13), torch.randn(13, 13)]
    (gd,), overflow = _guarded_run(g, [s, d], [d], xs)
    assert not overflow
    assert_close(gd, reference(g, xs)[1])
    _ok(g)
    _ok(g, horizontal=False)


def test_keepdim_reduction_and_row_outputs_are_one_value_per_row():
    """What may be one value per row: a reduction without keepdim ([R]), with keepdim ([R, 1]),
    and an elementwise value of shape [R, 1]; all written once per row, no guard overwritten."""
    g = Graph()
    x, c = g.input((6, 9), torch.float32), g.input((6, 1), torch.float32)
    m = g.add("reduce_max", x, axes=(1,), keepdim=False)
    s = g.add("reduce_sum", x, axes=(1,), keepdim=True)
    e = g.add("exp", c)
    t = g.add("sub", x, s)
    y = g.add("sub", t, e)
    outs = [m, s, e, y]
    xs = [torch.randn(6, 9), torch.randn(6, 1)]
    got, overflow = _guarded_run(g, [m, s, t, e, y], outs, xs)
    g.outputs = outs
    want = reference(g, xs)
    assert not overflow
    assert_close(got, want)


def test_layer_norm_of_a_constant_row():
    """Seeds 1730, 2106: a row whose values are all equal (clamped, a where of two scalars) has
    variance 0; torch's layer_norm returns the bias exactly, the C kernel was off by up to 7e-4:
    its mean, sum / N, was not exact, and x - mean was amplified by rstd up to 1/sqrt(eps). The
    corrected two-pass moments (kernels._moments) make the mean of equal values exact."""
    g = Graph()
    x = g.input((4, 16), torch.float32)
    g.outputs = [g.add("layer_norm", x, g.const(torch.linspace(0.5, 1.5, 16)), g.const(torch.linspace(-1, 1, 16)),
                       eps=1e-6, ndim=1)]
    prog = build_program(g, {"backend": "cpu"})
    assert [k.backend for k in prog.report.kernels] == ["c"]
    for v in (0.8930304, 1.7, 3.3):
        xs = [torch.full((4, 16), v)]
        got = prog(xs)[0]
        assert_close(got, reference(g, xs)[0], msg=f"x = {v}")
        assert torch.equal(got, g.outputs[0].inputs[2].value.expand(4, 16)), v   # the bias, exactly


def test_var_of_a_constant_row_is_zero():
    g = Graph()
    x = g.input((3, 11), torch.float32)
    g.outputs = [g.add("reduce_var", x, axes=(1,), correction=1, keepdim=True)]
    prog = build_program(g, {"backend": "cpu"})
    assert [k.backend for k in prog.report.kernels] == ["c"]
    for v in (0.8930304, 1.7, -3.3e5):
        assert torch.equal(prog([torch.full((3, 11), v)])[0], torch.zeros(3, 1)), v


def test_norm_of_a_norm_over_rows_of_one():
    """Seed 2109: rms_norm then layer_norm over rows of one element; the layer_norm must return its
    bias exactly (x - mean is 0), but its input, recomputed as an FMA (gcc's default
    -ffp-contract=fast), differed from its mean. Kernels compile with -ffp-contract=off."""
    g = Graph()
    x = g.input((2, 1, 1), torch.float32)
    r = g.add("rms_norm", x, g.const(torch.tensor([1.3])), eps=1e-6)
    g.outputs = [g.add("layer_norm", r, g.const(torch.tensor([0.7])), g.const(torch.tensor([0.25])), eps=1e-6, ndim=1)]
    prog = build_program(g, {"backend": "cpu"})
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        xs = [torch.randn(2, 1, 1, generator=gen)]
        assert_close(prog(xs)[0], reference(g, xs)[0])


def test_constants_that_are_strided_slices_compare_by_value():
    """Seed 778138: a one-element constant sliced with step 2 keeps stride 2 through .contiguous(),
    and hashing its bytes for CSE crashed the build. Equal constants still merge."""
    g = Graph()
    c = g.input((1,), torch.bool)
    a = g.const(torch.tensor([1.5, 9.0, 2.5])[::2][:1])
    b = g.const(torch.tensor([1.5]))
    g.outputs = [g.add("where", c, a, g.const(torch.tensor([4.0, 0.0])[::2][:1])), g.add("mul", a, b)]
    prog = build_program(g, {"backend": "cpu"})
    for v in (True, False):
        xs = [torch.tensor([v])]
        assert_close(prog(xs), reference(g, xs))
