"""SwiGLU / GeGLU: act(x·W1) * (x·W3) -> the merged GEMM + one gating kernel."""
import pytest
import torch
import torch.nn.functional as F
from helpers import Fn, assert_close, compiled


@pytest.mark.parametrize("act,rule", [(F.silu, "swiglu"), (F.gelu, "geglu")])
def test_gated_mlp(act, rule):
    gate, up = torch.nn.Linear(64, 176, bias=False), torch.nn.Linear(64, 176, bias=False)
    down = torch.nn.Linear(176, 64, bias=False)
    model = Fn(lambda m, x: down(act(gate(x)) * up(x)))
    model.gate, model.up, model.down = gate, up, down
    cm = compiled(model, torch.randn(2, 9, 64))
    rep = cm.report()
    assert rep.rules["horizontal_gemm"] == 1
    assert rep.fusions[rule] == 1
    assert cm.graph.op_counts()["linear"] == 2


def test_projections_of_different_inputs_are_not_merged():
    """gate(x) * up(y): the two GEMMs read different inputs, so no horizontal merge; the SiLU then
    rides on the gate GEMM as its epilogue instead."""
    gate, up = torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(32, 48, bias=False)
    model = Fn(lambda m, x, y: F.silu(gate(x)) * up(y))
    model.gate, model.up = gate, up
    cm = compiled(model, torch.randn(5, 32), torch.randn(5, 32))
    rep = cm.report()
    assert "horizontal_gemm" not in rep.rules
    assert cm.graph.op_counts()["linear"] == 2
    assert rep.fusions.get("gemm_silu") == 1


def test_gating_reads_the_merged_gemm_halves_in_place(monkeypatch):
    """The two halves of the merged gate/up output are strided views (row stride 2N): the gating
    kernel is specialised to those strides instead of copying them."""
    gate, up = torch.nn.Linear(64, 176, bias=False), torch.nn.Linear(64, 176, bias=False)
    model = Fn(lambda m, x: F.silu(gate(x)) * up(x))
    model.gate, model.up = gate, up
    x = torch.randn(3, 7, 64)
    cm = compiled(model, x)
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
