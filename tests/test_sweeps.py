"""Sweeps: every definition in sweeps/ composes; a multirun survives a failed run, resumes, and a sweep
killed at random points loses and repeats nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ream_exp import PACKAGE_DIR
from ream_exp.rundir import HOLDER_NAME

SWEEPS = sorted((PACKAGE_DIR.parent / "sweeps").glob("*.yaml"))
REAM_EXP = str(Path(sys.executable).parent / "ream-exp")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _hydra(*args, cwd=None):
    return subprocess.run([REAM_EXP, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_sweep_definitions_compose(sweep):
    done = _hydra("--config-dir", str(sweep.parent), "--config-name", sweep.stem, "--cfg", "hydra")
    assert done.returncode == 0, done.stderr[-2000:]
    searched = "mix_search" in done.stdout  # a search (hydra/sweeper=mix_search) has no fixed params
    assert ("n_trials:" if searched else "params:") in done.stdout and f"outputs/sweeps/{sweep.stem}" in done.stdout


def test_slurm_launcher_is_a_config_choice():
    done = _hydra("--config-dir", str(SWEEPS[0].parent), "--config-name", "paper_grid", "hydra/launcher=slurm",
                  "--cfg", "hydra")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SlurmLauncher" in done.stdout


def _summary(stdout):
    """The sweep summary's per-run lines as {run directory name: status}."""
    lines = stdout[stdout.index("sweep summary:"):].splitlines()
    return lines[0], {Path(l.split()[1]).name: l.split()[0] for l in lines[1:] if l.startswith("  ")}


@pytest.mark.slow  # three sweeps through the CLI
def test_failed_run_does_not_sink_the_sweep_and_sweeps_resume(tiny_checkpoint, tmp_path):
    args = ["-m", "model=local", f"model.path={tiny_checkpoint}", "method=freq", "ratio=0.25,0.9,0.5", "eval=none",
            "logger=none", "save=false", "calib.n=8", "calib.seq_len=32", "progress=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=r${ratio}", f"cache_dir={tmp_path / 'c'}"]
    first = _hydra(*args, cwd=tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]  # a failed run fails the sweep, after all runs
    good, bad, last = (tmp_path / "sweep" / f"r{r}" for r in ("0.25", "0.9", "0.5"))
    assert json.loads((good / "metrics.json").read_text())["status"] == "done"
    assert json.loads((last / "metrics.json").read_text())["status"] == "done"  # the run after the failure ran
    assert not (bad / "metrics.json").exists() and "fewer than top_k" in (bad / "error.txt").read_text()
    head, runs = _summary(first.stdout)
    assert head == "sweep summary: 2 done, 0 skipped, 1 failed"
    assert runs == {"r0.25": "done", "r0.9": "failed", "r0.5": "done"}
    assert "fewer than top_k" in next(l for l in first.stdout.splitlines() if "r0.9" in l and "failed" in l)
    stamp = (good / "metrics.json").stat().st_mtime_ns
    again = _hydra(*args, cwd=tmp_path)
    assert again.returncode == 1 and "skipped" in again.stdout
    assert _summary(again.stdout) == ("sweep summary: 0 done, 2 skipped, 1 failed",
                                      {"r0.25": "skipped", "r0.9": "failed", "r0.5": "skipped"})
    assert (good / "metrics.json").stat().st_mtime_ns == stamp  # finished result untouched
    assert (bad / "error.txt").exists() and list((bad / "attempts").iterdir())  # retried, old error kept
    fine = _hydra(*[a.replace("ratio=0.25,0.9,0.5", "ratio=0.25,0.5") for a in args], cwd=tmp_path)
    assert fine.returncode == 0 and _summary(fine.stdout)[0] == "sweep summary: 0 done, 2 skipped, 0 failed"


