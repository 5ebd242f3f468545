"""The test driver that runs ONE LiveCodeBench candidate program against its tests, inside the sandbox.

ream_exp.code_tasks.livecodebench appends a call `run(code, tests_json, func_name, timeout_s, token)`
to this file's text and hands the whole to ream_exp.sandbox.run_program, which runs it in a fresh
interpreter (-I: only the standard library), so this file imports nothing from ream_exp.

It runs the tests in order and stops at the first failure, each under a wall-clock timer:
- stdin/stdout problems: the program runs as `__main__` once per test with the test's input on file
  descriptor 0 and file descriptor 1 captured, so input(), sys.stdin(.buffer), open(0), print and
  os.write(1, ...) all behave as on a judge; outputs are compared token by token (see same_output);
- functional problems (LeetCode): the program is executed once, then `Solution().<func_name>` (or a
  module-level function of that name) is called with each test's JSON-decoded arguments and its
  result compared with the JSON-decoded expected value.
Only when every test passed does it print `token` on the original standard output and exit 0: a
program that ends the process itself (os._exit(0)) can therefore never be counted as passing.
"""

import builtins
import json
import os
import signal
import sys
import threading
from decimal import Decimal, InvalidOperation

# Names every candidate may use without importing them, as on the judges' Python environments
# (LeetCode's starter code uses List, Optional, ... unimported). `from builtins import *` comes last
# so that math's star import does not shadow the builtin pow(base, exp, mod).
PRELUDE = """\
import bisect, collections, copy, functools, heapq, itertools, math, operator, random, re, string, sys
from bisect import *
from collections import *
from functools import *
from heapq import *
from itertools import *
from math import *
from typing import *
from builtins import *
sys.setrecursionlimit(50000)
"""

INPUT_FILE, OUTPUT_FILE = "test_input.txt", "test_output.txt"


class TimeLimit(BaseException):
    """Raised by the timer; a BaseException, so `except Exception` in the candidate cannot eat it."""


def _on_alarm(_signum, _frame):
    raise TimeLimit()


class timer:
    """Context manager: TimeLimit is raised in the main thread after `seconds` of wall clock."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *_exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        return False


# ---------------------------------------------------------------- output comparison
def _tokens_equal(got: list[str], expected: list[str]) -> bool:
    if got == expected:
        return True
    if len(got) != len(expected):
        return False
    try:  # numbers compare by value ("1.50" == "1.5"), exactly (Decimal, not float)
        return all(Decimal(a) == Decimal(b) for a, b in zip(got, expected))
    except (InvalidOperation, ValueError):
        return False


def same_output(got: str, expected: str) -> bool:
    """Line by line, each line's whitespace-separated tokens equal (as text or as numbers); blank
    lines and whitespace at either end of the output, and at either end of a line, do not count."""
    got_lines, expected_lines = got.strip().split("\n"), expected.strip().split("\n")
    return len(got_lines) == len(expected_lines) and all(
        _tokens_equal(a.split(), b.split()) for a, b in zip(got_lines, expected_lines))


# ---------------------------------------------------------------- stdin/stdout problems
class judge_io:
    """Points fds 0 / 1 (and sys.stdin / sys.stdout) at the test's input and a capture file."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved = (os.dup(0), os.dup(1), sys.stdin, sys.stdout)
        for fd, path, flags in ((0, INPUT_FILE, os.O_RDONLY),
                                (1, OUTPUT_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        self.stdout = open(1, "w", closefd=False)
        sys.stdin, sys.stdout = open(0, "r", closefd=False), self.stdout

    def __exit__(self, *_exc):
        for stream in {sys.stdout, self.stdout}:  # the program may have replaced sys.stdout
            try:
                stream.flush()
            except Exception:  # closed or broken by the program: what reached the file counts
                pass
        saved_in, saved_out, sys.stdin, sys.stdout = self.saved
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)
        return False


def _join_program_threads(main: threading.Thread) -> None:
    # Judges' Python idiom for deep recursion: the work runs in a thread with a big stack.
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()


def run_stdin_test(program, test: dict, seconds: float) -> str | None:
    """None when the program's output matches; otherwise why not."""
    with open(INPUT_FILE, "w") as handle:
        handle.write(test["input"])
    with judge_io(), timer(seconds):
        try:
            exec(program, {"__name__": "__main__", "__builtins__": builtins})
        except SystemExit:  # exit() / sys.exit() end the program, not the test
            pass
        _join_program_threads(threading.current_thread())
    with open(OUTPUT_FILE, errors="replace") as handle:
        output = handle.read()
    return None if same_output(output, test["output"]) else "wrong answer"


# ---------------------------------------------------------------- functional problems
class printing_discarded:
    """What a functional solution prints goes to /dev/null: fd 1 stays free for the verdict."""

    def __enter__(self):
        sys.stdout.flush()
        self.sink = open(os.devnull, "w")
        self.saved = (os.dup(1), sys.stdout)
        os.dup2(self.sink.fileno(), 1)
        sys.stdout = self.sink

    def __exit__(self, *_exc):
        saved_out, sys.stdout = self.saved
        os.dup2(saved_out, 1)
        os.close(saved_out)
        self.sink.close()
        return False


def load_function(program, func_name: str, seconds: float):
    namespace = {"__name__": "solution", "__builtins__": builtins}
    with printing_discarded(), timer(seconds):
        exec(program, namespace)
        if "Solution" in namespace:  # LeetCode: a method of class Solution
            return getattr(namespace["Solution"](), func_name)
    return namespace[func_name]


def _lists(value):
    # A tuple where the expected JSON has a list is the same answer.
    if isinstance(value, (tuple, list)):
        return [_lists(item) for item in value]
    return value


def run_functional_test(function, test: dict, seconds: float) -> str | None:
    # One JSON value per line, one line per argument (a blank line is never a value).
    arguments = [json.loads(line) for line in test["input"].split("\n") if line.strip()]
    expected = json.loads(test["output"])
    with printing_discarded(), timer(seconds):
        result = function(*arguments)
    return None if _lists(result) == expected else "wrong answer"


# ---------------------------------------------------------------- driver
def first_failure(code: str, tests: list, func_name, seconds: float) -> str | None:
    """None when every test passes, else a one-line reason naming the first failing test."""
    try:
        program = compile(PRELUDE + code, "solution.py", "exec")
        function = load_function(program, func_name, seconds) if func_name else None
    except BaseException as error:  # noqa: BLE001 -- any failure of the candidate is a verdict
        return f"does not load: {type(error).__name__}: {error}"
    for index, test in enumerate(tests):
        try:
            if function is not None:
                reason = run_functional_test(function, test, seconds)
            else:
                reason = run_stdin_test(program, test, seconds)
        except TimeLimit:
            reason = f"time limit ({seconds} s)"
        except BaseException as error:  # noqa: BLE001
            reason = f"{type(error).__name__}: {error}"
        if reason is not None:
            return f"test {index + 1}/{len(tests)}: {reason}"
    return None


def run(code: str, tests_json: str, func_name, seconds: float, token: str) -> None:
    verdict_fd = os.dup(1)  # the candidate never writes here: fd 1 is redirected during tests
    reason = first_failure(code, json.loads(tests_json), func_name, seconds)
    if reason is None:
        os.write(verdict_fd, (token + "\n").encode())
    else:
        os.write(2, (reason[:2000] + "\n").encode(errors="replace"))
    # os._exit: threads the candidate left running must not keep the process alive.
    os._exit(0 if reason is None else 1)
