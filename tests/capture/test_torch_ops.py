"""Each ATen op the PyTorch frontend handles: captured, checked, and run by the reference interpreter
against eager on odd shapes."""
import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL_TOL, assert_close, module_of

import kfuse
from kfuse.capture.fx import export
from kfuse.ops.reference import run


def r(*shape):
    return torch.randn(*shape)


CASES = {
    "add_sub_mul_div": (lambda x, y: (x + y * 2 - y / 3) * x - 1.5, [r(7, 5), r(5)]),
    "rsub_pow": (lambda x: 1 - x.pow(2) + 2 ** x + x ** x.abs(), [r(3, 7)]),
    "unary": (lambda x: (x.exp() + x.abs().log() + x.abs().sqrt() + x.abs().rsqrt() + x.reciprocal()
                         + x.sin() + x.cos() + x.tanh() + x.sigmoid() + torch.erf(x) + x.relu() + F.silu(x)
                         + x.floor() + x.ceil() + x.neg() + x.sign()), [r(7, 9)]),
    "gelu": (lambda x: F.gelu(x) + F.gelu(x, approximate="tanh"), [r(1, 127)]),
    "clamp_leaky_softplus": (lambda x: x.clamp(-0.5, 0.7) + F.leaky_relu(x, 0.1) + F.softplus(x) + F.hardtanh(x), [r(13)]),
    "compare_where": (lambda x, y: torch.where((x > y) & (x <= 1) | ~(y != 0.5), x, y * 2), [r(4, 6), r(4, 6)]),
    "masked_fill": (lambda x, m: x.masked_fill(m, -1e9), [r(2, 3, 5), torch.rand(2, 1, 5) > 0.5]),
    "cast": (lambda x: (x > 0).float() + x.to(torch.int64).float(), [r(5, 5) * 3]),
    "view_permute_transpose": (lambda x: x.view(2, 3, 4, 5).permute(0, 2, 1, 3).transpose(1, 3).reshape(-1, 6), [r(6, 20)]),
    "unsqueeze_squeeze_expand": (lambda x: x.unsqueeze(1).expand(3, 4, 5).squeeze(0) * 2, [r(3, 5)]),
    "slice_select_split": (lambda x: x[:, 1:5:2].sum(-1) + x[:, -2:].sum(-1) + x[:, 3] + x[1, 2]
                           + x.split(3, dim=1)[1].sum(), [r(4, 7)]),
    "cat_chunk": (lambda x: torch.cat([x.chunk(2, -1)[1], x.chunk(2, -1)[0]], -1), [r(3, 8)]),
    "embedding": (lambda idx, w: F.embedding(idx, w), [torch.tensor([[1, 0, 3]]), r(5, 4)]),
    "index_select_index": (lambda x, i: x.index_select(1, i) + x[:, i], [r(3, 6), torch.tensor([5, 0, 2])]),
    "pad": (lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), [r(2, 3, 4)]),
    "triu_tril": (lambda x: x.triu(1) + x.tril(-1), [r(5, 7)]),
    "arange_full": (lambda x: x + torch.arange(x.shape[-1]) + torch.full((x.shape[-1],), 2.0) + torch.zeros(1)
                    + torch.ones(1), [r(3, 4)]),
    "reductions": (lambda x: (x.mean(-1, keepdim=True) + x.sum(1, keepdim=True) + x.amax(-1, keepdim=True)
                              + x.amin(-1, keepdim=True) + x.var(-1, keepdim=True) + x.mean() + x.sum()), [r(5, 7)]),
    "var_mean_max": (lambda x: torch.var_mean(x, -1, correction=0)[0] + x.max(-1)[0] + x.argmax(-1).float(), [r(4, 9)]),
    "softmax": (lambda x: torch.softmax(x, -1) + torch.log_softmax(x, 1) + torch.softmax(x, 0), [r(3, 5, 7)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (7,), w, b, 1e-5) + F.layer_norm(x, (5, 7)), [r(3, 5, 7), r(7), r(7)]),
    "cumsum": (lambda x: x.cumsum(1), [r(3, 6)]),
    "matmul_bmm_linear": (lambda a, b, w: a @ b + F.linear(a @ b, w), [r(2, 5, 7), r(2, 7, 3), r(3, 3)]),
    "matmul_broadcast": (lambda a, b: a @ b, [r(2, 3, 5, 7), r(7, 4)]),
    "addmm": (lambda x, w, bias: F.linear(x, w, bias), [r(5, 7), r(3, 7), r(3)]),
    "conv_pool": (lambda x, w: F.avg_pool2d(F.max_pool2d(F.conv2d(x, w, padding=1, stride=2), 2), 2, 1)
                  + F.adaptive_avg_pool2d(x[:, :1], 1).mean(), [r(1, 3, 17, 17), r(4, 3, 3, 3)]),
    "conv_groups_dilation": (lambda x, w: F.conv2d(x, w, padding=2, dilation=2, groups=2), [r(2, 4, 9, 9), r(4, 2, 3, 3)]),
    "batch_norm": (None, None),
    "sdpa": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
             [r(2, 3, 7, 8), r(2, 3, 9, 8), r(2, 3, 9, 8), r(2, 1, 1, 9)]),
    "sdpa_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    [r(1, 2, 5, 8), r(1, 2, 5, 8), r(1, 2, 5, 8)]),
    "div_floor": (lambda x: torch.div(x, 3, rounding_mode="floor") + torch.div(x, 3, rounding_mode="trunc"), [r(9) * 10]),
}


def _bn_model():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m, [r(2, 3, 8, 8)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_capture_matches_eager(name):
    fn, inputs = CASES[name]
    model, inputs = _bn_model() if name == "batch_norm" else (module_of(fn), inputs)
    graph, _ = export(model, tuple(inputs))
    graph.check()
    got = run(graph, inputs)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*inputs))
    assert_close(got, want, **SMALL_TOL)


def test_unsupported_op_names_op_and_node():
    model = module_of(lambda x: x + torch.randn_like(x))
    with pytest.raises(kfuse.UnsupportedOpError) as e:
        export(model, (r(4, 4),))
    assert "randn_like" in str(e.value) and "node" in str(e.value) and "draws random numbers" in str(e.value)
    assert isinstance(e.value, kfuse.KfuseError)
