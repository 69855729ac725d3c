"""Small built-in models with seeded random weights, for the demo, the tests and the benchmarks.

Each `build(name, ...)` returns (module in eval mode, example inputs). Nothing is downloaded.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cnn import ConvNeXtTiny, EfficientNetB0, MobileNetV3, RegNetY16GF, UNet


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, ffn, eps=1e-12):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.o = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        b, s, h = x.shape
        d = h // self.heads

        def split(t):
            return t.view(b, s, self.heads, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + mask
        ctx = torch.matmul(self.drop(torch.softmax(scores, dim=-1)), v)
        ctx = ctx.transpose(1, 2).reshape(b, s, h)
        x = self.ln1(x + self.drop(self.o(ctx)))
        return self.ln2(x + self.drop(self.down(F.gelu(self.up(x)))))


class Bert(nn.Module):
    """BERT-style encoder, MiniLM-sized by default: post-LayerNorm, GELU(erf), additive padding mask."""

    def __init__(self, vocab=1000, hidden=384, layers=6, heads=12, ffn=1536, max_pos=512):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.typ = nn.Embedding(2, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device)
        x = self.ln(self.tok(input_ids) + self.pos(pos)[None] + self.typ.weight[0])
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask)
        return x


class GPT2Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.fc, self.out = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x, mask):
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d).transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d)) + mask
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(ctx)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2-style causal decoder: pre-LayerNorm, fused QKV linear, GELU(tanh), causal + padding mask."""

    def __init__(self, vocab=1000, hidden=384, layers=6, heads=6, max_pos=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(max_pos, hidden)
        self.blocks = nn.ModuleList(GPT2Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(s, device=input_ids.device))[None]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ln_f(x)


class RMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LlamaLayer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, heads * self.d, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, hidden, bias=False)
        self.gate, self.up = nn.Linear(hidden, ffn, bias=False), nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)
        self.n1, self.n2 = RMSNorm(hidden), RMSNorm(hidden)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, s, self.heads, self.d).transpose(1, 2)
        k = self.k(h).view(b, s, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(h).view(b, s, self.kv_heads, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d) + mask
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, -1)
        x = x + self.o(ctx)
        return x + self.down(F.silu(self.gate(self.n2(x))) * self.up(self.n2(x)))


class Llama(nn.Module):
    """Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, causal mask."""

    def __init__(self, vocab=1000, hidden=512, layers=8, heads=8, kv_heads=2, ffn=1408, theta=10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(LlamaLayer(hidden, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        d = hidden // heads
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        x = self.embed(input_ids)
        freqs = torch.arange(s, dtype=torch.float32, device=x.device)[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[None, None], emb.sin().to(x.dtype)[None, None]   # bfloat16 models: as HF's
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class CNN(nn.Module):
    """Small CNN: conv + BatchNorm + ReLU, a depthwise-separable block, pooling, a linear head."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bn3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn3(self.pw(F.relu(self.bn2(self.dw(x))))))
        x = F.relu(self.conv3(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (with the stride), 1x1 expand, BatchNorm after each,
    residual add, ReLU; a 1x1 conv + BN on the shortcut where the shape changes."""

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016, torchvision's v1.5 layout): 53 convolutions, 16 bottlenecks."""

    def __init__(self, classes=1000, image=224):
        super().__init__()
        self.image = image
        self.stem, self.bn = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for k in range(n):
                blocks.append(Bottleneck(cin, width, stride if k == 0 else 1))
                cin = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 3, 2, 1)
        x = self.blocks(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 project; residual when shapes match."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x) if self.use_res else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), width 1.0: depthwise-separable inverted residuals, ReLU6."""

    def __init__(self, classes=1000, image=224):
        super().__init__()
        self.image = image
        blocks, cin = [_conv_bn(3, 32, 3, 2)], 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)):
            for k in range(n):
                blocks.append(InvertedResidual(cin, c, s if k == 0 else 1, t))
                cin = c
        blocks.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _randomise(model: nn.Module, seed: int):
    """Seeded weights, with BatchNorm statistics and norm scales away from their trivial values (drawn
    on the CPU, whatever torch's default device: the same weights everywhere)."""
    g = torch.Generator().manual_seed(seed)
    cpu = {"generator": g, "device": "cpu"}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, **cpu) / math.sqrt(p[0].numel()))  # fan-in scaling
            else:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, **cpu))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, **cpu))
                m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, **cpu))
    return model.eval()


def token_inputs(batch, seq, vocab=1000, seed=0, pad=True):
    """Token ids and a padding mask: with `pad`, row i (i > 0) ends in i*3 padding positions. Drawn on
    the CPU, returned on torch's default device."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g, device="cpu")
    mask = torch.ones(batch, seq, dtype=torch.int64, device="cpu")
    if pad:
        for i in range(1, batch):
            mask[i, max(1, seq - 3 * i):] = 0
    device = torch.get_default_device()
    return ids.to(device), mask.to(device)


MODELS = {"bert": Bert, "gpt2": GPT2, "llama": Llama, "cnn": CNN, "resnet50": ResNet50, "mobilenetv2": MobileNetV2,
          "mobilenetv3": MobileNetV3, "efficientnet_b0": EfficientNetB0, "convnext_tiny": ConvNeXtTiny,
          "regnety_1_6gf": RegNetY16GF, "unet": UNet}
IMAGE_MODELS = {"cnn": 32, "resnet50": 224, "mobilenetv2": 224, "mobilenetv3": 224, "efficientnet_b0": 224,
                "convnext_tiny": 224, "regnety_1_6gf": 224, "unet": 64}   # input side length (`image=` overrides it)
CNN_MODELS = ("resnet50", "mobilenetv2", "mobilenetv3", "efficientnet_b0", "convnext_tiny", "regnety_1_6gf", "unet")


def build(name: str, batch: int = 1, seq: int = 128, seed: int = 0, **config):
    """(model, example_inputs) for a built-in model; `config` overrides its size arguments."""
    if name not in MODELS:
        raise KeyError(f"unknown built-in model {name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    model = _randomise(MODELS[name](**config), seed)
    if name in IMAGE_MODELS:
        side = getattr(model, "image", IMAGE_MODELS[name])
        g = torch.Generator().manual_seed(seed + 1)
        return model, (torch.randn(batch, 3, side, side, generator=g, device="cpu").to(torch.get_default_device()),)
    vocab = config.get("vocab", 1000)
    return model, token_inputs(batch, seq, vocab, seed + 1)
