"""Packed weights collapsed into 2 MB pages (Linux THP, madvise MADV_COLLAPSE): the values and
addresses kernels hold stay as they were; only regions wholly inside a weight are collapsed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import kfuse
from kfuse import config
from kfuse.backends import hugepages, linear
from kfuse.runtime import settle

PAGE = hugepages.PAGE
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
                               reason="transparent huge pages are not available here")


def huge_bytes(address: int, nbytes: int = 1) -> int:
    """AnonHugePages of the mappings overlapping [address, address + nbytes) (/proc/self/smaps; a
    tensor's memory may span more than one)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo < address + nbytes and address < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def test_regions_are_the_2mb_pages_wholly_inside():
    assert hugepages.regions(PAGE, 3 * PAGE) == [PAGE, 2 * PAGE, 3 * PAGE]
    assert hugepages.regions(PAGE + 4096, 3 * PAGE) == [2 * PAGE, 3 * PAGE]      # the partial ends are left
    assert hugepages.regions(PAGE + 4096, PAGE) == []
    assert hugepages.regions(0, 0) == []


@needs_thp
def test_back_keeps_values_and_addresses():
    t = torch.randn(6 * PAGE // 4)
    want, address = t.clone(), t.data_ptr()
    n = hugepages.back(t)
    if n == 0:
        pytest.skip("the kernel collapsed nothing (no MADV_COLLAPSE, or no free huge page)")
    assert t.data_ptr() == address and torch.equal(t, want)
    # at least one region in huge pages now (the kernel may split some again under memory pressure)
    assert huge_bytes(address, t.untyped_storage().nbytes()) >= PAGE
    assert hugepages.back(torch.randn(100)) == 0 and hugepages.back(None, "x", 3) == 0


@needs_thp
@pytest.mark.parametrize("setting", ["1", "0"])
def test_a_compiled_linears_weights_are_collapsed_unless_turned_off(setting, monkeypatch):
    monkeypatch.setenv("KFUSE_HUGEPAGES", setting)
    monkeypatch.setattr(config, "_config", config.from_env())
    given, collapsed = [], []
    back = hugepages.back

    def recording(*tensors):
        given.extend(tensors)
        collapsed.append(back(*tensors))
        return collapsed[-1]
    monkeypatch.setattr(hugepages, "back", recording)
    # our GEMM, whose packed weight is a plain tensor (oneDNN's is opaque): the timed choice between the two
    # is close for this GEMV and once went to oneDNN in CI
    monkeypatch.setattr(linear, "pick", lambda problem, cands, inputs, **kw: ("c:gemm", "c:gemm (this test's)"))
    monkeypatch.setattr(settle, "propose", lambda program: {})     # and kept: not timed again in the program
    model = torch.nn.Sequential(torch.nn.Linear(1024, 3000), torch.nn.GELU(), torch.nn.Linear(3000, 17)).eval()
    x = torch.randn(1, 1024)
    cm = kfuse.compile(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    big = [t for t in given if t.untyped_storage().nbytes() >= 4 * PAGE]      # the 12 MB weight, packed
    assert big, "the first linear's packed weight was not given to hugepages.back"
    assert all(k.backend == "c:gemm" for k in cm.report().kernels if k.name.startswith("gemm")), cm.report().kernels
    if setting == "0":
        assert sum(collapsed) == 0
    else:
        assert sum(collapsed) > 0 and huge_bytes(big[0].untyped_storage().data_ptr(), big[0].untyped_storage().nbytes()) > 0
