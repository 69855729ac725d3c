"""The fold pass (kfuse/passes/fold.py), rule by rule, in the style of TVM's pass tests: a small graph
built by hand goes through `fold.run`, and the result must be, node for node, the expected graph
built by hand (ops, attributes, operands, shapes, dtypes, constants by value). Then both run through
the reference interpreter on random inputs: the rewrites that only move data (chains, identities,
neutral operands, CSE, reshape sinking) must give the same bits; naming a decomposed activation
(silu, gelu-tanh) swaps the decomposition for torch's fused function, within the verify table
(hardswish and hardsigmoid: bit for bit, torch's kernels compute their decompositions' operations)."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

from kfuse.ir import Graph, postorder
from kfuse.ops.reference import run
from kfuse.passes import fold
from kfuse.report import Report

F32 = torch.float32


def _attr(v):
    if isinstance(v, (list, tuple)):
        return tuple(_attr(x) for x in v)
    if isinstance(v, torch.Tensor):
        return (v.dtype, tuple(v.shape), tuple(v.reshape(-1).tolist()))
    return v


def canonical(g: Graph) -> list[str]:
    """The graph as lines numbered by a walk from the outputs (operands in order, graph inputs first),
    so two graphs compare equal when they compute the same thing the same way, whatever order their
    node lists are in and whatever their node ids."""
    index: dict = {}
    lines: list[str] = []

    def name(n) -> str:
        return f"%{index[n]}"

    for n in postorder([*g.inputs, *g.outputs]):   # numbered by a walk from the outputs, not by id
        index[n] = len(lines)
        ty = f"{n.dtype}{list(n.shape)}"
        if n.op == "input":
            lines.append(f"%{index[n]} = input {n.attrs['index']} : {ty}")
        elif n.op == "const":
            lines.append(f"%{index[n]} = const {_attr(n.value)[2]} : {ty}")
        else:
            attrs = {k: _attr(v) for k, v in sorted(n.attrs.items())}
            lines.append(f"%{index[n]} = {n.op}({', '.join(name(i) for i in n.inputs)}) {attrs} : {ty}")
    lines.append("return " + ", ".join(name(o) for o in g.outputs))
    return lines


def folded(build, inputs):
    """fold.run on the graph `build(g, *graph inputs)` makes, and a second, untouched copy."""
    graphs = []
    for _ in range(2):
        g = Graph()
        g.outputs = list(build(g, *[g.input(s, d) for s, d in inputs]))
        g.check()
        graphs.append(g)
    before, after = graphs
    after = fold.run(after, {}, Report())
    after.check()
    return before, after


def random_inputs(g: Graph):
    out = []
    for n in g.inputs:
        if n.dtype == torch.bool:
            out.append(torch.rand(n.shape) < 0.5)
        else:
            out.append(torch.randn(n.shape).to(n.dtype))
    return out


def check_fold(build, expect, inputs, exact=True):
    """fold.run(build) is `expect` node for node, and computes what build did (bit for bit if `exact`)."""
    before, after = folded(build, inputs)
    want = Graph()
    want.outputs = list(expect(want, *[want.input(s, d) for s, d in inputs]))
    want.check()
    assert canonical(after) == canonical(want), "\n".join(
        ["got:", *canonical(after), "want:", *canonical(want), "before:", *canonical(before)])
    for _ in range(3):
        xs = random_inputs(before)
        if exact:
            assert_close(run(after, xs), run(before, xs), atol=0, rtol=0)
        else:
            assert_close(run(after, xs), run(before, xs))
    return after


X = [((2, 3, 4), F32)]


# -- reshape and transpose chains -------------------------------------------------------------------------

def test_reshape_of_a_reshape_is_one_reshape():
    check_fold(lambda g, x: [g.add("reshape", g.add("reshape", x, shape=(6, 4)), shape=(4, 6))],
               lambda g, x: [g.add("reshape", x, shape=(4, 6))], X)
    check_fold(lambda g, x: [g.add("reduce_max", g.add("reshape", g.add("reshape", x, shape=(24,)), shape=(4, 6)), axes=(1,))],
               lambda g, x: [g.add("reduce_max", g.add("reshape", x, shape=(4, 6)), axes=(1,))], X)


def test_reshape_to_its_own_shape_is_dropped():
    check_fold(lambda g, x: [g.add("exp", g.add("reshape", x, shape=(2, 3, 4)))],
               lambda g, x: [g.add("exp", x)], X)


def test_transposes_compose_and_inverse_ones_cancel():
    check_fold(lambda g, x: [g.add("neg", g.add("transpose", g.add("transpose", x, perm=(1, 0, 2)), perm=(0, 2, 1)))],
               lambda g, x: [g.add("neg", g.add("transpose", x, perm=(1, 2, 0)))], X)
    check_fold(lambda g, x: [g.add("neg", g.add("transpose", g.add("transpose", x, perm=(1, 2, 0)), perm=(2, 0, 1)))],
               lambda g, x: [g.add("neg", x)], X)
    check_fold(lambda g, x: [g.add("neg", g.add("transpose", x, perm=(0, 1, 2)))],
               lambda g, x: [g.add("neg", x)], X)


# -- identities and neutral operands -------------------------------------------------------------------------

def test_cast_to_its_own_dtype_and_expand_to_its_own_shape_are_dropped():
    check_fold(lambda g, x: [g.add("abs", g.add("expand", g.add("cast", x, dtype=F32), shape=(2, 3, 4)))],
               lambda g, x: [g.add("abs", x)], X)


def test_a_cast_that_converts_stays():
    check_fold(lambda g, x: [g.add("cast", x, dtype=torch.int64)],
               lambda g, x: [g.add("cast", x, dtype=torch.int64)], X)


@pytest.mark.parametrize("op,neutral,dtype", [("mul", 1.0, F32), ("logical_and", True, torch.bool),
                                              ("logical_or", False, torch.bool)])
def test_neutral_operand_on_either_side_is_dropped(op, neutral, dtype):
    shape = (3, 5)
    check_fold(lambda g, x: [g.add(op, x, g.const(torch.tensor(neutral, dtype=dtype))),
                             g.add(op, g.const(torch.tensor(neutral, dtype=dtype)), x)],
               lambda g, x: [x, x], [(shape, dtype)])


def test_neutral_operand_that_broadcasts_x_becomes_an_expand():
    """A mask that only varies along some dims times ones of the full shape stays a broadcast."""
    check_fold(lambda g, x: [g.add("mul", x, g.const(torch.ones(2, 3, 4)))],
               lambda g, x: [g.add("expand", x, shape=(2, 3, 4))], [((3, 1), F32)])


def test_operand_that_is_not_neutral_stays():
    check_fold(lambda g, x: [g.add("mul", x, g.const(torch.tensor([1.0, 1.0, 1.0, 2.0])))],
               lambda g, x: [g.add("mul", x, g.const(torch.tensor([1.0, 1.0, 1.0, 2.0])))], X)


# -- common subexpressions ---------------------------------------------------------------------------------

def test_cse_merges_equal_ops_and_equal_constants_by_value():
    """Two exp(x) are one; two constants 2.0 built apart are one; a different constant stays apart."""
    def build(g, x):
        a = g.add("mul", g.add("exp", x), g.const(2.0))
        b = g.add("mul", g.add("exp", x), g.const(2.0))
        c = g.add("mul", g.add("exp", x), g.const(3.0))
        return [g.add("add", a, b), c]

    def expect(g, x):
        e = g.add("exp", x)
        a = g.add("mul", e, g.const(2.0))
        return [g.add("add", a, a), g.add("mul", e, g.const(3.0))]
    after = check_fold(build, expect, X)
    assert after.op_counts() == {"input": 1, "exp": 1, "mul": 2, "add": 1, "const": 2}


def test_cse_compares_large_constants_by_every_bit():
    """Big constants equal in the sampled elements but one bit apart elsewhere stay two; equal ones
    (a weight built twice) are one; 0.0 and -0.0 are different constants, and so are a float and an
    int tensor of the same bits."""
    from kfuse.ir import Graph
    from kfuse.passes.fold import cse
    w = torch.randn(64, 96)
    near = w.clone()
    near[63, 95] = torch.nextafter(near[63, 95], torch.tensor(9.0))
    g = Graph()
    x = g.input((5, 64), torch.float32)
    outs = [g.add("matmul", x, g.const(t)) for t in (w, w.clone(), near)]
    z, nz = g.const(torch.zeros(3)), g.const(-torch.zeros(3))
    f, i = g.const(torch.ones(5000)), g.const(torch.ones(5000).view(torch.int32).clone())   # equal bits
    g.outputs = outs + [g.add("add", z, z), g.add("add", nz, nz), f, i]
    cse(g)
    assert g.outputs[0] is g.outputs[1] and g.outputs[2] is not g.outputs[0]
    assert g.outputs[3] is not g.outputs[4]
    assert g.outputs[5] is not g.outputs[6] and g.outputs[6].dtype == torch.int32


def test_cse_keeps_ops_whose_attributes_differ():
    check_fold(lambda g, x: [g.add("reduce_sum", x, axes=(1,), keepdim=True), g.add("reduce_sum", x, axes=(2,), keepdim=True)],
               lambda g, x: [g.add("reduce_sum", x, axes=(1,), keepdim=True), g.add("reduce_sum", x, axes=(2,), keepdim=True)],
               X)


# -- activations named, reshapes sunk ------------------------------------------------------------------------

def test_x_times_sigmoid_x_is_silu():
    """Either operand order; the two silu(x) then merge (CSE)."""
    def expect(g, x):
        s = g.add("silu", x)
        return [s, s]
    check_fold(lambda g, x: [g.add("mul", x, g.add("sigmoid", x)), g.add("mul", g.add("sigmoid", x), x)],
               expect, X, exact=False)


def test_sigmoid_of_another_value_is_not_silu():
    check_fold(lambda g, x, y: [g.add("mul", x, g.add("sigmoid", y))],
               lambda g, x, y: [g.add("mul", x, g.add("sigmoid", y))], X * 2)


def _gelu_tanh_decomposed(g, x, k=math.sqrt(2 / math.pi)):
    cube = g.add("mul", g.const(0.044715), g.add("pow", x, g.const(3.0)))
    inner = g.add("mul", g.const(k), g.add("add", x, cube))
    return g.add("mul", g.add("mul", x, g.const(0.5)), g.add("add", g.add("tanh", inner), g.const(1.0)))


def test_gelu_tanh_written_out_is_named():
    check_fold(lambda g, x: [_gelu_tanh_decomposed(g, x)],
               lambda g, x: [g.add("gelu", x, approximate="tanh")], X, exact=False)


def test_gelu_tanh_with_another_constant_is_left_alone():
    check_fold(lambda g, x: [_gelu_tanh_decomposed(g, x, k=0.8)],
               lambda g, x: [_gelu_tanh_decomposed(g, x, k=0.8)], X)


def _relu6_x_plus_3(g, x, split=True, three=3.0):
    y = g.add("add", x, g.const(three))
    if split:       # core ATen: clamp_min then clamp_max
        return g.add("clamp", g.add("clamp", y, min=0, max=None), min=None, max=6)
    return g.add("clamp", y, min=0.0, max=6.0)


@pytest.mark.parametrize("split", [True, False])
def test_hardswish_and_hardsigmoid_written_out_are_named(split):
    """x * clamp(x + 3, 0, 6) / 6 (either operand order of the product) and clamp(x + 3, 0, 6) / 6:
    torch's kernels compute the same operations in the same order, so the names change no bits."""
    six = lambda g: g.const(torch.tensor(6))    # noqa: E731  (ATen's decomposition divides by an int 6)
    check_fold(lambda g, x: [g.add("div", g.add("mul", x, _relu6_x_plus_3(g, x, split)), six(g)),
                             g.add("div", g.add("mul", _relu6_x_plus_3(g, x, split), x), six(g)),
                             g.add("div", _relu6_x_plus_3(g, x, split), six(g))],
               lambda g, x: (lambda h: [h, h, g.add("hardsigmoid", x)])(g.add("hardswish", x)), X)


