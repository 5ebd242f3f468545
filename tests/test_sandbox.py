"""ream_exp/sandbox.py: model-written programs stay contained; humaneval's pass@k runs through it.

    pytest tests/test_sandbox.py

Every program here is a real subprocess; each test takes at most a few seconds.
"""

import itertools
import time
from pathlib import Path

import pytest

from ream_exp.code_tasks import humaneval
from ream_exp.sandbox import Limits, is_contained, run_program

SETTLE_S = 2.5  # longer than the grandchildren below sleep before writing their marker


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for its (new) parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


# The grandchild is a fresh interpreter (exec), so only what the kernel tracks -- its process group,
# its environment -- can find it; {environment} {{}} drops the sandbox's marker variable.
FORK_THEN_WRITE = """
import os, sys, time
pid = os.fork()
if pid == 0:
    {child_setup}
    os.execve(sys.executable, [sys.executable, "-c", {child!r}], {environment})
print(pid, flush=True)
{parent_tail}
"""
WRITE_LATER = "import time; time.sleep(1.5); open({marker!r}, 'w').write('survived')"


def _fork_then_write(marker: Path, child_setup: str, environment: str, parent_tail: str) -> str:
    child = WRITE_LATER.format(marker=str(marker))
    return FORK_THEN_WRITE.format(child_setup=child_setup, child=child, environment=environment,
                                  parent_tail=parent_tail)


@pytest.mark.parametrize("parent_tail", ["", "time.sleep(60)"], ids=["parent-exits", "parent-times-out"])
def test_forked_grandchild_is_killed_with_the_group(tmp_path, parent_tail):
    """Killed by the process-group kill alone: it stays in the group but carries no marker."""
    marker = tmp_path / "marker"
    source = _fork_then_write(marker, "pass", "{}", parent_tail)
    outcome = run_program(source, Limits(timeout_s=0.5 if parent_tail else 5.0))
    assert outcome.timed_out == bool(parent_tail)
    child = int(outcome.stdout.split()[0])
    time.sleep(SETTLE_S)
    assert not marker.exists() and _gone(child)


def test_daemonised_grandchild_that_left_the_group_is_killed(tmp_path):
    """Left the session and group (setsid): found by the marker in its environment."""
    marker = tmp_path / "marker"
    outcome = run_program(_fork_then_write(marker, "os.setsid()", "os.environ", ""), Limits(timeout_s=5.0))
    child = int(outcome.stdout.split()[0])
    time.sleep(SETTLE_S)
    assert not marker.exists() and _gone(child)


def test_relative_writes_land_in_a_temporary_directory_that_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = "import os\nopen('result.txt', 'w').write('x')\nos.makedirs('sub/deeper')\nos.chmod('sub', 0o500)\nprint(os.getcwd())"
    outcome = run_program(source)
    assert outcome.passed
    workdir = Path(outcome.stdout.strip())
    assert workdir != tmp_path and not (tmp_path / "result.txt").exists()
    assert not workdir.exists()  # removed, read-only subfolder included


def test_absolute_paths_stay_writable_not_a_security_sandbox(tmp_path):
    """Documented limit: the program runs as the same OS user, so absolute paths are reachable."""
    target = tmp_path / "absolute.txt"
    assert run_program(f"open({str(target)!r}, 'w').write('x')").passed
    assert target.read_text() == "x"


def test_endless_loop_stops_at_the_wall_clock_timeout():
    start = time.monotonic()
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=1.0))
    elapsed = time.monotonic() - start
    assert outcome.timed_out and not outcome.passed and outcome.returncode is None
    assert 1.0 <= elapsed < 5.0


def test_cpu_limit_kills_a_busy_program_before_the_timeout():
    start = time.monotonic()
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=60.0, cpu_s=1))
    assert not outcome.timed_out and outcome.returncode == -9  # SIGKILL at the hard RLIMIT_CPU
    assert time.monotonic() - start < 30.0


def test_memory_bomb_fails_under_the_address_space_limit():
    limit = 512 << 20
    bomb = run_program(f"block = bytearray({2 * limit})", Limits(memory_bytes=limit))
    assert not bomb.passed and "MemoryError" in bomb.stderr
    assert run_program(f"block = bytearray({limit // 8})", Limits(memory_bytes=limit)).passed


def test_file_size_limit_stops_large_writes():
    limit = 1 << 20
    big = run_program(f"open('big', 'wb').write(b'x' * {2 * limit})", Limits(file_bytes=limit))
    assert not big.passed and "File too large" in big.stderr
    assert run_program(f"open('small', 'wb').write(b'x' * {limit // 2})", Limits(file_bytes=limit)).passed


def test_limits_environment_and_stdin_seen_by_the_program(monkeypatch):
    monkeypatch.setenv("REAM_TEST_SECRET", "must-not-leak")
    source = (
        "import os, resource, sys\n"
        "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)\n"
        "assert resource.getrlimit(resource.RLIMIT_CPU) == (7, 7)\n"
        "assert resource.getrlimit(resource.RLIMIT_FSIZE) == (12345, 12345)\n"
        "assert os.getpgid(0) == os.getpid() == os.getsid(0)  # own session and group\n"
        "assert sys.stdin.read() == ''\n"
        "assert 'REAM_TEST_SECRET' not in os.environ\n"
    )
    outcome = run_program(source, Limits(cpu_s=7, file_bytes=12345))
    assert outcome.passed, outcome.stderr


def test_correct_and_failing_programs():
    assert run_program("assert sum(range(4)) == 6\nprint('ok')").stdout == "ok\n"
    assert not run_program("assert sum(range(4)) == 7").passed
    assert not run_program("def broken(:\n    pass").passed  # syntax error
    assert not run_program("import sys\nsys.exit(3)").passed


# ---------------------------------------------------------------- humaneval through the sandbox

ADD_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)"


def test_humaneval_pass_at_1_runs_each_candidate():
    docs = [{"prompt": ADD_PROMPT}]
    good = humaneval.build_predictions([["    return a + b\n"]], docs)
    bad = humaneval.build_predictions([["    return a * b\n"]], docs)
    looping = humaneval.build_predictions([["    while True:\n        pass\n"]], docs)
    assert good == [[ADD_PROMPT + "    return a + b\n"]]
    assert humaneval.pass_at_k([ADD_TEST], good, k=[1]) == 1.0
    assert humaneval.pass_at_k([ADD_TEST], bad, k=[1]) == 0.0
    assert humaneval.pass_at_k([ADD_TEST], looping, k=1) == 0.0
    assert is_contained(humaneval.pass_at_k) and is_contained(humaneval.pass_at_k.__call__)


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (6, 1, 3), (4, 0, 2), (4, 4, 3), (3, 2, 3)])
def test_pass_at_k_estimate_matches_counting_the_subsets(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert humaneval._estimate(c, n, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="pass@2"):
        humaneval._estimate(1, 1, 2)
    with pytest.raises(ValueError, match="one k"):
        humaneval.pass_at_k([ADD_TEST], [[ADD_PROMPT]], k=[1, 2])

