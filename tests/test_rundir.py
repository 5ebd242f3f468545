"""A run directory belongs to one process at a time, and nothing finished is ever touched by another run."""

import errno
import fcntl
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
import ream_exp.rundir as rundir
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


# Filesystems that refuse flock (ream_exp/rundir.py FLOCK_REFUSED): .lock-holder.json alone holds the directory.
REFUSALS = [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP]
NO_FLOCK = ("import errno, fcntl, os\n"
            "def refuse(*args): raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))\n"
            "fcntl.flock = refuse\n")


def _refuse_flock(monkeypatch, code: int) -> None:
    def refuse(*args):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(fcntl, "flock", refuse)  # what filelock calls on Unix


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid names no process
    return child.pid


@pytest.mark.parametrize("code", REFUSALS, ids=[errno.errorcode[c] for c in REFUSALS])
def test_without_flock_the_holder_file_holds_the_directory(tmp_path, monkeypatch, caplog, code):
    _refuse_flock(monkeypatch, code)
    with caplog.at_level(logging.WARNING, logger="ream_exp"):
        with hold_run_dir(tmp_path):
            holder = json.loads((tmp_path / HOLDER_NAME).read_text())
            assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
            with pytest.raises(RunDirBusy) as refused:
                with hold_run_dir(tmp_path):
                    pass
            assert json.loads((tmp_path / HOLDER_NAME).read_text()) == holder  # the refused one left it alone
    message = str(refused.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
    assert f"delete {tmp_path / HOLDER_NAME}" in message
    fallbacks = [r.message for r in caplog.records if "refuses flock" in r.message]
    assert fallbacks and all(errno.errorcode[code] in m and "\n" not in m for m in fallbacks)
    assert not (tmp_path / HOLDER_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lock-")]  # no claim or dead file left
    with hold_run_dir(tmp_path):  # released
        pass


@pytest.mark.parametrize("code", REFUSALS, ids=[errno.errorcode[c] for c in REFUSALS])
def test_without_flock_a_dead_holder_of_this_host_is_taken_over(tmp_path, monkeypatch, caplog, code):
    _refuse_flock(monkeypatch, code)
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:00+0000"}
    (tmp_path / HOLDER_NAME).write_text(json.dumps(dead))
    with caplog.at_level(logging.WARNING, logger="ream_exp"):
        with hold_run_dir(tmp_path):
            assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert any(f"pid {dead['pid']}" in r.message and "took over" in r.message for r in caplog.records)
    assert not (tmp_path / HOLDER_NAME).exists()


def test_without_flock_a_holder_on_another_host_is_refused(tmp_path, monkeypatch):
    _refuse_flock(monkeypatch, errno.ENOLCK)
    other = json.dumps({"pid": _dead_pid(), "host": "another-node", "started": "2024-01-01T00:00:00+0000"})
    (tmp_path / HOLDER_NAME).write_text(other)
    with pytest.raises(RunDirBusy) as refused:
        with hold_run_dir(tmp_path):
            pass
    assert "on another-node" in str(refused.value) and f"delete {tmp_path / HOLDER_NAME}" in str(refused.value)
    assert (tmp_path / HOLDER_NAME).read_text() == other  # this host cannot tell whether it is gone


def test_without_flock_a_live_holder_process_is_refused_and_its_lock_taken_over_once_killed(tmp_path, monkeypatch,
                                                                                              caplog):
    holder = subprocess.Popen([sys.executable, "-c", NO_FLOCK + HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    _refuse_flock(monkeypatch, errno.ENOLCK)
    try:
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid} on {socket.gethostname()}"):
            with hold_run_dir(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="ream_exp"):
        with hold_run_dir(tmp_path):
            assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert any(f"pid {holder.pid}" in r.message and "took over" in r.message for r in caplog.records)
    assert not (tmp_path / HOLDER_NAME).exists()


def test_without_flock_a_link_answered_eexist_but_made_still_holds(tmp_path, monkeypatch):
    _refuse_flock(monkeypatch, errno.ENOLCK)
    link = os.link

    def lost_reply(src, dst):  # NFS retried the link after its first reply was lost
        link(src, dst)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
    monkeypatch.setattr(os, "link", lost_reply)
    with hold_run_dir(tmp_path):
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / HOLDER_NAME).exists()


def test_a_live_claim_that_replaced_a_dead_holder_is_put_back(tmp_path):
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:00+0000"}
    live = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:01+0000"})
    (tmp_path / HOLDER_NAME).write_text(live)  # another process took over between our read and our move
    assert not rundir._remove_dead(tmp_path, dead)
    assert (tmp_path / HOLDER_NAME).read_text() == live and [p.name for p in tmp_path.iterdir()] == [HOLDER_NAME]


def test_ctrl_c_in_a_stage_marks_the_logged_run_failed_and_releases_the_directory(tiny_checkpoint, tmp_path,
                                                                                  monkeypatch):
    from ream_exp.tracking import NullLogger

    class Recorder(NullLogger):
        def finish(self, exit_code=0):
            finished.append(exit_code)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    finished = []
    monkeypatch.setattr(run_module, "make_logger", lambda *a, **k: Recorder())
    monkeypatch.setattr(run_module, "evaluate", ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(*_args(tiny_checkpoint, tmp_path, "ratio=0.25")), out)
    assert finished == [1]  # W&B records the run as failed, not finished
    assert (out / "plan.json").exists() and not (out / "error.txt").exists() and not (out / "metrics.json").exists()
    with hold_run_dir(out):
        pass


def _interrupted(*args, cwd, interrupt=""):
    """`ream-exp ARGS` with Ctrl-C pressed in the evaluation of the run directory named `interrupt`."""
    return subprocess.run([sys.executable, "-m", "tests.interrupt_child", *args], capture_output=True, text=True,
                          env={**ENV, "INTERRUPT_RUN": interrupt}, cwd=PACKAGE_DIR.parent, timeout=600)


@pytest.mark.slow  # two launches through the CLI, with W&B
def test_ctrl_c_is_one_line_and_the_relaunch_sets_the_attempt_and_its_wandb_run_aside(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = [*_args(tiny_checkpoint, tmp_path, "ratio=0.25", f"hydra.run.dir={out}"), "logger=wandb",
            "logger.mode=offline", "save=true"]
    stopped = _interrupted(*args, cwd=tmp_path, interrupt="run")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-1] == f"interrupted: {out}; relaunch the same command to resume"
    assert "Traceback" not in stopped.stdout + stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    assert not (out / "metrics.json").exists() and not (out / "error.txt").exists()
    left = {"plan.json", "checkpoint", "wandb"}
    assert left <= {p.name for p in out.iterdir()}
    (interrupted_wandb,) = (out / "wandb").glob("offline-run-*")
    assert not (out / HOLDER_NAME).exists()  # the directory was released
    resumed = _interrupted(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["status"] == "done"
    (attempt,) = (out / "attempts").iterdir()
    assert left <= {p.name for p in attempt.iterdir()}
    assert [p.name for p in (attempt / "wandb").glob("offline-run-*")] == [interrupted_wandb.name]
    (fresh_wandb,) = (out / "wandb").glob("offline-run-*")  # `wandb sync` of the run dir: the finished run alone
    assert fresh_wandb.name != interrupted_wandb.name
