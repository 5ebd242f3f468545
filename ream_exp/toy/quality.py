"""Score a toy checkpoint on the toy tasks with lm-eval (the numbers quoted in ream_exp/toy/README.md).

    python -m ream_exp.toy.quality                       # the shipped checkpoint, every item
    python -m ream_exp.toy.quality --model DIR --limit 20

The experiment pipeline evaluates through ``ream_exp.evaluation`` with ``conf/eval/toy.yaml``; this is
the same lm-eval call, kept here so the toy world can check itself without the pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).parent
TASKS_DIR = HERE / "tasks"
TASKS = {"toy_facts": "acc", "toy_stories": "acc", "toy_arith": "exact_match", "toy_code": "pass@1"}


def evaluate(model, tokenizer=None, tasks=tuple(TASKS), limit=None, batch_size: int = 16) -> dict:
    """{task: score} for a model (a directory or a loaded model with its tokenizer)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model) if isinstance(model, Path) else model, tokenizer=tokenizer,
              batch_size=batch_size, device="cpu")
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks),
        # the toy tasks only: indexing lm-eval's thousands of built-in tasks takes seconds
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        limit=limit, confirm_run_unsafe_code=True, log_samples=False)  # toy_code runs code
    return {t: round(out["results"][t][f"{TASKS[t]},none"], 4) for t in tasks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / "checkpoint")
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    # One thread: a second one made the full evaluation 10x slower (3.5 min vs 19 s) when the two
    # cores were shared with other jobs, and the toy model's matrices are too small to need it.
    import torch

    torch.set_num_threads(1)
    for task, score in evaluate(args.model, limit=args.limit).items():
        print(f"{task:12s} {TASKS[task]:12s} {score:.3f}")


if __name__ == "__main__":
    main()
