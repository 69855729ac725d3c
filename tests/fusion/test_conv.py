"""BatchNorm folded into the convolution before it."""
import torch
from helpers import compiled

from kfuse.models import build


def test_conv_bn_folds():
    model, inputs = build("cnn", batch=2)
    cm = compiled(model, *inputs)
    rep = cm.report()
    ops = cm.graph.op_counts()
    assert (rep.rules["conv_bn_scale"], rep.rules["conv_bn_shift"]) == (3, 3)    # 3 BatchNorms
    assert ops["conv2d"] == 4 and "mul" not in ops


def test_bn_after_shared_conv_is_not_folded():
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)

    class M(torch.nn.Module):
        def forward(self, x):
            y = conv(x)
            return bn(y) + y        # y is needed unscaled too
    m = M()
    m.conv, m.bn = conv, bn
    cm = compiled(m.eval(), torch.randn(1, 3, 9, 9))
    rep = cm.report()
    assert "conv_bn_scale" not in rep.rules and "conv_bn_shift" not in rep.rules


# -- convolutions through oneDNN with their epilogues --------------------------------------------------------
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import Fn, conv_pairs, kernels_named  # noqa: E402

import kfuse  # noqa: E402
from kfuse.backends import conv as conv_backend  # noqa: E402
from kfuse.backends.c import gemm as c_gemm  # noqa: E402
from kfuse.backends.c import winograd as c_winograd  # noqa: E402

OURS = ("c:gemm", "c:winograd")     # our convolution kernels with the activation (and residual) in registers

ACTS = [(F.relu, "relu"), (F.silu, "silu"), (torch.sigmoid, "sigmoid"), (torch.tanh, "tanh"), (F.gelu, "gelu"),
        (lambda y: F.leaky_relu(y, 0.1), "leaky_relu"), (F.relu6, "clamp")]


@pytest.mark.parametrize("act,name", ACTS)
def test_conv_bias_activation_is_one_kernel(act, name):
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    model = Fn(lambda m, x: act(conv(x)))
    model.conv = conv
    x = torch.randn(2, 5, 9, 11)
    x[0, 1, 2, 3] = float("nan")            # NaN must propagate as in eager (oneDNN's relu would zero it)
    cm = compiled(model, x)
    rep = cm.report()
    assert rep.fusions == {f"conv_{name}": 1}, rep.fusions
    kernels = [k for k in rep.kernels if k.backend != "view"]    # the channels-last views at the edges
    assert [k.ops for k in kernels] == [["conv2d", name]]
    assert kernels[0].backend.startswith("library:onednn") or kernels[0].backend in OURS, kernels[0].backend


@pytest.mark.parametrize("shape,kw", [
    ((1, 6, 13, 9), dict(kernel_size=3, groups=3, padding=1)),             # grouped
    ((1, 8, 11, 11), dict(kernel_size=3, groups=8, padding=1)),            # depthwise
    ((2, 4, 15, 17), dict(kernel_size=3, dilation=2, padding=2)),          # dilation 2
    ((1, 4, 16, 16), dict(kernel_size=2, stride=3)),                       # stride larger than the kernel
    ((1, 4, 15, 15), dict(kernel_size=1, stride=2)),                       # 1x1 stride 2, odd size
    ((3, 3, 7, 5), dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))),  # non-square
    ((0, 3, 8, 8), dict(kernel_size=3, padding=1)),                        # batch 0
])
def test_odd_convolutions_match_eager(shape, kw):
    conv = torch.nn.Conv2d(shape[1], 8 if kw.get("groups", 1) == 1 else shape[1] * 2, **kw)
    model = Fn(lambda m, x: F.silu(conv(x)))
    model.conv = conv
    cm = compiled(model, torch.randn(shape))
    assert len([k for k in cm.report().kernels if k.backend != "view"]) == 1


def test_non_contiguous_input():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    model = Fn(lambda m, x: torch.relu(conv(x.transpose(2, 3))))
    model.conv = conv
    compiled(model, torch.randn(1, 4, 9, 12))


def fuses_residual(backend: str) -> bool:
    """the 1x1 convolution's kernel adds the residual itself: our GEMM, or oneDNN's binary post-op"""
    return backend in OURS or backend.endswith("+residual")


