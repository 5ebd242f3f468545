"""The end of a run's console output: its scores beside the uncompressed model's as a plain text table
(MC / GEN / AVG and each task, in %, with standard errors), what they mean, and the files it wrote."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("ream_exp")


def report(metrics: dict, run_dir: Path) -> None:
    """The end of a run's output: its scores beside the uncompressed model's, what they mean, its files."""
    scores, baseline = metrics["eval"], metrics.get("baseline")
    rows = {"uncompressed": baseline} if baseline else {}
    quant = (metrics.get("quant") or {}).get("name", "none")
    label = f"{metrics['method']} ({metrics['experts_after']}/{metrics['experts_before']} experts"
    rows[label + (f", {quant})" if quant != "none" else ")")] = scores
    if scores.get("tasks"):
        print(score_table(rows))
        print("MC: mean accuracy of the multiple-choice tasks; GEN: mean score of the generation tasks; "
              "AVG: their mean (in %, ± standard error)")
    files = [name for name in ("metrics.json", "plan.json", "checkpoint/", "checkpoint_unquantized/")
             if (run_dir / name).exists()]
    log.info("run finished: %s (%s)", run_dir, ", ".join(files))


def score_table(rows: dict[str, dict]) -> str:
    """A plain text table: one row per model, columns MC / GEN / AVG and each task, in % ("61.0 ± 0.8"
    where the standard error is known)."""
    tasks = sorted({t for r in rows.values() for t in (r.get("tasks") or {})})
    head = ["model", "MC", "GEN", "AVG"] + tasks
    lines = [head]

    def fmt(value, stderr=None):
        if value is None:
            return "-"
        return f"{100 * value:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")

    for name, r in rows.items():
        task = lambda t: (r.get("tasks") or {}).get(t, {})
        lines.append([name] + [fmt(r.get(k), r.get(f"{k}_stderr")) for k in ("mc", "gen", "avg")]
                     + [fmt(task(t).get("score"), task(t).get("stderr")) for t in tasks])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines)
