"""The native runner (kfuse/runtime/native.py): after a program's second call its C kernels are called from
generated C; every later call must give what the Python program gives, bit for bit, on fresh inputs."""
import pytest
import torch

import kfuse
from kfuse import config
from kfuse.models import build
from kfuse.backends import linear
from kfuse.runtime import native, settle


class SortBetween(torch.nn.Module):
    """C kernels, a torch op between them (a Python step whose result a later C kernel reads), a small
    output and a view of an intermediate as a second output."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.sort(y, dim=1).values
        y = torch.sigmoid(self.c2(self.dw(y)))
        return self.fc(y.mean((2, 3))), y[:, :2]


class Elementwise(torch.nn.Module):
    """Two C elementwise kernels (no timed choice) with a torch op between them."""

    def forward(self, x):
        y = torch.sin(x) * 2 + 1
        return torch.cos(torch.sort(y, dim=-1).values) * 3 - y


def _python(cm, *inputs):
    """cm's outputs computed kernel by kernel from Python (its native runner set aside for the call)."""
    prog = cm._last
    runner, prog._native = prog._native, None
    try:
        return cm(*inputs)
    finally:
        prog._native = runner


def _warm(cm, *inputs):
    """The two calls after which the runner is made: none after the first."""
    cm(*inputs)
    assert cm._last._native is None and cm.report().launch == ""
    cm(*inputs)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(_flat(a), _flat(b), strict=True))


def test_a_cnn_runs_from_c_after_its_second_call_and_equals_the_python_program():
    model, inputs = build("mobilenetv3", image=64)
    cm = kfuse.compile(model, inputs)
    with torch.no_grad():
        _warm(cm, *inputs)
        launch = cm.report().launch
        assert launch.startswith("native:") and " 1 run(s)" in launch, launch
        for seed in range(3):
            x = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed))
            got = cm(x)
            assert _equal(got, _python(cm, x))
            torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def test_the_runs_read_the_callers_input_and_write_a_fresh_output_where_they_are():
    """The runs' pointers into an input's staging tensor are moved to each call's tensor of the same shape,
    dtype and strides, which the runs then read in place (the staging tensor is not written); the same
    tensor with new values is read anew; an input of other strides is copied into the staging tensor. The
    output the last run writes is a new tensor each call, its pointers moved there (the recorded one is
    not written), and the caller's earlier outputs stay as they were."""
    model, inputs = build("mobilenetv3", image=64)
    cm = kfuse.compile(model, inputs)
    with torch.no_grad():
        _warm(cm, *inputs)
        runner = cm._last._native
        moved = [v for v in runner._fn.__globals__.values() if isinstance(v, native._Moved)]
        assert len(moved) == 2 and all(m.sites for m in moved) and ".fresh()" in runner._keep[2]
        staged = [m.staging.clone() for m in moved]
        held = []
        for seed in range(3):
            x = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed))
            got = cm(x)
            assert moved[0].at == x.data_ptr() and moved[1].at == got.data_ptr() and _equal(got, _python(cm, x))
            held.append((got, got.clone()))
        assert all(torch.equal(m.staging, t) for m, t in zip(moved, staged))
        assert all(torch.equal(a, b) for a, b in held) and len({a.data_ptr() for a, _ in held}) == 3
        x.mul_(-2)
        assert _equal(cm(x), _python(cm, x))
        last = x.contiguous(memory_format=torch.channels_last)
        got = cm(last)
        assert torch.equal(moved[0].staging, last) and moved[0].at == moved[0].staging.data_ptr()
        assert _equal(got, _python(cm, last))
        torch.testing.assert_close(got, model(last), rtol=1e-4, atol=1e-4)


