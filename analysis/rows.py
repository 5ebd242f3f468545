"""One run's resolved config and metrics (the same schema in a run directory and on W&B) -> one table row;
rows -> the DataFrame analysis.collect returns.

Columns: run_dir, model, method (analysis.naming.method_name: the preset, `+switch=value` for each composition
switch the run changes, `+<score>` and `+super` for method.saliency and method.protect), experts
(= experts_after), experts_before, ratio, mix ('0:.3:.7';
'general .2, code .3, tool .5' with other sources), mix_general/mix_math/mix_code (0 for a source the mix
does not read), seed, mc, gen, avg, mc_stderr, gen_stderr, avg_stderr, mc_tasks, gen_tasks, eval,
eval_limit, eval_fewshot, eval_items, gen_protocol, baseline_mc, baseline_gen, baseline_mc_stderr,
baseline_gen_stderr, settings, status, error, one `mix_<source>` column per other calibration source, and
`task/<name>`, `stderr/<name>` columns per evaluated task. A run that did not finish keeps NaN scores.

mc_tasks / gen_tasks name the task set behind each mean: the sorted task names joined by '+'
('-' for a suite without tasks). They come from the sets metrics.json records ("mc_tasks",
"gen_tasks"), else from the per-task entries' kinds (older runs); when neither says (a W&B summary
without kinds), they are left empty: unknown. analysis.pareto refuses to compare different sets.

Standard errors: mc_stderr, gen_stderr, avg_stderr and one `stderr/<name>` per task, as metrics.json
records them (lm-eval's per-task stderrs; the suites' from them, see ream_exp.evaluation.scores); NaN for
runs evaluated without them.

Eval settings, so that only like is compared (analysis.pareto refuses to mix them): eval (the eval
config's name), eval_limit ('all' for no limit, else eval.limit), eval_fewshot (the few-shot count of
each task, 'name=n' joined by spaces, as lm-eval used it), eval_items (items scored per task, 'name=n'),
gen_protocol (how each GEN task was run: 'name[variant vVERSION; N-shot; metric,filter; chat; max T]'
joined by spaces, from the "gen_protocol" metrics.json records; docs/algorithms.md, "GEN protocol").
Each is left empty when the run does not record it (older runs: limit read from config.yaml then).

The uncompressed model's scores that each run's metrics.json carries ("baseline") become baseline_mc,
baseline_gen, baseline_mc_stderr, baseline_gen_stderr; experts_before is the model's expert count.

Weights (docs/bytes.md): quant (quant.name of the run's config, 'none' where it has none), weight_bytes and
expert_bytes (metrics.json's "weights": measured on the checkpoint's files, or computed from the model when
bytes_measured is 'memory'), params, active_params, bytes_before (the uncompressed model's weight bytes:
"weights_before", else the baseline's "weights") and peak_memory_bytes (the evaluation's peak GPU memory).
NaN for runs from before they were recorded.

settings: what the run's result depends on besides its seed and calibration mix, as JSON {dotted key:
value} (analysis.settings): from the run's identity.json, else (run dirs from before it, W&B runs)
ream_exp.identity.run_identity of its config. analysis.pareto refuses to compare or average runs whose
settings differ. Empty when the run has no config.

Scores are stored in metrics.json as fractions; here they are multiplied by 100 (percentage points),
the units of the paper's tables; standard errors too. Pareto reference points and table cells are in
these units.
"""

import json
import math

import pandas as pd

from analysis.naming import MIX_PARTS, format_mix, method_name, other_sources, parse_mix, quant_name
from analysis.settings import config_identity, settings_json

SCALE = 100.0  # fraction -> percentage points
EVAL_COLUMNS = ["eval", "eval_limit", "eval_fewshot", "eval_items", "gen_protocol"]
BASELINE_COLUMNS = ["baseline_mc", "baseline_gen", "baseline_mc_stderr", "baseline_gen_stderr"]
STDERR_COLUMNS = ["mc_stderr", "gen_stderr", "avg_stderr"]
WEIGHT_COLUMNS = ["weight_bytes", "expert_bytes", "params", "active_params", "bytes_before", "peak_memory_bytes"]
COLUMNS = ["run_dir", "model", "method", "experts", "experts_before", "ratio", "quant", "mix",
           *(f"mix_{part}" for part in MIX_PARTS), "seed", "mc", "gen", "avg", *STDERR_COLUMNS,
           "mc_tasks", "gen_tasks", *EVAL_COLUMNS, *BASELINE_COLUMNS, *WEIGHT_COLUMNS, "bytes_measured",
           "settings", "status", "error"]
