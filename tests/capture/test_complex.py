"""Complex tensors in a model (kfuse/capture/complex.py): carried as (real, imaginary) pairs, so rotary
embeddings written with complex numbers (Meta's Llama code, torchtitan, Hugging Face's Llama 4, diffusers'
Lumina with its table as an input) compile and give eager's numbers; complex outputs and ops not mapped are
clear errors."""
import math
import warnings

import pytest
import torch
from torch import nn

import kfuse
from kfuse.capture.fx import export
from kfuse.errors import UnsupportedOpError


def freqs_cis(dim, seq, theta=10000.0, dtype=torch.float32):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype)[: dim // 2] / dim))
    freqs = torch.outer(torch.arange(seq, dtype=dtype), freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


class TitanRope(nn.Module):
    """torchtitan's Llama attention front: q and k projected, rotated by a complex buffer, then attention"""

    def __init__(self, heads=3, dim=10, seq=16):
        super().__init__()
        self.h, self.d = heads, dim
        self.wq, self.wk, self.wv = (nn.Linear(heads * dim, heads * dim) for _ in range(3))
        self.register_buffer("freqs_cis", freqs_cis(dim, seq), persistent=False)

    @staticmethod
    def rotate(x, fc):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * fc).flatten(3).type_as(x)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, self.h, self.d) for f in (self.wq, self.wk, self.wv))
        fc = self.freqs_cis[:s].view(1, s, 1, self.d // 2)
        q, k = self.rotate(q, fc), self.rotate(k, fc)
        y = nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        return y.transpose(1, 2).reshape(b, s, -1)


class PolarInForward(nn.Module):
    """Llama 4's form: the rotation made in forward from the positions, by torch.polar"""

    def forward(self, x, pos):
        inv = 1.0 / (500000.0 ** (torch.arange(0, x.shape[-1], 2).float() / x.shape[-1]))
        freqs = pos[:, :, None].float() * inv
        fc = torch.polar(torch.ones_like(freqs), freqs)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * fc[:, :, None, :]).flatten(3)


def test_torchtitan_rope_attention_matches_eager_on_fresh_inputs():
    m = TitanRope().eval()
    cm = kfuse.compile(m, (torch.randn(2, 7, 30),))
    for seed in (1, 2):
        x = torch.randn(2, 7, 30, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-5)
    assert cm.verify(x).ok


def test_the_rotated_tensor_is_not_concatenated():
    """The complex multiply reads the rotated tensor's pairs through slices and swaps the pairs of the smaller
    operand (the rotary table): the only concatenations in the graph are the table's size, none of q's."""
    concats = lambda graph: [math.prod(n.shape) for n in graph.nodes if n.op == "concat"]
    graph, _ = export(TitanRope().eval(), (torch.randn(2, 7, 30),))
    assert max(concats(graph), default=0) <= 7 * 5 * 2           # (a constant table: folded at capture)
    x, pos = torch.randn(2, 5, 3, 12), torch.arange(5).expand(2, 5).contiguous()
    graph, _ = export(PolarInForward(), (x, pos))
    assert concats(graph) and max(concats(graph)) <= 2 * 5 * 6 * 2 < x.numel(), concats(graph)


def test_polar_made_in_forward_from_an_input():
    m = PolarInForward()
    x, pos = torch.randn(2, 5, 3, 12), torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 100, 2]])
    cm = kfuse.compile(m, (x, pos))
    x[0, 1, 2, 3] = math.nan        # the NaN stays in its own pair's two outputs
    torch.testing.assert_close(cm(x, pos), m(x, pos), rtol=1e-5, atol=1e-5, equal_nan=True)


def test_through_torch_compile():
    """compiled by kfuse, not handed back to torch (which warns)"""
    m = TitanRope().eval()
    f = torch.compile(m, backend="kfuse")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in (5, 9):
            x = torch.randn(1, s, 30)
            torch.testing.assert_close(f(x), m(x), rtol=1e-5, atol=1e-5)


class Ops(nn.Module):
    """The other mapped ops: torch.complex, conj, abs, add / sub (complex and real), div by a real, neg,
    sum, mean, Python complex numbers, cat, permute, transpose, unsqueeze, squeeze, select, slice, expand,
    a complex128 constant"""

    def __init__(self):
        super().__init__()
        self.register_buffer("c64", torch.complex(torch.randn(5, 1, 4), torch.randn(5, 1, 4)).to(torch.complex128))

    def forward(self, a, b):
        z = torch.complex(a, b)                                     # [3, 5, 4]
        w = (z.conj() * z - z / 2.0 + a - (-z)).permute(1, 0, 2)     # [5, 3, 4]
        w = torch.cat([w, w.transpose(0, 1).reshape(5, 3, 4)], 1)   # [5, 6, 4]
        w = w.unsqueeze(1)[:, 0, 1:5, ::2].expand(2, 5, 4, 2)        # [2, 5, 4, 2]
        u = w[1] * self.c64.squeeze(1)[:, :, None].to(torch.complex64)[:, :4]
        v = a.to(torch.complex64) * z          # a real tensor made complex
        s = (z * (1 + 2j) - (0.5 - 1j)).sum(1) + z.mean((0, -2), keepdim=True)[0]      # Python complex numbers
        return (torch.view_as_real(u), z.abs(), torch.view_as_real(w.select(-1, 0)), torch.view_as_real(v),
                torch.view_as_real(s))


