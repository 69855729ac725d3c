"""Artifacts: cm.save(path) then kfuse.load(path) gives the same outputs bit for bit, in a fresh process
with no C compiler; any changed, missing or truncated byte is a KfuseError naming the file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kfuse
from kfuse import artifact, config
from kfuse.errors import InputError, KfuseError
from kfuse.models import build


@pytest.fixture(scope="module")
def bert_artifact(tmp_path_factory):
    model, inputs = build("bert", batch=1, seq=24, layers=2)
    cm = kfuse.compile(model, inputs)
    path = tmp_path_factory.mktemp("art") / "bert"
    cm.save(path)
    return cm, inputs, path


def test_load_gives_the_same_bits_and_the_same_report(bert_artifact):
    cm, inputs, path = bert_artifact
    cm2 = kfuse.load(path)
    assert torch.equal(cm(*inputs), cm2(*inputs))
    r1, r2 = cm.report(), cm2.report()
    assert r2.fusions == r1.fusions and r2.rules == r1.rules and r2.why_not == r1.why_not
    assert [k.backend for k in r2.kernels] == [k.backend for k in r1.kernels]
    assert not r2.fallbacks
    assert cm2.verify(*inputs).ok


def test_gated_linears_round_trip(tmp_path):
    """SwiGLU's gated GEMM (its own library source, glu=True) is saved and loaded like the others"""
    model, inputs = build("llama", batch=1, seq=16, layers=2)
    cm = kfuse.compile(model, inputs)
    cm.save(tmp_path / "llama")
    cm2 = kfuse.load(tmp_path / "llama")
    assert torch.equal(cm(*inputs), cm2(*inputs))
    assert cm2.report().fusions["gemm_swiglu"] == 2 and not cm2.report().fallbacks


@pytest.mark.parametrize("autotune, threads", [("1", None), ("0", None), ("1", "1")])
def test_fresh_process_without_a_compiler_uses_the_stored_libraries(bert_artifact, tmp_path, autotune, threads):
    """... and with KFUSE_AUTOTUNE=0 too: the choices the artifact carries, not each problem's first
    candidate (a loaded ResNet differed by 2e-6 from the saved program); and on one thread (a serving
    replica on one CPU): timed again there, a choice between kernels once gave other bits."""
    cm, inputs, path = bert_artifact
    torch.save(inputs, tmp_path / "inputs.pt")
    code = (
        "import sys, time, torch, kfuse\n"
        "inputs = torch.load(sys.argv[2])\n"
        "t = time.perf_counter(); cm = kfuse.load(sys.argv[1]); t = time.perf_counter() - t\n"
        "torch.save(cm(*inputs), sys.argv[3])\n"
        "timed = sum('(measured:' in k.schedule for k in cm.report().kernels)\n"
        "print(len(cm.report().fallbacks), 'kfuse.capture.fx' in sys.modules, timed, t)\n")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "KFUSE_CACHE_DIR": str(tmp_path / "empty-cache"),
           "KFUSE_AUTOTUNE": autotune, **({"KFUSE_NUM_THREADS": threads, "OMP_NUM_THREADS": threads} if threads else {})}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fallbacks, captured, timed, _ = out.stdout.split()
    # the choices the artifact carries are taken, none timed again (a process without a compiler has
    # another machine key; re-timing under load once picked another GEMM and other bits)
    assert fallbacks == "0" and captured == "False" and timed == "0"
    assert torch.equal(torch.load(tmp_path / "out.pt"), cm(*inputs))


LOAD_AND_RUN = """
import json, sys, torch, kfuse
cm = kfuse.load(sys.argv[1])
torch.save(cm(torch.load(sys.argv[2])), sys.argv[3])
print(json.dumps([[k.backend for k in cm.report().kernels], cm.report().fallbacks]))
"""


def _same_without_a_compiler(tmp_path, cm, x):
    """cm saved, loaded and called on x in a process with no C compiler and an empty kernel cache (untimed):
    the same kernels, none falling back, the same bits"""
    backends = [k.backend for k in cm.report().kernels]
    cm.save(tmp_path / "model")
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "KFUSE_CACHE_DIR": str(tmp_path / "empty-cache"),
           "KFUSE_AUTOTUNE": "0"}
    out = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tmp_path / "model"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, fallbacks = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == backends and fallbacks == []
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), cm(x))


def test_a_fused_convolution_pair_loads_without_a_compiler(tmp_path, monkeypatch):
    """A 1x1 -> depthwise pair as one kernel, made from the kernels of its two convolutions: the artifact
    carries their libraries too, so a process without a compiler makes the same fused kernel (it could
    not make the halves, split the pair and ran other kernels: a loaded MobileNetV2 differed by 2e-7)."""
    monkeypatch.setenv("KFUSE_AUTOTUNE", "0")        # untimed: the pair stays fused (its first candidate)
    monkeypatch.setattr(config, "_config", config.from_env())
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(8, 48, 1), torch.nn.ReLU6(),
                            torch.nn.Conv2d(48, 48, 3, padding=1, groups=48), torch.nn.ReLU6(),
                            torch.nn.Conv2d(48, 16, 1)).eval()
    x = torch.randn(1, 8, 14, 14)
    cm = kfuse.compile(m, (x,))
    backends = [k.backend for k in cm.report().kernels]
    assert {"c:gemm+depthwise", "c:depthwise+gemm"} & set(backends), backends
    _same_without_a_compiler(tmp_path, cm, x)