NO_LIMIT = "all"  # eval_limit of a run that scored every item
SUITES = ("mc", "gen")
NO_TASKS = "-"  # the task set of a suite that scored no task (a CSV would read "" back as missing)


def make_row(config: dict, metrics: dict, *, run_dir, status: str, error=None, identity=None) -> dict:
    """Map one run's resolved config and metrics (same schema locally and on W&B) to a row; `identity` is
    the one the run recorded (identity.json), else it comes from the config."""
    recorded = _first(metrics.get("mix"), dig(config, "calib.mix"))  # {source: weight} or [general, math, code]
    mix = parse_mix(recorded)
    row = {
        "run_dir": str(run_dir),
        "model": dig(config, "model.name"),
        "method": method_name(_first(metrics.get("method"), dig(config, "method.name")), dig(config, "method")),
        "experts": metrics.get("experts_after"),
        "experts_before": metrics.get("experts_before"),
        "ratio": _first(metrics.get("ratio"), dig(config, "ratio")),
        "quant": quant_name(_first(dig(config, "quant.name"), dig(metrics, "quant.name"))),
        "mix": format_mix(recorded),
        "seed": dig(config, "seed"),
        "settings": settings_json(identity if identity is not None else config_identity(config)),
        "status": status,
        "error": error,
    }
    row.update({f"mix_{part}": (mix[i] if mix else math.nan) for i, part in enumerate(MIX_PARTS)})
    row.update({f"mix_{name}": weight for name, weight in other_sources(recorded).items()})
    if status == "done":
        evaluation = metrics.get("eval")
        evaluation = evaluation if isinstance(evaluation, dict) else metrics
        row.update(score_columns(evaluation))
        row.update(task_set_columns(evaluation))
        row.update(eval_setting_columns(evaluation, config))
        row.update(baseline_columns(metrics.get("baseline")))
        row.update(weight_columns(metrics))
    return row


def weight_columns(metrics: dict) -> dict:
    """weight_bytes, expert_bytes, params, active_params, bytes_measured, bytes_before, peak_memory_bytes
    (see the module docstring); None where the run does not record them."""
    weights = metrics.get("weights") if isinstance(metrics.get("weights"), dict) else {}
    before = _first(dig(metrics, "weights_before.bytes"), dig(metrics, "baseline.weights.bytes"))
    return {"weight_bytes": weights.get("bytes"), "expert_bytes": weights.get("expert_bytes"),
            "params": weights.get("params"), "active_params": weights.get("active_params"),
            "bytes_measured": weights.get("measured"), "bytes_before": before,
            "peak_memory_bytes": metrics.get("peak_memory_bytes")}


def eval_setting_columns(evaluation: dict, config: dict) -> dict:
    """eval, eval_limit, eval_fewshot, eval_items, gen_protocol (see the module docstring); None where
    unknown."""
    tasks = {n: t for n, t in (evaluation.get("tasks") or {}).items() if isinstance(t, dict)}
    if "limit" in evaluation:
        limit = _limit_label(evaluation["limit"])
    elif isinstance(dig(config, "eval"), dict):  # older runs: the configured limit
        limit = _limit_label(dig(config, "eval.limit"))
    else:
        limit = None
    return {"eval": dig(config, "eval.name"), "eval_limit": limit,
            "eval_fewshot": _per_task(tasks, "fewshot"), "eval_items": _per_task(tasks, "n"),
            "gen_protocol": gen_protocol_label(evaluation.get("gen_protocol"))}