def test_a_view_of_a_runs_output_is_returned_made_again_on_a_fresh_tensor():
    """An output that is a view of what a run wrote: the view is made on the fresh tensor each call, with
    eager's shape and strides, and an earlier output is not written by a later call."""
    model = lambda_module(lambda x: (torch.softmax(x * 2, -1).transpose(0, 1), torch.sin(x)))
    x = torch.randn(6, 7, 33)
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        _warm(cm, x)
        assert ".fresh()" in cm._last._native._keep[2] and ".clone()" not in cm._last._native._keep[2]
        first = cm(x)
        kept = [t.clone() for t in first]
        x2 = torch.randn(6, 7, 33)
        second = cm(x2)
        assert _equal(first, kept) and _equal(second, _python(cm, x2))
        for got, want in zip(second, model(x2)):
            assert got.stride() == want.stride()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", [Elementwise(), SortBetween().eval()])
def test_a_torch_op_between_c_kernels_runs_from_python_and_feeds_the_next_run(model):
    x = torch.randn(2, 3, 9, 9)
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        _warm(cm, x)
        assert cm._last._native is not None
        if isinstance(model, Elementwise):
            assert cm.report().launch == "native: 2 kernels called from C in 2 run(s), 1 from Python between them"
        for _ in range(3):
            x = torch.randn(2, 3, 9, 9)
            got = cm(x)
            assert _equal(got, _python(cm, x))
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_a_reshape_that_copies_is_redone_each_call():
    """MultiheadAttention (batch first) merges heads with a reshape of strided memory: a copy, not a view,
    which the runner must redo each call, not read as recorded."""
    model = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 32)
    cm = kfuse.compile(lambda_module(lambda x: model(x, x, x, need_weights=False)[0], model), (x,))
    with torch.no_grad():
        _warm(cm, x)
        assert cm.report().launch.startswith("native:"), cm.report().launch
        for _ in range(3):
            x = torch.randn(2, 9, 32)
            got = cm(x)
            assert _equal(got, _python(cm, x))
            torch.testing.assert_close(got, model(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def lambda_module(f, *mods):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = torch.nn.ModuleList(mods)

        def forward(self, *x):
            return f(*x)
    return M().eval()


def test_outputs_are_the_callers_and_a_strided_input_is_read_as_given():
    model, x = SortBetween().eval(), torch.randn(2, 3, 9, 9)
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        _warm(cm, x)
        first = cm(x)
        kept = [t.clone() for t in first]
        for t in first:
            t.fill_(float("nan"))           # the caller writing into its outputs changes no later call
        second = cm(x)
        assert _equal(second, kept)
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, second))
        wide = torch.randn(2, 3, 9, 20)[..., 3:12]         # not contiguous
        assert not wide.is_contiguous()
        torch.testing.assert_close(cm(wide), model(wide), rtol=1e-5, atol=1e-5)


def test_a_stale_replay_is_refused_and_the_program_stays_on_python():
    """A kernel that copies its input in Python before its recorded C call (a wrapper bug the replay
    could not redo) must not run from C: the check on inputs unlike the first call's catches it."""
    model, x = Elementwise(), torch.randn(2, 3, 9, 9)
    cm = kfuse.compile(model, (x,))
    prog = cm._last
    i = next(i for i, k in enumerate(cm.report().kernels) if k.backend == "c")
    inner = prog.kernels[i].fn

    def copies_first(bufs, x, *rest):
        return inner(bufs, x * 1.0, *rest)      # a temporary the recorded call reads
    prog.kernels[i].fn = copies_first
    prog._fn.__globals__[f"k{i}"] = copies_first
    with torch.no_grad():
        _warm(cm, x)
        assert prog._native is None
        assert "differed" in cm.report().launch, cm.report().launch
        x2 = torch.randn(2, 3, 9, 9)
        torch.testing.assert_close(cm(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_another_thread_count_runs_from_python(monkeypatch):
    model, x = SortBetween().eval(), torch.randn(2, 3, 9, 9)
    monkeypatch.setenv("KFUSE_NUM_THREADS", "2")
    monkeypatch.setattr(config, "_config", config.from_env())
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        _warm(cm, x)
        runner = cm._last._native
        assert runner is not None and runner.threads == 2
        calls = []
        fn = runner._fn
        runner._fn = lambda *a: (calls.append(1), fn(*a))[1]
        cm(x)
        assert calls == [1]
        monkeypatch.setenv("KFUSE_NUM_THREADS", "1")
        monkeypatch.setattr(config, "_config", config.from_env())
        x2 = torch.randn(2, 3, 9, 9)
        torch.testing.assert_close(cm(x2), model(x2), rtol=1e-5, atol=1e-5)
        assert calls == [1]             # the runner was recorded for two threads: not used


def test_kfuse_native_0_keeps_every_call_on_python(monkeypatch):
    monkeypatch.setenv("KFUSE_NATIVE", "0")
    monkeypatch.setattr(config, "_config", config.from_env())
    model, x = SortBetween().eval(), torch.randn(2, 3, 9, 9)
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        cm(x)
        cm(x)
    assert cm._last._native is None
    assert "KFUSE_NATIVE=0" in cm.report().launch


@pytest.mark.parametrize("inference", [False, True])
def test_inference_mode_at_the_first_call_or_later(inference):
    model, x = SortBetween().eval(), torch.randn(2, 3, 9, 9)
    cm = kfuse.compile(model, (x,))
    with torch.inference_mode(inference):
        _warm(cm, x)
    assert cm._last._native is not None
    with torch.inference_mode(not inference):
        x2 = torch.randn(2, 3, 9, 9)
        got = cm(x2)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x2), rtol=1e-5, atol=1e-5)


