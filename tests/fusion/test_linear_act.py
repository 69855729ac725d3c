"""Linear + bias (+ activation) -> one GEMM with epilogue; projections of one input -> one GEMM."""
import pytest
import torch
import torch.nn.functional as F
from helpers import Fn, compiled

ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
        "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("m_rows", [1, 7, 130])
def test_linear_bias_act(act, m_rows):
    lin = torch.nn.Linear(33, 65)
    model = Fn(lambda m, x: ACTS[act](lin(x)))
    model.lin = lin
    cm = compiled(model, torch.randn(2, m_rows, 33))
    rep = cm.report()
    assert rep.fusions == {f"gemm_{act}": 1}
    kernels = [k for k in rep.kernels if k.backend != "view"]
    assert len(kernels) == 1 and kernels[0].ops == ["linear"]


def test_qkv_projections_merge_into_one_gemm():
    q, k, v = (torch.nn.Linear(48, 48) for _ in range(3))
    model = Fn(lambda m, x: q(x) * 2 + k(x) - v(x))
    model.q, model.k, model.v = q, k, v
    cm = compiled(model, torch.randn(3, 5, 48))
    rep = cm.report()
    assert rep.rules["horizontal_gemm"] == 1
    assert cm.graph.op_counts()["linear"] == 1


def test_activation_of_a_reused_linear_is_not_fused():
    """The pre-activation value is needed elsewhere: fusing the activation would lose it."""
    lin = torch.nn.Linear(16, 16)
    model = Fn(lambda m, x: F.relu(lin(x)) + lin(x))
    model.lin = lin
    cm = compiled(model, torch.randn(4, 16))
    rep = cm.report()
    assert "gemm_relu" not in rep.fusions
    assert [(w.code, "relu" in w.consumer) for w in rep.why_not if w.code == "shared_intermediate"] == [
        ("shared_intermediate", True)]
