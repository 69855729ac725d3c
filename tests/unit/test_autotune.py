"""The C kernels' schedule autotuner (kfuse/backends/c/autotune.py): every variant computes the same
numbers (bit for bit where only the split differs; within rounding where a row's sums run 512 bits
wide), the choice is timed once per machine and read from the cache after, KFUSE_AUTOTUNE=0 turns it
off, and the report shows the choice."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import kfuse
from kfuse import config
from kfuse.backends import openmp
from kfuse.backends.c import autotune, build, compiler, variant
from kfuse.backends.c.render import DEFAULT, PARALLEL_MIN, Schedule
from kfuse.ir import Graph
from kfuse.kernels import lower


def _kernel(build_graph, *shapes):
    g = Graph()
    xs = [g.input(list(s), torch.float32) for s in shapes]
    g.outputs = build_graph(g, *xs)
    return lower([n for n in g.nodes if n.op not in ("input", "const")], g.outputs)


W, B = torch.linspace(0.5, 2, 131), torch.linspace(-1, 1, 131)

# name -> (graph builder, input shapes, torch function of the inputs); every shape is odd and above
# PARALLEL_MIN elements, so the kernel has schedule variants
CASES = {
    "add+layernorm rows": (lambda g, x, r: [g.add("layer_norm", g.add("add", x, r), g.const(W), g.const(B), eps=1e-5)],
                           [(257, 131), (257, 131)],
                           lambda x, r: F.layer_norm(x + r, (131,), W, B, 1e-5)),
    "rmsnorm long rows, 3-d": (lambda g, x: [g.add("rms_norm", x, g.const(torch.linspace(-1, 1, 1031)), eps=1e-6)],
                               [(3, 13, 1031)],
                               lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.linspace(-1, 1, 1031)),
    "softmax + row max output": (lambda g, x: [g.add("softmax", x, axis=-1), g.add("reduce_max", x, axes=[-1], keepdim=True)],
                                 [(333, 101)],
                                 lambda x: (torch.softmax(x, -1), x.amax(-1, keepdim=True))),
    "swiglu flat": (lambda g, a, b: [g.add("mul", g.add("silu", a), b)], [(40009,), (40009,)],
                    lambda a, b: F.silu(a) * b),
    # outputs of 8 MB and more: a streaming-stores variant too, its rows 64-byte aligned (blocks streamed,
    # no tail) or not (4099 floats: plain stores for the misaligned blocks, a tail of 3)
    "rmsnorm big, rows misaligned": (lambda g, x: [g.add("rms_norm", x, g.const(torch.linspace(-1, 1, 4099)), eps=1e-6)],
                                     [(513, 4099)],
                                     lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
                                     * torch.linspace(-1, 1, 4099)),
    "softmax big + row max output": (lambda g, x: [g.add("softmax", x, axis=-1), g.add("reduce_max", x, axes=[-1], keepdim=True)],
                                     [(1025, 2048)],
                                     lambda x: (torch.softmax(x, -1), x.amax(-1, keepdim=True))),
}
STREAMED = ("rmsnorm big, rows misaligned", "softmax big + row max output")


@pytest.mark.parametrize("name", CASES)
def test_every_variant_matches_the_reference(cache, name):
    build_graph, shapes, ref = CASES[name]
    k = _kernel(build_graph, *shapes)
    scheds = autotune.variants(k)
    assert len(scheds) >= 3 and scheds[0] == DEFAULT
    assert (Schedule(stream=True) in scheds) == (name in STREAMED)
    # rows read again after their reductions: the variant fetching the next row in the last pass
    assert (Schedule(prefetch=True) in scheds) == (k.passes > 1) == (name != "swiglu flat")
    assert (Schedule(stream=True, prefetch=True) in scheds) == (name in STREAMED)
    fn = build(k)
    assert fn.choice is not None and fn.choice.how == "timed"
    xs = [torch.randn(s) for s in shapes]
    xs[0][1, ...] = float("nan")          # a NaN row: every schedule propagates it the same way
    want = ref(*xs)
    want = list(want) if isinstance(want, tuple) else [want]
    args = [xs[n.attrs["index"]] if n.op == "input" else n.value for n in k.inputs]
    first = {}      # the first outputs of each vector width
    for i, s in enumerate(scheds):
        outs = [torch.full(n.shape, 1234.5, dtype=n.dtype) for n in k.outputs]     # poisoned
        v = variant(fn, i)
        v.check(args, outs)
        v(args, outs)
        for o, w in zip(outs, want):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5, equal_nan=True, msg=lambda m: f"{s}: {m}")
        # the split only moves rows between threads: bit for bit the same numbers at one vector width
        # (another width adds a row's lanes in another order; an elementwise kernel has no sums)
        for ref_outs in [first.setdefault(s.wide, outs)] + ([first[False]] if k.flat else []):
            assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(outs, ref_outs)), s
    assert (True in first) == (autotune.vector_isa() == "avx512")


def test_the_second_compile_reads_the_choice_from_the_cache(cache, monkeypatch):
    k = _kernel(CASES["add+layernorm rows"][0], (257, 131), (257, 131))
    first = build(k)
    assert first.choice.how == "timed" and set(first.choice.ms) == {str(s) for s in autotune.variants(k)}
    autotune.flush()        # (a program's build flushes when its kernels are built)
    entries = json.loads((cache / "autotune.json").read_text())
    assert len(entries) == 1 and next(iter(entries.values()))["variant"] == str(first.choice.sched)

    def no_timing(*a, **kw):
        raise AssertionError("timed again")
    monkeypatch.setattr(autotune, "_time", no_timing)
    monkeypatch.setattr(autotune, "_memo", {})        # a new process: only the file remembers
    compiler._loaded.clear()
    again = build(k)
    assert again.choice.how == "cached" and again.choice.index == first.choice.index
    assert again.source == first.source


def test_a_faster_variant_wins_only_by_the_margin(cache, monkeypatch):
    k = _kernel(CASES["rmsnorm long rows, 3-d"][0], (3, 13, 1031))
    monkeypatch.setattr(autotune, "_time", lambda fns, argv: [1.0, 0.97, 0.99, 1.2])
    assert build(k).choice.index == 0                 # 3% faster is noise: the default stays
    monkeypatch.setattr(autotune, "_memo", {})
    autotune.flush()
    (cache / "autotune.json").unlink()
    monkeypatch.setattr(autotune, "_time", lambda fns, argv: [1.0, 0.97, 0.5, 1.2])
    fn = build(k)
    assert fn.choice.index == 2 and fn.choice.sched.omp.startswith("dynamic")


def test_a_different_thread_count_or_machine_is_another_key(cache):
    src = "void kf_run(void **a) {}"
    assert autotune._key(src, 2) != autotune._key(src, 4)
    assert "model name" not in autotune.machine_key() and autotune.machine_key().count("\n") >= 5


def test_nothing_to_choose_for_small_kernels_or_one_thread(cache):
    small = _kernel(lambda g, x: [g.add("exp", x)], (PARALLEL_MIN - 1,))
    assert autotune.variants(small) == [DEFAULT]
    fn = build(small)
    assert fn.choice is None and "kf_v0" not in fn.source
    big = _kernel(lambda g, x: [g.add("exp", x)], (PARALLEL_MIN,))
    assert Schedule(threads="one") in autotune.variants(big)
    config._config = config.from_env({"KFUSE_NUM_THREADS": "1", "KFUSE_CACHE_DIR": str(cache)})
    fn = build(big)         # one thread: the default schedule alone, nothing timed
    assert fn.choice is None and "kf_v0" not in fn.source


def test_an_artifacts_tuned_library_serves_an_untuned_load(cache, monkeypatch):
    """A library saved tuned (every variant) is used by a process that would not tune (KFUSE_AUTOTUNE=0
    or one thread): the default entry, no compiler needed."""
    k = _kernel(CASES["add+layernorm rows"][0], (257, 131), (257, 131))
    tuned = build(k)
    monkeypatch.setattr(compiler, "_provided", {compiler._key(tuned.source): compiler.library_of(tuned.source)})
    monkeypatch.setenv("KFUSE_AUTOTUNE", "0")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(config, "_config", config.from_env())
    fn = build(k)
    assert fn.source == tuned.source and fn.choice.how == "default" and fn.choice.index == 0


def test_off_switch(cache, monkeypatch):
    monkeypatch.setenv("KFUSE_AUTOTUNE", "0")
    monkeypatch.setattr(config, "_config", config.from_env())
    assert config.get().autotune is False
    k = _kernel(CASES["add+layernorm rows"][0], (257, 131), (257, 131))
    fn = build(k)
    assert fn.choice is None and "kf_v0" not in fn.source
    assert not (cache / "autotune.json").exists()


class _RMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


@pytest.mark.parametrize("on", [True, False])
def test_the_report_shows_the_choice(cache, monkeypatch, on):
    if not on:
        monkeypatch.setenv("KFUSE_AUTOTUNE", "0")
        monkeypatch.setattr(config, "_config", config.from_env())
    m = _RMSNorm(515).eval()
    x = torch.randn(97, 515)
    cm = kfuse.compile(m, (x,))
    torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-5)
    [k] = [k for k in cm.report().kernels if k.backend == "c"]
    if on:
        # the choice, then every variant timed with its time: the chosen one among them (any of them may
        # win on a machine, the prefetching one included)
        chosen, timed = k.schedule.split(" (autotuned: ", 1)
        assert re.search(r"(^|, )" + re.escape(chosen) + r" \d+\.\d+(,| ms)", timed) and "static " in timed, k.schedule
        assert "autotuned" in str(cm.report())
    else:
        assert k.schedule == "" and "autotuned" not in str(cm.report())


def _candidates(calls: list, times: dict):
    """pick() candidates that record their calls and sleep the seconds `times[name]` gives per call (a
    list: one entry per call, in turn)."""

    def make(name):
        def f(arg):
            seq = times[name]
            calls.append(name)
            time.sleep(seq[(calls.count(name) - 1) % len(seq)])
        return f
    return {n: make(n) for n in times}


def test_pick_takes_each_kernels_fastest_call(cache):
    """A kernel preempted on most of its calls (a loaded machine: 8 ms slices) still wins on its fastest
    one; the medians would have picked the other."""
    calls = []
    best, text = autotune.pick("p", _candidates(calls, {"a": [0.004, 0.004, 0.0002], "b": [0.001]}), lambda: None)
    assert best == "a" and "measured" in text, text


def test_pick_keeps_the_first_kernel_on_a_near_tie(cache):
    """A candidate replaces the first only when its fastest call is KERNEL_MARGIN faster: a near-tie,
    timed either way from compile to compile, keeps the first; a clear win does not."""
    # b 1.6% faster: as far from a tie's edge (3%) as from b measured slower than a
    best, text = autotune.pick("p", _candidates([], {"a": [0.0050], "b": [0.00492]}), lambda: None)
    assert best == "a" and "the first kept" in text, text
    best, text = autotune.pick("q", _candidates([], {"a": [0.0050], "b": [0.0030]}), lambda: None)
    assert best == "b" and "the first kept" not in text, text
    assert autotune.winner([1.0, 0.98, 0.99], 0.03) == 0 and autotune.winner([1.0, 0.96], 0.03) == 1
    assert autotune.winner([0.96, 1.0, 0.98], 0.03, default=2) == 2 and autotune.winner([0.9, 1.0, 0.98], 0.03, default=2) == 0


def test_pick_timed_again_when_a_kernel_source_changes(cache, monkeypatch):
    calls = []
    cands = _candidates(calls, {"a": [0.0002], "b": [0.001]})
    assert autotune.pick("p", cands, lambda: None)[1].endswith("ms)")
    assert autotune.pick("p", cands, lambda: None)[1] == "a (measured, cached)"
    monkeypatch.setattr(autotune, "kernels_fingerprint", lambda: "another build")
    assert "cached" not in autotune.pick("p", cands, lambda: None)[1]


def test_a_load_at_another_thread_count_takes_the_artifacts_choice(cache):
    """A serving replica on one CPU loads an artifact compiled on two: its kernels are the compiled ones
    (the same bits), not timed again at one thread, which could pick the other kernel; another machine's
    artifact, or none being loaded, times the choice."""
    calls = []
    cands = _candidates(calls, {"a": [0.0002], "b": [0.001]})
    autotune.adopt({autotune._key("\0".join([autotune.problem("p"), "a", "b", autotune.kernels_fingerprint()]), 2):
                    [1, "b"]})
    with autotune.compiled_on(autotune.machine_key(), threads=2):
        assert autotune.pick(autotune.problem("p"), cands, lambda: None, threads=1) == \
            ("b", "b (the artifact's choice, made at 2 threads)")
    assert calls == []
    other = autotune.machine_key().replace("\n", "\nanother CPU\n", 1)
    with autotune.compiled_on(other, threads=2):
        assert autotune.pick(autotune.problem("p"), cands, lambda: None, threads=1)[0] == "a"
    assert calls


def _load_shown(text: str) -> int:
    """The percentage a choice's text gives for its load: about the fake's fraction, since the fake clock
    and the timing read perf_counter at slightly different moments (under CI's load, 89% for 0.9)."""
    return int(re.search(r"under load, (\d+)% of the time waiting for a CPU", text)[1])


def _load(monkeypatch, fractions: list):
    """waited() as if each timing in turn had spent fractions[i] of its thread-time waiting for a CPU."""
    clock = {"ns": 0, "t": None, "i": 0}

    def waited():
        if clock["t"] is None:          # a timing starts
            clock["t"] = time.perf_counter()
            return clock["ns"]
        wall = (time.perf_counter() - clock["t"]) * 1e9 * 2
        clock["ns"] += int(fractions[min(clock["i"], len(fractions) - 1)] * wall)
        clock["t"], clock["i"] = None, clock["i"] + 1
        return clock["ns"]
    monkeypatch.setattr(autotune, "waited", waited)
    return clock


def test_a_timing_under_load_is_taken_again_and_a_disturbed_choice_is_not_cached(cache, monkeypatch):
    """Another process holding the CPUs while a choice is timed: the timing is taken again (up to
    ATTEMPTS), the least disturbed one decides, and a choice still disturbed holds for this process
    only (the report says so); the next process times it again, and stores it once quiet."""
    calls = []
    cands = _candidates(calls, {"a": [0.0002], "b": [0.002]})
    clock = _load(monkeypatch, [0.5, 0.3, 0.4])
    best, text = autotune.pick("p", cands, lambda: None)
    assert best == "a" and clock["i"] == autotune.ATTEMPTS, text
    assert _load_shown(text) == pytest.approx(30, abs=3) and text.endswith("of the time waiting for a CPU: not cached)")
    assert autotune.pick("p", cands, lambda: None)[1] == "a (measured, cached)"       # this process's memo
    autotune.flush()
    assert not (cache / "autotune.json").exists()
    monkeypatch.setattr(autotune, "_memo", {})                                      # the next process
    clock = _load(monkeypatch, [0.6, 0.02])
    best, text = autotune.pick("p", cands, lambda: None)
    assert clock["i"] == 2 and "under load" not in text and "measured:" in text, text
    autotune.flush()
    [entry] = json.loads((cache / "autotune.json").read_text()).values()
    # the fake clock and the timing read perf_counter at slightly different moments: about, not equal
    assert entry["variant"] == "a" and entry["load"] == pytest.approx(0.02, abs=0.005)
    monkeypatch.setattr(autotune, "_memo", {})
    assert autotune.pick("p", cands, lambda: None)[1] == "a (measured, cached)"


def test_a_schedule_timed_under_load_is_not_cached(cache, monkeypatch):
    _load(monkeypatch, [0.9])
    k = _kernel(CASES["add+layernorm rows"][0], (257, 131), (257, 131))
    fn = build(k)
    assert fn.choice.how == "timed" and fn.choice.load == pytest.approx(0.9, abs=0.05)
    assert _load_shown(str(fn.choice)) == pytest.approx(90, abs=5) and "not cached" in str(fn.choice)
    autotune.flush()
    assert not (cache / "autotune.json").exists()


def test_an_entry_cached_before_timings_were_checked_for_load_is_timed_again(cache, monkeypatch):
    calls = []
    cands = _candidates(calls, {"a": [0.0002], "b": [0.002]})
    autotune.pick("p", cands, lambda: None)
    autotune.flush()
    path = cache / "autotune.json"
    entries = json.loads(path.read_text())
    for e in entries.values():
        del e["load"]                       # as the cache file of an earlier version holds it
    path.write_text(json.dumps(entries))
    monkeypatch.setattr(autotune, "_memo", {})
    assert "measured:" in autotune.pick("p", cands, lambda: None)[1]


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="Linux schedstat")
def test_waited_sees_another_process_holding_the_cpus():
    """The measure itself: with a busy process on every CPU, a 2-thread timing's threads wait for a CPU
    for much more than LOAD_MAX of their time."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.2)
        a = torch.randn(384, 384)
        with openmp.using(2):
            w, t = autotune.waited(), time.perf_counter()
            while time.perf_counter() - t < 0.5:
                a @ a
            load = (autotune.waited() - w) / ((time.perf_counter() - t) * 1e9 * 2)
    finally:
        for p in busy:
            p.kill()
    assert load > 2 * autotune.LOAD_MAX, load


def test_cold_pick_overwrites_the_caches_before_each_call_and_is_its_own_choice(cache, monkeypatch):
    calls = []

    class Buffer:
        def add_(self, v):
            calls.append("evict")
    monkeypatch.setattr(autotune, "_evict_buffer", lambda: Buffer())
    cands = _candidates(calls, {"a": [0.0002], "b": [0.0003]})
    autotune.pick("p", cands, lambda: None)
    assert "evict" not in calls
    assert "cached" not in autotune.pick("p", cands, lambda: None, cold=True)[1]      # not the warm choice
    timed = calls[calls.index("evict"):]
    # after each call's warm-up (the first of each), every call is preceded by an eviction
    assert all(timed[i - 1] == "evict" for i, c in enumerate(timed) if c != "evict" and i > 2), timed


def test_weights_from_memory_evicts_then_reads_the_inputs_again(cache, monkeypatch):
    """inside weights_from_memory(True) each timed call finds its weights cold and its inputs warm (read
    again after the eviction, as the kernel before leaves them), and the choice is keyed apart"""
    calls = []

    class Buffer:
        def add_(self, v):
            calls.append("evict")

    class Input(torch.Tensor):
        def sum(self, *a, **kw):
            calls.append("read")
            return super().sum(*a, **kw)
    monkeypatch.setattr(autotune, "_evict_buffer", lambda: Buffer())
    cands = _candidates(calls, {"a": [0.0002], "b": [0.0003]})
    inputs = lambda: [torch.randn(4).as_subclass(Input)]      # noqa: E731
    autotune.pick("p", cands, inputs)
    assert "evict" not in calls and "read" not in calls
    with autotune.weights_from_memory(True):
        assert "cached" not in autotune.pick("p", cands, inputs)[1]      # not the warm choice
    timed = calls[calls.index("evict"):]
    # after each candidate's warm-up (b's is the fourth), every call comes after an eviction and a read
    assert all(timed[i - 2:i] == ["evict", "read"] for i, c in enumerate(timed) if c in "ab" and i != 3), timed
    with autotune.weights_from_memory(False):
        assert autotune.pick("p", cands, inputs)[1] == "a (measured, cached)"


@pytest.mark.parametrize("cache_bytes,cold", [(1 << 10, True), (1 << 40, False)])
def test_a_program_whose_weights_exceed_the_cache_times_its_choices_with_them_cold(cache, monkeypatch, cache_bytes,
                                                                                    cold):
    modes = []
    real = autotune._time
    monkeypatch.setattr(autotune, "_time", lambda *a, **kw: modes.append(kw.get("cold", "")) or real(*a, **kw))
    monkeypatch.setattr(autotune, "cache_bytes", lambda: cache_bytes)
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1))
    kfuse.compile(convs, torch.randn(1, 3, 12, 12))
    # the first convolution reads the network's input, timed with every cache cold; the second's input
    # comes from the first
    assert modes[0] == "all" and set(modes[1:]) == {"weights" if cold else ""}, modes


def test_tables_only_looked_up_are_not_weights_a_call_reads():
    from kfuse.runtime import _weight_bytes
    g = Graph()
    ids = g.input([1, 5], torch.int64)
    table, w = g.const(torch.randn(1000, 64)), g.const(torch.randn(64, 32))
    g.outputs = [g.add("matmul", g.add("gather", table, ids, axis=0), w)]
    assert _weight_bytes(g) == 64 * 32 * 4
