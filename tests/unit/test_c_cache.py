"""The C kernel cache: concurrent builds, damaged cached libraries, a missing compiler."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kfuse import config
from kfuse.backends.c import build, compiler
from kfuse.ir import Graph
from kfuse.kernels import lower

# A script that builds one kernel in a fresh process and checks its result.
CHILD = """
import sys, torch
from kfuse.ir import Graph
from kfuse.kernels import lower
from kfuse.backends.c import build
g = Graph(); x = g.input([1000], torch.float32); y = g.add("exp", g.add("mul", x, g.const(%r)))
fn = build(lower([n for n in g.nodes if n.op not in ("input", "const")], [y]))
a = torch.randn(1000); out = torch.empty(1000); fn([a], [out])
assert torch.allclose(out, torch.exp(a * %r)), "wrong result"
print("ok")
"""


def _kernel(scale=0.5):
    g = Graph()
    x = g.input([100], torch.float32)
    y = g.add("tanh", g.add("mul", x, g.const(scale)))
    return lower([n for n in g.nodes if n.op not in ("input", "const")], [y])


def _run(fn):
    x = torch.randn(100)
    out = torch.full((100,), float("nan"))
    fn([x], [out])
    return torch.allclose(out, torch.tanh(x * 0.5))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(config, "_config", config.from_env())   # settings are read once: re-read them
    compiler._loaded.clear()    # forget libraries this process loaded from other cache dirs
    return tmp_path


def test_two_processes_compile_the_same_kernel_at_once(cache):
    scale = 0.123456  # a kernel no other test builds
    procs = [subprocess.Popen([sys.executable, "-c", CHILD % (scale, scale)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip() == "ok", err
    assert len(list(cache.glob("*.so"))) == 1
    assert not list(cache.glob(".build-*"))   # temporary build dirs are cleaned up


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_cached_library_is_rebuilt(cache, damage):
    k = _kernel()
    build(k)
    (so,) = cache.glob("*.so")
    data = so.read_bytes()
    so.unlink()   # a new inode, as another process would leave it (this one has the old one mapped)
    so.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x7fELF" + b"\0" * 5000,
                    "empty": b""}[damage])
    compiler._loaded.clear()    # as a new process would
    assert _run(build(k))
    assert compiler._complete_elf(so) and len(so.read_bytes()) == len(data)


def test_missing_compiler_raises_compile_error_naming_it(cache, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/kfuse-cc")
    monkeypatch.setattr(config, "_config", config.from_env())
    with pytest.raises(compiler.CompileError, match="kfuse-cc"):
        build(_kernel(0.77))


def test_compiler_error_is_reported(cache, monkeypatch):
    monkeypatch.setenv("CC", "false")   # a program that runs and fails
    monkeypatch.setattr(config, "_config", config.from_env())
    with pytest.raises(compiler.CompileError, match="C compiler failed"):
        build(_kernel(0.78))


def test_cache_key_changes_with_flags_and_source(cache):
    a = compiler.library_path("int f(void){return 1;}")
    assert a == compiler.library_path("int f(void){return 1;}")
    assert a != compiler.library_path("int f(void){return 2;}")
    assert a != compiler.library_path("int f(void){return 1;}", flags=tuple(compiler.FLAGS[1:]))


def test_collecting_records_sources_and_keeps_no_stand_in(cache):
    """backends.prebuild's two steps: kernels made while collecting hold stand-ins (which raise if called,
    and are cached nowhere), then build_all builds what they recorded, and the kernels made after load it."""
    src = "int kf_seven(void) { return 7; }\n"

    @compiler.keeps_built
    def seven():
        return compiler.load(src).kf_seven

    with compiler.collecting() as wanted:
        assert compiler.is_collecting()
        stand_in = seven()
        k = build(_kernel())
    assert not compiler.is_collecting()
    with pytest.raises(RuntimeError, match="kf_seven called while its library was only being collected"):
        stand_in()
    with pytest.raises(RuntimeError, match="only being collected"):
        k([torch.randn(100)], [torch.empty(100)])
    assert len(wanted) == 2 and not list(cache.glob("*.so"))          # recorded, nothing built yet
    assert compiler.build_all(wanted) == 2 and len(list(cache.glob("*.so"))) == 2
    assert compiler.build_all(wanted) == 0                             # on disk now
    assert seven()() == 7                 # not the stand-in: it was not kept
    assert _run(build(_kernel()))


def test_a_kernel_made_with_a_stand_in_is_made_again_and_one_made_whole_is_kept(cache):
    from kfuse.backends.constants import shared
    src = "int kf_eight(void) { return 8; }\n"

    @compiler.keeps_built
    def eight():
        return compiler.load(src).kf_eight

    class Kernel:
        def __init__(self, weight):
            self.fn = eight()
    w = torch.randn(64, 64)
    with compiler.collecting() as wanted:
        first = shared(Kernel, w)
        assert wanted.stand_ins == 1 and shared(Kernel, w) is not first      # holds a stand-in: not kept
    compiler.build_all(wanted)
    with compiler.collecting() as wanted:
        whole = shared(Kernel, w)
        assert shared(Kernel, w) is whole and not wanted and wanted.stand_ins == 0
    assert shared(Kernel, w) is whole and whole.fn() == 8


def test_build_all_leaves_a_failing_compiler_to_load(cache, monkeypatch):
    with compiler.collecting() as wanted:
        build(_kernel(0.79))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(config, "_config", config.from_env())
    assert compiler.build_all(wanted) == 0          # no error here: the kernel's build reports it
    with pytest.raises(compiler.CompileError, match="C compiler failed"):
        build(_kernel(0.79))


# A first compile (an empty cache, a fresh process) of a model with convolutions, max pooling, a depthwise ->
# 1x1 pair, a global average pool, a linear and an elementwise kernel: which C builds ran inside build_all,
# and which one at a time after.
FIRST_COMPILE = """
import json, threading, torch, kfuse
from kfuse.backends.c import compiler
torch.manual_seed(0)
late, build = [], compiler._build
def recorded(src, path, flags):
    if threading.current_thread() is threading.main_thread():
        late.append(src.splitlines()[0][:60])
    build(src, path, flags)
