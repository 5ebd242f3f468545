"""A run directory belongs to one process at a time, and nothing finished is ever touched by another run."""

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ream_exp.run as run_module
from ream_exp import PACKAGE_DIR
from ream_exp.rundir import HOLDER_NAME, RunDirBusy, hold_run_dir, set_aside
from ream_exp.run import run
from tests.test_config import make_cfg

REAM_EXP = str(Path(sys.executable).parent / "ream-exp")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
# A stand-in for a run in progress in another process: holds the directory until killed.
HOLDER = ("import sys, time; from pathlib import Path; from ream_exp.rundir import hold_run_dir\n"
          "with hold_run_dir(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n")


def _args(tiny_checkpoint, tmp_path, *extra):
    return ["model=local", f"model.path={tiny_checkpoint}", "method=freq", "eval=none", "logger=none", "save=false",
            "calib.n=8", "calib.seq_len=32", "progress=false", f"cache_dir={tmp_path / 'cache'}", *extra]


def _cli(*args, cwd):
    return subprocess.run([REAM_EXP, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def _digest(run_dir: Path) -> dict:
    """Every file under run_dir with its content hash and modification time."""
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _start_holder(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow  # three launches through the CLI
def test_another_config_is_refused_and_leaves_every_byte(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    first = _cli(*_args(tiny_checkpoint, tmp_path, "ratio=0.25", f"hydra.run.dir={out}"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert {"metrics.json", "plan.json", "config.yaml", "run.log", ".hydra/config.yaml", ".hydra/overrides.yaml"} \
        <= set(_digest(out))
    assert "run finished" in (out / "run.log").read_text()  # the run's own log is still written
    before = _digest(out)
    other = _cli(*_args(tiny_checkpoint, tmp_path, "ratio=0.5", f"hydra.run.dir={out}"), cwd=tmp_path)
    assert other.returncode != 0 and "different config" in other.stderr
    assert _digest(out) == before
    again = _cli(*_args(tiny_checkpoint, tmp_path, "ratio=0.25", f"hydra.run.dir={out}"), cwd=tmp_path)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert _digest(out) == before


def test_held_directory_is_refused_at_once_naming_the_holder(tiny_checkpoint, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = _start_holder(out)
    try:
        before = _digest(out)
        refused = _cli(*_args(tiny_checkpoint, tmp_path, "ratio=0.25", f"hydra.run.dir={out}"), cwd=tmp_path)
        assert refused.returncode != 0
        (line,) = [l for l in refused.stderr.splitlines() if "in use by" in l]
        assert f"pid {holder.pid} on {socket.gethostname()}" in line and "started" in line
        assert _digest(out) == before  # no error.txt, no config, no log in a directory another process holds
    finally:
        holder.kill()
        holder.wait()


def test_same_config_relaunched_while_it_runs_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "nested"
    cfg = make_cfg(*_args(tiny_checkpoint, tmp_path, "ratio=0.25"))
    stages = run_module._run_stages
    refusals = []

    def relaunch_midway(*args):
        with pytest.raises(RunDirBusy) as refused:
            run(cfg, out)
        refusals.append(str(refused.value))
        return stages(*args)

    monkeypatch.setattr(run_module, "_run_stages", relaunch_midway)
    metrics = run(cfg, out)
    assert metrics["status"] == "done" and json.loads((out / "metrics.json").read_text()) == metrics
    (message,) = refusals
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
    assert not (out / HOLDER_NAME).exists() and not (out / "attempts").exists()
    with hold_run_dir(out):  # released once metrics.json is written
        pass


def test_lock_of_a_killed_run_is_taken_over(tiny_checkpoint, tmp_path, caplog):
    out = tmp_path / "stale"
    out.mkdir()
    holder = _start_holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((out / HOLDER_NAME).read_text())["pid"] == holder.pid  # its record outlived it
    with caplog.at_level(logging.WARNING, logger="ream_exp"):
        metrics = run(make_cfg(*_args(tiny_checkpoint, tmp_path, "ratio=0.25")), out)
    assert metrics["status"] == "done"
    assert any(f"pid {holder.pid}" in r.message and "took over" in r.message for r in caplog.records)
    assert not (out / HOLDER_NAME).exists()


def test_damaged_metrics_is_an_unfinished_attempt(tiny_checkpoint, tmp_path, caplog):
    out = tmp_path / "damaged"
    cfg = make_cfg(*_args(tiny_checkpoint, tmp_path, "ratio=0.25"))
    run(cfg, out)
    cut = (out / "metrics.json").read_bytes()[:40]  # a write cut short
    (out / "metrics.json").write_bytes(cut)
    with caplog.at_level(logging.WARNING, logger="ream_exp"):
        metrics = run(cfg, out)
    assert metrics["status"] == "done" and json.loads((out / "metrics.json").read_text()) == metrics
    assert any("unreadable" in r.message for r in caplog.records)
    (attempt,) = (out / "attempts").iterdir()
    assert (attempt / "metrics.json").read_bytes() == cut and (attempt / "plan.json").exists()


def test_attempts_within_one_second_do_not_collide(tmp_path):
    kept = []
    for i in range(3):
        (tmp_path / "error.txt").write_text(f"attempt {i}")
        kept.append(set_aside(tmp_path, ["error.txt"]))
    assert len(set(kept)) == 3
    assert sorted((a / "error.txt").read_text() for a in kept) == ["attempt 0", "attempt 1", "attempt 2"]
