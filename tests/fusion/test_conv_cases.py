"""Convolutions in the forms standard CNN families use, each against eager: grouped (group sizes off
the SIMD width), dilated, strided past the kernel, odd sizes, batch 0, non-contiguous inputs,
padding modes, transposed, 1-D; and aten.as_strided (ConvNeXt's pooled restride, sliding windows)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import Fn, compiled

import kfuse
from kfuse.backends.c import winograd
from kfuse.errors import KfuseError

# oneDNN reorders each output's sums (channels-last, blocked weights): a few float32 ulp of the output
CONV_TOL = {"atol": 1e-5, "rtol": 1e-5}


def run(conv, x, act=F.silu, residual=False):
    """act(conv(x)) (+ x with `residual`) compiled and compared with eager; returns the report."""
    model = Fn(lambda m, x: act(m.conv(x) + x) if residual else act(m.conv(x)))
    model.conv = conv.eval()
    return compiled(model, x, **CONV_TOL).report()


CASES = {  # id: (module, input shape)
    "groups3_c9": (nn.Conv2d(9, 12, 3, padding=1, groups=3), (1, 9, 10, 11)),       # 3 input channels per group
    "groups6_c18": (nn.Conv2d(18, 30, 3, padding=1, groups=6), (2, 18, 9, 9)),      # 3 in, 5 out per group
    "groups6_c42_s2": (nn.Conv2d(42, 42, 3, stride=2, padding=1, groups=6), (1, 42, 13, 13)),
    "depthwise_c10_k5": (nn.Conv2d(10, 10, 5, padding=2, groups=10), (1, 10, 7, 9)),
    "depthwise_multiplier2": (nn.Conv2d(6, 12, 3, padding=1, groups=6), (1, 6, 8, 8)),
    "dilation2": (nn.Conv2d(5, 7, 3, padding=2, dilation=2), (1, 5, 12, 10)),
    "dilation2_grouped": (nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3), (1, 6, 11, 11)),
    "dilation_2x3": (nn.Conv2d(4, 4, 3, dilation=(2, 3)), (1, 4, 13, 14)),
    "stride3_kernel2": (nn.Conv2d(4, 8, 2, stride=3), (1, 4, 16, 17)),
    "stride4_kernel1": (nn.Conv2d(4, 8, 1, stride=4), (1, 4, 9, 9)),
    "1x1_stride2": (nn.Conv2d(8, 16, 1, stride=2, bias=False), (1, 8, 15, 15)),
    "odd_7x9": (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 7, 9)),
    "odd_7x9_stride2": (nn.Conv2d(3, 8, 3, stride=2, padding=1), (1, 3, 7, 9)),
    "kernel_as_input": (nn.Conv2d(3, 5, (7, 9)), (1, 3, 7, 9)),                       # 1x1 output
    "batch0": (nn.Conv2d(3, 8, 3, padding=1), (0, 3, 8, 8)),
    "padding_same_even_kernel": (nn.Conv2d(3, 4, 4, padding="same"), (1, 3, 9, 8)),  # asymmetric pad
    "padding_reflect": (nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), (1, 3, 8, 9)),
    "padding_replicate": (nn.Conv2d(3, 6, 5, padding=2, padding_mode="replicate"), (1, 3, 7, 7)),
    "padding_circular": (nn.Conv2d(3, 6, 3, padding=(1, 2), padding_mode="circular"), (1, 3, 6, 9)),
    "padding_reflect_grouped_s2": (nn.Conv2d(6, 6, 3, 2, 1, groups=3, padding_mode="reflect"), (1, 6, 9, 9)),
    "conv_transpose": (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (1, 4, 5, 7)),
    "conv_transpose_grouped": (nn.ConvTranspose2d(6, 9, 4, stride=2, padding=1, groups=3), (1, 6, 5, 5)),
    "conv_transpose_dilated": (nn.ConvTranspose2d(4, 4, 3, stride=3, dilation=2, output_padding=(2, 1)), (1, 4, 4, 5)),
    "conv1d": (nn.Conv1d(5, 7, 3, padding=1), (2, 5, 17)),
    "conv1d_grouped_dilated": (nn.Conv1d(6, 9, 3, padding=2, dilation=2, groups=3), (1, 6, 11)),
    "conv1d_stride2_reflect": (nn.Conv1d(4, 4, 5, stride=2, padding=2, padding_mode="reflect"), (1, 4, 13)),
    "conv1d_circular": (nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"), (1, 4, 9)),
    "conv_transpose1d": (nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1, output_padding=1), (1, 4, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conv_form_matches_eager(case):
    """Every convolution runs on oneDNN with its activation as a post-op (transposed ones too); a padding
    mode other than zeros (and 'same' with an even kernel) is a pad kernel first."""
    torch.manual_seed(0)
    conv, shape = CASES[case]
    rep = run(conv, torch.randn(shape))
    assert not rep.fallbacks, rep.fallbacks
    kernels = [(k.ops, k.backend) for k in rep.kernels if k.backend != "view"]
    if "transpose" in case:
        assert kernels == [(["conv_transpose2d", "silu"], "library:onednn+post-op")], kernels
    else:
        padded = "reflect" in case or "replicate" in case or "circular" in case or "same" in case
        assert kernels[:-1] == [(["pad"], "torch")] * padded and kernels[-1][0] == ["conv2d", "silu"], kernels
        # oneDNN with the post-op, or where a kernel of ours computes the same, the one measured faster
        ours = {"depthwise": {"c:depthwise"}, "1x1": {"library:onednn-linear+post-op"}}
        allowed = {"library:onednn+post-op"}.union(*(v for k, v in ours.items() if k in case and "stride" not in case))
        allowed |= {"c:gemm"} if conv.groups == 1 or conv.weight.shape[1] > 1 else set()    # not depthwise
        allowed |= {"c:winograd"} if winograd.supported(conv.weight.shape, conv.groups, conv.stride, conv.dilation) else set()
        assert kernels[-1][1] in allowed, kernels


@pytest.mark.parametrize("groups", [1, 3])
def test_residual_on_grouped_conv(groups):
    """oneDNN's residual post-op is used only for groups == 1 (it silently runs unfused otherwise):
    a grouped conv + add must still come out right."""
    torch.manual_seed(0)
    rep = run(nn.Conv2d(9, 9, 3, padding=1, groups=groups), torch.randn(1, 9, 8, 8), act=F.relu, residual=True)
    assert rep.fusions == {"conv_add_relu": 1}, rep.fusions


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_input(layout):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2)
    x = torch.randn(2, 6, 9, 11)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3)
    else:
        x = torch.randn(2, 6, 18, 11)[:, :, ::2]
    assert not x.is_contiguous()
    run(conv, x)


def test_channels_last_model_weights():
    """A model converted to channels-last (weights in that format) computes the same."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)
    run(conv, torch.randn(1, 4, 7, 9).contiguous(memory_format=torch.channels_last))


