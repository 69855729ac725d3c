"""Scale + additive or boolean mask + softmax -> one kernel: probabilities that sum to 1 per row and
equal torch.softmax."""
import math

import pytest
import torch
from helpers import Fn, assert_close, compiled


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 2, 1, 130), (8, 12, 128, 128)])
def test_scale_additive_mask_softmax(shape):
    def fn(m, s, mask):
        return torch.softmax(s / math.sqrt(32) + mask, dim=-1)
    mask = torch.zeros(shape[0], 1, 1, shape[-1])
    mask[0, ..., -1] = float("-inf")
    s = torch.randn(shape)
    cm = compiled(Fn(fn), s, mask)
    rep = cm.report()
    assert rep.fusions == {"scale_mask_softmax": 1}
    assert len(rep.kernels) == 1
    p = cm(s, mask)
    assert_close(p, torch.softmax(s / math.sqrt(32) + mask, dim=-1))
    assert_close(p.sum(-1), torch.ones(shape[:-1]))
    assert bool((p[0, ..., -1] == 0).all())                  # the masked key gets exactly 0


def test_bool_mask_softmax():
    def fn(m, s, keep):
        return torch.softmax((s * 0.125).masked_fill(~keep, float("-inf")), dim=-1)
    keep = torch.rand(2, 1, 5, 9) > 0.3
    keep[..., 0] = True
    s = torch.randn(2, 4, 5, 9)
    cm = compiled(Fn(fn), s, keep)
    rep = cm.report()
    assert rep.fusions.get("scale_mask_softmax") == 1
    assert len(rep.kernels) == 1
    p = cm(s, keep)
    assert_close(p, fn(None, s, keep))
    assert_close(p.sum(-1), torch.ones(2, 4, 5))
    assert bool((p[~keep.expand_as(p)] == 0).all()) and bool((p[keep.expand_as(p)] > 0).all())


def test_softmax_not_on_last_axis_runs_alone_and_right():
    s = torch.randn(3, 5, 7)
    cm = compiled(Fn(lambda m, s: torch.softmax(s * 2, dim=1)), s)
    rep = cm.report()
    assert "scale_mask_softmax" not in rep.fusions
    (soft,) = [k for k in rep.kernels if "softmax" in k.ops]
    assert soft.ops == ["softmax"] and soft.backend == "torch" and "last axis" in soft.note, soft
    p = cm(s)
    assert_close(p, torch.softmax(s * 2, dim=1))
    assert_close(p.sum(1), torch.ones(3, 7))
