"""Dataset loaders and a scorer for the tiny lm-eval tasks used by tests/test_evaluate.py.

lm-eval resolves a YAML's relative `data_files` against the current working directory, so the
YAMLs load their JSONL through these `!function` loaders, which resolve paths against this file.
"""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict

from ream_exp import sandbox

HERE = Path(__file__).resolve().parent


def _jsonl_split(filename: str) -> DatasetDict:
    # Built in memory: nothing is written to the HF datasets cache.
    rows = [json.loads(line) for line in (HERE / filename).read_text().splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def load_mc(**_metadata) -> DatasetDict:
    """Multiple-choice docs: {question, choices, label}."""
    return _jsonl_split("mc.jsonl")


def load_gen(**_metadata) -> DatasetDict:
    """Generation docs: {question, answer}."""
    return _jsonl_split("gen.jsonl")


def score_gen(doc: dict, results: list[str]) -> dict:
    """Per-doc scores. `lower_share` (listed first, so it is the task's primary metric) is the share
    of the response written in the answers' alphabet (lowercase letters): crude partial credit that
    a random tiny model already earns, so its score is not a constant 0 like exact_match."""
    response = results[0]
    lower_share = sum(ch.islower() for ch in response) / max(len(response), 1)
    return {"lower_share": lower_share, "exact_match": float(response.strip() == doc["answer"])}


def first_half(dataset: Dataset) -> Dataset:
    """Makes a group's second subtask a different size, so size weighting is observable."""
    return dataset.select(range(len(dataset) // 2))


@sandbox.contained
def score_contained(doc: dict, results: list[str]) -> dict:
    """Runs the response as a program (a tiny model's text is rarely valid Python: mostly 0.0).
    Looked up on the module at call time, so a test can count the calls."""
    return {"ran": float(sandbox.run_program(results[0], sandbox.Limits(timeout_s=2.0)).passed)}
