"""Settings read from the environment: KFUSE_DUMP prints the named pipeline steps, KFUSE_CACHE_DIR and
CC are read once (a changed environment is seen only through a fresh config)."""
import torch

import kfuse
from kfuse import config


def _use_env(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(config, "_config", config.from_env())


def test_dump_prints_the_named_steps(monkeypatch, capsys):
    _use_env(monkeypatch, KFUSE_DUMP="schedule,codegen")
    kfuse.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()), (torch.randn(2, 4),))
    err = capsys.readouterr().err
    assert "after schedule" in err and "after codegen" in err and "def program(arena, i0)" in err
    assert "after fold ---" not in err


def test_dump_all(monkeypatch, capsys):
    _use_env(monkeypatch, KFUSE_DUMP="all")
    kfuse.compile(torch.nn.ReLU(), (torch.randn(3),))
    err = capsys.readouterr().err
    for step in ("fold", "patterns", "fold_again", "layout", "fission", "schedule", "kernels", "memory_plan", "codegen"):
        assert f"after {step} ---" in err, step


def test_settings_are_read_once(monkeypatch, tmp_path):
    before = config.get()
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path))
    assert config.get() is before                      # no re-read behind the user's back
    assert config.from_env().cache_dir == tmp_path
