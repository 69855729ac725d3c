"""Residual add + LayerNorm and RMSNorm: recognised from native and decomposed forms, one kernel each."""
import pytest
import torch
import torch.nn.functional as F
from helpers import Fn, compiled, kernels_named


def decomposed_ln(m, x, r):
    h = x + r
    mu = h.mean(-1, keepdim=True)
    d = h - mu
    var = (d * d).mean(-1, keepdim=True)
    return d / torch.sqrt(var + 1e-5) * m.w + m.b


def native_ln(m, x, r):
    return F.layer_norm(x + r, (x.shape[-1],), m.w, m.b, 1e-5)


def rms(m, x, r):
    h = x + r
    return m.w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("shape", [(1, 7), (3, 127), (2, 5, 384)])
@pytest.mark.parametrize("fn,rule,op", [(decomposed_ln, "add_layernorm", "layer_norm"),
                                        (native_ln, "add_layernorm", "layer_norm"),
                                        (rms, "add_rmsnorm", "rms_norm")])
def test_residual_norm_is_one_kernel(fn, rule, op, shape):
    d = shape[-1]
    model = Fn(fn, w=torch.randn(d), b=torch.randn(d))
    cm = compiled(model, torch.randn(shape), torch.randn(shape))
    rep = cm.report()
    assert rep.fusions.get(rule) == 1
    assert [k.ops for k in kernels_named(rep, rule)] == [["add", op]]
    assert len([k for k in rep.kernels if k.backend != "view"]) == 1


def test_layernorm_over_other_axis_is_not_rewritten():
    """Normalising over axis 0 is not a LayerNorm over the last axis: the rule must not fire."""
    def fn(m, x):
        mu = x.mean(0, keepdim=True)
        d = x - mu
        return d / torch.sqrt((d * d).mean(0, keepdim=True) + 1e-5)
    cm = compiled(Fn(fn), torch.randn(6, 5))
    rep = cm.report()
    assert "layer_norm" not in cm.graph.op_counts()
    assert "layernorm_decomposed" not in rep.fusions


def test_rms_with_eps_inside_sqrt_of_other_tensor_is_not_rmsnorm():
    def fn(m, x, y):
        return x * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)   # normalises by another tensor
    cm = compiled(Fn(fn), torch.randn(4, 8), torch.randn(4, 8))
    assert "rms_norm" not in cm.graph.op_counts()