compiler._build = recorded
class M(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.c1, s.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        s.dw, s.pw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.Conv2d(16, 24, 1)
        s.fc = torch.nn.Linear(24, 10)
    def forward(s, x):
        y = torch.nn.functional.max_pool2d(torch.relu(s.bn(s.c1(x))), 2)
        y = s.pw(torch.relu(s.dw(y)))
        return torch.tanh(s.fc(y.mean((2, 3))) * 0.5 + 1)
m, x = M().eval(), torch.randn(1, 3, 12, 12)
cm = kfuse.compile(m, (x,))
with torch.no_grad():
    err = (cm(x) - m(x)).abs().max().item()
    cm(x)                   # the second call makes the native runner: built after the kernels
print(json.dumps({"late": late, "built": len(list(compiler.cache_dir().glob("*.so"))), "err": err,
                  "backends": sorted({k.backend for k in cm.report().kernels})}))
"""


def test_first_compile_builds_its_libraries_together_before_timing(tmp_path):
    env = {**os.environ, "KFUSE_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", FIRST_COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["err"] < 1e-4
    assert out["built"] >= 4, out                      # our GEMM, depthwise, the pair, the elementwise kernel
    # every kernel built by build_all, none one at a time; the native runner after them: at the second call,
    # and the two programs' of settle.faster where a choice timed in the program changed a kernel
    assert out["late"] and set(out["late"]) == {"/* a program's native runner (kfuse/runtime/native.py) */"}, out
    assert {"c:gemm", "c:max_pool2d", "c:depthwise+gemm", "c:reduce_mid", "c"} <= set(out["backends"]), out
