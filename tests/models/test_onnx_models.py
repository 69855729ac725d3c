"""Whole models through the ONNX frontend: the built-in models and tiny Hugging Face models, each
exported by both torch.onnx exporters with dynamic batch/sequence dims, loaded at two shapes and
run by the reference interpreter; outputs must match ONNX Runtime on the same file and PyTorch eager."""
import warnings

import pytest
import torch

from kfuse.capture.onnx import load_onnx
from kfuse.models import build, token_inputs
from kfuse.ops.reference import run

from helpers import REFERENCE_REL, hf_model

ort = pytest.importorskip("onnxruntime")

VOCAB = 100
BUILTIN = {
    "bert": dict(layers=2, hidden=64, heads=4, ffn=128, vocab=VOCAB),
    "gpt2": dict(layers=2, hidden=64, heads=4, vocab=VOCAB),
    "llama": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=VOCAB),
    "cnn": {},
}
HF = [f"hf_{arch}_{attn}" for arch in ("bert", "gpt2", "llama") for attn in ("eager", "sdpa")]
SHAPES = [(2, 8), (3, 13)]  # (batch, seq); the export traces the first, the second is a reload
EXPORTERS = ["dynamo", "torchscript"]


class _LastHidden(torch.nn.Module):
    """A Hugging Face model as a function of (input_ids, attention_mask) -> last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _hf_model(name):
    pytest.importorskip("transformers")
    _, kind, attn = name.split("_")
    return _LastHidden(hf_model(kind, attn)).eval()


def _model(name):
    if name.startswith("hf_"):
        return _hf_model(name)
    return build(name, 1, 1, **BUILTIN[name])[0]


def _inputs(name, batch, seq):
    if name == "cnn":
        return [torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))]
    return list(token_inputs(batch, seq, VOCAB, seed=batch))  # rows > 0 end in padding


def _export(model, name, exporter, path):
    args = tuple(_inputs(name, *SHAPES[0]))
    names = ["x"] if name == "cnn" else ["input_ids", "attention_mask"]
    axes = {0: "batch"} if name == "cnn" else {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {i: torch.export.Dim(n) for i, n in axes.items()}
            torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=tuple(dims for _ in names),
                              input_names=names, output_names=["out"])
        else:
            torch.onnx.export(model, args, path, dynamo=False, dynamic_axes={n: axes for n in names},
                              input_names=names, output_names=["out"])


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(name, exporter) -> (model, path of the exported file); each export runs once a session.
    An export that fails skips its cases, with the exporter's error as the reason."""
    folder, cache = tmp_path_factory.mktemp("onnx_exports"), {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            model, path = _model(name), folder / f"{name}_{exporter}.onnx"
            try:
                _export(model, name, exporter, path)
                cache[name, exporter] = (model, path, None)
            except Exception as e:  # the exporter's own failure, reported as the skip reason
                cache[name, exporter] = (model, path, f"{exporter} export of {name} failed: {type(e).__name__}: {e}")
        model, path, failure = cache[name, exporter]
        if failure:
            pytest.skip(failure[:500])
        return model, path
    return get


def _rel_err(got, expected):
    """max |got - expected| / max |expected|: the error relative to the output's scale (Verification.max_rel)."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s[0]}s{s[1]}")
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", [*BUILTIN, *HF])
def test_exported_model_matches(exported, name, exporter, shape):
    model, path = exported(name, exporter)
    xs = _inputs(name, *shape)
    g = load_onnx(path, xs)
    g.check()
    assert g.input_names == (["x"] if name == "cnn" else ["input_ids", "attention_mask"])
    assert g.output_names == ["out"]
    assert all(i.shape == tuple(x.shape) for i, x in zip(g.inputs, xs))

    (got,) = run(g, xs)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ort_out,) = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})
    with torch.no_grad():
        eager = model(*xs)
    assert got.shape == eager.shape
    assert _rel_err(got, torch.from_numpy(ort_out)) < REFERENCE_REL
    assert _rel_err(got, eager) < REFERENCE_REL