def test_the_runner_writes_into_the_programs_arena():
    """No second arena resident for the runner; a call holding another arena of the pool (made for
    concurrent callers) runs from Python, and the next lone call finds the runner's arena on top; a call
    while another holds the runner's arena runs from Python too."""
    model, x = SortBetween().eval(), torch.randn(2, 3, 9, 9)
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        _warm(cm, x)
        prog = cm._last
        runner = prog._native
        assert runner is not None and prog._n_arenas == 1 and prog._arenas == [runner.arena]
        calls = []
        fn = runner._fn
        runner._fn = lambda *a: (calls.append(1), fn(*a))[1]
        with prog._grow:        # as a concurrent spell leaves the pool: another arena on top
            prog._n_arenas += 1
        prog._arenas.append(prog._plan.new_arena())
        x2 = torch.randn(2, 3, 9, 9)
        want = model(x2)
        torch.testing.assert_close(cm(x2), want, rtol=1e-5, atol=1e-5)
        assert calls == [] and prog._arenas[-1] is runner.arena
        torch.testing.assert_close(cm(x2), want, rtol=1e-5, atol=1e-5)
        assert calls == [1]
        # Program.lone, which the call tries first, serves a lone caller only: while a call in flight holds
        # the runner's arena it declines, and the call runs from Python in another arena
        held = prog._arenas.pop()
        assert held is runner.arena and prog.lone([x2]) is None
        torch.testing.assert_close(cm(x2), want, rtol=1e-5, atol=1e-5)
        assert calls == [1] and all(a is not held for a in prog._arenas)
        prog._arenas.append(held)               # that call ends: the runner's arena on top again
        got = prog.lone([x2])
        assert calls == [1, 1] and _equal(got, _python(cm, x2)) and prog._arenas[-1] is runner.arena


