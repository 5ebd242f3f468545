"""LiveCodeBench code generation (livecodebench.yaml here): problems, prompt, and pass@1 in the sandbox.

    ream-exp ... eval=gen eval.allow_code_eval=true        # livecodebench is one of the GEN tasks

Problems come from the hub dataset livecodebench/code_generation_lite, one JSONL file per update;
a release (release_v6 = test.jsonl ... test6.jsonl) is all files up to it. The task config names the
release and, optionally, a contest-date window (`metadata`): livecodebench.yaml scores the whole
release_v6 (1055 problems, what the paper's item counts imply: docs/algorithms.md, "GEN protocol");
livecodebench_2502_2505.yaml the window 2025-02-01 to 2025-05-01 that Qwen reports. load_problems keeps
the problems whose contest_date lies in [start_date, end_date) (an open end where a date is null) and
decodes their tests.

Each problem's tests are its public_test_cases (JSON) followed by its private_test_cases, which the
dataset stores either as JSON or compressed: base64 text of zlib-compressed bytes of a pickled str
that holds the JSON. A test is {"input", "output", "testtype"}; testtype "functional" (LeetCode:
`class Solution` with the method named by metadata.func_name, arguments one JSON value per input
line) or "stdin" (the program reads stdin and writes stdout).

Scoring: the code of the answer's last fenced block runs against all tests, in order, in ONE
contained program (livecodebench_harness.py under ream_exp.sandbox), each test under a wall-clock
limit of TEST_TIMEOUT_S and the whole run under (TEST_TIMEOUT_S + 1) * n_tests + 5 s, as
LiveCodeBench's own grader does. A sample passes when every test passes; pass_at_1 is the share of
passing samples (one greedy sample: 1 or 0), and the task's score is its mean over problems.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import math
import pickle
import re
import uuid
import zlib
from pathlib import Path

from ream_exp.config import ConfigError
from ream_exp.sandbox import Limits, contained, run_program

log = logging.getLogger(__name__)

HUB_SOURCE = "hf://datasets/livecodebench/code_generation_lite"
# The files of each release: every update's file up to and including that release's.
UPDATE_FILES = ["test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl"]
RELEASE_FILES = {f"release_v{n}": UPDATE_FILES[:n] for n in range(1, len(UPDATE_FILES) + 1)}

TEST_TIMEOUT_S = 6.0  # per test, wall clock (LiveCodeBench's default)
MEMORY_BYTES = 4 << 30  # address space of the program (LiveCodeBench's grader allows 4 GB)
HARNESS = (Path(__file__).parent / "livecodebench_harness.py").read_text()

# The prompt LiveCodeBench gives chat models: this system message (the task's `description`), then
# the question and a format instruction that depends on whether the problem has starter code.
WITH_STARTER_CODE = ("You will use the following starter code to write the solution to the problem "
                     "and enclose your code within delimiters.")
WITHOUT_STARTER_CODE = ("Read the inputs from stdin solve the problem and write the answer to stdout "
                        "(do not directly test on the sample inputs). Enclose your code within "
                        "delimiters as follows. Ensure that when the python program runs, it reads "
                        "the inputs, runs the algorithm and writes output to STDOUT.")


# ---------------------------------------------------------------- problems
def load_problems(release: str, start_date=None, end_date=None, source: str = HUB_SOURCE, cache_dir=None,
                  **_other_metadata):
    """lm-eval `custom_dataset`: the release's problems dated in [start_date, end_date), tests decoded.

    Called with the task's `metadata` (release; start_date, end_date: null for no bound, both null for
    the whole release; `source`: a directory or hub prefix holding the release's files, the hub by default).
    """
    import datasets

    if release not in RELEASE_FILES:
        raise ConfigError(f"livecodebench metadata.release={release!r}: choose one of {sorted(RELEASE_FILES)}")
    start = dt.datetime.min if start_date is None else _as_datetime(start_date)
    end = dt.datetime.max if end_date is None else _as_datetime(end_date)
    if not start < end:
        raise ConfigError(f"livecodebench metadata.start_date={start_date} must be before "
                          f"metadata.end_date={end_date} (or null for no bound)")
    files = [f"{str(source).rstrip('/')}/{name}" for name in RELEASE_FILES[release]]
    raw = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
    in_window = raw.filter(lambda date: start <= _as_datetime(date) < end, input_columns="contest_date")
    problems = in_window.map(as_problem, remove_columns=in_window.column_names)
    log.info("livecodebench %s: %d of %d problems dated in [%s, %s)", release, len(problems), len(raw),
             start_date or "-", end_date or "-")
    return datasets.DatasetDict({"test": problems})


def _as_datetime(value) -> dt.datetime:
    # contest_date is ISO text, or a timestamp where the JSON reader inferred one; YAML dates are dates.
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    return dt.datetime.fromisoformat(str(value)).replace(tzinfo=None)


def as_problem(row: dict) -> dict:
    """One dataset row as a task doc: the prompt's fields, func_name and all tests as JSON text."""
    tests = json.loads(row["public_test_cases"]) + decode_tests(row["private_test_cases"])
    if not tests:
        raise ValueError(f"livecodebench problem {row['question_id']} has no tests")
    func_name = json.loads(row["metadata"] or "{}").get("func_name")
    return {"question_id": row["question_id"], "question_title": row["question_title"],
            "question_content": row["question_content"], "platform": row["platform"],
            "difficulty": row["difficulty"], "contest_date": str(row["contest_date"]),
            "starter_code": row["starter_code"] or "", "func_name": func_name or "",
            "tests": json.dumps(tests)}


