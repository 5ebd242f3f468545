"""The livecodebench task (ream_exp/code_tasks/livecodebench*) on local LiveCodeBench-shaped problems.

    pytest tests/test_livecodebench.py

Offline: tests/data/livecodebench/ holds ten problems in a release's six update files, written by
make_problems.py there (whose PROBLEMS list is the plain-text truth the tests compare with). Every
candidate program really runs in ream_exp.sandbox; per-test timeouts are shortened where a test
waits for one.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from ream_exp.code_tasks import CODE_TASKS_DIR  # noqa: E402
from ream_exp.code_tasks import livecodebench as lcb  # noqa: E402
from tests.scripted_lm import scripted_lm  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "livecodebench"
SHIPPED = CODE_TASKS_DIR / "livecodebench.yaml"  # the whole release_v6
WINDOW = CODE_TASKS_DIR / "livecodebench_2502_2505.yaml"  # Qwen's window, the alternative


def _load_problem_source():
    spec = importlib.util.spec_from_file_location("lcb_problem_source", DATA / "make_problems.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCE = _load_problem_source()
TRUTH = {p["question_id"]: p for p in SOURCE.PROBLEMS}


def shipped_metadata(path=WINDOW) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False)["metadata"]


@pytest.fixture(scope="module")
def window_docs(tmp_path_factory):
    """The shipped window's problems, loaded as lm-eval loads them (the task's metadata)."""
    cache = tmp_path_factory.mktemp("hf_cache")
    dataset = lcb.load_problems(**shipped_metadata(), source=str(DATA), cache_dir=str(cache))
    return {doc["question_id"]: doc for doc in dataset["test"]}


# ---------------------------------------------------------------- problems: release, window, tests
def test_the_default_task_keeps_every_problem_of_the_release(tmp_path):
    meta = shipped_metadata(SHIPPED)
    assert (meta["release"], meta["start_date"], meta["end_date"]) == ("release_v6", None, None)
    dataset = lcb.load_problems(**meta, source=str(DATA), cache_dir=str(tmp_path))
    assert sorted(doc["question_id"] for doc in dataset["test"]) == sorted(TRUTH)


def test_shipped_window_keeps_exactly_the_problems_dated_inside_it(window_docs):
    meta = shipped_metadata()
    assert meta["release"] == "release_v6"
    # ISO dates order as text: the reference is a string comparison on the raw field
    inside = {qid for qid, p in TRUTH.items() if meta["start_date"] <= p["contest_date"][:10] < meta["end_date"]}
    assert set(window_docs) == inside == {"sum_2025_02", "scale_2025_03", "mean_2025_04"}


def test_a_release_reads_only_its_own_update_files(tmp_path):
    everything = dict(start_date="2000-01-01", end_date="2100-01-01", source=str(DATA), cache_dir=str(tmp_path))
    v6 = {d["question_id"] for d in lcb.load_problems("release_v6", **everything)["test"]}
    v5 = {d["question_id"] for d in lcb.load_problems("release_v5", **everything)["test"]}
    assert v6 == set(TRUTH)
    assert v5 == {qid for qid, p in TRUTH.items() if p["file"] != "test6.jsonl"}


def test_bad_release_or_window_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"release='v6'.*release_v6"):
        lcb.load_problems("v6", "2025-02-01", "2025-05-01", source="/nonexistent")
    with pytest.raises(ValueError, match="start_date"):
        lcb.load_problems("release_v6", "2025-05-01", "2025-02-01", source="/nonexistent")


def test_tests_are_public_then_decoded_private(window_docs):
    for qid, doc in window_docs.items():
        assert json.loads(doc["tests"]) == TRUTH[qid]["public"] + TRUTH[qid]["private"]
        assert doc["func_name"] == (TRUTH[qid]["func_name"] or "")
    rows = [json.loads(line) for line in (DATA / "test6.jsonl").read_text().splitlines()]
    kinds = {r["question_id"]: r["private_test_cases"].startswith("[") for r in rows}
    assert kinds["mean_2025_04"] and not kinds["sum_2025_02"]  # both storage forms were decoded


def test_decoding_inverts_the_datasets_compression():
    tests = [{"input": "2\n1 é\n" * 50, "output": "3\n", "testtype": "stdin"}]
    assert lcb.decode_tests(SOURCE.compress(tests)) == tests
    assert lcb.decode_tests(json.dumps(tests)) == tests


def test_compressed_tests_never_unpickle_objects():
    import base64
    import pickle
    import zlib

    class Payload:  # unpickling it would call os.getcwd: a stand-in for any code execution
        def __reduce__(self):
            return (os.getcwd, ())

    field = base64.b64encode(zlib.compress(pickle.dumps(Payload()))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lcb.decode_tests(field)


# ---------------------------------------------------------------- prompt and code extraction
def test_prompt_has_starter_code_for_functional_problems_and_stdin_format_otherwise(window_docs):
    functional = lcb.doc_to_text(window_docs["scale_2025_03"])
    stdin = lcb.doc_to_text(window_docs["sum_2025_02"])
    assert functional.startswith(f"### Question:\n{TRUTH['scale_2025_03']['question_content']}\n\n")
    assert f"{lcb.WITH_STARTER_CODE}\n```python\n{TRUTH['scale_2025_03']['starter_code']}\n```" in functional
    assert f"{lcb.WITHOUT_STARTER_CODE}\n```python\n# YOUR CODE HERE\n```" in stdin
    assert lcb.WITH_STARTER_CODE not in stdin and "# YOUR CODE HERE" not in functional
    for prompt in (functional, stdin):
        assert prompt.endswith("### Answer: (use the provided format with backticks)\n\n")


def test_the_last_closed_code_block_is_the_program():
    answer = "Draft:\n```python\nprint(1)\n```\nFinal:\n```python\nx = 2\nprint(x)\n```\nDone."
    assert lcb.extract_code(answer) == "x = 2\nprint(x)"
    assert lcb.extract_code(answer + "\n```python\nprint(3)") == "x = 2\nprint(x)"  # cut off: ignored
    assert lcb.extract_code("no code here") == ""
    assert lcb.extract_code("```\nplain fence\n```") == "plain fence"


# ---------------------------------------------------------------- scoring in the sandbox
SUM_READERS = {
    "input": "n = int(input())\nprint(sum(map(int, input().split())))",
    "buffer": "import sys\nprint(sum(map(int, sys.stdin.buffer.read().split()[1:])))",
    "open0": "print(sum(map(int, open(0).read().split()[1:])))",
    "main_guard": "import sys\ndef main():\n    data = sys.stdin.read().split()\n"
                  "    sys.stdout.write(str(sum(map(int, data[1:]))) + '\\n')\nif __name__ == '__main__':\n    main()",
    "os_write": "import os, sys\nos.write(1, f'{sum(map(int, sys.stdin.read().split()[1:]))}\\n'.encode())",
    "thread": "import threading\ndef main():\n    n = int(input())\n    print(sum(map(int, input().split())))\n"
              "threading.Thread(target=main).start()",
    "spaces": "n = int(input())\nprint('  ', sum(map(int, input().split())), '  ')\nprint()\nprint()",
}


@pytest.mark.parametrize("reader", sorted(SUM_READERS))
def test_a_correct_stdin_program_passes_however_it_reads_and_writes(window_docs, reader):
    assert lcb.passes_all_tests(SUM_READERS[reader], window_docs["sum_2025_02"])


def test_process_results_scores_1_for_correct_and_0_for_wrong(window_docs):
    doc = window_docs["sum_2025_02"]
    fenced = f"Here it is:\n```python\n{SUM_READERS['input']}\n```"
    assert lcb.process_results(doc, [fenced]) == {"pass_at_1": 1.0}
    assert lcb.process_results(doc, ["```python\nprint(6)\n```"]) == {"pass_at_1": 0.0}  # public only
    assert lcb.process_results(doc, [SUM_READERS["input"]]) == {"pass_at_1": 0.0}  # no code block
    assert lcb.process_results(doc, [fenced, "```python\nprint(6)\n```"]) == {"pass_at_1": 0.5}


def test_private_tests_count(window_docs):
    doc = window_docs["sum_2025_02"]
    public_input = TRUTH["sum_2025_02"]["public"][0]["input"]
    memorised = f"import sys\ndata = sys.stdin.read()\nprint(6 if data == {public_input!r} else 0)"
    assert not lcb.passes_all_tests(memorised, doc)


def test_numbers_compare_by_value_token_by_token(window_docs):
    doc = window_docs["mean_2025_04"]  # expected "2.500", "2.333", "5.000"
    rounded = "n = int(input())\nxs = list(map(int, input().split()))\nprint(round(sum(xs) / n, 3))"
    assert lcb.passes_all_tests(rounded, doc)  # 2.5 == 2.500, 5.0 == 5.000 as numbers
    one_decimal = "n = int(input())\nxs = list(map(int, input().split()))\nprint(f'{sum(xs) / n:.1f}')"
    assert not lcb.passes_all_tests(one_decimal, doc)  # 2.3 != 2.333
    from ream_exp.code_tasks.livecodebench_harness import same_output

    assert same_output(" 1  2\n3 \n\n", "1 2\n3") and not same_output("1 2 3", "1 2\n3")
    assert not same_output("1 2", "1 2 0") and not same_output("yes", "Yes")


FUNCTIONAL = {
    "list": "class Solution:\n    def scaleAll(self, nums: List[int], k: int) -> List[int]:\n"
            "        return [x * k for x in nums]",
    "tuple_and_prints": "class Solution:\n    def scaleAll(self, nums, k):\n        print('debug', nums)\n"
                        "        return tuple(x * k for x in nums)",
}


@pytest.mark.parametrize("variant", sorted(FUNCTIONAL))
def test_a_correct_functional_solution_passes(window_docs, variant):
    assert lcb.passes_all_tests(FUNCTIONAL[variant], window_docs["scale_2025_03"])


def test_a_wrong_or_broken_functional_solution_fails(window_docs):
    doc = window_docs["scale_2025_03"]
    wrong = "class Solution:\n    def scaleAll(self, nums, k):\n        return [x * k for x in nums if x > 0]"
    assert not lcb.passes_all_tests(wrong, doc)  # right on the public test, wrong on private ones
    assert not lcb.passes_all_tests("class Solution:\n    def other(self, nums, k):\n        return nums", doc)
    assert not lcb.passes_all_tests("class Solution(:\n", doc)


def test_an_endless_loop_times_out_and_scores_0(window_docs, monkeypatch):
    import time

    monkeypatch.setattr(lcb, "TEST_TIMEOUT_S", 0.5)
    for doc, code in ((window_docs["sum_2025_02"], "while True:\n    pass"),
                      (window_docs["scale_2025_03"],
                       "class Solution:\n    def scaleAll(self, nums, k):\n        while True:\n            pass")):
        started = time.monotonic()
        assert lcb.process_results(doc, [f"```python\n{code}\n```"]) == {"pass_at_1": 0.0}
        assert time.monotonic() - started < 5  # the per-test timer, not the overall cap, ended it


def test_a_loop_that_swallows_the_timer_meets_the_overall_cap(window_docs, monkeypatch):
    monkeypatch.setattr(lcb, "TEST_TIMEOUT_S", 0.2)
    doc = window_docs["scale_2025_03"]  # 4 tests: cap (0.2 + 1) * 4 + 5 = 9.8 s
    stubborn = ("class Solution:\n    def scaleAll(self, nums, k):\n        while True:\n            try:\n"
                "                while True:\n                    pass\n            except BaseException:\n"
                "                pass")
    assert lcb.limits_for(4).timeout_s == pytest.approx(9.8)
    assert not lcb.passes_all_tests(stubborn, doc)


def test_a_program_that_exits_the_process_itself_does_not_pass(window_docs):
    # os._exit(0) ends the process with status 0 before the verdict is written
    assert not lcb.passes_all_tests("import os\nprint(6)\nos._exit(0)", window_docs["sum_2025_02"])
    # exit() ends the program, not the test: a correct answer still passes
    assert lcb.passes_all_tests(SUM_READERS["input"] + "\nexit(0)", window_docs["sum_2025_02"])


def test_every_program_runs_in_the_sandbox(window_docs, monkeypatch):
    from ream_exp.sandbox import is_contained

    limits = []
    real_run_program = lcb.run_program

    def recording_run_program(source, program_limits):
        limits.append(program_limits)
        return real_run_program(source, program_limits)

    monkeypatch.setattr(lcb, "run_program", recording_run_program)
    assert lcb.passes_all_tests(SUM_READERS["input"], window_docs["sum_2025_02"])
    n_tests = len(json.loads(window_docs["sum_2025_02"]["tests"]))
    assert [lim.timeout_s for lim in limits] == [(lcb.TEST_TIMEOUT_S + 1) * n_tests + 5]
    assert is_contained(lcb.process_results)


# ---------------------------------------------------------------- through lm-eval
ANSWERS = {  # what the fake model answers to each in-window problem
    "sum_2025_02": f"```python\n{SUM_READERS['buffer']}\n```",                  # correct
    "scale_2025_03": f"Solution:\n```python\n{FUNCTIONAL['list']}\n```\n",      # correct
    "mean_2025_04": "```python\nprint(2.5)\n```",                              # wrong
}


def _answer(task: str, chat: list, gen_kwargs: dict) -> str:
    """ANSWERS' solution of the problem the chat asks."""
    return next(a for qid, a in ANSWERS.items() if f"Problem {qid}:" in chat[-1]["content"])


