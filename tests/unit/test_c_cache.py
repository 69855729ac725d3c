"""The C kernel cache: concurrent builds, damaged cached libraries, a missing compiler."""
from __future__ import annotations

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
