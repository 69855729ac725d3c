"""Automatic (kind-based) fusion: what it fuses without pattern rules, the why-not records, user
policy, the cost model's predictions and memory planning."""
import torch

import kfuse
from kfuse.ir import Graph
from kfuse.models import build
from kfuse.runtime import build_program
from kfuse.ops.reference import run


def program(build_graph, *inputs, **options):
    g = Graph()
    ins = [g.input(t.shape, t.dtype) for t in inputs]
    g.outputs = list(build_graph(g, *ins))
    prog = build_program(g, {"backend": "cpu", **options})
    got = prog(list(inputs))
    want = run(g, list(inputs))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return prog


def custom_activation(g, x, r):
    """x * sigmoid(1.702 x) + 0.5 * r: the quick-GELU of CLIP plus a scaled residual."""
    s = g.add("sigmoid", g.add("mul", x, g.const(1.702)))
    return [g.add("add", g.add("mul", x, s), g.add("mul", r, g.const(0.5)))]


def test_custom_activation_chain_is_one_kernel():
    prog = program(custom_activation, torch.randn(33, 77), torch.randn(33, 77))
    kernels = prog.report.kernels
    assert len(kernels) == 1 and kernels[0].backend == "c"
    assert sorted(kernels[0].ops) == ["add", "mul", "mul", "mul", "sigmoid"]
    assert kernels[0].bytes_after < kernels[0].bytes_before


def test_user_can_forbid_an_op_type():
    prog = program(custom_activation, torch.randn(8, 16), torch.randn(8, 16), disable=["sigmoid"])
    assert all(k.ops == ["sigmoid"] or "sigmoid" not in k.ops for k in prog.report.kernels)
    assert any("sigmoid excluded from fusion by the user" in w.reason for w in prog.report.why_not)


def test_user_can_cap_group_size():
    prog = program(custom_activation, torch.randn(8, 16), torch.randn(8, 16), max_group=2)
    assert max(len(k.ops) for k in prog.report.kernels) <= 2
    assert any("capped at 2" in w.reason for w in prog.report.why_not)


def test_why_not_names_the_rule_that_refused():
    """A softmax over axis 0 cannot be a row kernel; the elementwise op after it is left apart, and the
    report says why for that pair."""
    def graph(g, x):
        return [g.add("exp", g.add("softmax", g.add("mul", x, g.const(2.0)), axis=0))]
    prog = program(graph, torch.randn(5, 7))
    assert len(prog.report.kernels) >= 2
    reasons = {w.what: w.reason for w in prog.report.why_not}
    assert "mul -> softmax" in reasons or "softmax -> exp" in reasons
    assert all(r for r in reasons.values())


def test_every_kernel_has_a_prediction():
    model, inputs = build("bert", batch=1, seq=16, layers=1)
    cm = kfuse.compile(model, inputs)
    for k in cm.report().kernels:
        assert k.predicted_ms > 0 or k.backend == "view"


def test_patterns_off_still_fuses_and_matches():
    model, inputs = build("bert", batch=2, seq=16, layers=2)
    cm = kfuse.compile(model, inputs, patterns=False)
    v = cm.verify(*inputs)
    assert v.ok and v.max_rel <= 1e-4, v
    fusions = cm.report().fusions
    assert "attention" not in fusions and fusions.get("scale_mask_softmax") == 2
    assert fusions.get("add_layernorm") == 5


def test_memory_plan_reuses_buffers_and_outputs_stay_valid():
    model, inputs = build("bert", batch=2, seq=32, layers=2)
    cm = kfuse.compile(model, inputs)
    rep = cm.report()
    assert 0 < rep.peak_bytes < rep.unplanned_bytes
    first = cm(*inputs).clone()
    out1 = cm(*inputs)
    other = build("bert", batch=2, seq=32, layers=2, seed=5)[1]
    cm(*other)                              # a second call must not overwrite the first call's output
    torch.testing.assert_close(out1, first, rtol=0, atol=0)