@pytest.fixture(scope="module")
def local_task_dir(tmp_path_factory) -> str:
    """The shipped task under another name, reading the local files (same window and settings).
    One directory for the module: evaluate's task index is cached per include_path."""
    root = tmp_path_factory.mktemp("lcb_task")
    metadata = {**shipped_metadata(), "source": str(DATA), "cache_dir": str(root / "hf_cache")}
    (root / "livecodebench_local.yaml").write_text(
        f"include: {WINDOW}\ntask: livecodebench_local\n" + yaml.safe_dump({"metadata": metadata}))
    return str(root)


@pytest.mark.slow  # lm-eval indexes its task YAMLs once (~20 s on a loaded CPU)
def test_livecodebench_scores_through_lm_eval_with_a_scripted_model(local_task_dir, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml

    from ream_exp.evaluation import harness

    lm = scripted_lm(_answer)
    monkeypatch.setattr(harness, "make_lm", lambda *args: lm)
    cfg = {"name": "lcb", "tasks": ["livecodebench_local"], "include_path": local_task_dir,
           "limit": None, "batch_size": 1, "num_fewshot": {"livecodebench_local": 0}, "max_gen_toks": None,
           "allow_code_eval": True, "apply_chat_template": True, "backend": "hf"}
    result = harness.evaluate(None, None, cfg)
    task = result["tasks"]["livecodebench_local"]
    assert task["metric"] == "pass_at_1,none" and task["kind"] == "gen" and task["n"] == 3
    assert task["score"] == pytest.approx(2 / 3) and result["gen"] == task["score"]
    system = load_yaml(SHIPPED, resolve_func=False)["description"]
    assert sorted(c[-1]["content"] for c, _, _ in lm.requests["livecodebench_local"]) == sorted(
        lcb.doc_to_text({"question_content": TRUTH[q]["question_content"], "starter_code": TRUTH[q]["starter_code"]})
        for q in ANSWERS)
    assert all(c[0] == {"role": "system", "content": system} for c, _, _ in lm.requests["livecodebench_local"])


@pytest.mark.slow
def test_livecodebench_is_refused_unless_code_eval_is_allowed(local_task_dir, monkeypatch):
    from ream_exp.evaluation import harness

    monkeypatch.setattr(harness, "make_lm", lambda *args: pytest.fail("no model may be built"))
    cfg = {"name": "lcb", "tasks": ["livecodebench_local"], "include_path": local_task_dir,
           "allow_code_eval": False}
    result = harness.evaluate(None, None, cfg)
    assert result["tasks"] == {} and "allow_code_eval" in result["skipped"]["livecodebench_local"]


@pytest.mark.slow
def test_livecodebench_is_in_the_task_index_from_the_package(local_task_dir):
    from ream_exp.evaluation import task_index

    index = task_index.task_manager(local_task_dir).task_index  # CODE_TASKS_DIR is on every task path
    assert Path(index["livecodebench"].yaml_path).resolve() == SHIPPED.resolve()
