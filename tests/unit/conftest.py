"""Fixtures of the unit tests."""
from __future__ import annotations

import pytest

from kfuse import config
from kfuse.backends.c import autotune, compiler


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache dir, 2 threads for kfuse's kernels (variants exist on any machine), autotuning on, and
    a quiet machine: a timing disturbed by CI's load would be taken again (its warm-ups repeated) and not
    cached, which tests of call patterns and caching do not expect; the load tests set their own."""
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KFUSE_NUM_THREADS", "2")
    monkeypatch.delenv("KFUSE_AUTOTUNE", raising=False)
    monkeypatch.setattr(config, "_config", config.from_env())    # settings are read once: re-read them
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(autotune, "waited", lambda: 0)
    compiler._loaded.clear()
    return tmp_path
