"""Compiling leaves torch's global random generator where the user's program left it: kernels are
timed on random inputs, and a compile inside a seeded run (generate(do_sample=True) compiles on its
first call) must not change the numbers the run draws next."""
from __future__ import annotations

import torch

import kfuse
from kfuse import config


def test_a_compile_that_times_kernels_leaves_the_global_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path))     # nothing cached: every choice is timed
    monkeypatch.setattr(config, "_config", config.from_env())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 19), torch.nn.GELU()).eval()
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(11)
    want = torch.rand(5)
    torch.manual_seed(11)
    cm = kfuse.compile(model, (x,))
    assert torch.equal(torch.rand(5), want)
    assert "measured" in str(cm.report()), "nothing was timed: the test would not see a draw"
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
