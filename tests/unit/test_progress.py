"""A compile's progress: shown on stderr where asked (KFUSE_PROGRESS=1, or stderr a terminal), the
C library builds as they start, always logged to the "kfuse" logger; quiet otherwise."""
from __future__ import annotations

import logging
import re

import pytest
import torch

import kfuse
from kfuse import config


class Affine(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x * 1.75 + 0.5)


def _compile_fresh(tmp_path, monkeypatch, progress: str | None):
    """A compile into an empty kernel cache, so it builds its C library."""
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path))
    if progress is None:
        monkeypatch.delenv("KFUSE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("KFUSE_PROGRESS", progress)
    monkeypatch.setattr(config, "_config", config.from_env())
    x = torch.randn(3, 37)
    cm = kfuse.compile(Affine(), (x,))
    torch.testing.assert_close(cm(x), torch.tanh(x * 1.75 + 0.5), rtol=1e-5, atol=1e-6)


def test_progress_shows_the_library_builds(tmp_path, monkeypatch, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="kfuse"):
        _compile_fresh(tmp_path, monkeypatch, "1")
    err = capsys.readouterr().err
    assert re.search(r"^kfuse: building \d+ C kernel librar(y|ies) \(\d+ at a time\) \.\.\. \d+\.\d s$", err, re.M), err
    assert all(line.startswith("kfuse: ") for line in err.splitlines()), err
    assert any(r.getMessage().startswith("compiled Affine for f32[3, 37] in ") for r in caplog.records)


@pytest.mark.parametrize("progress", ["0", None])
def test_progress_is_quiet_when_off_or_not_a_terminal(tmp_path, monkeypatch, capsys, progress):
    _compile_fresh(tmp_path, monkeypatch, progress)       # capsys: stderr is not a terminal
    assert "kfuse:" not in capsys.readouterr().err


def test_a_stage_that_others_interrupt_ends_on_a_line_of_its_own(capsys):
    from kfuse import progress
    with progress.stage("outer", always="  "):
        with progress.stage("inner", always="  "):
            pass
    assert re.fullmatch(r"  outer \.\.\.\n  inner \.\.\. \d+\.\d s\n  outer: \d+\.\d s\n", capsys.readouterr().err)


def test_a_dynamo_graphs_first_call_shows_what_it_compiled(monkeypatch, capsys):
    from kfuse import progress
    monkeypatch.setenv("KFUSE_PROGRESS", "1")
    monkeypatch.setattr(config, "_config", config.from_env())
    monkeypatch.setattr(progress, "SLOW_S", 0.0)       # every step shown, however quick
    torch._dynamo.reset()
    fn = torch.compile(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval(), backend="kfuse")
    x = torch.randn(3, 16)
    with torch.no_grad():
        fn(x)
        first = capsys.readouterr().err
        fn(x)
        again = capsys.readouterr().err
    torch._dynamo.reset()
    assert re.search(r"^kfuse: compiled Dynamo graph \d+ \(static, 1 kfuse segment\(s\)\) and ran it in \d+\.\d s$",
                     first, re.M), first
    assert re.search(r"^kfuse: compiled a Dynamo graph's segment for f32\[3, 16\] in ", first, re.M), first
    assert again == ""          # a call that compiles nothing shows nothing
