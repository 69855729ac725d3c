"""The public API's errors: one exception family, each naming the problem."""
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import REFERENCE_REL, assert_verified

import kfuse
from kfuse.models import build


@pytest.fixture(scope="module")
def compiled():
    model, inputs = build("gpt2", batch=2, seq=8, layers=1)
    return kfuse.compile(model, inputs, backend="reference"), inputs


def test_wrong_number_of_inputs(compiled):
    cm, (ids, mask) = compiled
    with pytest.raises(kfuse.InputError, match="2 positional"):
        cm(ids)


def test_wrong_dtype(compiled):
    cm, (ids, mask) = compiled
    with pytest.raises(kfuse.InputError, match="dtype"):
        cm(ids.float(), mask)


def test_wrong_rank(compiled):
    cm, (ids, mask) = compiled
    with pytest.raises(kfuse.InputError, match="rank"):
        cm(ids[0], mask)


def test_not_a_tensor(compiled):
    cm, (ids, mask) = compiled
    with pytest.raises(kfuse.InputError, match="torch.Tensor"):
        cm(ids, 5)


def test_a_container_where_a_tensor_was_compiled_is_named(compiled):
    cm, (ids, mask) = compiled
    with pytest.raises(kfuse.InputError, match=r"^input 0 is a list, compiled for a torch.Tensor$"):
        cm(ids.tolist(), mask)


def test_an_input_on_another_device_is_named(tmp_path):
    """C kernels given a meta (or other device's) tensor read a pointer they cannot (it crashed the
    process); the compiled model, and one loaded from its artifact, say which input is where."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    x = torch.randn(4, 8)
    cm = kfuse.compile(model, (x,))
    cm.save(tmp_path / "m.kfuse")
    for c in (cm, kfuse.load(tmp_path / "m.kfuse")):
        with pytest.raises(kfuse.InputError, match=r"input 0 \(positional input 0\) is on device meta, compiled for cpu"):
            c(torch.empty(4, 8, device="meta"))
        torch.testing.assert_close(c(x), model(x))


class Flagged(torch.nn.Module):
    def forward(self, x, mask=None, output_attentions=False, scale=2.0, mode="a", extra=None):
        y = x * scale
        if mask is not None:
            y = y + mask
        if output_attentions:
            y = y.relu()
        return (y if mode == "a" else -y), extra


def test_non_tensor_inputs_are_compiled_in_and_checked_at_call(tmp_path):
    """None, bools, numbers and strings among the inputs (a pipeline's return_dict=False, PixArt's
    added_cond_kwargs={"resolution": None}) are compiled in as torch.export specialises them: the same
    values give eager's numbers, another value is an InputError naming the input (the compiled model and
    one loaded from its artifact), and so is a tensor where None was compiled."""
    m, x = Flagged(), torch.randn(3, 5)
    kw = {"mask": None, "output_attentions": True, "scale": 3.0, "mode": "b", "extra": [None, "no"]}
    cm = kfuse.compile(m, (x,), kw)
    cm.save(tmp_path / "m.kfuse")
    for c in (cm, kfuse.load(tmp_path / "m.kfuse")):
        got, extra = c(x, **kw)
        torch.testing.assert_close(got, m(x, **kw)[0])
        assert extra == [None, "no"]
        for key, value, said in [("output_attentions", False, "False"), ("scale", 3, "3"), ("mode", "a", "'a'"),
                                 ("mask", torch.ones(3, 5), r"a tensor torch.float32\[3, 5\]")]:
            with pytest.raises(kfuse.InputError, match=rf"keyword input '{key}'\) is {said}, compiled with"):
                c(x, **{**kw, key: value})
    assert cm.verify(x, **kw).ok


def test_other_python_objects_as_inputs_are_named_by_keyword():
    with pytest.raises(kfuse.InputError, match=r"input 2 \(keyword input 'extra'\[1\]\) is a dtype, expected a "
                                               r"torch.Tensor \(or None, a bool, int, float or str compiled in\)"):
        kfuse.compile(Flagged(), (torch.ones(2),), {"extra": [torch.ones(1), torch.float16]})


@pytest.mark.parametrize("value", [1, "yes", None])
def test_cuda_graphs_option_takes_auto_or_a_bool(value):
    with pytest.raises(kfuse.KfuseError, match=r"option cuda_graphs=.*expected 'auto', True or False"):
        kfuse.compile(torch.nn.ReLU(), (torch.randn(3),), cuda_graphs=value)
    for ok in ("auto", True, False):     # accepted (on the CPU backend there is nothing to capture)
        assert torch.equal(kfuse.compile(torch.nn.ReLU(), (torch.randn(3),), cuda_graphs=ok)(torch.ones(3)), torch.ones(3))


def test_bad_model_argument():
    with pytest.raises(kfuse.KfuseError, match="nn.Module"):
        kfuse.compile(42, ())


def test_missing_onnx_file(tmp_path):
    with pytest.raises(kfuse.ModelFileError, match="nope.onnx"):
        kfuse.compile(str(tmp_path / "nope.onnx"), ())


def test_export_failure_is_a_kfuse_error():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x.numpy()       # cannot be traced
    with pytest.raises(kfuse.KfuseError, match="torch.export failed"):
        kfuse.compile(Bad(), (torch.ones(2),))


def test_a_dynamically_quantized_module_says_to_compile_the_float_model():
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 4)), {torch.nn.Linear})
    with pytest.raises(kfuse.KfuseError, match="quantized by torch.ao.quantization.*compile the float model"):
        kfuse.compile(q, (torch.randn(2, 8),))


def test_a_new_shape_the_model_cannot_take_is_one_error_without_a_logged_traceback():
    cm = kfuse.compile(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logger = logging.getLogger("torch._subclasses.fake_tensor")    # torch's loggers do not propagate
    logger.addHandler(handler)
    try:
        with pytest.raises(kfuse.KfuseError, match=r"torch.export failed on Linear: .*\[2, 7\] X \[8, 4\]"):
            cm(torch.randn(2, 7))
    finally:
        logger.removeHandler(handler)
    assert not logged


def test_data_dependent_control_flow_names_the_cause_and_the_way_through():
    """A branch on a tensor's values (a mixture-of-experts' routing, as DBRX's) cannot be exported as one
    graph: the error says why and points at torch.compile(backend="kfuse"), which splits the model there
    and gives eager's numbers on both sides of the branch."""
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if (x > 0).any():
                return torch.relu(x) * 2
            return x - 1
    with pytest.raises(kfuse.KfuseError, match=r"torch.export failed on Branchy \(a branch or a size there depends "
                                               r"on the values of tensors.*backend=\"kfuse\"\)"):
        kfuse.compile(Branchy(), (torch.randn(4, 5),))
    f = torch.compile(Branchy(), backend="kfuse")
    for x in (torch.randn(4, 5), -torch.rand(4, 5)):
        torch.testing.assert_close(f(x), Branchy()(x))