def test_residual_add_and_relu_ride_on_the_conv():
    c1, c2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
    model = Fn(lambda m, x: F.relu(c2(F.relu(c1(x))) + x))
    model.c1, model.c2 = c1, c2
    cm = compiled(model, torch.randn(2, 8, 10, 10))
    rep = cm.report()
    assert rep.fusions == {"conv_relu": 1, "conv_add_relu": 1}, rep.fusions
    assert fuses_residual(kernels_named(rep, "conv_add_relu")[0].backend)


def test_residual_that_depends_on_the_conv_is_not_fused():
    """y + f(y): taking the add into y's kernel would make that kernel read its own output."""
    c = torch.nn.Conv2d(4, 4, 3, padding=1)
    model = Fn(lambda m, x: (lambda y: y + torch.tanh(y) * 2)(c(x)))
    model.c = c
    cm = compiled(model, torch.randn(1, 4, 8, 8))
    assert not any(k.name.startswith("conv_add") for k in cm.report().kernels)


def _unavailable(*args, **kw):
    raise NotImplementedError("gemm kernel: off for this test")


def test_without_onednn_the_fallback_computes_the_same(monkeypatch):
    monkeypatch.setattr(conv_backend, "_ops", lambda: None)
    monkeypatch.setattr(c_gemm, "GemmConv", _unavailable)        # and no C kernels: torch's conv2d
    monkeypatch.setattr(c_winograd, "WinogradConv", _unavailable)
    conv_backend.supports.cache_clear()
    try:
        c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        model = Fn(lambda m, x: F.relu(c1(x) + 1.0) * 2)
        model.c1 = c1
        cm = compiled(model, torch.randn(2, 3, 9, 9))
        assert [k.backend for k in cm.report().kernels if k.backend != "view"][0] == "library:torch"
    finally:
        conv_backend.supports.cache_clear()


def test_resnet50_fusion_counts():
    model, inputs = build("resnet50", batch=1, image=64)
    cm = compiled(model, *inputs, rtol=1e-4, atol=1e-4)   # 53 oneDNN convolutions reorder their sums
    rep = cm.report()
    assert rep.rules["conv_bn_scale"] == 53 and rep.rules["conv_bn_shift"] == 53    # every BatchNorm folded
    assert cm.graph.op_counts()["conv2d"] == 53
    assert rep.fusions == {"conv_relu": 33, "conv_add_relu": 16, "gemm_bias": 1}, rep.fusions
    assert not rep.fallbacks
    # the stem's max pool, channels-last, is our kernel writing into the arena (not torch's, with indices)
    assert [k.backend for k in rep.kernels if "max_pool2d" in k.ops] == ["c:max_pool2d"]


MOBILENETV2_PAIRS = {"dw_pw": 1, "pw_dw": 16}


def test_mobilenetv2_fusion_counts():
    """Depthwise-separable inverted residuals: every conv takes its BatchNorm, ReLU6 (clamp) and residual;
    each of the 16 depthwise convs after an expand 1x1 is one group with it, the first block's (no expand)
    with the 1x1 projection after it (counted as their halves: the same conv_clamp and conv_add kernels)."""
    model, inputs = build("mobilenetv2", batch=1, image=64)
    cm = compiled(model, *inputs, rtol=1e-4, atol=1e-4)
    rep = cm.report()
    assert rep.rules["conv_bn_scale"] == 52 and cm.graph.op_counts()["conv2d"] == 52
    assert conv_pairs(rep) == ({"conv_clamp": 35, "conv_add": 10, "gemm_bias": 1}, MOBILENETV2_PAIRS), rep.fusions
    assert not rep.fallbacks