def gen_protocol_label(protocols) -> str | None:
    """The GEN protocol metrics.json records ({task: protocol}) as one comparable text; '-' for a run
    without GEN tasks, None when the run does not record it (runs from before the record)."""
    if not isinstance(protocols, dict):
        return None
    if not protocols:
        return NO_TASKS

    def one(name: str, p: dict) -> str:
        fewshot = p.get("fewshot")
        fewshot = json.dumps(fewshot, sort_keys=True) if isinstance(fewshot, dict) else fewshot
        parts = [f"{p.get('variant')} v{p.get('version')}", f"{fewshot}-shot",
                 f"{p.get('metric')},{p.get('filter')}", "chat" if p.get("chat_template") else "no chat"]
        if p.get("max_gen_toks") is not None:
            parts.append(f"max {p['max_gen_toks']}")
        return f"{name}[{'; '.join(parts)}]"

    return " ".join(one(name, p if isinstance(p, dict) else {}) for name, p in sorted(protocols.items()))


def _limit_label(limit) -> str:
    return NO_LIMIT if limit is None else f"{float(limit):g}"


def _per_task(tasks: dict, key: str):
    """'a=0 b=5' over the tasks that record `key`; None unless every task does."""
    if not tasks or not all(key in task for task in tasks.values()):
        return None
    value = lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)
    return " ".join(f"{name}={value(tasks[name][key])}" for name in sorted(tasks))


def baseline_columns(baseline) -> dict:
    """The uncompressed model's MC / GEN (and their stderrs) that a run's metrics.json carries."""
    baseline = baseline if isinstance(baseline, dict) else {}
    return {f"baseline_{key}": _percent(baseline.get(key)) for key in ("mc", "gen", "mc_stderr", "gen_stderr")}


def score_columns(evaluation: dict) -> dict:
    """mc, gen, avg, their stderrs and task/<name>, stderr/<name> in percentage points;
    avg = (mc + gen) / 2 when not given."""
    scores = {key: _percent(evaluation.get(key)) for key in ("mc", "gen", "avg", *STDERR_COLUMNS)}
    if math.isnan(scores["avg"]):
        scores["avg"] = (scores["mc"] + scores["gen"]) / 2
    for name, task in (evaluation.get("tasks") or {}).items():
        value = task.get("score") if isinstance(task, dict) else task
        scores[f"task/{name}"] = _percent(value)
        scores[f"stderr/{name}"] = _percent(task.get("stderr") if isinstance(task, dict) else None)
    return scores


def task_set_columns(evaluation: dict) -> dict:
    """mc_tasks / gen_tasks: recorded sets first, else derived from per-task kinds, else None.

    A derived set holds the tasks with a score only: older runs left a task without its metric
    out of the mean, so those are the tasks the mean is over.
    """
    tasks = evaluation.get("tasks") if isinstance(evaluation.get("tasks"), dict) else {}
    tasks = {name: task for name, task in tasks.items() if isinstance(task, dict)}
    derivable = bool(tasks) and all(task.get("kind") in SUITES for task in tasks.values())
    columns = {}
    for suite in SUITES:
        recorded = evaluation.get(f"{suite}_tasks")
        if isinstance(recorded, (list, tuple)):
            names = list(recorded)
        elif derivable:
            names = [name for name, task in tasks.items()
                     if task["kind"] == suite and task.get("score") is not None]
        else:
            columns[f"{suite}_tasks"] = None
            continue
        columns[f"{suite}_tasks"] = "+".join(sorted(map(str, names))) or NO_TASKS
    return columns


def _percent(value) -> float:
    try:
        return float(value) * SCALE
    except (TypeError, ValueError):
        return math.nan


def _first(*values):
    return next((v for v in values if v is not None), None)


def dig(tree, dotted: str):
    """tree['a']['b'] for 'a.b'; None when any level is missing."""
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def to_frame(rows) -> pd.DataFrame:
    """Rows -> DataFrame with every standard column present, task columns sorted at the end."""
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    tasks = sorted(c for c in frame.columns if c.startswith(("task/", "stderr/")))
    sources = sorted(c for c in frame.columns if c.startswith("mix_") and c not in COLUMNS)  # e.g. mix_tool
    frame = frame[COLUMNS + sources + tasks]
    for column in ("experts", "experts_before"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    numeric = ["ratio", "mc", "gen", "avg", *STDERR_COLUMNS, *BASELINE_COLUMNS, *WEIGHT_COLUMNS,
               *(f"mix_{p}" for p in MIX_PARTS), *sources, *tasks]
    frame["quant"] = frame["quant"].map(quant_name)
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce").astype(float)
    return frame
