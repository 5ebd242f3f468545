"""Sweeps: every definition in sweeps/ composes; a multirun survives a failed run and resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ream_exp import PACKAGE_DIR

SWEEPS = sorted((PACKAGE_DIR.parent / "sweeps").glob("*.yaml"))
REAM_EXP = str(Path(sys.executable).parent / "ream-exp")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _hydra(*args, cwd=None):
    return subprocess.run([REAM_EXP, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_sweep_definitions_compose(sweep):
    done = _hydra("--config-dir", str(sweep.parent), "--config-name", sweep.stem, "--cfg", "hydra")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "params:" in done.stdout and f"outputs/sweeps/{sweep.stem}" in done.stdout


def test_slurm_launcher_is_a_config_choice():
    done = _hydra("--config-dir", str(SWEEPS[0].parent), "--config-name", "paper_grid", "hydra/launcher=slurm",
                  "--cfg", "hydra")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SlurmLauncher" in done.stdout


def test_failed_run_does_not_sink_the_sweep_and_sweeps_resume(tiny_checkpoint, tmp_path):
    args = ["-m", "model=local", f"model.path={tiny_checkpoint}", "method=freq", "ratio=0.25,0.9", "eval=none",
            "logger=none", "save=false", "calib.n=8", "calib.seq_len=32", "progress=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=r${ratio}", f"cache_dir={tmp_path / 'c'}"]
    first = _hydra(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    good, bad = tmp_path / "sweep" / "r0.25", tmp_path / "sweep" / "r0.9"
    assert json.loads((good / "metrics.json").read_text())["status"] == "done"
    assert not (bad / "metrics.json").exists() and "fewer than top_k" in (bad / "error.txt").read_text()
    stamp = (good / "metrics.json").stat().st_mtime_ns
    again = _hydra(*args, cwd=tmp_path)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert (good / "metrics.json").stat().st_mtime_ns == stamp  # finished result untouched
    assert (bad / "error.txt").exists() and list((bad / "attempts").iterdir())  # retried, old error kept
