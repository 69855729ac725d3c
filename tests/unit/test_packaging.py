"""What an installed kfuse offers: its version, and the Dynamo backend as an entry point that works
in a process that never imports kfuse itself."""
import importlib.metadata
import subprocess
import sys

import pytest

import kfuse


def _installed():
    try:
        return importlib.metadata.distribution("kfuse")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kfuse is not installed (pip install -e .)")


def test_one_version_string():
    assert _installed().version == kfuse.__version__


def test_dynamo_backend_is_an_entry_point():
    _installed()
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert [e.value for e in eps if e.name == "kfuse"] == ["kfuse.dynamo:kfuse_backend"]


def test_torch_compile_finds_kfuse_without_importing_it():
    _installed()
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())\n"
        "f = torch.compile(m, backend='kfuse', dynamic=False)\n"
        "x = torch.randn(4, 8)\n"
        "with torch.no_grad():\n"
        "    err = float((f(x) - m(x)).abs().max())\n"
        "print(err, 'kfuse.dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    err, loaded = out.stdout.split()
    assert float(err) < 1e-5 and loaded == "True"
