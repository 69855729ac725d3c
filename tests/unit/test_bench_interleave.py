"""bench/common.py's interleaved timing (`--interleave` of bench_models.py and the kernel benches): workers
in their own processes serve timed blocks in rotated rounds; a slower provider reads slower, every round
times each worker once, and a worker that fails to build or dies while timed is reported, not waited for."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[2] / "bench"

WORKER = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import common
mode, calls, until = sys.argv[2], [0], [0.0]
if mode == "broken":
    print("RESULT " + json.dumps({"error": "no such model"}))
    sys.exit(0)
if mode == "crash":
    sys.exit("build failed: out of cheese")
if mode == "plain":                 # a worker that times itself (run_worker), never reading stdin
    print("built")
    print("RESULT " + json.dumps({"label": mode}))
    sys.exit(0)
def spin():                  # a pool spinning on after the calls, as ONNX Runtime's does for ~55 ms
    while True:
        while time.perf_counter() < until[0]:
            pass
        time.sleep(0.001)
def f():
    calls[0] += 1
    if mode == "dies" and calls[0] > 20:
        os._exit(3)
    if mode == "spins":
        until[0] = time.perf_counter() + 0.15
        if calls[0] == 1:
            threading.Thread(target=spin, daemon=True).start()
    time.sleep(0.001 if mode in ("dies", "spins") else float(mode))
common.serve_blocks(f, block_s=0.01)
print("RESULT " + json.dumps({"label": mode, "calls": calls[0]}))
"""


@pytest.fixture
def common(monkeypatch):
    monkeypatch.setenv("KFUSE_BENCH_REEXEC", "1")     # no re-execution of this process with the bench env
    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(threads)                      # common sets the bench's thread count
    return module


def _served(common, tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return common.Served([str(script), str(BENCH), mode], echo=None, timeout=120)


def test_workers_are_timed_in_the_same_rounds_and_their_results_come_back(common, tmp_path):
    fast, slow = _served(common, tmp_path, "0.001"), _served(common, tmp_path, "0.004")
    try:
        assert fast.ready() is None and slow.ready() is None
        res = common.interleaved({"fast": fast, "slow": slow}, rounds=5)
        assert [len(res[n]["samples"]) for n in ("fast", "slow")] == [5, 5]
        assert res["fast"]["ms"] >= 1.0 and res["slow"]["ms"] >= 4.0
        assert res["slow"]["ms"] > 1.5 * res["fast"]["ms"]
        assert res["fast"]["p10"] <= res["fast"]["ms"] <= res["fast"]["p90"]
        done = fast.finish()
        # sized to ~10 ms blocks: a few calls sizing them, 5 untimed and 5 timed blocks
        assert done["label"] == "0.001" and done["calls"] >= 5 * (fast.calls + 1)
    finally:
        fast.close()
        slow.close()


@pytest.mark.parametrize("mode, why", [("broken", "no such model"), ("crash", "out of cheese")])
def test_a_worker_that_cannot_build_says_why(common, tmp_path, mode, why):
    w = _served(common, tmp_path, mode)
    assert why in w.ready()


def test_run_worker_returns_a_plain_worker_s_result_or_why_it_has_none(common, tmp_path, capsys):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    assert common.run_worker([str(script), str(BENCH), "plain"], echo="  > ") == {"label": "plain"}
    assert "  > built" in capsys.readouterr().out
    assert "out of cheese" in common.run_worker([str(script), str(BENCH), "crash"], echo=None)["error"]


def test_a_worker_that_dies_while_timed_is_dropped_and_the_others_are_timed_on(common, tmp_path):
    ok, dies = _served(common, tmp_path, "0.001"), _served(common, tmp_path, "dies")
    try:
        assert ok.ready() is None and dies.ready() is None
        res = common.interleaved({"ok": ok, "dies": dies}, rounds=6)
        assert "worker stopped" in res["dies"]["error"] and "exit 3" in res["dies"]["error"]
        assert len(res["ok"]["samples"]) == 6
        with pytest.raises(RuntimeError, match="worker stopped"):     # not a broken pipe
            dies.block()
    finally:
        ok.close()
        dies.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the idle wait reads /proc")
def test_the_next_block_waits_for_a_worker_spinning_after_its_block(common, tmp_path):
    idle, spins = _served(common, tmp_path, "0.001"), _served(common, tmp_path, "spins")
    try:
        assert idle.ready() is None and spins.ready() is None
        waits = {}
        for name, w in (("idle", idle), ("spins", spins)):
            w.block()
            t0 = time.perf_counter()
            w.settle()
            waits[name] = time.perf_counter() - t0
        assert waits["spins"] >= 0.08 and waits["idle"] < waits["spins"]
    finally:
        idle.close()
        spins.close()