def test_other_mapped_ops():
    m = Ops()
    a, b = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    cm = kfuse.compile(m, (a, b))
    for got, want in zip(cm(a, b), m(a, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class ComplexOut(nn.Module):
    def forward(self, x):
        return torch.view_as_complex(x) * 2


class Unmapped(nn.Module):
    def forward(self, x):
        return torch.view_as_real(torch.exp(torch.view_as_complex(x)))


class RotaryTableIn(nn.Module):
    """diffusers' Lumina-Next form: the pipeline computes the complex rotation and passes it in"""

    def forward(self, x, freqs_cis):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


def test_a_complex_input_is_fed_as_its_pairs(tmp_path):
    """a complex input reaches the program as torch.view_as_real's view of it (no copy): eager's numbers for
    contiguous and transposed tables, from a saved artifact too, through torch.compile as well, and a real
    tensor in its place is an InputError"""
    m, x = RotaryTableIn(), torch.randn(2, 7, 3, 10)
    f = torch.polar(torch.ones(7, 5), torch.randn(7, 5))
    cm = kfuse.compile(m, (x, f))
    cm.save(tmp_path / "m.kfuse")
    moved = torch.polar(torch.ones(5, 7), torch.randn(5, 7)).t()
    for c in (cm, kfuse.load(tmp_path / "m.kfuse"), torch.compile(m, backend="kfuse")):
        for table in (f, moved):
            with torch.no_grad():
                torch.testing.assert_close(c(x, table), m(x, table), rtol=1e-6, atol=1e-6)
    assert cm.verify(x, f).ok
    x9, f9 = torch.randn(1, 9, 3, 10), torch.polar(torch.ones(9, 5), torch.randn(9, 5))    # another shape
    torch.testing.assert_close(cm(x9, f9), m(x9, f9), rtol=1e-6, atol=1e-6)
    with pytest.raises(kfuse.InputError, match="has dtype torch.float32, compiled for torch.complex64"):
        cm(x, f.real.contiguous())


@pytest.mark.parametrize("model,x,match", [
    (ComplexOut(), torch.randn(4, 2), "'output'.*complex output.*view_as_real"),
    (Unmapped(), torch.randn(4, 2), "'aten.exp.default'.*on a complex tensor"),
])
def test_what_is_not_mapped_is_a_clear_error(model, x, match):
    with pytest.raises(UnsupportedOpError, match=match):
        kfuse.compile(model, (x,))


class Spectrogram(nn.Module):
    """An audio front end: a Hann-windowed torch.stft, the power spectrum, a mel-like projection and log,
    then a convolution (a model's spectrogram computed inside it)"""

    def __init__(self, n_fft=64, hop=16, bins=12):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft))
        self.mel = nn.Parameter(torch.rand(n_fft // 2 + 1, bins))
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, wav):
        spec = torch.stft(wav, self.n_fft, self.hop, window=self.window, return_complex=True)
        power = spec.abs() ** 2
        logmel = torch.log(power.transpose(1, 2) @ self.mel + 1e-6)
        return torch.relu(self.conv(logmel.unsqueeze(1)))


class FourierMix(nn.Module):
    """FNet's token mixing (the real part of a 2-d FFT over sequence and hidden), then a residual LayerNorm"""

    def __init__(self, d=24):
        super().__init__()
        self.ln, self.ff = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return self.ln(x + torch.fft.fftn(x, dim=(1, 2)).real) + self.ff(x)


class FftForms(nn.Module):
    """every FFT form and normalisation: rfft cut and padded (n), its inverse, ifft, 2-d, imag, a complex
    product between the transforms (an FFT convolution)"""

    def forward(self, x, k):
        conv = torch.fft.irfft(torch.fft.rfft(x, n=64) * torch.fft.rfft(k, n=64), n=64)[..., :x.shape[-1]]
        a = torch.fft.rfft(x, n=20, norm="ortho").abs()
        b = torch.fft.ifft(torch.fft.fft(x, norm="forward"), norm="forward")
        c = torch.fft.irfft2(torch.fft.rfft2(x), s=x.shape[-2:])
        d = torch.fft.fft2(x, norm="ortho").imag
        return conv + b.real + c + d, a


@pytest.mark.parametrize("model,inputs", [
    (Spectrogram(), (torch.randn(2, 400),)),
    (FourierMix(), (torch.randn(2, 9, 24),)),
    (FftForms(), (torch.randn(3, 5, 33), torch.randn(3, 5, 7))),
])
def test_fft_models_match_eager(model, inputs):
    """torch.fft and torch.stft run as the IR's fft op (torch's own FFTs) between fused kernels: eager's
    numbers on fresh inputs, through kfuse.compile and torch.compile"""
    model = model.eval()
    cm = kfuse.compile(model, inputs)
    assert "fft" in [k.name for k in cm.report().kernels]
    tc = torch.compile(model, backend="kfuse")
    for seed in (1, 2):
        torch.manual_seed(seed)
        fresh = tuple(torch.randn_like(t) * 3 for t in inputs)
        with torch.no_grad():
            want = model(*fresh)
            for got in (cm(*fresh), tc(*fresh)):
                for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    assert cm.verify(*inputs).ok


def test_fft_of_nan_and_inf_spreads_as_torch():
    """a NaN or Inf sample spreads over its row's spectrum as torch's FFT spreads it"""
    x = torch.randn(3, 16)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    m = FftForms().eval()
    k = torch.randn(3, 7)
    cm = kfuse.compile(m, (x, k))
    for g, w in zip(cm(x, k), m(x, k)):
        assert torch.equal(g.isnan(), w.isnan())
        torch.testing.assert_close(g.nan_to_num(0, 0, 0), w.nan_to_num(0, 0, 0), rtol=1e-4, atol=1e-3)
