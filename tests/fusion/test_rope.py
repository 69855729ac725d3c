"""Rotary embeddings: x * cos + rotate_half(x) * sin -> one rope kernel reading strided q/k."""
import pytest
import torch
from helpers import Fn, compiled


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@pytest.mark.parametrize("shape", [(1, 2, 1, 8), (2, 3, 7, 16), (2, 4, 33, 64)])
def test_rope_fires_on_strided_heads(shape):
    b, h, s, d = shape
    cos, sin = torch.randn(s, d), torch.randn(s, d)

    def fn(m, x):
        q = x.view(b, s, h, d).transpose(1, 2)          # a head-split view, not contiguous
        return q * m.cos + rotate_half(q) * m.sin
    cm = compiled(Fn(fn, cos=cos, sin=sin), torch.randn(b, s, h * d))
    rep = cm.report()
    assert rep.fusions == {"rope": 1}
    assert [k.backend for k in rep.kernels if k.backend != "view"] == ["c:rope"]


def test_rotation_by_other_halves_is_not_rope():
    def fn(m, x):
        a, b = x[..., :3], x[..., 3:]                    # uneven split: not rotate_half
        return x * 2.0 + torch.cat((-b, a), dim=-1) * 3.0
    cm = compiled(Fn(fn), torch.randn(2, 8))
    rep = cm.report()
    assert "rope" not in rep.fusions
