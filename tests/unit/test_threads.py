"""Threads: compiling and calling never change torch's thread setting, and one compiled model may be
called from many threads at once (each call has its own intermediate buffers)."""
import threading

import pytest
import torch
from helpers import in_threads

import kfuse
from kfuse import config
from kfuse.backends import openmp
from kfuse.models import build


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_compile_and_call_keep_torchs_thread_count(one_thread):
    model, inputs = build("bert", batch=1, seq=16, layers=1)
    cm = kfuse.compile(model, inputs)
    assert torch.get_num_threads() == 1
    cm(*inputs)
    assert torch.get_num_threads() == 1


def test_kfuse_num_threads_applies_to_the_call_only(one_thread, monkeypatch):
    """KFUSE_NUM_THREADS sets the kernels' threads during a call; torch's setting is back after it."""
    monkeypatch.setenv("KFUSE_NUM_THREADS", "2")
    monkeypatch.setenv("KFUSE_NATIVE", "0")         # the probe wraps the Python program
    monkeypatch.setattr(config, "_config", config.from_env())
    seen = []
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sigmoid())
    cm = kfuse.compile(model, (torch.randn(4, 8),))
    cm._last.kernels.append(None)       # not a kernel: a probe run by the wrapper below
    inner = cm._last._fn
    cm._last._fn = lambda arena, *a: (seen.append(openmp.threads()), inner(arena, *a))[1]
    cm(torch.randn(4, 8))
    assert seen == [2] and torch.get_num_threads() == 1


def test_bad_thread_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KFUSE_NUM_THREADS", "many")
    with pytest.raises(kfuse.KfuseError, match="KFUSE_NUM_THREADS"):
        config.from_env()


def _hammer(fn, inputs_of, n_threads, calls):
    """Call fn from n_threads threads at once, `calls` times each, on inputs_of(thread, call);
    returns {(thread, call): output}."""
    out = {}

    def worker(t):
        for c in range(calls):
            out[(t, c)] = fn(*inputs_of(t, c))
    in_threads(n_threads, worker)
    return out


def _flat(out):
    return [t.clone() for t in (out if isinstance(out, (tuple, list)) else [out])]


def _assert_serial(got, serial, which):
    """every concurrent call's outputs (got[(thread, call)]) equal, bit for bit, the serial call on the
    same input, serial[which(thread, call)]"""
    for (t, c), outs in got.items():
        for a, b in zip(outs, serial[which(t, c)]):
            assert torch.equal(a, b), (t, c)


def test_one_model_from_eight_threads_matches_serial_calls():
    model, _ = build("bert", batch=1, seq=24, layers=2)
    inputs = [build("bert", batch=1, seq=24, layers=2, seed=s)[1] for s in range(8)]
    cm = kfuse.compile(model, inputs[0])
    serial = [_flat(cm(*x)) for x in inputs]
    got = _hammer(lambda *x: _flat(cm(*x)), lambda t, c: inputs[(t + c) % 8], 8, 100)
    _assert_serial(got, serial, lambda t, c: (t + c) % 8)
    assert len(cm._last._arenas) > 1      # concurrent calls had their own buffers


def test_decoder_with_gated_gemms_from_four_threads_on_two_lengths():
    """The Llama-style decoder (SwiGLU in one GEMM, causal + padding masks whose hidden key tiles the
    attention kernel skips) from four threads at once, on prompts of two lengths: serial answers."""
    model, _ = build("llama", batch=2, seq=24, layers=2)
    inputs = [build("llama", batch=2, seq=24 if s % 2 else 17, layers=2, seed=s)[1] for s in range(4)]
    cm = kfuse.compile(model, inputs[0])
    serial = [_flat(cm(*x)) for x in inputs]
    assert cm.report().fusions["gemm_swiglu"] == 2
    got = _hammer(lambda *x: _flat(cm(*x)), lambda t, c: inputs[(t + c) % 4], 4, 30)
    _assert_serial(got, serial, lambda t, c: (t + c) % 4)


def test_torch_compile_backend_from_eight_threads_matches_serial_calls():
    model, _ = build("gpt2", batch=1, seq=16, layers=1)
    inputs = [build("gpt2", batch=1, seq=16, layers=1, seed=s)[1] for s in range(4)]
    fn = torch.compile(model, backend="kfuse", dynamic=False)

    def call(*x):
        with torch.no_grad():           # grad mode is per thread (and Dynamo guards on it)
            return _flat(fn(*x))
    serial = [call(*x) for x in inputs]
    got = _hammer(call, lambda t, c: inputs[(t * 7 + c) % 4], 8, 100)
    _assert_serial(got, serial, lambda t, c: (t * 7 + c) % 4)