# -- aten.as_strided -----------------------------------------------------------------------------------

def test_pooled_restride_in_channels_last_is_a_view():
    """adaptive_avg_pool2d(x, 1) of a channels-last x restrides its mean with as_strided (ConvNeXt)."""
    model = Fn(lambda m, x: F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2) * 2.0, 1).permute(0, 2, 3, 1))
    cm = compiled(model, torch.randn(2, 5, 6, 8))
    assert "gather" not in cm.graph.op_counts()


@pytest.mark.parametrize("size,stride,offset", [
    ((4, 6), (6, 1), 0),            # the whole input, reshaped
    ((6, 4), (1, 6), 0),            # transposed
    ((3, 3, 4), (4, 4, 1), 2),      # overlapping sliding windows, with an offset
    ((2, 3), (10, 3), 1),           # a strided subset
])
def test_as_strided_reads_the_input(size, stride, offset):
    x = torch.randn(24)
    model = Fn(lambda m, x: torch.as_strided(x * 1.5, size, stride, offset) + 1.0)
    compiled(model, x)


def test_as_strided_out_of_bounds_is_a_clear_error():
    model = Fn(lambda m, x: torch.as_strided(x * 1.5, (3, 3), (4, 1), 20))     # eager reads past x's storage
    with pytest.raises(KfuseError, match="outside"):
        kfuse.compile(model, (torch.randn(24),))


def test_as_strided_of_a_transposed_tensor_reads_its_memory_order():
    """x.t().contiguous() has x.t()'s elements in row-major memory; a transposed view of x reads
    x's memory: the read must follow the traced strides, not the logical order."""
    model = Fn(lambda m, x: (x * 2.0).t().contiguous().as_strided((3, 4), (1, 3)) + 0.5)
    compiled(model, torch.randn(4, 3))
