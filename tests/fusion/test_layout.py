"""The channels-last pass (kfuse/passes/layout.py) and the squeeze-excitation op it enables."""
import pytest
import torch
import torch.nn.functional as F
from helpers import Fn, assert_close, compiled

from kfuse import config
from kfuse.backends.c import gemm as c_gemm


def nonview(rep):
    return [k for k in rep.kernels if k.backend != "view"]


def convs(*shapes, **kw):
    """Conv2d modules (cin, cout, k) with seeded weights."""
    return [torch.nn.Conv2d(cin, cout, k, padding=k // 2, **kw) for cin, cout, k in shapes]


def test_conv_chain_runs_channels_last_with_conversions_at_the_edges():
    c1, c2 = convs((3, 8, 3), (8, 5, 1))
    scale = torch.randn(1, 8, 1, 1)
    m = Fn(lambda m, x: c2(F.relu(c1(x)) * m.scale + 1.0), scale=scale)
    m.c1, m.c2 = c1, c2
    x = torch.randn(2, 3, 9, 11)
    cm = compiled(m, x)
    rep = cm.report()
    assert rep.rules["nhwc_layout"] >= 3 and rep.rules["layout_conversion"] == 2, rep.rules
    # the scale and shift read and write NHWC buffers: one flat C kernel between the two convolutions
    # (the 1x1 one on oneDNN as a convolution or as the GEMM it is, or our GEMM: whichever was measured faster)
    assert [k.ops for k in nonview(rep)][:2] == [["conv2d", "relu"], ["mul", "add"]]
    assert nonview(rep)[0].backend in ("library:onednn", "c:gemm", "c:winograd") and nonview(rep)[1].backend == "c"
    assert nonview(rep)[2].backend in ("library:onednn", "library:onednn-linear", "c:gemm"), nonview(rep)[2]
    nchw = compiled(m, x, layout="nchw").report()
    assert "nhwc_layout" not in nchw.rules


def test_layout_option_is_checked():
    import kfuse
    with pytest.raises(kfuse.KfuseError, match="layout"):
        kfuse.compile(Fn(lambda m, x: x + 1), (torch.randn(2),), layout="nhwc")


def test_pools_reductions_and_concat_in_the_region():
    c1, c2, c3 = convs((4, 6, 3), (4, 5, 1), (11, 7, 3))

    def f(m, x, w):
        a, b = F.relu(c1(x)), c2(x)
        y = c3(torch.cat([a, b], 1))                         # a UNet's skip concat, over channels
        p = F.max_pool2d(y, 3, 2, 1) + F.avg_pool2d(y, 2)[..., :5, :5].mean()
        q = F.adaptive_avg_pool2d(p, 1).flatten(1)           # global pool -> classifier input
        return q, p.mean(1), p.sum((2, 3)), p.amax(1, keepdim=True), y + w   # w: a [W] input broadcast
    m = Fn(f)
    m.c1, m.c2, m.c3 = c1, c2, c3
    x, w = torch.randn(2, 4, 10, 10), torch.randn(10)
    x[1, 2, 3, 4] = float("nan")
    cm = compiled(m, x, w)
    assert cm.report().rules["nhwc_layout"] >= 6


def test_convnext_permutes_cancel():
    """conv -> permute to NHWC -> LayerNorm -> linear -> permute back -> residual add: in the region the
    model's own permutes meet the layout's views and vanish; layer scale and residual are one kernel."""
    dw = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    ln, fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)
    gamma = torch.rand(16)

    def f(m, x):
        y = ln(dw(x).permute(0, 2, 3, 1))
        return x + (fc(y) * m.gamma).permute(0, 3, 1, 2)
    m = Fn(f, gamma=gamma)
    m.dw, m.ln, m.fc = dw, ln, fc
    cm = compiled(m, torch.randn(2, 16, 9, 9))
    rep = cm.report()
    assert not any(k.ops == ["transpose"] and k.backend != "view" for k in rep.kernels)
    assert rep.fusions.get("elementwise_chain") == 1, rep.fusions      # mul and add in one kernel
    assert rep.rules["layout_conversion"] <= 2


class SE(torch.nn.Module):
    """torchvision's SqueezeExcitation (1x1 convs) or a linear form, after a conv."""

    def __init__(self, c, r, act=torch.nn.ReLU(), gate=torch.nn.Sigmoid(), linear=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.linear = linear
        if linear:
            self.fc1, self.fc2 = torch.nn.Linear(c, r), torch.nn.Linear(r, c)
        else:
            self.fc1, self.fc2 = torch.nn.Conv2d(c, r, 1), torch.nn.Conv2d(r, c, 1)
        self.act, self.gate = act, gate

    def forward(self, x):
        x = self.conv(x)
        if self.linear:
            s = x.mean((2, 3))
            s = self.gate(self.fc2(self.act(self.fc1(s))))[:, :, None, None]
        else:
            s = self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


@pytest.mark.parametrize("act,gate,linear", [
    (torch.nn.ReLU(), torch.nn.Hardsigmoid(), False),       # MobileNetV3
    (torch.nn.SiLU(), torch.nn.Sigmoid(), False),           # EfficientNet
    (torch.nn.ReLU(), torch.nn.Sigmoid(), True),            # the linear form
    (torch.nn.GELU(), torch.nn.Sigmoid(), True),
    (torch.nn.LeakyReLU(0.2), torch.nn.Hardsigmoid(), False),
    (torch.nn.Hardswish(), torch.nn.Sigmoid(), False),
])
def test_squeeze_excitation_is_one_kernel(act, gate, linear):
    m = SE(20, 6, act, gate, linear).eval()
    x = torch.randn(3, 20, 7, 5)
    cm = compiled(m, x)
    rep = cm.report()
    assert rep.fusions.get("squeeze_excite") == 1 and rep.rules["squeeze_excite"] == 1, (rep.fusions, rep.rules)
    se = [k for k in rep.kernels if k.name == "squeeze_excite"]
    assert se[0].backend == "c:squeeze_excite"
    assert not any(k.ops in (["reduce_mean"], ["mul"]) for k in rep.kernels)


def test_squeeze_excitation_nan_input_and_batch_sizes():
    m = SE(12, 4).eval()
    x = torch.randn(2, 12, 6, 6)
    x[1, 3, 2, 2] = float("nan")          # image 1's channel 3 mean is NaN: every gate of image 1 is NaN
    cm = compiled(m, x)
    out = cm(x)
    assert out[1].isnan().all() and not out[0].isnan().any()
    compiled(m, torch.randn(1, 12, 1, 1))


def test_squeeze_excitation_with_a_shared_intermediate_is_left_alone():
    m = SE(8, 2).eval()

    def f(_, x):
        y = m.conv(x)
        s = torch.sigmoid(m.fc2(torch.relu(m.fc1(y.mean((2, 3), keepdim=True)))))
        return y * s, s          # the gate is an output too
    cm = compiled(Fn(f), torch.randn(2, 8, 5, 5))
    assert "squeeze_excite" not in cm.report().fusions


@pytest.mark.parametrize("k,stride,dil,act", [(3, 1, 1, F.relu6), (5, 2, 1, F.hardswish), (3, 2, 2, F.silu),
                                              (7, 1, 1, None), (3, 3, 1, F.relu)])
def test_depthwise_conv_runs_our_kernel_or_onednn_and_says_which(monkeypatch, k, stride, dil, act):
    untimed(monkeypatch)                 # untimed: our kernel, the first candidate
    conv = torch.nn.Conv2d(19, 19, k, stride, padding=dil * (k // 2), dilation=dil, groups=19)
    m = Fn(lambda m, x: act(conv(x)) if act else conv(x))
    m.conv = conv
    x = torch.randn(2, 19, 11, 13)
    x[0, 4, 5, 6], x[1, 7, 0, 0] = float("nan"), float("inf")
    cm = compiled(m, x)
    (k,) = nonview(cm.report())
    assert k.backend == "c:depthwise" and "KFUSE_AUTOTUNE=0" in k.schedule, (k.backend, k.schedule)


def untimed(monkeypatch):
    monkeypatch.setenv("KFUSE_AUTOTUNE", "0")
    monkeypatch.setattr(config, "_config", config.from_env())


@pytest.mark.parametrize("kernel", ["c:gemm", "library:onednn-linear"])
@pytest.mark.parametrize("act,residual", [(None, False), (F.relu, False), (F.hardswish, False), (F.relu6, False),
                                          (None, True), (F.relu, True)])
def test_pointwise_conv_as_a_gemm(monkeypatch, act, residual, kernel):
    """A 1x1 stride-1 conv on NHWC tensors runs as a GEMM on the [N*H*W, C] view: with timing off our C
    GEMM, the first candidate; without it oneDNN's linear op (cheaper to call than its convolution).
    Either computes what eager does, NaN included, with the epilogue inside the call where it can."""
    untimed(monkeypatch)
    if kernel != "c:gemm":
        def unavailable(*a, **k):
            raise NotImplementedError("gemm kernel: off for this test")
        monkeypatch.setattr(c_gemm, "GemmConv", unavailable)
    c1, c2 = convs((6, 9, 3), (9, 9, 1))

    def f(m, x):
        y = c1(x)
        z = c2(y) + y if residual else c2(y)
        return act(z) if act else z
    m = Fn(f)
    m.c1, m.c2 = c1, c2
    x = torch.randn(2, 6, 7, 5)
    x[1, 2, 3, 4] = float("nan")
    cm = compiled(m, x)
    k = nonview(cm.report())[-1]
    assert k.backend.startswith(kernel) and k.ops[0] == "conv2d", (k.backend, k.ops)
    if kernel != "c:gemm":
        assert ("+residual" in k.backend) == residual


@pytest.mark.parametrize("residual", [False, True])
def test_depthwise_then_pointwise_is_one_group(monkeypatch, residual):
    """dw -> ReLU6 -> 1x1 (+ residual) is one group; with timing off its kernel is the fused C kernel (the
    first candidate), which computes what eager does, NaN included."""
    untimed(monkeypatch)
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    pw = torch.nn.Conv2d(8, 8, 1)
    m = Fn(lambda m, x: m.pw(F.relu6(m.dw(x))) + (x if residual else 0))
    m.dw, m.pw = dw, pw
    x = torch.randn(2, 8, 9, 7)
    x[1, 3, 4, 5] = float("nan")
    rep = compiled(m, x).report()
    (k,) = [k for k in rep.kernels if k.ops[0] == "conv2d"]
    assert k.name == ("dwconv_pwconv_add" if residual else "dwconv_pwconv") and k.backend == "c:depthwise+gemm"
    assert not [w for w in rep.why_not if "depthwise" in w.detail]


def _fused_loses(monkeypatch, fused_name):
    """pick() answering that the fused kernel `fused_name` is slower than the two kernels in turn."""
    from kfuse import backends
    real = backends.pick

    def pick(problem, cands, inputs, threads=None, **kw):
        names = list(cands)
        if fused_name in names:
            other = next(n for n in names if n != fused_name)
            return other, f"{other} (measured: {fused_name} 2.000 ms, {other} 1.000 ms)"
        return real(problem, cands, inputs, threads, **kw)
    monkeypatch.setattr(backends, "pick", pick)


def test_depthwise_then_pointwise_measured_slower_runs_as_two_kernels(monkeypatch):
    """where the fused kernel times slower, the pair becomes two groups again (the depthwise output gets a
    planned buffer, no allocation per call), each its own fusion, and a `measured_slower` record names
    both convolutions and the times"""
    _fused_loses(monkeypatch, "c:depthwise+gemm")
    m = Fn(lambda m, x: m.pw(F.relu6(m.dw(x))))
    m.dw, m.pw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 12, 1)
    cm = compiled(m, torch.randn(1, 8, 9, 9))
    rep = cm.report()
    (w,) = [w for w in rep.why_not if w.code == "measured_slower"]
    assert "c:depthwise+gemm 2.000 ms" in w.detail and w.producer != w.consumer
    assert rep.fusions == {"conv_clamp": 1}, rep.fusions
    dw, pw = [k for k in rep.kernels if k.ops[0] == "conv2d"]
    assert dw.name == "conv_clamp" and pw.ops == ["conv2d"] and "+" not in dw.backend + pw.backend
    planned = cm._last._plan.planned
    assert any(n.op == "clamp" for n in planned), planned      # the depthwise output: an arena buffer


def _inverted_residual(residual: bool, stride: int = 1):
    """MobileNetV2's block: 1x1 expand + ReLU6, depthwise 3x3 + ReLU6, 1x1 projection (+ the input)"""
    m = Fn(lambda m, x: m.project(F.relu6(m.dw(F.relu6(m.expand(x))))) + (x if residual else 0))
    m.expand, m.dw = torch.nn.Conv2d(6, 24, 1), torch.nn.Conv2d(24, 24, 3, stride=stride, padding=1, groups=24)
    m.project = torch.nn.Conv2d(24, 6, 1)
    return m


@pytest.mark.parametrize("residual,stride", [(False, 2), (True, 1)])
def test_expand_then_depthwise_is_one_group(monkeypatch, residual, stride):
    """In an inverted residual block the expand 1x1 and the depthwise conv after it are one group (the
    expanded tensor, the block's widest, never written); with timing off its kernel is the fused one. The
    projection after the depthwise conv stays its own kernel, and the report says why."""
    untimed(monkeypatch)
    x = torch.randn(2, 6, 9, 7)
    x[1, 3, 4, 5] = float("nan")
    rep = compiled(_inverted_residual(residual, stride), x).report()
    pair, proj = [k for k in rep.kernels if k.ops[0] == "conv2d"]
    assert pair.name == "pwconv_dwconv" and pair.backend == "c:gemm+depthwise"
    assert pair.parts == ("conv_clamp", "conv_clamp") and proj.name == ("conv_add" if residual else "conv2d")
    (w,) = [w for w in rep.why_not if "depthwise -> pointwise" in w.detail]
    assert w.code == "contraction_consumer" and "already" in w.detail


def test_expanded_tensor_read_twice_keeps_the_pair_apart():
    """the expand 1x1's output also read by an add: the pair is not formed (the expanded tensor must be
    written), values as eager, and the why-not says so"""
    m = Fn(lambda m, x: (lambda e: m.dw(e) + e)(F.relu6(m.expand(x))))
    m.expand, m.dw = torch.nn.Conv2d(6, 24, 1), torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
    rep = compiled(m, torch.randn(1, 6, 9, 9)).report()
    assert "pwconv_dwconv" not in rep.fusions
    (w,) = [w for w in rep.why_not if "pointwise -> depthwise" in w.detail]
    assert w.code == "contraction_consumer" and "read elsewhere" in w.detail


def test_expand_then_depthwise_measured_slower_runs_as_two_kernels(monkeypatch):
    _fused_loses(monkeypatch, "c:gemm+depthwise")
    cm = compiled(_inverted_residual(True), torch.randn(1, 6, 9, 9))
    rep = cm.report()
    (w,) = [w for w in rep.why_not if w.code == "measured_slower"]
    assert w.detail.startswith("pointwise -> depthwise") and "2.000 ms" in w.detail
    assert rep.fusions == {"conv_clamp": 2, "conv_add": 1}, rep.fusions
    assert any(n.op == "clamp" and n.inputs[0].inputs[1].shape[1] == 6 for n in cm._last._plan.planned)


def test_expand_then_depthwise_kept_apart_by_the_user():
    """disable=["pointwise_depthwise"] keeps the pair apart (the depthwise conv then pairs with the
    projection after it, as before this pair existed)"""
    rep = compiled(_inverted_residual(False), torch.randn(1, 6, 9, 9), disable=["pointwise_depthwise"]).report()
    (w,) = [w for w in rep.why_not if "pointwise_depthwise" in w.detail]
    assert w.code == "user_disabled"
    assert "pwconv_dwconv" not in rep.fusions and sum(k.name.startswith("dwconv_pwconv") for k in rep.kernels) \
        + sum(w.detail.startswith("depthwise ->") for w in rep.why_not if w.code == "measured_slower") == 1


def _se_block(residual: bool):
    """a depthwise 3x3 conv, a squeeze-excitation (ReLU, hardsigmoid gate) of its 6 channels, then a 1x1
    projection to 10 channels (to 6 with the residual of the block's input)."""
    def block(m, x):
        h = F.silu(m.dw(x))
        return m.pw(h * F.hardsigmoid(m.fc2(F.relu(m.fc1(h.mean((2, 3), keepdim=True)))))) + (x if residual else 0)
    m = Fn(block)
    m.dw, m.fc1, m.fc2 = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6), torch.nn.Conv2d(6, 3, 1), torch.nn.Conv2d(3, 6, 1)
    m.pw = torch.nn.Conv2d(6, 6 if residual else 10, 1)
    return m


@pytest.mark.parametrize("residual", [False, True])
def test_squeeze_excitation_gate_scales_the_pointwise_conv_inputs(monkeypatch, residual):
    """a squeeze-excitation and the 1x1 convolution reading it are one group: the gate alone, then our GEMM
    scaling its inputs by it as it reads them (x * s never written); values as eager, NaN included"""
    untimed(monkeypatch)
    x = torch.randn(3, 6, 7, 5)
    x[2, 1, 3, 4] = float("nan")
    rep = compiled(_se_block(residual), x).report()
    (k,) = [k for k in rep.kernels if k.ops[0] == "squeeze_excite"]
    assert k.name == ("se_pwconv_add" if residual else "se_pwconv") and k.backend == "c:squeeze_excite+gemm"
    assert k.parts == ("squeeze_excite", "conv_add" if residual else None)


def test_squeeze_excitation_pair_measured_slower_runs_as_two_kernels(monkeypatch):
    _fused_loses(monkeypatch, "c:squeeze_excite+gemm")
    rep = compiled(_se_block(True), torch.randn(2, 6, 9, 9)).report()
    (w,) = [w for w in rep.why_not if w.code == "measured_slower"]
    assert w.detail.startswith("squeeze-excitation -> pointwise") and "2.000 ms" in w.detail
    assert rep.fusions == {"conv_silu": 1, "squeeze_excite": 1, "conv_add": 1}, rep.fusions


def test_pairs_kept_apart_by_the_user_say_so():
    rep = compiled(_se_block(False), torch.randn(1, 6, 9, 9), disable=["squeeze_excite_pointwise"]).report()
    (w,) = [w for w in rep.why_not if w.consumer.endswith("conv2d") and "squeeze_excite" in w.producer]
    assert w.code == "user_disabled" and "squeeze_excite_pointwise" in w.detail
    assert "se_pwconv" not in rep.fusions


def test_depthwise_output_read_twice_says_why_it_is_two_kernels():
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    pw = torch.nn.Conv2d(8, 8, 1)
    m = Fn(lambda m, x: (lambda y: m.pw(y) * y)(F.relu6(m.dw(x))))
    m.dw, m.pw = dw, pw
    rep = compiled(m, torch.randn(1, 8, 9, 9)).report()
    (w,) = [w for w in rep.why_not if "depthwise -> pointwise" in w.detail]
    assert w.code == "contraction_consumer" and "read elsewhere" in w.detail


@pytest.mark.parametrize("silu,affine,groups,size", [(True, True, 4, 9), (False, True, 1, 9), (True, False, 8, 9),
                                                     (True, True, 4, 96)])   # 8x96x96 > the fold limit
def test_group_norm_runs_channels_last(silu, affine, groups, size):
    """conv -> GroupNorm (+ SiLU) -> conv, as a diffusion UNet block: the norm is one NHWC op, so the
    region has no edge around it (captured, its rows [N, G, C/G*H*W] are not contiguous in NHWC)."""
    c1, c2 = convs((3, 8, 3), (8, 6, 3))
    gn = torch.nn.GroupNorm(groups, 8, affine=affine)
    if affine:
        with torch.no_grad():
            gn.weight.uniform_(0.5, 2), gn.bias.uniform_(-1, 1)
    m = Fn(lambda m, x: c2(F.silu(gn(c1(x))) if silu else gn(c1(x))))
    m.c1, m.c2, m.gn = c1, c2, gn
    x = torch.randn(2, 3, size, size - 2)
    x[1, 0, 4, 4] = float("nan")              # image 1's groups go NaN downstream, image 0's do not
    cm = compiled(m, x)
    rep = cm.report()
    assert cm.graph.op_counts().get("group_norm") == 1, cm.graph.op_counts()
    assert [k.ops for k in nonview(rep)] == [["conv2d"], ["group_norm"], ["conv2d"]], [k.ops for k in nonview(rep)]
    # a big tensor's affine is applied after the reshape back by the capture, then taken into the op
    assert ("group_norm_epilogue" in rep.rules) == (size > 9 and affine), rep.rules
    assert rep.rules["layout_conversion"] == 2, rep.rules
    (k,) = [k for k in rep.kernels if k.ops == ["group_norm"]]
    assert k.backend == "c:group_norm"


def test_our_conv_kernels_write_into_planned_buffers(monkeypatch):
    """c:gemm, c:depthwise and the fused pair write their outputs into the arena (a fresh output of tens
    of MB per call was page-faulted in on every call); arenas handed out full of NaN change nothing."""
    untimed(monkeypatch)
    c1, c2, c3 = convs((3, 16, 3), (16, 16, 1), (16, 8, 3))
    dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
    m = Fn(lambda m, x: m.c3(m.dw(F.relu(m.c2(F.relu(m.c1(x)))))))
    m.c1, m.c2, m.c3, m.dw = c1, c2, c3, dw
    x = torch.randn(2, 3, 11, 9)
    cm = compiled(m, x)
    (prog,) = cm._programs.values()
    ours = [k for k, info in zip(prog.kernels, prog.report.kernels) if info.backend.startswith("c:")]
    assert ours and all(k.writes_into for k in ours)
    assert prog._plan is not None and len(prog._plan.planned) >= 2
    for arena in prog._arenas:
        for b in arena:
            b.fill_(float("nan"))
    assert_close(cm(x), m(x), atol=1e-4, rtol=1e-4)


def test_onnx_group_norm_of_an_empty_batch(tmp_path):
    """GroupNorm as ONNX exports it (reshape to [N, groups, -1], a row norm, reshape back) compiled at batch 0:
    the empty output, unfused (the NHWC group_norm rule had divided by the empty rows' length)."""
    import kfuse
    m = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU()).eval()
    path = tmp_path / "gn.onnx"
    torch.onnx.export(m, (torch.randn(2, 8, 12, 12),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    x = torch.randn(0, 8, 12, 12)
    assert kfuse.compile(str(path), (x,))(x).shape == (0, 32, 12, 12)
    x = torch.randn(2, 8, 12, 12)
    cm = kfuse.compile(str(path), (x,))
    assert_close(cm(x), m(x), atol=1e-4, rtol=1e-4)
    assert cm.report().fusions.get("group_norm") == 1        # at batch 2 the rule fires


class ShuffleBlock(torch.nn.Module):
    """ShuffleNet v2's unit: split the channels, a 1x1 -> depthwise -> 1x1 branch, concatenate, shuffle."""

    def __init__(self, c=8):
        super().__init__()
        h = c // 2
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(h, h, 1), torch.nn.ReLU(),
                                          torch.nn.Conv2d(h, h, 3, padding=1, groups=h), torch.nn.Conv2d(h, h, 1))
        self.head = torch.nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(2):
            a, b = x.chunk(2, dim=1)
            x = torch.cat([a, self.branch(b)], 1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x)


def test_channel_shuffle_stays_channels_last(monkeypatch):
    """The shuffle as the same permutation of the NHWC channels: as captured it left the region (a copy in
    NCHW order, read back through transposes by every consumer)."""
    from kfuse.passes import layout
    torch.manual_seed(0)
    m, x = ShuffleBlock().eval(), torch.randn(2, 3, 9, 7)
    cm = compiled(m, x)
    shuffles = [n for n in cm.graph.nodes if n.op == "transpose" and tuple(n.attrs["perm"]) == (0, 1, 2, 4, 3)]
    assert len(shuffles) == 2 and all(n.shape[:3] == (2, 9, 7) for n in shuffles)      # [N, H, W, C/G, G]
    monkeypatch.setattr(layout._Region, "channel_shuffle", lambda self, n: None)
    plain = compiled(m, x)
    assert not any(n.op == "transpose" and len(n.shape) == 5 and n.shape[:3] == (2, 9, 7) for n in plain.graph.nodes)
    assert cm.report().rules["layout_conversion"] < plain.report().rules["layout_conversion"]


def test_near_misses_of_the_channel_shuffle_keep_their_meaning():
    """A 5-d reshape of a region tensor whose swap is not of the group dims, or whose reshape back is not
    to the input's shape, is not the shuffle: not rewritten, the numbers eager's."""
    c1 = torch.nn.Conv2d(3, 8, 3, padding=1)

    def swap_hw(m, x):
        y = m.c1(x)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(3, 4).reshape(n, c, w, h).relu()

    def other_split(m, x):
        y = m.c1(x)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c // 2, 2 * h, w).relu()

    for fn in (swap_hw, other_split):
        m = Fn(fn)
        m.c1 = c1
        cm = compiled(m, torch.randn(2, 3, 5, 7))
        assert not any(n.op == "transpose" and tuple(n.attrs["perm"]) == (0, 1, 2, 4, 3) and n.shape[1:3] == (5, 7)
                       for n in cm.graph.nodes)