def test_hard_activations_with_other_arithmetic_are_left_alone():
    """Multiplying by 1/6 rounds differently; another offset or another operand is another function."""
    def build(g, x, y):
        r, six = _relu6_x_plus_3(g, x), g.const(6.0)
        return [g.add("mul", g.add("mul", x, r), g.const(1 / 6)),
                g.add("div", _relu6_x_plus_3(g, x, three=2.0), six), g.add("div", g.add("mul", y, r), six)]
    check_fold(build, build, X * 2)


def test_hardswish_written_out_in_half_precision_stays():
    """torch's half kernel rounds once; the decomposition rounds after every op."""
    build = lambda g, x: [g.add("div", g.add("mul", x, _relu6_x_plus_3(g, x)), g.const(torch.tensor(6)))]  # noqa: E731
    check_fold(build, build, [((2, 3, 4), torch.float16)])


def test_activation_of_a_reshape_sinks_below_it():
    check_fold(lambda g, x: [g.add("tanh", g.add("reshape", x, shape=(6, 4)))],
               lambda g, x: [g.add("reshape", g.add("tanh", x), shape=(6, 4))], X)


def test_reshape_read_twice_does_not_sink():
    def build(g, x):
        r = g.add("reshape", x, shape=(6, 4))
        return [g.add("tanh", r), r]
    check_fold(build, build, X)
