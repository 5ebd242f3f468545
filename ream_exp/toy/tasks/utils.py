"""lm-eval hooks for the toy tasks: dataset loaders and scorers (referenced by the YAML files here).

The eval data (toy_*.jsonl, written by ``python -m ream_exp.toy.data``) sits next to this file.
lm-eval resolves a relative ``data_files`` against the current directory, so the YAML files use
``custom_dataset: !function utils.load_...`` instead, and these loaders find the JSONL from
``__file__``: the tasks then work from any working directory via TaskManager(include_path=...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

from ream_exp.sandbox import Limits, contained, run_program

HERE = Path(__file__).parent


def _load(name: str) -> datasets.DatasetDict:
    with open(HERE / f"{name}.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# lm-eval calls custom_dataset(**metadata); the toy sets take no options.
def load_toy_facts(**_):
    return _load("toy_facts")


def load_toy_stories(**_):
    return _load("toy_stories")


def load_toy_arith(**_):
    return _load("toy_arith")


def load_toy_code(**_):
    return _load("toy_code")


def final_number(text: str) -> int | None:
    """The last integer on the first line ("12 + 7 = 19" -> 19); None when there is none."""
    numbers = re.findall(r"-?\d+", text.split("\n")[0])
    return int(numbers[-1]) if numbers else None


def process_arith(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(final_number(results[0]) == doc["target"])}


def function_body(completion: str) -> str:
    """Keep the indented body only: generation stops at a blank line, but a model may still run on
    into top-level code, which must not count (or run)."""
    lines = []
    for line in completion.split("\n"):
        if line.strip() and not line.startswith((" ", "\t")):
            break
        lines.append(line)
    return "\n".join(lines)


def run_tests(prompt: str, completion: str, tests: list[str], timeout: float = 3.0) -> float:
    """1.0 if prompt + body passes every assert within `timeout` seconds, else 0.0. The program is
    model-written, so it runs in ream_exp.sandbox (own process group, temporary cwd, limits)."""
    program = prompt + function_body(completion) + "\n\n" + "\n".join(tests) + "\n"
    return float(run_program(program, Limits(timeout_s=timeout)).passed)


@contained
def process_code(doc: dict, results: list[str]) -> dict:
    return {"pass@1": run_tests(doc["prompt"], results[0], doc["tests"])}