def test_profile_walks_the_kernels_the_runner_records():
    """Program.profile and the runner's recording share Program.kernel_calls: every kernel timed, the
    fused ones against their ops run one by one, and the program's calls unchanged after it."""
    model, x = SortBetween().eval(), torch.randn(2, 3, 9, 9)
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        _warm(cm, x)
        prog = cm._last
        pairs = prog.profile([x], reps=3)
        infos = cm.report().kernels
        assert len(pairs) == len(infos) and all(i.measured_ms > 0 for i in infos)
        assert any(i.fusion for i in infos) and all(i.unfused_ms > 0 for i in infos if i.fusion)
        x2 = torch.randn(2, 3, 9, 9)
        assert _equal(cm(x2), _python(cm, x2))
        torch.testing.assert_close(cm(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_views_nothing_reads_are_dropped_and_the_runs_beside_them_joined():
    """A view of an input that only the runs read (through their moved pointers) is not made in Python,
    and two runs that then follow each other are one C call; views a later line reads stay."""
    lines = ["def program(i0, i1):", "    m3(i0)", "    run0()", "    v1_0 = i1.permute((1, 0, ))",
             "    v2_0 = v1_0.reshape((4, 8, ))", "    run1()", "    v4_0 = i0.reshape((2, 16, ))", "    v5_0, = k7(v4_0)",
             "    run2()", "    return (v5_0, )"]
    views = {lines[3], lines[4], lines[6]}
    kept = native._read_views_only(lines, views)
    assert kept == [ln for ln in lines if ln not in (lines[3], lines[4])]
    out, runs = native._joined_runs(kept, [["a"], ["b", "c"], ["d"]])
    assert out == ["def program(i0, i1):", "    m3(i0)", "    run0()", "    v4_0 = i0.reshape((2, 16, ))",
                   "    v5_0, = k7(v4_0)", "    run1()", "    return (v5_0, )"]
    assert runs == [["a", "b", "c"], ["d"]]


class LinearIntoC(torch.nn.Module):
    """A library GEMM whose output a C kernel reads and the caller gets as well."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(24, 40), torch.nn.Linear(40, 16)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.sin(h) * 2), h


def test_a_library_output_a_run_reads_is_moved_to_not_copied(monkeypatch):
    """The runs read a library kernel's output (a new tensor each call) through their pointers moved to it, as
    an input's, not through a copy into the recorded tensor; the caller owns it when it is an output too."""
    monkeypatch.setattr(linear, "pick", lambda problem, cands, inputs, **kw: (next(iter(cands)), "the library's"))
    monkeypatch.setattr(settle, "propose", lambda program: {})
    model, x = LinearIntoC().eval(), torch.randn(37, 24)
    cm = kfuse.compile(model, (x,))
    assert cm.report().kernels[0].backend.startswith("library"), cm.report().kernels
    with torch.no_grad():
        _warm(cm, x)
        source = cm._last._native._keep[2]
        assert cm.report().launch.startswith("native:") and ".copy_(" not in source, source
        for _ in range(3):
            x = torch.randn(37, 24)
            got = cm(x)
            assert _equal(got, _python(cm, x))
            torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
        kept = [t.clone() for t in got]
        cm(torch.randn(37, 24))
        assert _equal(got, kept)


class LibraryChain(torch.nn.Module):
    """Library GEMMs, each output read by a C kernel (a run) and then dead."""

    def __init__(self, n=6, d=256):
        super().__init__()
        self.fcs = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        for fc in self.fcs:
            x = torch.sin(fc(x)) * 2
        return x


def _peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held at once during fn() beyond those held before it."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    live = peak = 0
    for e in sorted((e for e in p.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_a_library_output_is_freed_after_the_last_run_that_reads_it(monkeypatch):
    """A library kernel's output lives until the run that reads it, not to the end of the call: six 0.5 MiB
    GEMM outputs had all been held at once (a call's peak 3.5 MiB; ConvNeXt-Tiny's 3.3x eager's)."""
    monkeypatch.setattr(linear, "pick", lambda problem, cands, inputs, **kw: (next(iter(cands)), "the library's"))
    monkeypatch.setattr(settle, "propose", lambda program: {})
    model, x = LibraryChain().eval(), torch.randn(512, 256)
    cm = kfuse.compile(model, (x,))
    assert [k.backend.split(":")[0] for k in cm.report().kernels] == ["library", "c"] * 6, cm.report().kernels
    with torch.no_grad():
        _warm(cm, x)
        assert cm.report().launch.startswith("native:")
        mib = 1 << 20
        # the output (0.5 MiB) and one GEMM's output at a time
        assert _peak_bytes(lambda: cm(x)) <= mib, cm._last._native._keep[2]
        for _ in range(2):
            x = torch.randn(512, 256)
            got = cm(x)
            assert _equal(got, _python(cm, x))
            torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
