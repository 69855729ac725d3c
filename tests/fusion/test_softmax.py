"""Scale + additive or boolean mask + softmax -> one kernel."""
import math

import pytest
import torch

from fusion_check import Fn, compiled


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 2, 1, 130), (8, 12, 128, 128)])
def test_scale_additive_mask_softmax(shape):
    def fn(m, s, mask):
        return torch.softmax(s / math.sqrt(32) + mask, dim=-1)
    mask = torch.zeros(shape[0], 1, 1, shape[-1])
    mask[0, ..., -1] = float("-inf")
    cm, rep = compiled(Fn(fn), torch.randn(shape), mask)
    assert rep.fusions == {"scale_mask_softmax": 1}
    assert len(rep.kernels) == 1


def test_bool_mask_softmax():
    def fn(m, s, keep):
        return torch.softmax((s * 0.125).masked_fill(~keep, float("-inf")), dim=-1)
    keep = torch.rand(2, 1, 5, 9) > 0.3
    keep[..., 0] = True
    cm, rep = compiled(Fn(fn), torch.randn(2, 4, 5, 9), keep)
    assert rep.fusions.get("scale_mask_softmax") == 1
    assert len(rep.kernels) == 1


def test_softmax_not_on_last_axis_runs_alone_and_right():
    cm, rep = compiled(Fn(lambda m, s: torch.softmax(s * 2, dim=1)), torch.randn(3, 5, 7))
    assert "scale_mask_softmax" not in rep.fusions
    assert any("last axis" in (k.note or "") or k.backend == "torch" for k in rep.kernels) or len(rep.kernels) == 2
