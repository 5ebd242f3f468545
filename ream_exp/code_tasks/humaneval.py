"""HumanEval's pass@k with every candidate program run in ream_exp.sandbox (humaneval.yaml here).

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
