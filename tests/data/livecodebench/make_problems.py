"""Writes the LiveCodeBench-shaped problems of tests/test_livecodebench.py (run it to rebuild them).

    python tests/data/livecodebench/make_problems.py

Ten problems spread over the six update files of a release as the hub dataset spreads them
(test.jsonl ... test6.jsonl), with the dataset's fields: public_test_cases as JSON text,
private_test_cases compressed (base64 of zlib of a pickled JSON str) or, for one problem, plain JSON,
metadata as JSON text (func_name for the LeetCode problems). Three of them lie in the shipped window
[2025-02-01, 2025-05-01); the others lie before it, after it, or on its exclusive end.
"""

import base64
import json
import pickle
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stdin_test(given: str, expected: str) -> dict:
    return {"input": given, "output": expected, "testtype": "stdin"}


def call_test(arguments: list, expected) -> dict:
    return {"input": "\n".join(json.dumps(a) for a in arguments), "output": json.dumps(expected),
            "testtype": "functional"}


def sum_tests(lists):
    return [stdin_test(f"{len(xs)}\n{' '.join(map(str, xs))}\n", f"{sum(xs)}\n") for xs in lists]


def scale_tests(cases):
    return [call_test([xs, k], [x * k for x in xs]) for xs, k in cases]


def mean_tests(lists):  # the expected output keeps three decimals: "2.500"
    return [stdin_test(f"{len(xs)}\n{' '.join(map(str, xs))}\n", f"{sum(xs) / len(xs):.3f}\n") for xs in lists]


def problem(file, question_id, date, platform, public, private, func_name=None, private_as="compressed"):
    functional = func_name is not None
    starter = (f"class Solution:\n    def {func_name}(self, nums: List[int], k: int) -> List[int]:\n        "
               if functional else "")
    return {"file": file, "question_id": question_id, "contest_date": date, "platform": platform,
            "question_title": f"Problem {question_id}",
            "question_content": f"Problem {question_id}: "
            + ("return nums with every value multiplied by k." if functional else
               "read N, then N integers, and print " + ("their mean with three decimals."
                                                      if question_id.startswith("mean") else "their sum.")),
            "starter_code": starter, "func_name": func_name, "public": public, "private": private,
            "private_as": private_as}


PROBLEMS = [
    problem("test.jsonl", "sum_2023", "2023-08-12T00:00:00", "atcoder", sum_tests([[1, 2]]), sum_tests([[5]])),
    problem("test2.jsonl", "scale_2024", "2024-04-20T00:00:00", "leetcode", scale_tests([([1], 2)]),
            scale_tests([([3, 4], 5)]), func_name="scaleAll"),
    problem("test3.jsonl", "sum_2024_06", "2024-06-01T00:00:00", "codeforces", sum_tests([[7, 8]]), sum_tests([[0]])),
    problem("test4.jsonl", "sum_2024_09", "2024-09-14T00:00:00", "atcoder", sum_tests([[2, 2]]), sum_tests([[9]])),
    problem("test5.jsonl", "sum_2025_01", "2025-01-04T00:00:00", "atcoder", sum_tests([[4, 4]]), sum_tests([[1]])),
    # In the window: its first instant, a LeetCode problem, its last second.
    problem("test6.jsonl", "sum_2025_02", "2025-02-01T00:00:00", "atcoder", sum_tests([[1, 2, 3]]),
            sum_tests([[10, -4], [7], list(range(1000))])),
    problem("test6.jsonl", "scale_2025_03", "2025-03-15T00:00:00", "leetcode", scale_tests([([1, 2, 3], 2)]),
            scale_tests([([], 3), ([-1, 5], -2), ([7], 0)]), func_name="scaleAll"),
    problem("test6.jsonl", "mean_2025_04", "2025-04-30T23:59:59", "atcoder", mean_tests([[2, 3]]),
            mean_tests([[1, 2, 4], [5]]), private_as="json"),
    problem("test6.jsonl", "sum_2025_05", "2025-05-01T00:00:00", "atcoder", sum_tests([[3, 3]]), sum_tests([[2]])),
    problem("test6.jsonl", "sum_2025_05_late", "2025-05-17T00:00:00", "atcoder", sum_tests([[6]]), sum_tests([[8]])),
]


def compress(tests: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("ascii")


def row(p: dict) -> dict:
    """A problem as the dataset stores it."""
    private = compress(p["private"]) if p["private_as"] == "compressed" else json.dumps(p["private"])
    return {"question_title": p["question_title"], "question_content": p["question_content"],
            "platform": p["platform"], "question_id": p["question_id"], "contest_id": p["question_id"][:6],
            "contest_date": p["contest_date"], "starter_code": p["starter_code"],
            "difficulty": "easy", "public_test_cases": json.dumps(p["public"]),
            "private_test_cases": private,
            "metadata": json.dumps({"func_name": p["func_name"]} if p["func_name"] else {})}


def main() -> None:
    by_file: dict[str, list[str]] = {}
    for p in PROBLEMS:
        by_file.setdefault(p["file"], []).append(json.dumps(row(p)))
    for name, lines in by_file.items():
        (HERE / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
