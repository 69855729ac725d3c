"""Kernels chosen by timing alone, timed again in their program (kfuse/runtime/settle.py): the verdicts,
the kernels they change, the whole-program check that can refuse them, and what is cached."""
from __future__ import annotations

import time

import pytest
import torch
from helpers import compiled

import kfuse
from kfuse.backends.c import autotune
from kfuse.backends.choice import Contest
from kfuse.ir import Graph
from kfuse.report import Report
from kfuse.runtime import settle


def _cnn():
    """Two convolutions with several candidates each (ours, oneDNN's), odd sizes."""
    m = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 12, 1)).eval()
    return m, torch.randn(2, 8, 11, 13)


def _mlp():
    """Linears with several candidates each (oneDNN's, MKL's packed, our GEMM): GELU, none, odd sizes."""
    m = torch.nn.Sequential(torch.nn.Linear(40, 72), torch.nn.GELU(), torch.nn.Linear(72, 24)).eval()
    return m, torch.randn(3, 37, 40)


MODELS = {"cnn": (_cnn, "conv2d"), "mlp": (_mlp, "linear")}


def _contested(cm, model="cnn"):
    """The report's kernels of the model's contested kind."""
    return [k for k in cm.report().kernels if k.ops[0] == MODELS[model][1]]


def _convs(cm):
    return _contested(cm)


def _fails(*a, **kw):
    raise AssertionError("timed again")


def _walks_favouring(monkeypatch, contests: dict):
    """settle's walks timing, in each contest, the first candidate that is not the one chosen alone at
    half the others' time; `contests` collects {group: Contest}."""
    def walks(program, cs):
        contests.update(cs)
        fav = {gi: next(n for n in c.names if n != c.chosen) for gi, c in cs.items()}
        return {gi: {n: [1e-3 if n == fav[gi] else 2e-3] * 3 for n in c.names} for gi, c in cs.items()}, 0.0
    monkeypatch.setattr(settle, "_walks", walks)


@pytest.mark.parametrize("model", list(MODELS))
def test_choices_made_alone_are_timed_in_the_program_and_the_verdicts_cached(cache, monkeypatch, model):
    m, x = MODELS[model][0]()
    convs = _contested(compiled(m, x), model)
    assert len(convs) == 2 and all(" (measured in the program: " in k.schedule and "; alone: " in k.schedule
                                   for k in convs), [k.schedule for k in convs]
    # a new process: the verdicts come from the cache file; nothing is timed, alone or in the program
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(settle, "_walks", _fails)
    monkeypatch.setattr(autotune, "_time", _fails)
    again = _contested(compiled(m, x), model)
    assert [k.backend for k in again] == [k.backend for k in convs]
    assert all(k.schedule.startswith(f"{k.backend} (measured in the program, cached)") for k in again), \
        [k.schedule for k in again]


@pytest.mark.parametrize("model", list(MODELS))
def test_a_verdict_against_the_choice_made_alone_changes_the_kernel(cache, monkeypatch, model):
    contests = {}
    _walks_favouring(monkeypatch, contests)
    monkeypatch.setattr(settle, "faster", lambda new, old: True)
    m, x = MODELS[model][0]()
    cm = compiled(m, x)          # the outputs checked against eager's
    convs = _contested(cm, model)
    assert len(contests) == 2
    for k, c in zip(convs, contests.values()):
        fav = next(n for n in c.names if n != c.chosen)
        assert k.backend == fav and k.schedule.startswith(f"{fav} (measured in the program: "), (k, c)
    # the program as made for the user: not called yet (its runner is made at its own second call)
    assert cm._last._native is None and cm._last._native_after
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(settle, "_walks", _fails)
    assert [k.backend for k in _contested(compiled(m, x), model)] == [k.backend for k in convs]


def test_a_program_slower_with_the_verdicts_keeps_the_choices_made_alone(cache, monkeypatch):
    contests = {}
    _walks_favouring(monkeypatch, contests)
    monkeypatch.setattr(settle, "faster", lambda new, old: False)
    m, x = _cnn()
    convs = _convs(compiled(m, x))
    for k, c in zip(convs, contests.values()):
        assert k.backend == c.chosen and k.schedule.startswith(f"{c.chosen} (kept: the program measured slower"), k
    # the kept choices are the verdicts: the next compile neither walks nor changes them
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(settle, "_walks", _fails)
    assert [k.backend for k in _convs(compiled(m, x))] == [c.chosen for c in contests.values()]


