"""Built-in CNNs beyond ResNet-50 and MobileNetV2, written from the published architectures (torchvision's
layouts, which follow the papers; nothing is imported from torchvision): MobileNetV3-Large,
EfficientNet-B0, ConvNeXt-Tiny, RegNetY-1.6GF, and a small diffusion-style UNet (GroupNorm + SiLU + conv).

Each class takes `classes` and `image` (the side of the example input `build` makes). Dropout and
stochastic depth are identities in eval mode and are left out.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% down (the MobileNet rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn(cin, cout, k, stride=1, groups=1, act=None):
    """Conv (no bias, 'same' padding for odd k) + BatchNorm + an optional activation module."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act) if act is not None else nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global average, 1x1 conv down + act, 1x1 conv up + gate,
    the input scaled per channel. The gate is sigmoid (EfficientNet, RegNetY) or hardsigmoid (MobileNetV3)."""

    def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


# -- MobileNetV3-Large ----------------------------------------------------------------------------------------

class MBV3Block(nn.Module):
    """MobileNetV3 bottleneck: 1x1 expand (when wider), kxk depthwise, optional SE (hardsigmoid gate,
    squeeze = expanded/4 rounded to 8), 1x1 project; residual when the shape is kept."""

    def __init__(self, cin, k, expanded, cout, se, act, stride):
        super().__init__()
        act = nn.Hardswish if act == "HS" else nn.ReLU
        layers = [conv_bn(cin, expanded, 1, act=act())] if expanded != cin else []
        layers.append(conv_bn(expanded, expanded, k, stride, groups=expanded, act=act()))
        if se:
            layers.append(SqueezeExcite(expanded, make_divisible(expanded // 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(conv_bn(expanded, cout, 1))
        self.body = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.use_res else self.body(x)


MBV3_LARGE = [  # (in, kernel, expanded, out, SE, activation, stride): Howard et al. 2019, table 1
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
]


class MobileNetV3(nn.Module):
    """MobileNetV3-Large (Howard et al. 2019): hardswish, SE with a hardsigmoid gate, 62 convolutions
    (46 with a BatchNorm, 16 in the 8 SE blocks), a two-layer head with hardswish."""

    def __init__(self, classes=1000, image=224):
        super().__init__()
        self.image = image
        blocks = [conv_bn(3, 16, 3, 2, act=nn.Hardswish())]
        blocks += [MBV3Block(*cfg) for cfg in MBV3_LARGE]
        blocks.append(conv_bn(160, 960, 1, act=nn.Hardswish()))
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Linear(1280, classes))

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# -- EfficientNet-B0 ------------------------------------------------------------------------------------------

class MBConv(nn.Module):
    """EfficientNet MBConv: 1x1 expand + SiLU (ratio > 1), kxk depthwise + SiLU, SE (sigmoid gate,
    squeeze = input channels / 4, SiLU), 1x1 project; residual when the shape is kept (stochastic
    depth is an identity in eval)."""

    def __init__(self, expand, k, stride, cin, cout):
        super().__init__()
        hidden = make_divisible(cin * expand)
        layers = [conv_bn(cin, hidden, 1, act=nn.SiLU())] if hidden != cin else []
        layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU()),
                   SqueezeExcite(hidden, max(1, cin // 4), nn.SiLU, nn.Sigmoid), conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.use_res else self.body(x)


EFFICIENTNET_B0 = [  # (expand ratio, kernel, stride, in, out, layers): Tan & Le 2019, table 1
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
]


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 (Tan & Le 2019): 16 MBConv blocks with SiLU and SE, 81 convolutions (49 with a
    BatchNorm, 32 in the SE blocks)."""

    def __init__(self, classes=1000, image=224):
        super().__init__()
        self.image = image
        blocks = [conv_bn(3, 32, 3, 2, act=nn.SiLU())]
        for expand, k, stride, cin, cout, n in EFFICIENTNET_B0:
            blocks += [MBConv(expand, k, stride if i == 0 else 1, cin if i == 0 else cout, cout) for i in range(n)]
        blocks.append(conv_bn(320, 1280, 1, act=nn.SiLU()))
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# -- ConvNeXt-Tiny --------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, by permuting to NHWC and back (torchvision's)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, then channels-last: LayerNorm, Linear 4x, GELU, Linear back, layer scale
    (one value per channel); residual."""

    def __init__(self, dim):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.layer_scale * self.down(F.gelu(self.up(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    """ConvNeXt-T (Liu et al. 2022): a 4x4 stride-4 patchify stem, stages of 3, 3, 9, 3 blocks at
    96, 192, 384, 768 channels, LayerNorm + 2x2 stride-2 convs between them; 22 convolutions."""

    def __init__(self, classes=1000, image=224, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)):
        super().__init__()
        self.image = image
        layers = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (dim, n) in enumerate(zip(dims, depths)):
            if i > 0:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [ConvNeXtBlock(dim) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.norm = LayerNorm2d(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.fc(self.norm(F.adaptive_avg_pool2d(self.features(x), 1)).flatten(1))


# -- RegNetY-1.6GF --------------------------------------------------------------------------------------------

class RegNetYBlock(nn.Module):
    """RegNet Y block (bottleneck ratio 1): 1x1, 3x3 grouped conv (group width 24, carrying the stride),
    SE (squeeze = a quarter of the block's input width), 1x1; shortcut projected (1x1 + BN) when the
    shape changes; ReLU after the residual add."""

    def __init__(self, cin, cout, stride, group_width=24, se_ratio=0.25):
        super().__init__()
        self.a = conv_bn(cin, cout, 1, act=nn.ReLU())
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width, act=nn.ReLU())
        self.se = SqueezeExcite(cout, int(round(se_ratio * cin)))
        self.c = conv_bn(cout, cout, 1)
        self.proj = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.c(self.se(self.b(self.a(x))))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class RegNetY16GF(nn.Module):
    """RegNetY-1.6GF (Radosavovic et al. 2020): w0 48, wa 20.71, wm 2.65, depth 27, group width 24 give
    stages of 2, 6, 17, 2 blocks at widths 48, 120, 336, 888 (every stage starts with stride 2);
    140 convolutions (86 with a BatchNorm, 54 in the SE blocks)."""

    def __init__(self, classes=1000, image=224, widths=(48, 120, 336, 888), depths=(2, 6, 17, 2)):
        super().__init__()
        self.image = image
        blocks, cin = [conv_bn(3, 32, 3, 2, act=nn.ReLU())], 32
        for w, n in zip(widths, depths):
            for i in range(n):
                blocks.append(RegNetYBlock(cin, w, 2 if i == 0 else 1))
                cin = w
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# -- a small diffusion-style UNet -------------------------------------------------------------------------

class ResBlock(nn.Module):
    """The diffusion UNet residual block (Ho et al. 2020, Stable Diffusion's ResnetBlock2D without the
    time embedding): GroupNorm(32) + SiLU + 3x3 conv, twice; 1x1 conv on the shortcut when the channels change."""

    def __init__(self, cin, cout, groups=32):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class UNet(nn.Module):
    """A small UNet of diffusion ResBlocks: conv in, ResBlock + 3x3 stride-2 downsample, ResBlock at half
    size (wider), a middle ResBlock, nearest 2x upsample + 3x3 conv, concatenation with the skip,
    ResBlock, GroupNorm + SiLU + conv out; 14 convolutions."""

    def __init__(self, channels=3, width=64, image=64):
        super().__init__()
        self.image = image
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down1, self.down = ResBlock(width, width), nn.Conv2d(width, width, 3, 2, 1)
        self.down2, self.mid = ResBlock(width, 2 * width), ResBlock(2 * width, 2 * width)
        self.up_conv = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up1 = ResBlock(3 * width, width)
        self.norm_out, self.conv_out = nn.GroupNorm(32, width), nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x):
        skip = self.down1(self.conv_in(x))
        h = self.mid(self.down2(self.down(skip)))
        h = self.up_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat((h, skip), dim=1))
        return self.conv_out(F.silu(self.norm_out(h)))
