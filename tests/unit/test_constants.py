"""Constants shared between programs (kfuse/backends/constants.py): equal weights are one tensor,
packed once, and freed with the last program holding them; nothing is shared that differs by a bit."""
import gc

import torch
from helpers import assert_close

import kfuse
from kfuse.backends import constants
from kfuse.backends.constants import intern, shared


def test_intern_returns_the_live_tensor_of_equal_bits():
    a = torch.randn(64, 128)
    assert intern(a) is a
    assert intern(a.clone()) is a
    assert intern(a.double()) is not a and intern(a.t().contiguous()) is not a.t()
    other = a.clone()
    other[63, 127] += 1          # one element off, past the sampled ones
    assert intern(other) is other
    zeros, negzeros = torch.zeros(8192), -torch.zeros(8192)
    assert intern(zeros) is zeros and intern(negzeros) is negzeros     # 0.0 and -0.0 stay apart
    nan = torch.full((8192,), float("nan"))
    assert intern(nan) is nan and intern(nan.clone()) is nan
    small = torch.randn(10)
    assert intern(small.clone()) is not small


def test_interned_tensors_are_forgotten_when_freed():
    a = torch.randn(100, 100)
    intern(a)
    key = constants.fingerprint(a)
    assert key in constants._canonical
    del a
    gc.collect()
    assert key not in constants._canonical
    b = torch.randn(100, 100)
    assert intern(b.clone()) is not b


class Packed:
    builds = 0

    def __init__(self, w, b, act, rows=None):
        Packed.builds += 1
        self.w = w.t().contiguous()


def test_shared_builds_once_per_identical_arguments():
    w, b = torch.randn(32, 16), torch.randn(16)
    Packed.builds = 0
    p = shared(Packed, w, b, "relu", rows=None)
    assert shared(Packed, w, b, "relu", rows=None) is p and Packed.builds == 1
    assert shared(Packed, w, b, "gelu", rows=None) is not p                 # another argument
    assert shared(Packed, w.t(), b, "relu", rows=None) is not p             # another view
    assert shared(Packed, w, b.clone(), "relu", rows=None) is p             # a small tensor: by its bits
    assert shared(Packed, w, b + 1, "relu", rows=None) is not p
    assert shared(Packed, w.clone(), b, "relu", rows=None) is not p         # another weight (not interned)
    w.mul_(2)                                                               # changed in place
    assert shared(Packed, w, b, "relu", rows=None) is not p
    builds = Packed.builds
    q = shared(Packed, w, b, "relu", rows=1)
    del q
    gc.collect()
    shared(Packed, w, b, "relu", rows=1)                                    # kept weakly: built again
    assert Packed.builds == builds + 2


def _live_packs(tensors) -> int:
    gc.collect()        # the packs are held weakly: count those a program holds, not garbage not yet collected
    return sum(1 for t in tensors for _, ref in getattr(t, "_kfuse_packed", {}).values() if ref() is not None)


def test_programs_of_one_model_share_weights_and_packs():
    """Every signature of a model holds the same weight tensors and the same packed GEMM weights (oneDNN
    packs alike for any row count above one, our GEMM for any), but for MKL's pack, made for one row count:
    at most one per weight, for the first signature of many rows (linear.FEW_ROWS)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 256), torch.nn.GELU(), torch.nn.Linear(256, 96)).eval()
    cm = kfuse.compile(model, (torch.randn(8, 96),))
    consts = lambda: [n.value for n in cm._last.graph.nodes if n.op == "const" and n.numel >= constants.MIN_NUMEL]  # noqa: E731
    first = consts()
    packs = _live_packs(first)
    assert len(first) == 2 and packs >= 2
    counts = []
    for rows in (5, 33, 47, 64):
        x = torch.randn(rows, 96)
        assert_close(cm(x), model(x))
        assert [id(t) for t in consts()] == [id(t) for t in first]
        counts.append(_live_packs(first))
    assert counts[0] == packs and packs <= counts[1] <= packs + len(first) and counts[1:] == [counts[1]] * 3, counts