@pytest.mark.parametrize("name,fusions", [
    ("resnet50", ({"conv_relu": 33, "conv_add_relu": 16, "gemm_bias": 1}, {"dw_pw": 0, "pw_dw": 0})),
    ("mobilenetv2", ({"conv_clamp": 35, "conv_add": 10, "gemm_bias": 1}, MOBILENETV2_PAIRS)),
])
def test_cnn_through_onnx_matches_onnx_runtime(tmp_path, name, fusions):
    """The ONNX path (dynamo exporter, which folds BatchNorm itself) forms the same kernels."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model, (x,) = build(name, batch=1, image=64)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    cm = kfuse.compile(str(tmp_path / "m.onnx"), (x,))
    v = cm.verify(x)
    assert v.ok and v.max_rel < 1e-4, v
    assert conv_pairs(cm.report()) == fusions and not cm.report().fallbacks


# -- hardswish / hardsigmoid (MobileNetV3): captured as add, clamp, div, mul, named by a fold rule --------------

def _with_infinities(x, conv):
    """x with +inf and -inf at two pixels far apart in channel 0, whose weights are made positive: the
    conv's outputs there are +inf and -inf (hardswish(-inf) is NaN in eager: -inf * 0), and a NaN."""
    with torch.no_grad():
        conv.weight[:, 0] = conv.weight[:, 0].abs() + 0.1
    x = x.clone()
    x[0, 0, 0, 0], x[0, 0, -1, -1] = float("inf"), -float("inf")
    x[-1, -1, x.shape[2] // 2, 1] = float("nan")
    return x


@pytest.mark.parametrize("act,name", [(F.hardswish, "hardswish"), (F.hardsigmoid, "hardsigmoid")])
@pytest.mark.parametrize("shape,kw", [
    ((2, 5, 9, 11), dict(kernel_size=3, padding=1)),
    ((1, 8, 13, 7), dict(kernel_size=5, groups=8, padding=2, stride=2)),  # depthwise 5x5 stride 2
    ((3, 6, 7, 9), dict(kernel_size=1, bias=False)),
])
def test_conv_hard_activation_is_one_kernel(act, name, shape, kw):
    """BN folded, then hardswish as oneDNN's post-op (it passes the NaN probe); hardsigmoid's post-op turns
    NaN into a number, so it runs in place after the oneDNN call, in the same kernel, with a note."""
    conv = torch.nn.Conv2d(shape[1], shape[1] * 2 if kw.get("groups") else 7, **kw)
    bn = torch.nn.BatchNorm2d(conv.out_channels).eval()
    model = Fn(lambda m, x: act(bn(conv(x))))
    model.conv, model.bn = conv, bn
    x = _with_infinities(torch.randn(shape) * 4, conv)
    cm = compiled(model, x)                 # NaN and inf where eager has them, the rest by the verify table
    rep = cm.report()
    assert rep.rules["hard_activations"] == 1 and rep.fusions == {f"conv_{name}": 1}, (rep.rules, rep.fusions)
    (k,) = [k for k in rep.kernels if k.backend != "view"]
    assert k.ops == ["conv2d", name]
    if k.backend in OURS:              # where our kernel measured faster: act in registers
        return
    assert k.backend.startswith("library:onednn")
    assert k.backend.endswith("+post-op") == conv_backend.supports((name, (), ""), False)
    assert ("runs in place" in k.note) == (not k.backend.endswith("+post-op"))


def test_conv_residual_then_hardswish_and_a_hand_written_hardsigmoid():
    """x * (x + 3).clamp(0, 6) / 6 written out is hardswish too; with a residual add the binary post-op
    carries the add and hardswish runs in place."""
    c1, c2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
    model = Fn(lambda m, x: (lambda y: y * (y + 3).clamp(0, 6) / 6)(c2(torch.clamp(c1(x) + 3, 0, 6) / 6) + x))
    model.c1, model.c2 = c1, c2
    cm = compiled(model, torch.randn(2, 8, 10, 10) * 3)
    rep = cm.report()
    assert rep.fusions == {"conv_hardsigmoid": 1, "conv_add_hardswish": 1}, rep.fusions
    assert fuses_residual(kernels_named(rep, "conv_add_hardswish")[0].backend)


def test_hardswish_not_after_a_conv_is_a_c_kernel_bit_for_bit():
    x = torch.randn(3, 37, 41) * 5
    x[0, 0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -3.0, 3.0, 0.0])
    cm = compiled(Fn(lambda m, x: F.hardswish(x * 1.5) + F.hardsigmoid(x - 1)), x, atol=0, rtol=0)
    assert [k.ops for k in cm.report().kernels] == [["mul", "sub", "hardswish", "hardsigmoid", "add"]]


