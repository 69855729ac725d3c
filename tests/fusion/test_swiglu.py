"""SwiGLU / GeGLU: act(x·W1) * (x·W3) -> the merged GEMM + one gating kernel."""
import pytest
import torch
import torch.nn.functional as F

from fusion_check import Fn, compiled


@pytest.mark.parametrize("act,rule", [(F.silu, "swiglu"), (F.gelu, "geglu")])
def test_gated_mlp(act, rule):
    gate, up, down = torch.nn.Linear(64, 176, bias=False), torch.nn.Linear(64, 176, bias=False), torch.nn.Linear(176, 64, bias=False)
    model = Fn(lambda m, x: down(act(gate(x)) * up(x)))
    model.gate, model.up, model.down = gate, up, down
    cm, rep = compiled(model, torch.randn(2, 9, 64))
    assert rep.fusions["horizontal_gemm"] == 1
    assert rep.fusions[rule] == 1
    assert cm.graph.op_counts()["linear"] == 2


def test_projections_of_different_inputs_are_not_merged():
    """gate(x) * up(y): the two GEMMs read different inputs, so no horizontal merge; the SiLU then
    rides on the gate GEMM as its epilogue instead."""
    gate, up = torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(32, 48, bias=False)
    model = Fn(lambda m, x, y: F.silu(gate(x)) * up(y))
    model.gate, model.up = gate, up
    cm, rep = compiled(model, torch.randn(5, 32), torch.randn(5, 32))
    assert "horizontal_gemm" not in rep.fusions
    assert cm.graph.op_counts()["linear"] == 2
    assert rep.fusions.get("gemm_silu") == 1