def test_first_calls_of_a_dynamo_graph_from_eight_threads_compile_it_once():
    """Eight threads making the first call of a graph Dynamo handed to kfuse, at once: one compilation,
    every answer right (the others wait for it, rather than compile again or read a half-built one)."""
    from kfuse.dynamo import Segment

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    seg = Segment(torch.fx.symbolic_trace(model), {"backend": "cpu"}, frozen=[])
    x = torch.randn(4, 16)
    start = threading.Barrier(8)

    def call(x):
        start.wait(timeout=60)
        return _flat(seg(x))
    got = _hammer(call, lambda t, c: (x,), 8, 1)
    assert seg.builds == 1
    for outs in got.values():
        torch.testing.assert_close(outs[0], model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenetv3", "unet", "efficientnet_b0"])
def test_cnn_kernels_from_four_threads_match_serial_calls(name, monkeypatch):
    """The channels-last CNN kernels (depthwise, our GEMM, the fused depthwise + 1x1, squeeze-excitation,
    its gate folded into the 1x1 conv, GroupNorm) called from four threads at once, on two input sizes
    (the second compiles on first use): serial answers. EfficientNet untimed, so every squeeze-excitation
    pair takes its fused kernel."""
    if name == "efficientnet_b0":
        monkeypatch.setenv("KFUSE_AUTOTUNE", "0")
        monkeypatch.setattr(config, "_config", config.from_env())
    model, _ = build(name, batch=1, image=32)
    inputs = [build(name, batch=b, image=32, seed=s)[1] for s, b in ((0, 1), (1, 2), (2, 1), (3, 2))]
    cm = kfuse.compile(model, inputs[0])
    if name == "efficientnet_b0":
        assert sum(k.name.startswith("se_pwconv") for k in cm.report().kernels) == 16
    serial = [_flat(cm(*x)) for x in inputs]
    got = _hammer(lambda *x: _flat(cm(*x)), lambda t, c: inputs[(t + c) % 4], 4, 10)
    _assert_serial(got, serial, lambda t, c: (t + c) % 4)
    with torch.no_grad():
        torch.testing.assert_close(serial[1][0], model(*inputs[1]), rtol=1e-4, atol=1e-4)


def test_new_shapes_from_two_threads_compile_one_at_a_time():
    """Two threads calling one model with batch sizes it has not seen: each new shape compiles once more,
    one at a time (torch.export keeps process-wide state: two exports at once had failed with "Trying to
    pop empty mode stack"), and every call gets its own shape's program, not the one another thread made
    last."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 4, 1)).eval()
    cm = kfuse.compile(m, (torch.randn(2, 3, 12, 12),))
    inputs = [torch.randn(b, 3, 12, 12) for b in (3, 4, 5, 6)]
    got = _hammer(lambda x: _flat(cm(x)), lambda t, c: (inputs[(t + c) % 4],), 2, 6)
    with torch.no_grad():
        for (t, c), outs in got.items():
            torch.testing.assert_close(outs[0], m(inputs[(t + c) % 4]), rtol=1e-4, atol=1e-5)
    assert len(cm._programs) == 5


def test_first_calls_of_a_dynamic_torch_compile_from_two_threads():
    """Two threads making the first calls of torch.compile(backend="kfuse", dynamic=True) on inputs of
    four shapes: kfuse's compilations of new size sets wait for Dynamo's tracing in the other thread (an
    export beside it had failed with "sN is not tracked with proxy" in every trial)."""
    model, _ = build("llama", batch=1, seq=8, layers=1)
    inputs = [build("llama", batch=b, seq=s, layers=1, seed=s)[1] for b, s in ((1, 7), (2, 19), (1, 33), (3, 5))]
    with torch.no_grad():
        want = [_flat(model(*x)) for x in inputs]
    torch._dynamo.reset()
    fn = torch.compile(model, backend="kfuse", dynamic=True)

    def call(*x):
        with torch.no_grad():
            return _flat(fn(*x))
    got = _hammer(call, lambda t, c: inputs[(t + c) % 4], 2, 4)
    for (t, c), outs in got.items():
        for a, b in zip(outs, want[(t + c) % 4]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


class _Cached(torch.nn.Module):
    """Sets an attribute in forward, as rotary embeddings cache their tables by length."""
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.table = None

    def forward(self, x):
        if self.table is None or self.table.shape[0] != x.shape[0]:
            self.table = torch.arange(x.shape[0], dtype=x.dtype)[:, None]
        return torch.nn.functional.gelu(self.proj(x)) + self.table


def test_eager_module_in_one_thread_while_another_compiles_it():
    """The user's own module called in one thread while another thread's call compiles it for new
    sizes: torch.export had swapped fake tensors into the module it traced (the eager call returned
    a FakeTensor, or the trace failed; the attribute forward sets held a fake one meanwhile). Both threads get
    real, right answers, and the module keeps its mode and attributes."""
    torch.manual_seed(0)
    m = _Cached().eval()
    cm = kfuse.compile(m, (torch.randn(3, 16),))
    m.train()                           # compiled as in eval mode; the user's module stays as it is
    sizes = range(4, 12)
    inputs = {n: torch.randn(n, 16) for n in sizes}
    with torch.no_grad():
        want = {n: m(inputs[n]) for n in sizes}
    got, done = [], threading.Event()

    def work(i):
        if i == 0:
            got.extend((n, cm(inputs[n])) for n in sizes)
            done.set()
        while i == 1 and not done.is_set():          # eager calls all through the compilations
            got.extend((n, m(inputs[n]).detach()) for n in sizes)
    in_threads(2, work)
    for n, out in got:
        assert type(out) is torch.Tensor, n
        torch.testing.assert_close(out, want[n], rtol=1e-5, atol=1e-5)
    assert m.training and type(m.table) is torch.Tensor and len(cm._programs) == 1 + len(sizes)
