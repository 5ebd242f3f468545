"""HumanEval's pass@k with every candidate program run in ream_exp.sandbox (humaneval.yaml and
humaneval_instruct.yaml here).

lm-eval's own humaneval scores through HF `evaluate`'s code_eval, which executes the programs in
threads of a forked helper with no process-group kill and no temporary directory. This module gives
the same score -- a candidate passes when prompt + completion followed by the task's `check` code
runs without error within 3 s (code_eval's default timeout) -- from contained subprocesses.
"""

from __future__ import annotations

import math

from ream_exp.sandbox import Limits, contained, run_program

LIMITS = Limits(timeout_s=3.0)


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: each generated completion becomes a full program (prompt + completion)."""
    return [[doc["prompt"] + text for text in texts] for texts, doc in zip(resps, docs)]


def build_predictions_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter of humaneval_instruct: each reply becomes a full program (see instruct_program)."""
    return [[instruct_program(doc, text) for text in texts] for texts, doc in zip(resps, docs)]


def instruct_program(doc: dict, reply: str) -> str:
    """The program an instruct model's reply stands for.

    The assistant turn starts with humaneval_instruct's prefix, which opens a ```python block holding the
    function's signature and docstring, so the reply normally continues the function body and closes
    the block: the program is prompt + the reply up to its first fence (lm-eval's
    build_predictions_instruct). A model that re-opens a block of its own (the reply starts with
    ```python) is read as that block: prompt + its code, the code redefining the function when it holds
    a whole `def <entry_point>(`, else continuing the body (docs/algorithms.md, "GEN protocol").
    """
    stripped = reply.lstrip()
    if stripped.startswith("```"):
        body = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        code = body.split("```", 1)[0]
        if f"def {doc['entry_point']}(" in code:
            return doc["prompt"] + "\n" + code
        return doc["prompt"] + code
    fence = reply.find("```")
    return doc["prompt"] + (reply if fence == -1 else reply[:fence])


@contained
def pass_at_k(references: list[str], predictions: list[list[str]], k=1) -> float:
    """Mean over problems of the unbiased pass@k estimate (Chen et al. 2021) of their candidates.

    lm-eval calls it once per problem (references = [test code], predictions = [[program, ...]]).
    The function's name is the metric's name: lm-eval reports it as "pass_at_k,create_test".
    """
    ks = [k] if isinstance(k, int) else list(k)
    if len(ks) != 1:
        raise ValueError(f"humaneval metric: one k per task (got k={ks})")
    estimates = [_estimate(_count_passed(test, programs), len(programs), ks[0])
                 for test, programs in zip(references, predictions)]
    return sum(estimates) / len(estimates)


def _count_passed(test: str, programs: list[str]) -> int:
    return sum(run_program(program + "\n" + test + "\n", LIMITS).passed for program in programs)


def _estimate(passed: int, n: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of the n samples include a passing one."""
    if n < k:
        raise ValueError(f"humaneval metric: pass@{k} needs at least {k} samples per problem, got {n}")
    return 1.0 - math.comb(n - passed, k) / math.comb(n, k)
