"""Automatic (kind-based) fusion: what it fuses without pattern rules, the why-not records, user
policy, the cost model's predictions and memory planning."""
import torch

import kfuse
from kfuse.ir import Graph
from kfuse.models import build
from kfuse.runtime import build_program
from kfuse.backends.calibrate import machine
from kfuse.cost import LAUNCH_MS
from kfuse.ops.reference import run
from kfuse.report import WHY_NOT_CODES


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
    disabled = [w for w in prog.report.why_not if w.code == "user_disabled"]
    assert disabled and all("sigmoid" in w.producer + w.consumer for w in disabled), prog.report.why_not


def test_user_can_cap_group_size():
    prog = program(custom_activation, torch.randn(8, 16), torch.randn(8, 16), max_group=2)
    assert max(len(k.ops) for k in prog.report.kernels) <= 2
    assert any(w.code == "group_size_cap" and "capped at 2" in w.detail for w in prog.report.why_not)


def test_why_not_names_the_rule_that_refused():
    """A softmax over axis 0 cannot be a row kernel; the elementwise op after it is left apart, and the
    report says why for that pair."""
    def graph(g, x):
        return [g.add("exp", g.add("softmax", g.add("mul", x, g.const(2.0)), axis=0))]
    prog = program(graph, torch.randn(5, 7))
    assert len(prog.report.kernels) >= 2
    codes = {(w.producer.split(":")[-1], w.consumer.split(":")[-1]): w.code for w in prog.report.why_not}
    assert codes.get(("mul", "softmax")) == "kernel_ir_cannot_express" or \
        codes.get(("softmax", "exp")) == "kernel_ir_cannot_express", codes
    assert set(codes.values()) <= set(WHY_NOT_CODES)


def test_predictions_follow_bytes_and_flops():
    """Each kernel's prediction is at least its launch plus its bytes at the measured bandwidth and
    its FLOPs at the GEMM rate; four times the tokens predicts more time for every kernel that moves data."""
    m = machine()
    reps = []
    for seq in (16, 64):
        model, inputs = build("bert", batch=1, seq=seq, layers=1)
        reps.append(kfuse.compile(model, inputs).report())
    for k in reps[0].kernels:
        if k.backend == "view":
            assert k.predicted_ms == 0.0
            continue
        floor = LAUNCH_MS + max(k.bytes_after / (m.bandwidth_gbs * 1e6), k.flops / (m.gemm_gflops * 1e6))
        assert k.predicted_ms >= floor * (1 - 1e-9), (k.name, k.predicted_ms, floor)
    small, big = ([k for k in r.kernels if k.backend != "view"] for r in reps)
    assert [k.name for k in small] == [k.name for k in big]
    assert all(b.predicted_ms > s.predicted_ms for s, b in zip(small, big) if s.bytes_after < b.bytes_after)


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