@pytest.mark.parametrize("cin,cout,k,stride,dilation,groups,winograd,gemm", [
    (16, 24, 3, 1, 1, 1, True, True),          # 3x3 stride 1: Winograd beside the direct kernels
    (16, 24, 3, 2, 1, 1, False, True),         # strided
    (16, 24, 3, 1, 2, 1, False, True),         # dilated
    (16, 24, 5, 1, 1, 1, False, True),         # 5x5
    (48, 48, 3, 1, 1, 2, False, True),         # grouped: our GEMM per group
    (16, 16, 3, 1, 1, 16, False, False),       # depthwise: its own kernel, not the GEMM
])
def test_convolution_candidates(cin, cout, k, stride, dilation, groups, winograd, gemm):
    """which of our kernels are built and timed for a convolution (backends._conv_candidates)"""
    from kfuse.backends import _conv_candidates
    from kfuse.ir import Graph
    from kfuse.kernels.conv import ConvEpilogue
    x = Graph().input([1, 12, 12, cin], torch.float32)
    attrs = {"stride": [stride] * 2, "padding": [dilation] * 2, "dilation": [dilation] * 2, "groups": groups,
             "layout": "nhwc"}
    spec = ConvEpilogue(x, torch.randn(cout, cin // groups, k, k), torch.randn(cout), attrs, ("relu", (), ""), None)
    cands = _conv_candidates(spec)
    assert ("c:winograd" in cands) == winograd and ("c:gemm" in cands) == gemm, list(cands)
    assert ("c:depthwise" in cands) == (groups == cin == cout)
    xs = torch.randn(1, 12, 12, cin)
    want = F.relu(F.conv2d(xs.permute(0, 3, 1, 2), spec.weight, spec.bias, stride, dilation, dilation, groups))
    for name, kern in cands.items():            # every candidate computes the same function
        torch.testing.assert_close(kern(xs).permute(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4, msg=name)


# -- 3-D convolutions (video networks): BatchNorm folded, the epilogue a oneDNN post-op, channels_last_3d ----------

class _Block3d(torch.nn.Module):
    """A video ResNet block: conv3d + BN + ReLU, conv3d + BN, the input added, ReLU."""

    def __init__(self, c, k=(3, 3, 3), groups=1):
        super().__init__()
        pad = tuple(i // 2 for i in k)
        self.c1, self.c2 = (torch.nn.Conv3d(c, c, k, padding=pad, groups=groups, bias=False) for _ in range(2))
        self.b1, self.b2 = torch.nn.BatchNorm3d(c), torch.nn.BatchNorm3d(c)
        with torch.no_grad():
            for b in (self.b1, self.b2):
                b.running_mean.uniform_(-1, 1)
                b.running_var.uniform_(0.5, 2)
                b.weight.uniform_(0.5, 1.5)
                b.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)


@pytest.mark.parametrize("k,groups", [((3, 3, 3), 1), ((1, 3, 3), 1), ((3, 1, 1), 2)])
def test_conv3d_block_folds_bn_and_fuses_its_epilogue(k, groups):
    model = _Block3d(6, k, groups).eval()
    x = torch.randn(2, 6, 5, 9, 7)
    x[0, 1, 2, 3, 4] = float("nan")             # NaN propagates as in eager (oneDNN's relu post-op would zero it)
    cm = compiled(model, x)
    rep = cm.report()
    assert (rep.rules["conv_bn_scale"], rep.rules["conv_bn_shift"]) == (2, 2)
    assert rep.fusions == {"conv_relu": 1, "conv_add_relu": 1}, rep.fusions
    ops = cm.graph.op_counts()
    assert ops["conv3d"] == 2 and "mul" not in ops
    backends = [k.backend for k in rep.kernels]
    # oneDNN, or where the kernel spans one frame, ours over the frames if it measured faster
    ours = {"c:gemm", "c:winograd"} if k[0] == 1 else set()
    assert all(b.startswith("library:onednn") or b in ours for b in backends), backends
    # the residual add is inside the kernel: ours, or oneDNN's post-op where the convolution has one group
    assert backends[1] in ours or backends[1].endswith("+residual") == (groups == 1)


@pytest.mark.parametrize("shape,kw", [
    ((1, 4, 5, 7, 6), dict(kernel_size=3, dilation=2, padding=2)),                        # dilation 2
    ((1, 4, 6, 9, 9), dict(kernel_size=2, stride=3)),                                     # stride larger than the kernel
    ((2, 4, 5, 9, 7), dict(kernel_size=1, stride=(1, 2, 2))),                             # 1x1x1 stride 2, odd sizes
    ((1, 6, 4, 7, 7), dict(kernel_size=(3, 5, 5), groups=6, padding=(1, 2, 2))),          # depthwise
    ((1, 3, 4, 6, 6), dict(kernel_size=3, padding=1, padding_mode="replicate")),
    ((0, 3, 4, 6, 6), dict(kernel_size=3, padding=1)),                                    # batch 0
])
@pytest.mark.parametrize("act", [F.silu, F.hardswish, F.relu6])
def test_odd_3d_convolutions_match_eager(shape, kw, act):
    conv = torch.nn.Conv3d(shape[1], 8 if kw.get("groups", 1) == 1 else shape[1] * 2, **kw)
    model = Fn(lambda m, x: act(conv(x)))
    model.conv = conv
    x = torch.randn(shape)
    cm = compiled(model, x)
    assert compiled(model, x.transpose(3, 4).contiguous().transpose(3, 4))      # a non-contiguous input
    convs = [k for k in cm.report().kernels if k.ops[0] == "conv3d"]
    frame_wise = kw["kernel_size"] == 1           # (the only case here whose kernel spans one frame)
    assert len(convs) == 1 and len(convs[0].ops) == 2
    assert convs[0].backend.startswith("library:onednn") or frame_wise and convs[0].backend == "c:gemm"


@pytest.mark.parametrize("k,stride,padding,groups,residual,ours", [
    ((1, 3, 3), (1, 1, 1), (0, 1, 1), 1, True, {"c:gemm", "c:winograd"}),     # R(2+1)D's spatial convolution
    ((1, 3, 3), (1, 2, 2), (0, 1, 1), 1, False, {"c:gemm"}),
    ((1, 5, 5), (1, 1, 1), (0, 2, 2), 6, False, {"c:depthwise"}),
    ((1, 1, 1), (1, 2, 1), (0, 0, 0), 1, True, {"c:gemm"}),
    ((3, 1, 1), (1, 1, 1), (1, 0, 0), 1, False, set()),                       # spans frames: oneDNN alone
    ((1, 3, 3), (2, 1, 1), (0, 1, 1), 1, False, set()),                       # a depth stride
])
def test_conv3d_candidates_over_frames(k, stride, padding, groups, residual, ours):
    """A 3-D convolution whose kernel spans one frame is also a 2-D one over the N * D frames of its
    channels_last_3d input, which our kernels take (backends.conv.FrameConv): every candidate computes
    eager's function, reading NCDHW or channels_last_3d input, writing channels_last_3d."""
    from kfuse.backends import _conv_candidates
    from kfuse.ir import Graph
    from kfuse.kernels.conv import ConvEpilogue
    shape = (2, 6, 3, 9, 8)
    g = Graph()
    x, r = g.input(list(shape), torch.float32), g.input([1], torch.float32)
    w, b = torch.randn(6, 6 // groups, *k), torch.randn(6)
    attrs = {"stride": stride, "padding": padding, "dilation": (1, 1, 1), "groups": groups}
    xs = torch.randn(shape)
    want = F.conv3d(xs, w, b, stride, padding, 1, groups)
    rs = torch.randn(want.shape) if residual else None
    spec = ConvEpilogue(x, w, b, attrs, ("swish", (), ""), r if residual else None)
    want = F.silu(want + rs if residual else want)
    cands = _conv_candidates(spec)
    assert set(cands) - {"library:onednn+post-op", "library:onednn+residual", "library:onednn"} == ours, list(cands)
    for name, kern in cands.items():
        for inp in (xs, xs.contiguous(memory_format=torch.channels_last_3d)):
            got = kern(inp) if rs is None else kern(inp, rs)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
            assert got.is_contiguous(memory_format=torch.channels_last_3d), name


def test_conv3d_without_onednn_is_torch_with_the_same_numbers(monkeypatch):
    monkeypatch.setattr(conv_backend, "_ops", lambda: None)
    conv_backend.supports.cache_clear()
    try:
        model = _Block3d(4).eval()
        cm = compiled(model, torch.randn(1, 4, 3, 6, 5))
        assert {k.backend for k in cm.report().kernels} == {"library:torch"}
    finally:
        conv_backend.supports.cache_clear()


def test_conv3d_through_onnx_matches_onnx_runtime(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 8, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)),
                                torch.nn.BatchNorm3d(8), torch.nn.ReLU(), _Block3d(8)).eval()
    x = torch.randn(1, 3, 4, 12, 10)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    cm = kfuse.compile(str(tmp_path / "m.onnx"), (x,))
    v = cm.verify(x)
    assert v.ok and v.max_rel < 1e-4, v
    assert cm.report().fusions == {"conv_relu": 2, "conv_add_relu": 1}, cm.report().fusions


# -- transposed convolutions (decoders, GAN generators): BatchNorm folded, oneDNN with the activation a post-op ------

def _bn(c):
    bn = torch.nn.BatchNorm2d(c) if isinstance(c, int) else c
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


@pytest.mark.parametrize("kw", [
    dict(kernel_size=4, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1, groups=2),     # grouped: BN scales per group
    dict(kernel_size=3, stride=(1, 3), padding=(0, 1), output_padding=(0, 2), dilation=1),
    dict(kernel_size=2, stride=1, dilation=2, bias=False),
])
def test_conv_transpose_bn_activation_is_one_kernel(kw):
    up = torch.nn.ConvTranspose2d(6, 4, **kw)
    model = torch.nn.Sequential(up, _bn(4), torch.nn.ReLU()).eval()
    x = torch.randn(2, 6, 7, 9)
    x[0, 1, 2, 3] = float("nan")
    cm = compiled(model, x)
    rep = cm.report()
    assert (rep.rules["conv_bn_scale"], rep.rules["conv_bn_shift"]) == (1, 1)
    assert rep.fusions == {"conv_transpose_relu": 1}, rep.fusions
    assert "mul" not in cm.graph.op_counts()
    (k,) = [k for k in rep.kernels if k.backend != "view"]
    assert k.backend.startswith("library:onednn"), k.backend


def test_conv_transpose_chain_stays_channels_last_with_a_residual():
    """a decoder: two transposed convolutions and a conv in one NHWC region, a skip connection added"""
    a, b = torch.nn.ConvTranspose2d(8, 8, 4, 2, 1), torch.nn.ConvTranspose2d(8, 4, 3, 1, 1)
    c = torch.nn.Conv2d(4, 3, 3, padding=1)
    model = Fn(lambda m, x, skip: torch.tanh(c(F.silu(b(F.relu(a(x)) + skip)))))
    model.a, model.b, model.c = a, b, c
    cm = compiled(model, torch.randn(1, 8, 5, 6), torch.randn(1, 8, 10, 12))
    rep = cm.report()
    assert rep.fusions == {"conv_transpose_relu": 1, "conv_transpose_silu": 1, "conv_tanh": 1}, rep.fusions
    assert rep.rules["nhwc_layout"] >= 3


def test_conv_transpose3d_folds_bn():
    up = torch.nn.ConvTranspose3d(4, 6, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1))
    model = torch.nn.Sequential(up, _bn(torch.nn.BatchNorm3d(6)), torch.nn.SiLU()).eval()
    cm = compiled(model, torch.randn(1, 4, 3, 5, 6))
    assert cm.report().fusions == {"conv_transpose_silu": 1}
    assert "mul" not in cm.graph.op_counts()


def test_conv_transpose_through_onnx_matches_onnx_runtime(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 4, 4, 2, 1), _bn(4), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(4, 3, 3, 2, 1, output_padding=1), torch.nn.Tanh()).eval()
    x = torch.randn(1, 8, 6, 5)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    cm = kfuse.compile(str(tmp_path / "m.onnx"), (x,))
    v = cm.verify(x)
    assert v.ok and v.max_rel < 1e-4, v
    assert cm.report().fusions == {"conv_transpose_relu": 1, "conv_transpose_tanh": 1}, cm.report().fusions
