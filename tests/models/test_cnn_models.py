"""The built-in CNN families (kfuse/models/cnn.py) at 64x64, batch 1: through torch.export against
eager, and through the ONNX path (dynamo exporter) against ONNX Runtime, with their fusion counts.
ResNet-50 and MobileNetV2 are tested in tests/fusion/test_conv.py."""
import pytest
import torch
from helpers import assert_verified, compiled, conv_pairs

import kfuse
from kfuse.cli import main
from kfuse.models import CNN_MODELS, build

# A whole CNN through oneDNN convolutions (sums reordered, dozens of layers): the verify table's
# float32 tolerance, as tests/fusion/test_conv.py holds ResNet-50 and MobileNetV2
MODEL_TOL = {"rtol": 1e-4, "atol": 1e-4}

EXPECTED = {
    # 62 convs: 46 with a BatchNorm, 16 in 8 SE blocks, each block one squeeze_excite op (its mean, two
    # 1x1 convs, ReLU, hardsigmoid gate and scale); the 11 ReLU convs of the blocks take their ReLU;
    # hardswish and hardsigmoid, captured as add/clamp/div/mul, are named again by a fold rule (29: 20 on
    # convs, 8 SE gates, 1 after the classifier's first linear); the 14 blocks with an expand 1x1 pair it
    # with their depthwise conv, the first block (none) its depthwise conv with the 1x1 projection, the 8
    # with SE their squeeze_excite op with the projection (counted as their halves: tests/helpers.conv_pairs)
    "mobilenetv3": dict(convs=46, bn=46, hard=29, se=8, pairs={"dw_pw": 1, "pw_dw": 14}, fusions={
        "conv_relu": 11, "conv_add": 10, "conv_hardswish": 20, "squeeze_excite": 8, "gemm_bias": 2}),
    # 81 convs: 49 with a BatchNorm, 32 in 16 SE blocks (16 squeeze_excite ops); every other SiLU rides on
    # its conv, 9 residual adds too; the 15 expand 1x1 convs pair with their depthwise conv
    "efficientnet_b0": dict(convs=49, bn=49, se=16, pairs={"dw_pw": 0, "pw_dw": 15},
                            fusions={"conv_silu": 33, "squeeze_excite": 16, "conv_add": 9, "gemm_bias": 1}),
    # 22 convs (stem, 18 depthwise 7x7, 3 downsamples), no BatchNorm; 23 LayerNorms as row kernels;
    # each block's MLP is a GEMM + GELU and a GEMM + bias (the 19th: the classifier), then its layer
    # scale and residual add in one kernel (channels-last: no transpose between them), or, before a
    # downsample, in the next LayerNorm's kernel
    "convnext_tiny": dict(convs=22, bn=0, layer_norms=23, fusions={"gemm_gelu": 18, "gemm_bias": 19,
                                                                   "elementwise_chain": 15, "add_layernorm": 3}),
    # 140 convs: 86 with a BatchNorm, 54 in 27 SE blocks (27 squeeze_excite ops); 27 residual adds + ReLU
    # ride on the last conv of their block
    "regnety_1_6gf": dict(convs=86, bn=86, se=27, fusions={"conv_relu": 55, "squeeze_excite": 27,
                                                            "conv_add_relu": 27, "gemm_bias": 1}),
    # 14 convs, 9 GroupNorms, each one channels-last group_norm op (C kernel) with its scale, shift and
    # SiLU (applied after the reshape back by the capture where too big to fold into the row form: taken
    # into the op by the rule group_norm_epilogue); 4 residual adds on the convs
    "unet": dict(convs=14, bn=0, group_norms=9, fusions={"group_norm": 9, "conv_add": 4}),
}

NEW = list(EXPECTED)
NO_PAIRS = {"dw_pw": 0, "pw_dw": 0}


def test_every_cnn_is_registered():
    assert set(NEW) <= set(CNN_MODELS)


@pytest.mark.parametrize("name", NEW)
def test_cnn_matches_eager_with_its_fusions(name):
    model, inputs = build(name, batch=1, image=64)
    cm = compiled(model, *inputs, **MODEL_TOL)
    assert_verified(cm.verify(*inputs), 1e-4)
    rep, ops, want = cm.report(), cm.graph.op_counts(), EXPECTED[name]
    assert ops["conv2d"] == want["convs"] and ops.get("squeeze_excite", 0) == want.get("se", 0), ops
    assert rep.rules.get("conv_bn_scale", 0) == rep.rules.get("conv_bn_shift", 0) == want["bn"], rep.rules
    assert "batch_norm" not in ops and not rep.fallbacks, rep.fallbacks
    assert rep.rules.get("hard_activations", 0) == want.get("hard", 0), rep.rules
    if "layer_norms" in want:
        assert ops["layer_norm"] == want["layer_norms"], ops
    assert ops.get("group_norm", 0) == want.get("group_norms", 0), ops
    assert conv_pairs(rep) == (want["fusions"], want.get("pairs", NO_PAIRS)), rep.fusions


# The ONNX path: the exporter folds BatchNorm itself; the GroupNorm of the UNet arrives as
# GroupNormalization (its scale and shift after the norm, taken into the group_norm op as on the torch path)
ONNX_FUSIONS = {
    "efficientnet_b0": EXPECTED["efficientnet_b0"]["fusions"],
    # the first block after each downsample keeps its layer scale and residual add apart (3 of 18)
    "convnext_tiny": {**EXPECTED["convnext_tiny"]["fusions"], "elementwise_chain": 13, "add_layernorm": 2},
    "unet": {"group_norm": 9, "conv_add": 4},
}


@pytest.mark.parametrize("name", list(ONNX_FUSIONS))
def test_cnn_through_onnx_matches_onnx_runtime(tmp_path, name):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model, (x,) = build(name, batch=1, image=64)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    cm = kfuse.compile(str(tmp_path / "m.onnx"), (x,))
    assert_verified(cm.verify(x), 1e-4)
    assert cm.graph.op_counts()["conv2d"] == EXPECTED[name]["convs"]
    assert conv_pairs(cm.report()) == (ONNX_FUSIONS[name], EXPECTED[name].get("pairs", NO_PAIRS)) \
        and not cm.report().fallbacks


def test_demo_choices_include_the_cnns(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in CNN_MODELS)


@pytest.mark.parametrize("name", ["mobilenetv3", "efficientnet_b0", "unet"])
def test_cnn_on_an_empty_batch(name):
    """Batch 0 through the squeeze-excitation, depthwise, GroupNorm and resize kernels: an empty output of
    eager's shape (torch's meta kernels reject an empty upsample; the resize reference answers itself)."""
    model, (x,) = build(name, batch=1, image=32)
    cm = kfuse.compile(model, (x[:0],))
    with torch.no_grad():
        assert cm(x[:0]).shape == model(x[:0]).shape