def test_cli_help():
    for args in (["--help"], ["demo", "--help"], ["compile", "--help"]):
        out = subprocess.run([sys.executable, "-m", "kfuse.cli", *args], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: kfuse" in out.stdout


def test_cli_demo_small(capsys):
    from kfuse.cli import main
    assert main(["demo", "--model", "gpt2", "--batch", "2", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "all outputs match" in out and "PyTorch eager" in out and "kfuse" in out


def test_cli_compile_garbage_file(tmp_path, capsys):
    from kfuse.cli import main
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    assert main(["compile", str(bad)]) == 2
    assert "bad.onnx" in capsys.readouterr().err


def _dynamic_onnx(path):
    class Twice(torch.nn.Module):
        def forward(self, x):
            return x * 2
    torch.onnx.export(Twice(), (torch.randn(2, 3),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}})
    return path


def test_cli_bad_sizes_and_dims_are_one_line_errors(tmp_path, capsys):
    """Sizes below 1, more positions than the model has and a --dim the file does not name were a
    traceback (or silently ignored: --dim), each is now a one-line error."""
    from kfuse.cli import main
    for argv in (["demo", "--batch", "0"], ["demo", "--seq", "-1"], ["demo", "--threads", "-2"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "invalid integer >=" in capsys.readouterr().err
    assert main(["demo", "--seq", "600"]) == 2
    assert "--seq 600: the built-in bert has 512 positions" in capsys.readouterr().err
    path = _dynamic_onnx(tmp_path / "twice.onnx")
    assert main(["compile", str(path), "--dim", "sequence=4"]) == 2
    assert "twice.onnx has no such symbolic dimension (it has: batch, seq)" in capsys.readouterr().err


def test_onnx_runtime_failing_is_a_kfuse_error(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    path = _dynamic_onnx(tmp_path / "twice.onnx")
    cm = kfuse.compile(path, (torch.randn(2, 3),))

    def fail(self, *a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Reshape\nsecond line")
    monkeypatch.setattr(ort.InferenceSession, "run", fail)
    with pytest.raises(kfuse.KfuseError, match=r"ONNX Runtime, the reference, failed on inputs f32\[2, 3\]: .*Reshape$"):
        cm.verify(torch.randn(2, 3))


def test_missing_c_compiler_falls_back_and_says_so(tmp_path, monkeypatch):
    """CC names a program that does not exist: every generated kernel falls back to the reference
    path, the results stay right, and the report lists the fallbacks naming the compiler."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kfuse.config, "_config", kfuse.config.from_env())   # settings are read once
    import kfuse.backends.c.compiler as compiler
    from kfuse.backends.c import attention, depthwise, gemm, rope
    monkeypatch.setattr(compiler, "_loaded", {})       # forget libraries this process already loaded
    monkeypatch.setattr(compiler, "_provided", {})     # and those an artifact provided
    for lib in (attention.library, rope._lib, gemm._fn, depthwise._fn):
        lib.cache_clear()
    model, inputs = build("bert", batch=2, seq=16, layers=1)
    cm = kfuse.compile(model, inputs)
    assert_verified(cm.verify(*inputs), max_rel=REFERENCE_REL)      # every kernel on the torch path
    rep = cm.report()
    assert rep.fallbacks and all("no-such-cc" in f for f in rep.fallbacks)
    assert all(k.backend in ("view", "torch") or k.backend.startswith("library") for k in rep.kernels)
    rope._lib.cache_clear()


def test_zero_size_batch_compiles_and_runs():
    ln = torch.nn.LayerNorm(5)
    cm = kfuse.compile(ln, (torch.randn(0, 5),))
    assert cm(torch.randn(0, 5)).shape == (0, 5)


def test_control_flow_subgraphs_are_a_clear_error_or_run_by_torch():
    """torch.cond (a higher-order op with subgraphs): kfuse.compile names it; torch.compile's backend runs
    that graph by torch with a warning (both had failed with a bare KeyError 'true_graph_0')."""
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: x.sin() * 2, lambda x: x.cos() - 1, (x,))
    x = torch.randn(3, 4).abs()
    with pytest.raises(kfuse.UnsupportedOpError, match="cond.*control flow"):
        kfuse.compile(M(), (x,))
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="runs by torch"):
        got = torch.compile(M(), backend="kfuse")(x)
    torch.testing.assert_close(got, M()(x))
    torch._dynamo.reset()


def test_a_module_in_training_mode_is_compiled_as_in_eval_mode_and_left_as_it_was():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5)).train()
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="training mode; kfuse compiles it as in eval mode"):
        cm = kfuse.compile(m, (x,))
    assert m.training and all(c.training for c in m)      # the caller's module keeps its mode
    torch.testing.assert_close(cm(x), m.eval()(x))


def test_export_failures_inside_the_decompositions_are_kfuse_errors():
    """Two inputs overlapping in memory, one written in place: torch.export's decompositions fail; a
    KfuseError (a raw RuntimeError had escaped), so torch.compile's backend runs the graph by torch."""
    def f(a, b):
        a.add_(1)
        return b * 2
    base = torch.arange(16.0).reshape(4, 4)
    want_base = base.clone()
    want = f(want_base[0], want_base[:, 0])
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="runs by torch"):
        got = torch.compile(f, backend="kfuse")(base[0], base[:, 0])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(base, want_base)
    torch._dynamo.reset()


def test_disable_names_are_checked():
    with pytest.raises(kfuse.KfuseError, match=r"disable: 'sofmax' names no op type or fusion \(did you mean 'softmax'"):
        kfuse.compile(torch.nn.Softmax(-1), (torch.randn(2, 3),), disable=["sofmax"])
    kfuse.compile(torch.nn.Softmax(-1), (torch.randn(2, 3),), disable=["softmax", "gated_linear", "horizontal_gemm",
                                                                        "depthwise_pointwise", "squeeze_excite_pointwise"])


def test_torch_compile_mode_and_gradients_are_warnings():
    """kfuse computes inference only: inputs that ask for gradients get a warning, through either entry."""
    m = torch.nn.Linear(4, 4)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="gradients enabled: kfuse computes inference only"):
        y = torch.compile(m, backend="kfuse")(torch.randn(2, 4))
    assert not y.requires_grad
    torch._dynamo.reset()
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="a model compiled with gradients enabled: kfuse computes inference only"):
        y = kfuse.compile(m, (x,))(x)
    assert not y.requires_grad and torch.allclose(y, m(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kfuse.compile(m, (x.detach(),))           # an input that needs no grad: no warning
        with torch.no_grad():
            kfuse.compile(m, (x,))
    with pytest.warns(UserWarning, match="mode='reduce-overhead' does not apply"), torch.no_grad():
        torch.compile(m, backend="kfuse", mode="reduce-overhead")(torch.randn(2, 4))
    torch._dynamo.reset()
