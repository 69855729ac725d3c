"""SwiGLU / GeGLU: act(x·W1 + b1) * (x·W3 + b3) -> one GEMM (the gate and up projections merged) with the
gating in its epilogue (CPU backend); where that rule cannot fire, the merged GEMM + one gating kernel."""
import pytest
import torch
import torch.nn.functional as F
from helpers import Fn, assert_close, compiled


def gated_mlp(act, bias=False, up_first=False, width=176):
    gate, up = torch.nn.Linear(64, width, bias=bias), torch.nn.Linear(64, width, bias=bias)
    down = torch.nn.Linear(width, 64, bias=False)
    model = Fn(lambda m, x: down(up(x) * act(gate(x)) if up_first else act(gate(x)) * up(x)))
    model.gate, model.up, model.down = gate, up, down
    return model


@pytest.mark.parametrize("act,name", [(F.silu, "gemm_swiglu"), (F.gelu, "gemm_geglu"),
                                      (lambda t: F.gelu(t, approximate="tanh"), "gemm_geglu_tanh"),
                                      (torch.relu, "gemm_reglu"), (torch.sigmoid, "gemm_glu")])
def test_gated_mlp_in_one_gemm(act, name):
    cm = compiled(gated_mlp(act), torch.randn(2, 9, 64))
    rep = cm.report()
    assert rep.rules["horizontal_gemm"] == 1 and rep.rules["gated_linear"] == 1
    assert rep.fusions[name] == 1 and not rep.fallbacks
    assert all(k.backend == "c:gemm" or k.backend.startswith("library:") for k in rep.kernels if k.name == name)
    assert cm.graph.op_counts()["gated_linear"] == 1 and cm.graph.op_counts()["linear"] == 1
    assert "mul" not in cm.graph.op_counts()


@pytest.mark.parametrize("shape", [(1, 64), (3, 17, 64), (0, 64)])
@pytest.mark.parametrize("width", [5, 16, 33])
def test_gated_mlp_with_bias_either_operand_order(shape, width):
    cm = compiled(gated_mlp(F.silu, bias=True, up_first=True, width=width), torch.randn(*shape))
    assert cm.report().rules["gated_linear"] == 1


def test_gate_read_elsewhere_stays_a_gating_kernel():
    """the activated gate is also an output: the GEMM keeps both halves, the gating is its own kernel"""
    gate, up = torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(32, 48, bias=False)
    model = Fn(lambda m, x: (F.silu(gate(x)) * up(x), F.silu(gate(x))))
    model.gate, model.up = gate, up
    cm = compiled(model, torch.randn(5, 32))
    rep = cm.report()
    assert "gated_linear" not in rep.rules and cm.graph.op_counts()["linear"] == 1
    assert any(w.code == "shared_intermediate" and "gated_linear" in w.detail for w in rep.why_not)


def test_rule_can_be_disabled():
    cm = compiled(gated_mlp(F.silu), torch.randn(2, 9, 64), disable=["gated_linear"])
    rep = cm.report()
    assert "gated_linear" not in rep.rules and rep.fusions["swiglu"] == 1
    assert cm.graph.op_counts()["linear"] == 2


def test_projections_of_different_inputs_are_not_merged():
    """gate(x) * up(y): the two GEMMs read different inputs, so no horizontal merge; the SiLU then
    rides on the gate GEMM as its epilogue instead."""
    gate, up = torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(32, 48, bias=False)
    model = Fn(lambda m, x, y: F.silu(gate(x)) * up(y))
    model.gate, model.up = gate, up
    cm = compiled(model, torch.randn(5, 32), torch.randn(5, 32))
    rep = cm.report()
    assert "horizontal_gemm" not in rep.rules and "gated_linear" not in rep.rules
    assert cm.graph.op_counts()["linear"] == 2
    assert rep.fusions.get("gemm_silu") == 1


def test_gating_reads_the_merged_gemm_halves_in_place(monkeypatch):
    """Without the gated GEMM, the two halves of the merged gate/up output are strided views (row stride
    2N): the gating kernel is specialised to those strides instead of copying them."""
    model = gated_mlp(F.silu)
    x = torch.randn(3, 7, 64)
    cm = compiled(model, x, disable=["gated_linear"])
    rep = cm.report()
    copies = []
    real = torch.Tensor.contiguous

    def counting(t, *a, **k):
        if not t.is_contiguous():
            copies.append(tuple(t.shape))
        return real(t, *a, **k)
    monkeypatch.setattr(torch.Tensor, "contiguous", counting)
    assert_close(cm(x), model(x))
    assert rep.fusions["swiglu"] == 1 and copies == []
