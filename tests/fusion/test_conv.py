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
