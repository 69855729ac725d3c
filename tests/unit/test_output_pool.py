"""A C kernel's large outputs are recycled between calls (kfuse/backends/__init__.py, POOL_MIN): the
previous call's tensor is reused only when nothing outside the pool refers to it or its storage."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kfuse
from kfuse import backends


class _Gelu(torch.nn.Module):
    def forward(self, x):
        return F.gelu(x * 2.0)


def _compiled(n=512):
    x = torch.randn(n, n)      # 1 MiB of output: pooled
    assert x.nbytes >= backends.POOL_MIN
    return kfuse.compile(_Gelu(), (x,)), x, _Gelu()(x)


def test_a_loop_reuses_two_buffers_and_every_result_is_right():
    cm, x, ref = _compiled()
    ptrs = set()
    y = None
    for _ in range(6):
        y = cm(x)              # the previous y is still held during the call
        ptrs.add(y.data_ptr())
        torch.testing.assert_close(y, ref)
    assert len(ptrs) == 2


def test_a_held_output_its_views_and_storage_sharers_are_never_overwritten():
    cm, x, ref = _compiled()
    held = [cm(x) for _ in range(4)]
    assert len({h.data_ptr() for h in held}) == 4
    view = held[-1][0]
    detached = held[-2].detach()
    array = held[-3].numpy()
    del held
    before = [view.clone(), detached.clone(), torch.from_numpy(array.copy())]
    fresh = [cm(x * 0.5) for _ in range(3)]
    taken = {view.data_ptr() - 0, detached.data_ptr(), array.ctypes.data}
    assert not taken & {f.data_ptr() for f in fresh}
    for a, b in zip([view, detached, torch.from_numpy(array)], before):
        assert torch.equal(a, b)


def test_small_outputs_are_not_pooled():
    x = torch.randn(8, 8)
    cm = kfuse.compile(_Gelu(), (x,))
    ys = [cm(x) for _ in range(3)]
    del ys
    assert x.nbytes < backends.POOL_MIN
    torch.testing.assert_close(cm(x), _Gelu()(x))