def test_3d_convolutions_on_our_kernels_round_trip(tmp_path, monkeypatch):
    """a 3-D convolution spanning one frame on our GEMM over the frames (backends.conv.FrameConv): its C
    source travels in the artifact, and a process with no C compiler runs it"""
    monkeypatch.setenv("KFUSE_AUTOTUNE", "0")        # untimed: our kernel, the first candidate
    monkeypatch.setattr(config, "_config", config.from_env())
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv3d(4, 8, (1, 3, 3), padding=(0, 1, 1)), torch.nn.ReLU(),
                            torch.nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)), torch.nn.SiLU()).eval()
    x = torch.randn(1, 4, 3, 9, 10)
    cm = kfuse.compile(m, (x,))
    backends = [k.backend for k in cm.report().kernels]
    assert backends[0] == "c:gemm" and backends[1].startswith("library:"), backends
    _same_without_a_compiler(tmp_path, cm, x)


def _files(path: Path):
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_any_changed_byte_of_any_file_is_an_error_naming_it(bert_artifact, tmp_path, where):
    _, _, path = bert_artifact
    for f in _files(path):
        copy = tmp_path / f"copy-{f.name}"
        subprocess.run(["cp", "-r", str(path), str(copy)], check=True)
        target = copy / f.relative_to(path)
        data = bytearray(target.read_bytes())
        k = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
        data[k] ^= 0x01
        target.write_bytes(bytes(data))
        with pytest.raises(KfuseError) as e:
            kfuse.load(copy)
        assert str(target.name) in str(e.value), (f, str(e.value))
        subprocess.run(["rm", "-rf", str(copy)], check=True)


def test_truncated_or_missing_files_are_errors(bert_artifact, tmp_path):
    _, _, path = bert_artifact
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(path), str(copy)], check=True)
    weights = copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(KfuseError, match="weights.safetensors"):
        kfuse.load(copy)
    so = next((copy / "kernels").glob("*.so"))
    so.unlink()
    with pytest.raises(KfuseError, match="manifest.json|missing"):
        kfuse.load(copy)
    with pytest.raises(KfuseError, match="manifest"):
        kfuse.load(tmp_path / "nowhere")


def test_a_manifest_naming_files_outside_the_artifact_is_refused(bert_artifact, tmp_path):
    """The manifest's hash covers its text, but a rewritten manifest with a fresh hash must still not
    make kfuse read files outside the artifact."""
    _, _, path = bert_artifact
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(path), str(copy)], check=True)
    body = json.loads((copy / "manifest.json").read_text().split("\n", 1)[1])
    body["files"]["../../etc/passwd"] = "0" * 64
    text = json.dumps(body)
    (copy / "manifest.json").write_text(artifact._sha(text.encode()) + "\n" + text)
    with pytest.raises(KfuseError, match="outside the artifact"):
        kfuse.load(copy)


def test_loaded_model_refuses_a_new_shape_clearly(bert_artifact):
    _, _, path = bert_artifact
    cm2 = kfuse.load(path)
    other = build("bert", batch=2, seq=24, layers=2)[1]
    with pytest.raises(InputError, match="loaded from an artifact"):
        cm2(*other)


def test_every_signature_is_saved(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32))
    x1, x2 = torch.randn(3, 16), torch.randn(7, 16)
    cm = kfuse.compile(model, (x1,))
    cm(x2)
    cm.save(tmp_path / "a")
    cm2 = kfuse.load(tmp_path / "a")
    assert sorted(cm2.signatures) == sorted(cm.signatures)
    for x in (x1, x2):
        assert torch.equal(cm2(x), cm(x))


def test_keyword_inputs_and_structured_outputs_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    model = transformers.BertModel(cfg).eval()
    kw = {"input_ids": torch.randint(0, 50, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    cm = kfuse.compile(model, (), kw)
    cm.save(tmp_path / "hf")
    cm2 = kfuse.load(tmp_path / "hf")
    a, b = cm(**kw), cm2(**kw)
    assert type(a) is type(b)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)


def test_onnx_model_round_trip(tmp_path):
    pytest.importorskip("onnxscript")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4), torch.nn.Softmax(-1))
    x = torch.randn(5, 8)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    cm = kfuse.compile(str(tmp_path / "m.onnx"), (x,))
    cm.save(tmp_path / "onnx-art")
    cm2 = kfuse.load(tmp_path / "onnx-art")
    assert torch.equal(cm(x), cm2(x))


def test_cli_compile_writes_an_artifact(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    x = torch.randn(1, 8)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    from kfuse.cli import main
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out")]) == 0
    cm = kfuse.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)


def test_other_cpu_rebuilds_from_sources_or_says_what_differs(bert_artifact, monkeypatch, tmp_path):
    """Loading where the CPU lacks one of the saving CPU's ISA flags: with a compiler every kernel is
    rebuilt from the stored sources (same outputs); without one, the error names the missing flag."""
    cm, inputs, path = bert_artifact
    manifest = artifact._read_manifest(path)
    flag = manifest["cpu_flags"][0]
    monkeypatch.setattr(artifact, "cpu_flags", lambda: [f for f in manifest["cpu_flags"] if f != flag])
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(config, "_config", config.from_env())
    rebuilt = kfuse.load(path)
    assert not rebuilt.report().fallbacks
    assert torch.equal(rebuilt(*inputs), cm(*inputs))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(config, "_config", config.from_env())
    with pytest.raises(KfuseError, match=flag):
        kfuse.load(path)


def test_saving_over_something_else_is_refused(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep me")
    cm = kfuse.compile(torch.nn.ReLU(), (torch.randn(3),))
    with pytest.raises(KfuseError, match="not a kfuse artifact"):
        cm.save(tmp_path / "precious")
    assert (tmp_path / "precious" / "data.txt").read_text() == "keep me"
