"""The concat C kernel (kfuse/backends/c/concat.py) against torch.cat: a copy, so the outputs must be
equal, bit for bit, over ranks 1-5, every axis (negative too), 1-24 inputs of odd sizes, float32,
float16, int64 and bool, empty inputs among the others, non-contiguous inputs, an `out` poisoned with NaN,
1-3 threads (the row-split and the byte-split paths) and four calling threads; errors named. In a
program: DenseNet's channel concatenations run as this kernel inside the native runner."""
from __future__ import annotations

import pytest
import torch
from helpers import in_threads
from helpers import recorded_flags

from kfuse.backends import openmp
from kfuse.backends.c.concat import Concat
from kfuse.backends.c.nhwc import row_stride


def make(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, shape)
    return torch.randn(shape).to(dtype)


def check(shapes, axis, dtype=torch.float32, threads=None):
    xs = [make(s, dtype) for s in shapes]
    want = torch.cat(xs, axis)
    out = torch.full(want.shape, float("nan")).to(dtype) if dtype.is_floating_point else torch.zeros_like(want)
    if threads is None:
        got = Concat(axis)(*xs, out=out)
    else:
        with openmp.using(threads):
            got = Concat(axis)(*xs, out=out)
    assert got is out and torch.equal(got, want)


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool])
def test_equals_torch_cat(axis, dtype):
    base = [2, 3, 5, 7]
    shapes = []
    for k in (1, 4, 2):
        s = list(base)
        s[axis] = k
        shapes.append(tuple(s))
    check(shapes, axis, dtype)


@pytest.mark.parametrize("shapes,axis", [
    ([(5,), (1,), (9,)], 0),                            # one row: each piece split between the threads
    ([(1, 56, 56, 64)] + [(1, 56, 56, 32)] * 5, 3),     # DenseNet: one row per pixel
    ([(1, 14, 14, 256)] + [(1, 14, 14, 32)] * 23, -1),  # 24 inputs
    ([(2, 3, 4, 5, 6), (2, 3, 1, 5, 6)], 2),            # rank 5
    ([(3, 0, 4), (3, 2, 4), (3, 0, 4)], 1),             # empty inputs add nothing
    ([(70000,), (3,)], 0),                              # past the serial size
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_shapes_and_threads(shapes, axis, threads):
    check(shapes, axis, threads=threads)


def test_non_contiguous_inputs():
    a = torch.randn(4, 6, 5).transpose(0, 2)           # [5, 6, 4]
    b = torch.randn(5, 3, 4)[:, ::1, :]
    c = torch.randn(5, 8, 4)[:, ::2, :]                 # [5, 4, 4] strided
    assert torch.equal(Concat(1)(a, b, c), torch.cat([a, b, c], 1))


@pytest.mark.parametrize("threads", [1, 2])
def test_inputs_with_evenly_spaced_rows_are_read_in_place(threads):
    """a channel slice of an NHWC map (ShuffleNet's chunk) and one pixel's channels broadcast over the map
    are read where they are (the call recorded for the native runner); a batch slice of a row slice and
    a transposed input are copied first (not recorded: a replay would read the old copy)"""
    from kfuse.backends.c import concat as c_concat
    half = torch.randn(2, 5, 6, 16)[..., 8:]
    pixel = torch.randn(1, 1, 1, 4).expand(2, 5, 6, 4)
    uneven = torch.randn(2, 9, 6, 3)[:, 2:7]
    tr = torch.randn(2, 6, 5, 5).transpose(1, 3)
    assert [row_stride(x, 3) for x in (half, pixel, uneven, tr)] == [16, 0, None, None]
    with recorded_flags(c_concat) as recorded, openmp.using(threads):
        for xs in ([half, pixel], [half, uneven, pixel], [tr, half[:, :, :5]]):
            assert torch.equal(Concat(3)(*xs), torch.cat(xs, 3))
    assert recorded == [True, False, False]


def test_all_empty_and_no_output():
    assert Concat(0)(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0, 3)


def test_calls_from_four_threads_at_once():
    k = Concat(1)
    xs = [[torch.randn(3, i + 2, 7) for i in range(3)] for _ in range(4)]
    want = [torch.cat(x, 1) for x in xs]
    bad = []

    def run(i):
        for _ in range(30):
            if not torch.equal(k(*xs[i]), want[i]):
                bad.append(i)
    in_threads(4, run)
    assert not bad


def test_errors():
    k = Concat(1)
    with pytest.raises(ValueError, match="differ at an axis other than 1"):
        k(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="differ"):
        k(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="axis 2 of a rank-2"):
        Concat(2)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="out must be contiguous"):
        k(torch.randn(2, 3), torch.randn(2, 3), out=torch.empty(2, 5))


def test_densenet_concatenations_run_natively():
    """a DenseNet-style block (each layer reads the concatenation of the features so far): every concat a
    C kernel, called from the native runner's C runs; outputs equal eager's within tolerance"""
    import kfuse

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.layers = torch.nn.ModuleList(torch.nn.Sequential(
                torch.nn.BatchNorm2d(16 + 8 * i), torch.nn.ReLU(), torch.nn.Conv2d(16 + 8 * i, 8, 3, padding=1))
                for i in range(4))

        def forward(self, x):
            feats = [self.stem(x)]
            for layer in self.layers:
                feats.append(layer(torch.cat(feats, 1)))
            return torch.cat(feats, 1).mean((2, 3))

    torch.manual_seed(0)
    model, x = Dense().eval(), torch.randn(2, 3, 12, 12)
    cm = kfuse.compile(model, (x,))
    for _ in range(3):
        got = cm(x)
    assert cm.verify(x).ok
    backends = [k.backend for k in cm.report().kernels if k.name == "concat"]
    assert backends == ["c:concat"] * 4, backends       # (the first layer's cat of one tensor is that tensor)
    assert cm.report().launch.endswith("in 1 run(s), 0 from Python between them"), cm.report().launch
    torch.testing.assert_close(got, model(x).detach(), atol=1e-5, rtol=1e-4)
