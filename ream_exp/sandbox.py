"""The one place where model-written code runs: each program in a contained subprocess.

    from ream_exp.sandbox import Limits, run_program
    outcome = run_program(source, Limits(timeout_s=3.0))   # outcome.passed: exit 0 in time

Used by the toy_code task (ream_exp/toy/tasks/utils.py), humaneval and livecodebench (ream_exp/code_tasks/:
humaneval replaces lm-eval's own, so that its tests run here instead of in HF `evaluate`).

What containment means here -- resource, process and working-directory containment:
- the program runs in a fresh Python interpreter (-I: no PYTHONPATH, no user site) in its own
  session and process group, with stdin from /dev/null and a minimal environment;
- its working directory is a fresh temporary directory, removed afterwards, so relative paths land
  there;
- it runs under hard resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size of
  any file it writes, its captured output included (RLIMIT_FSIZE), and no core files;
- at the wall-clock timeout, and also after a normal exit, the whole process group is killed, so
  forked children (background sleepers, pools) never outlive it; processes that left the group
  (setsid, a daemon's double fork) are found by a marker in their environment and killed too.
This is NOT a security sandbox: the program runs as the same OS user, so it can still read and
write any absolute path that user can, open network connections, and a program that clears its
own environment and leaves the process group escapes the kill. Run untrusted models' code in a
container or VM when that matters.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

MARKER_VAR = "REAM_SANDBOX_RUN"  # set in every program's environment: finds its strays
OUTPUT_CHARS = 20_000  # how much of stdout / stderr is kept for error messages

# Limits are set by this bootstrap inside the child, before the program is read. Setting them in a
# preexec_fn instead would run Python code between fork and exec, which can deadlock when the
# parent has other threads (torch, tokenizers). Soft = hard, so the program cannot raise them.
BOOTSTRAP = """\
import resource, runpy, sys
cpu, memory, file_size = (int(v) for v in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = [sys.argv[4]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. RLIMIT_NPROC is not set: it counts every process of the OS user (the
    evaluation's own threads included), so no value fits every machine."""

    timeout_s: float = 3.0  # wall clock; then the process group is killed
    cpu_s: int = 10  # RLIMIT_CPU: also bounds a busy process that escaped the group
    memory_bytes: int = 2 << 30  # RLIMIT_AS (address space; numpy alone reserves a few hundred MB)
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: every file written, the captured output included


@dataclass(frozen=True)
class Outcome:
    passed: bool  # exited with status 0 before the timeout
    returncode: int | None  # None at the timeout; negative: killed by that signal (-9 at RLIMIT_CPU)
    timed_out: bool
    stdout: str
    stderr: str


def contained(hook):
    """Marks an lm-eval hook (process_results or metric) that runs model-written code only through
    run_program; ream_exp.evaluation refuses to run a code-executing task without such a hook."""
    hook.runs_code_contained = True
    return hook


def is_contained(hook) -> bool:
    # lm-eval keeps a metric function as its bound `__call__`; look through to the function.
    return bool(getattr(getattr(hook, "__self__", hook), "runs_code_contained", False))


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Runs Python `source` contained (see the module docstring) and reports how it ended."""
    workdir = Path(tempfile.mkdtemp(prefix="ream-sandbox-"))
    marker = uuid.uuid4().hex
    try:
        (workdir / "main.py").write_text(source)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            returncode, timed_out = _run(workdir, marker, limits, out, err)
            stdout, stderr = _read(out), _read(err)
    finally:
        _remove_tree(workdir)
    passed = returncode == 0 and not timed_out
    return Outcome(passed, returncode, timed_out, stdout, stderr)


def _run(workdir: Path, marker: str, limits: Limits, out, err) -> tuple[int | None, bool]:
    command = [sys.executable, "-I", "-c", BOOTSTRAP, str(limits.cpu_s), str(limits.memory_bytes),
               str(limits.file_bytes), "main.py"]
    # Output goes to files outside workdir, not pipes: a child holding a pipe open would make the
    # parent wait for it.
    process = subprocess.Popen(command, cwd=workdir, env=_environment(workdir, marker),
                               stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               start_new_session=True)
    timed_out = True
    try:
        timed_out = not _wait_unreaped(process.pid, limits.timeout_s)
    finally:
        # The leader is unreaped (a zombie, or still running), so its pid -- the group's id --
        # cannot have been reused: the group kill reaches this program's processes only.
        _kill_group(process.pid)
        returncode = process.wait()
        _kill_strays(marker)
    return (None if timed_out else returncode), timed_out


def _environment(workdir: Path, marker: str) -> dict:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",  # thread pools reserve address space per thread
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        MARKER_VAR: marker,
    }


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """True once the process has exited (left unreaped), False at the timeout."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass


def _kill_strays(marker: str, rounds: int = 5) -> None:
    """SIGKILLs processes that left the group but still carry this run's marker (Linux /proc)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    for _ in range(rounds):
        found = [pid for pid in _proc_pids() if needle in _environ(pid)]
        if not found:
            return
        for pid in found:
            _kill_pid(pid)


def _proc_pids() -> list[int]:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    return [int(p.name) for p in proc.iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or another user's process
        return b""


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(handle) -> str:
    handle.seek(0)
    return handle.read(OUTPUT_CHARS).decode("utf-8", errors="replace")


def _remove_tree(path: Path) -> None:
    """Removes the work directory even when the program made parts of it read-only."""
    def make_writable_and_retry(function, target, _exc):
        try:
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            os.chmod(target, stat.S_IRWXU)
            function(target)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)