class _Sleeper:
    """A stand-in program: a call sleeps `s` seconds."""
    def __init__(self, s, report):
        self.s, self.report, self.graph = s, report, Graph()

    def __call__(self, inputs):
        time.sleep(self.s)
        self.report.launch = f"called {self.s}"


@pytest.mark.parametrize("new_s,old_s,won", [(0.0, 0.004, True), (0.004, 0.0, False)])
def test_faster_calls_both_programs_and_keeps_the_report(new_s, old_s, won):
    report = Report(launch="as it was")
    assert settle.faster(_Sleeper(new_s, report), _Sleeper(old_s, report)) is won
    assert report.launch == "as it was"


def test_a_walk_that_fails_leaves_the_choices_made_alone(cache, monkeypatch):
    def walks(program, contests):
        raise RuntimeError("an input the program cannot take")
    monkeypatch.setattr(settle, "_walks", walks)
    m, x = _cnn()
    convs = _convs(compiled(m, x))
    assert convs and not any("in the program" in k.schedule for k in convs)


def test_an_artifact_loads_with_its_verdicts_and_times_nothing(cache, monkeypatch, tmp_path):
    contests = {}
    _walks_favouring(monkeypatch, contests)
    monkeypatch.setattr(settle, "faster", lambda new, old: True)
    m, x = _cnn()
    cm = compiled(m, x)
    cm.save(tmp_path / "cnn")
    monkeypatch.setattr(autotune, "_memo", {})
    (cache / "autotune.json").unlink()         # another cache: only the artifact knows the verdicts
    monkeypatch.setattr(settle, "_walks", _fails)
    monkeypatch.setattr(autotune, "_time", _fails)
    loaded = kfuse.load(tmp_path / "cnn")
    assert [k.backend for k in _convs(loaded)] == [k.backend for k in _convs(cm)]
    torch.testing.assert_close(loaded(x), cm(x), rtol=0, atol=0)


def test_the_walks_orders_are_balanced_and_no_two_groups_locked_together():
    """Each group runs each candidate equally often, in an order of its own: in rotation a candidate of one
    group always met the same candidate of the group before it, and was timed in that one context."""
    runs = {gi: dict.fromkeys(["a", "b", "c"]) for gi in range(4)} | {9: dict.fromkeys(["x", "y"])}
    order = settle._orders(runs, 30)
    assert order == settle._orders(runs, 30)            # seeded: a compile times what the last one did
    for gi, seq in order.items():
        assert len(seq) == 30 and all(seq.count(n) == 30 // len(runs[gi]) for n in runs[gi]), seq
    for gi in range(3):
        assert len(set(zip(order[gi], order[gi + 1]))) > 3, (order[gi], order[gi + 1])


class _Walked:
    """A stand-in program for settle._walks: group 0 is contested (its candidates take `own[name]` seconds),
    group 1 is a kernel after it that takes `after[name]` seconds after candidate `name`."""

    def __init__(self, own: dict, after: dict):
        self.own, self.after, self.last = own, after, None
        self.graph, self.groups = Graph(), [None, None]

    def arena_buffers(self):
        return {}

    def candidate(self, name):
        def run():
            self.last = name
            time.sleep(self.own[name])
        return run

    def kernel_calls(self, inputs, buffers, call, drop=False):
        call(0, None, None, [])
        call(1, None, lambda: time.sleep(self.after[self.last]), [])


def test_a_candidate_is_charged_for_what_it_costs_the_kernels_after_it():
    """'fast' alone, but the kernel after it runs slower: its time in the walks runs to the next contested
    kernel, so 'steady' is faster there."""
    prog = _Walked({"fast": 0.001, "steady": 0.002}, {"fast": 0.004, "steady": 0.0})
    contest = Contest("key", ["fast", "steady"], "fast", lambda: {n: prog.candidate(n) for n in ("fast", "steady")})
    times, _ = settle._walks(prog, {0: contest})
    med = {n: settle._median(ts) for n, ts in times[0].items()}
    assert med["steady"] < med["fast"] and med["fast"] >= 4.5, med
