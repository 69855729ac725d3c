"""Static segments of Dynamo graphs that compute the same (the same code over the same weights and
input shapes, as a graph Dynamo recompiles repeats the segments of the one before) share one
compiled program; anything else that differs compiles its own."""
from __future__ import annotations

import gc

import torch
import torch.fx

from kfuse.dynamo import Segment

OPTIONS = {"backend": "cpu"}


def _fn(w, b, x):
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)) * 2.0


def _segment():
    return Segment(torch.fx.symbolic_trace(_fn), OPTIONS, frozen=[0, 1])


def _args(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 16, generator=g), torch.randn(24, generator=g)


def test_a_segment_computing_the_same_reuses_the_program():
    w, b = _args()
    x = torch.randn(5, 16)
    first, second = _segment(), _segment()
    want = first(w, b, x)
    got = second(w, b, x)
    assert (first.builds, second.builds, second.reused) == (1, 0, 1)
    assert second.cm is first.cm and second.programs == 0 and first.programs == 1
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, _fn(w, b, x), rtol=1e-5, atol=1e-5)


def test_other_weights_shapes_or_changed_weights_compile_their_own():
    w, b = _args()
    x = torch.randn(5, 16)
    first = _segment()
    first(w, b, x)
    # equal values in another tensor: shared only by identity
    w2, b2 = w.clone(), b.clone()
    w2[0, 0] += 1.0
    other = _segment()
    torch.testing.assert_close(other(w2, b2, x), _fn(w2, b2, x), rtol=1e-5, atol=1e-5)
    assert other.builds == 1 and other.reused == 0
    # another input shape
    wider = _segment()
    x3 = torch.randn(3, 5, 16)
    torch.testing.assert_close(wider(w, b, x3), _fn(w, b, x3), rtol=1e-5, atol=1e-5)
    assert wider.builds == 1
    # the same weights changed in place: the version moved, so not the program compiled before
    with torch.no_grad():
        w.mul_(0.5)
    changed = _segment()
    torch.testing.assert_close(changed(w, b, x), _fn(w, b, x), rtol=1e-5, atol=1e-5)
    assert changed.builds == 1 and changed.reused == 0


def test_a_freed_weights_program_is_not_found_for_new_tensors():
    """The key names tensors by id, and a segment outlives the weights it was called with (Dynamo
    passes them at each call): new tensors at freed ones' addresses must not find its program."""
    x = torch.randn(5, 16)
    kept = []
    for seed in range(6):
        w, b = _args(seed)
        seg = _segment()
        torch.testing.assert_close(seg(w, b, x), _fn(w, b, x), rtol=1e-5, atol=1e-5)
        assert seg.reused == 0
        kept.append(seg)
        del w, b
        gc.collect()


def test_segments_of_one_structure_share_an_export_and_keep_their_weights(monkeypatch):
    """Segments equal but for their weights (a decode graph's layers) are exported once and each is
    converted with its own weights; another weight shape is another export."""
    import kfuse.capture.fx as fx
    calls = []
    exported = fx.exported
    monkeypatch.setattr(fx, "exported", lambda *a, **k: calls.append(a[0]) or exported(*a, **k))
    exports = {}
    x = torch.randn(5, 16)
    for seed in range(3):
        w, b = _args(seed)
        seg = Segment(torch.fx.symbolic_trace(_fn), OPTIONS, frozen=[0, 1], exports=exports)
        torch.testing.assert_close(seg(w, b, x), _fn(w, b, x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and len(exports) == 1
    wide = Segment(torch.fx.symbolic_trace(_fn), OPTIONS, frozen=[0, 1], exports=exports)
    w, b = torch.randn(40, 16), torch.randn(40)
    torch.testing.assert_close(wide(w, b, x), _fn(w, b, x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 and len(exports) == 2


def test_a_programs_gpu_is_its_inputs_else_its_weights(monkeypatch):
    # a Dynamo segment's live inputs can all be CPU numbers while its weights sit on the GPU: its
    # constants (aranges, masks) must go to that GPU, or a torch op mixes devices (seen on an H200)
    from types import SimpleNamespace

    from kfuse.api import _gpu_of
    gpu = SimpleNamespace(is_cuda=True, device="cuda:1")
    cpu = torch.zeros(2)
    module = torch.nn.Linear(2, 2)
    assert _gpu_of([cpu], module) is None
    assert _gpu_of([cpu, gpu], module) == "cuda:1"
    monkeypatch.setattr(module, "buffers", lambda: iter([gpu]))
    assert _gpu_of([cpu], module) == "cuda:1" and _gpu_of([], module) == "cuda:1"
    assert _gpu_of([cpu], None) is None
    module.kfuse_device = "cuda:2"          # a segment that makes GPU tensors from CPU numbers alone
    monkeypatch.setattr(module, "buffers", lambda: iter([]))
    assert _gpu_of([cpu], module) == "cuda:2"


def test_a_segment_names_the_gpu_its_values_live_on():
    from types import SimpleNamespace

    from kfuse.dynamo import _Frozen
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    for n in gm.graph.nodes:
        n.meta["val"] = torch.empty(2, device="meta")
    assert _Frozen(gm, [torch.zeros(2)], set(), set()).kfuse_device is None     # no CUDA value: the CPU
    list(gm.graph.nodes)[1].meta["val"] = SimpleNamespace(is_cuda=True, device="cuda:0")   # (a fake: no GPU here)
    assert _Frozen(gm, [torch.zeros(2)], set(), set()).kfuse_device == "cuda:0"
