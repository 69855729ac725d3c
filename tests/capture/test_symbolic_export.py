"""`kfuse.compile(..., dynamic_shapes=...)`: the model is exported once with symbolic sizes and each
size set is converted from that export (sizes read by sym_size, arithmetic on them, size checks),
compiled as a static program; sizes the export does not admit are traced anew, never run on a graph
made for other sizes."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch.export import Dim

import kfuse
import kfuse.capture.fx as fx


class Block(torch.nn.Module):
    """A transformer-style block whose views are computed from the input's sizes."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b * s, d)
        return self.norm(x + self.out(a).view(b, s, d))


@pytest.fixture
def exports(monkeypatch):
    """How many times torch.export traces a model."""
    calls = []
    real = torch.export.export

    def counting(*a, **k):
        calls.append(k.get("dynamic_shapes"))
        return real(*a, **k)
    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def test_one_export_serves_every_size_set(exports):
    torch.manual_seed(0)
    model = Block().eval()
    cm = kfuse.compile(model, (torch.randn(2, 9, 32),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    for b, s in [(2, 9), (3, 17), (5, 2), (2, 9), (4, 64)]:
        x = torch.randn(b, s, 32)
        assert_close(cm(x), model(x))
        assert "one torch.export with symbolic sizes (input 0 dim 0/1)" in str(cm.report())
        assert cm.report().fusions       # each size set is a fused static program
    assert len(exports) == 1 and len(cm.signatures) == 4


def test_sizes_outside_the_export_are_traced_again(exports):
    """torch.export specialises sizes 0 and 1 (its ranges start at 2) and guards on branches over a
    size: a call outside those is exported for its own sizes, and the report says why."""
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[1] > 4 else x - 1

    model = Branchy()
    cm = kfuse.compile(model, (torch.randn(3, 8),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    for shape in [(3, 8), (2, 6), (1, 8), (3, 3)]:
        x = torch.randn(*shape)
        assert_close(cm(x), model(x))
    assert len(exports) == 3, exports      # (3, 8) symbolic; (1, 8) and (3, 3) each traced for their sizes
    assert "torch.export for this size set (not the export with symbolic sizes" in str(cm.report())


def test_size_checks_and_arithmetic_are_evaluated():
    """torch._check on a size becomes an assert in the export: a call failing it is not run on the
    symbolic graph (it is traced again, where torch raises the check)."""
    class Checked(torch.nn.Module):
        def forward(self, x):
            torch._check(x.shape[0] % 2 == 0)
            return x.reshape(x.shape[0] // 2, 2 * x.shape[1]).sum(-1)

    model = Checked()
    cm = kfuse.compile(model, (torch.randn(6, 5),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    for shape in [(8, 3), (4, 7)]:
        x = torch.randn(*shape)
        assert_close(cm(x), model(x))
    assert "one torch.export with symbolic sizes" in str(cm.report())
    with pytest.raises(kfuse.KfuseError):
        cm(torch.randn(5, 3))


def test_check_sizes_rejects_what_the_export_does_not_admit():
    model = Block().eval()
    ep = fx.exported(model, (torch.randn(2, 9, 32),), dynamic_shapes=({1: Dim.AUTO},))
    assert fx.symbolic_inputs(ep) == {0: [1]}
    fx.to_graph(ep, [(2, 11, 32)])
    for shapes, why in [([(3, 11, 32)], "is 3 in this call"), ([(2, 1, 32)], "outside the exported range"),
                        ([(2, 9)], "rank")]:
        with pytest.raises(fx.SizeMismatch, match=why):
            fx.to_graph(ep, shapes)


def test_a_failed_symbolic_export_falls_back_with_the_reason(exports):
    model = Block().eval()
    with pytest.warns(UserWarning, match="no export with symbolic sizes"):
        cm = kfuse.compile(model, (torch.randn(2, 9, 32),), dynamic_shapes=({1: Dim.AUTO}, {0: Dim.AUTO}))
    x = torch.randn(2, 5, 32)
    assert_close(cm(x), model(x))
    assert "torch.export for this size set (no export with symbolic sizes" in str(cm.report())


def test_dynamic_shapes_is_for_pytorch_models(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    with pytest.raises(kfuse.KfuseError, match="dim_param"):
        kfuse.compile(str(path), (torch.randn(2),), dynamic_shapes={})


def test_sizes_through_strided_convolutions_under_dynamic_torch_compile():
    """A view computed from the sizes after strided convolutions (shufflenet's channel shuffle): Dynamo's
    graph computes them with torch.sym_sum, which had sent the whole graph to torch with a warning."""
    class Shuffle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)

        def forward(self, x):
            z = self.c2(self.c1(x))
            b, c, h, w = z.size()
            return z.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, -1, h, w).relu()

    torch.manual_seed(0)
    model = Shuffle().eval()
    compiled = torch.compile(model, backend="kfuse", dynamic=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")          # a graph run by torch warns
        for shape in [(2, 3, 17, 21), (3, 3, 30, 9)]:
            x = torch.randn(*shape)
            assert_close(compiled(x), model(x))