class _TextOnlyUnpickler(pickle.Unpickler):
    """The compressed tests are a pickled str; refusing every class keeps unpickling inert."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"livecodebench tests: refusing to unpickle {module}.{name}")


def decode_tests(field: str) -> list[dict]:
    """private_test_cases as a list of tests: plain JSON, or base64(zlib(pickle(JSON text)))."""
    try:
        return json.loads(field)
    except json.JSONDecodeError:
        pass
    packed = zlib.decompress(base64.b64decode(field.encode("ascii")))
    text = _TextOnlyUnpickler(io.BytesIO(packed)).load()
    return json.loads(text.decode() if isinstance(text, bytes) else text)


# ---------------------------------------------------------------- prompt and answer
def doc_to_text(doc: dict) -> str:
    """The user turn of LiveCodeBench's chat prompt."""
    prompt = f"### Question:\n{doc['question_content']}\n\n"
    if doc["starter_code"]:
        prompt += f"### Format: {WITH_STARTER_CODE}\n```python\n{doc['starter_code']}\n```\n\n"
    else:
        prompt += f"### Format: {WITHOUT_STARTER_CODE}\n```python\n# YOUR CODE HERE\n```\n\n"
    return prompt + "### Answer: (use the provided format with backticks)\n\n"


FENCE = re.compile(r"^\s*```")


def extract_code(answer: str) -> str:
    """The last fenced code block of the answer ("" when there is none): models often show drafts
    or examples before their final program. A block still open at the end does not count."""
    blocks, current = [], None
    for line in answer.split("\n"):
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks[-1] if blocks else ""


# ---------------------------------------------------------------- scoring
@contained
def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval hook: pass_at_1 = the share of this problem's samples that pass all its tests."""
    passed = [passes_all_tests(extract_code(answer), doc) for answer in results]
    return {"pass_at_1": sum(passed) / len(passed)}


def passes_all_tests(code: str, doc: dict) -> bool:
    """Runs `code` against every test of `doc` in the sandbox (see the module docstring)."""
    if not code.strip():
        return False
    n_tests = len(json.loads(doc["tests"]))
    token = uuid.uuid4().hex  # printed by the harness only after the last test passed
    call = (f"\nrun({code!r}, {doc['tests']!r}, {doc['func_name'] or None!r}, "
            f"{float(TEST_TIMEOUT_S)!r}, {token!r})\n")
    outcome = run_program(HARNESS + call, limits_for(n_tests))
    passed = outcome.passed and token in outcome.stdout.split()
    if not passed:
        log.debug("livecodebench %s failed: %s", doc["question_id"],
                  "overall time limit" if outcome.timed_out else outcome.stderr.strip()[-500:])
    return passed


def limits_for(n_tests: int) -> Limits:
    overall_s = (TEST_TIMEOUT_S + 1) * n_tests + 5
    return Limits(timeout_s=overall_s, cpu_s=math.ceil(overall_s) + 1, memory_bytes=MEMORY_BYTES)