@pytest.mark.slow  # two sweeps through the CLI
def test_ctrl_c_stops_the_sweep_with_its_summary_and_one_line(tiny_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model=local", f"model.path={tiny_checkpoint}", "method=freq", "ratio=0.25,0.5,0.75", "eval=none",
            "logger=none", "save=true", "calib.n=8", "calib.seq_len=32", "progress=false",
            f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=r${ratio}", f"cache_dir={tmp_path / 'c'}"]

    def launch(interrupt=""):  # Ctrl-C in the evaluation of the run directory named `interrupt`
        env = {**ENV, "INTERRUPT_RUN": interrupt,
               "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-m", "tests.interrupt_child", *args], capture_output=True,
                              text=True, env=env, cwd=PACKAGE_DIR.parent, timeout=600)

    stopped = launch(interrupt="r0.5")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stdout + stopped.stderr
    assert _summary(stopped.stdout) == ("sweep summary: 1 done, 0 skipped, 0 failed, 1 interrupted",
                                        {"r0.25": "done", "r0.5": "interrupted"})
    assert stopped.stderr.splitlines()[-1] == f"interrupted: {sweep / 'r0.5'}; relaunch the same command to resume"
    assert not (sweep / "r0.75").exists()  # the sweep stopped: no later run started
    resumed = launch()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _summary(resumed.stdout) == ("sweep summary: 2 done, 1 skipped, 0 failed",
                                        {"r0.25": "skipped", "r0.5": "done", "r0.75": "done"})
    assert (sweep / "r0.5" / "attempts").is_dir()  # the interrupted attempt's plan and checkpoint, set aside


def _status(metrics: Path):
    try:
        return json.loads(metrics.read_text()).get("status")
    except (OSError, ValueError):
        return None


def _finished(sweep: Path) -> dict:
    """Every finished metrics.json under the sweep: run directory -> (inode, mtime, content)."""
    found = {}
    for path in sweep.glob("*/metrics.json"):
        stat, content = path.stat(), path.read_bytes()
        if _status(path) == "done":
            found[path.parent.name] = (stat.st_ino, stat.st_mtime_ns, content)
    return found


def _running(sweep: Path) -> set:
    """Run directories whose lock holder is recorded and whose metrics.json is not written yet."""
    return {d.name for d in sweep.glob("*") if (d / HOLDER_NAME).exists() and not (d / "metrics.json").exists()}


def _launch_and_kill(args, sweep: Path, log: Path, new_runs: int, pause: float) -> None:
    """Start the sweep; once `new_runs` more runs finished and the next one holds its directory, SIGKILL it
    `pause` seconds later (0: just after it took its lock; else loading, calibrating, writing plan.json ...)."""
    target = len(_finished(sweep)) + new_runs
    with log.open("w") as out:
        sweep_process = subprocess.Popen([REAM_EXP, *args], stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                         cwd=sweep.parent, start_new_session=True)
        deadline = time.monotonic() + 600
        while (len(_finished(sweep)) < target or not _running(sweep)) and sweep_process.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(pause)
        os.killpg(sweep_process.pid, signal.SIGKILL)
        sweep_process.wait()


@pytest.mark.slow  # four launches of a 12-run sweep
def test_sweep_killed_at_random_points_loses_and_repeats_nothing(tiny_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model=local", f"model.path={tiny_checkpoint}", "method=freq,random",
            "ratio=0.125,0.25,0.375,0.5,0.625,0.75", "eval=none", "logger=none", "save=false", "calib.n=8",
            "calib.seq_len=32", "progress=false", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${method.name}-r${ratio}",
            f"cache_dir={tmp_path / 'cache'}"]
    rng = random.Random(11)
    seen, stale_after_kills = {}, set()
    for kill in range(3):
        # the first kill lands just after a run took its lock, the others at random moments (a toy run
        # lasts about 0.3 s here, so those may also fall between two runs)
        pause = 0.0 if kill == 0 else rng.uniform(0, 0.2)
        _launch_and_kill(args, sweep, tmp_path / f"kill{kill}.log", rng.randint(1, 3), pause)
        now = _finished(sweep)
        assert {d: now[d] for d in seen} == seen, "a finished run was recomputed or lost"
        assert len(now) < 12, "the kill came after the last run"
        seen = now
        stale_after_kills |= {d.name for d in sweep.iterdir() if (d / HOLDER_NAME).exists()}
    assert stale_after_kills, "no kill fell inside a run"
    stale = {d.name for d in sweep.iterdir() if (d / HOLDER_NAME).exists()}
    final = _hydra(*args, cwd=tmp_path)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    done = _finished(sweep)
    assert len(done) == 12 and {d: done[d] for d in seen} == seen
    assert f"sweep summary: {12 - len(seen)} done, {len(seen)} skipped, 0 failed" in final.stdout
    for name in stale:  # a killed run's lock is taken over, not waited for
        assert any("took over the lock" in l and name in l for l in final.stdout.splitlines()), name
    for attempt_metrics in sweep.glob("*/attempts/*/metrics.json"):  # nothing finished was set aside
        assert _status(attempt_metrics) != "done"
    assert not list(sweep.glob(f"*/{HOLDER_NAME}"))  # every lock released
