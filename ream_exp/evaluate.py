"""lm-evaluation-harness over an in-memory model: the MC, GEN and AVG scores of one eval config.

    from ream_exp.evaluate import check_tasks, evaluate
    check_tasks(cfg.eval)                            # before the model is loaded: bad names fail here
    metrics = evaluate(model, tokenizer, cfg.eval, output_dir=run_dir / "lm_eval")
    # {"tasks", "mc", "gen", "avg", "mc_stderr", "gen_stderr", "avg_stderr", "percent", "mc_tasks",
    #  "gen_tasks", "gen_protocol", "limit", "bootstrap_iters", "skipped", "versions"}

The eval config is one of conf/eval/*.yaml. Every name in its `tasks` list is scored as ONE task:
a leaf task by its own metric, a group (mmlu) by the group's aggregate score, a tag by each of the
tasks it stands for. Whether a task is MC or GEN is read from lm-eval's own `output_type`
(multiple_choice / loglikelihood -> MC, generate_until -> GEN), never from a list kept here.
Primary metric: MC -> acc (README: evaluation; acc, not acc_norm); GEN -> the task's first metric under
its first filter (gsm8k: exact_match,strict-match; ifeval: prompt_level_strict_acc,none; humaneval:
pass_at_k,create_test = pass@1). `metrics: {task: "metric,filter"}` in the config overrides this
(conf/eval/gen.yaml does, for the paper's GEN protocol: docs/algorithms.md, "GEN protocol"); every
metric lm-eval reports for the task is kept beside the primary one ("metrics").
MC = mean of the MC task scores, GEN = mean of the GEN ones, AVG = (MC + GEN) / 2 (README: evaluation).

GEN protocol: each task's entry records how it was run ("protocol": the prompt variant, its version,
the shots, metric, filter, chat template, stop sequences and token cap), and "gen_protocol" gathers the
GEN tasks' protocols, so that analysis refuses to compare GEN means run under different protocols.
Each suite's task set is recorded ("mc_tasks", "gen_tasks": the tasks it was meant to score), so
means over different task sets are never compared unknowingly; a task of the set whose metric is
missing makes that suite's mean (and AVG) None, with an error logged, never a mean over fewer tasks.

Standard errors: each task's `stderr` is the one lm-eval reports beside its metric ("acc_stderr,none"),
in the same units as its score. lm-eval computes it in closed form for metrics aggregated by `mean`
(sample standard deviation / sqrt(n): every task of this project) and by bootstrap, with
`eval.bootstrap_iters` resamples, for the few others (median, f1, mcc, bleu, ...); bootstrap_iters=0
turns every stderr off (None). A group's stderr is lm-eval's pooled one. The suites' means are means
of k task scores over disjoint item sets, so, taking the tasks as independent,
SE(MC) = sqrt(sum_i SE_i^2) / k, the same for GEN, and SE(AVG) = sqrt(SE(MC)^2 + SE(GEN)^2) / 2 (AVG's
own suite's SE when only one suite has tasks); a task without a stderr makes its suite's SE None.
They measure the sampling error of the eval items only, not run-to-run variation of the compression.

With `output_dir`, lm-eval's own EvaluationTracker writes its results files there (results_mc_<time>.json,
results_gen_<time>.json: the raw lm-eval output, configs and versions included) and, with
`eval.log_samples=true`, every item's prompt, response and score (samples_<task>_<time>.jsonl).
The result's "versions" are the task (and group) versions lm-eval reports.

What made a set of scores (`scores_made_by`, recorded in the uncompressed model's cached scores, see
cache_meta): EVAL_VERSION below, lm-eval's version and the version each task's YAML declares
(`metadata.version`, the one lm-eval reports), read from lm-eval's task index before anything runs.

Code-executing tasks (lm-eval's `unsafe_code`: toy_code, humaneval, humaneval_instruct, livecodebench)
run only with allow_code_eval=true, and only when their scorer runs the code through ream_exp.sandbox
(`sandbox.contained` hooks). lm-eval's own humaneval and humaneval_instruct are replaced by
ream_exp/code_tasks/humaneval*.yaml, whose directory is always on the task search path; any other
code-executing task is refused.

Data a task needs at run time besides its dataset: ifeval's checks tokenize with nltk's punkt_tab,
which lm-eval downloads when the task first loads; `check_runtime_data` (called by validate, before
any load) refuses a run whose punkt_tab is missing, saying how to fetch it once.

Backends: the model already in memory is wrapped in lm-eval's HFLM (no reload), so it is evaluated
as model.device_map / max_memory / offload_folder placed it. `backend: vllm` runs the GEN tasks with
lm-eval's vLLM backend instead, which must load the model itself, so it needs the saved
`checkpoint_dir`, split over `tensor_parallel_size` GPUs; MC (loglikelihood) tasks always stay on the
in-memory model.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache_meta import made_by
from .code_tasks import CODE_TASKS_DIR
from .config import ConfigError, require_number, require_positive_int
from .sandbox import is_contained

log = logging.getLogger(__name__)

# The version of the code that turns lm-eval's output into scores (metric choice, means, standard errors),
# recorded in the cached scores of the uncompressed model: bump it when a change here changes a score
# (README, "Caches").
EVAL_VERSION = 2  # 2: every reported metric and the task's protocol recorded per task

# lm-eval output types answered by scoring fixed continuations (no sampling): the MC side.
MC_OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
MC_METRIC = "acc"  # MC is scored by acc, not acc_norm (README: evaluation)
CODE_EVAL_HINT = "set eval.allow_code_eval=true to run it (executes model-written code)"
SUITES = ("mc", "gen")
# lm-eval's default (100000) is for bootstrapped metrics on big suites and takes minutes; every metric
# here is a mean, whose stderr lm-eval computes in closed form whatever this number (> 0) is. For the
# bootstrapped rest, 1000 resamples estimate a stderr to about 1/sqrt(2 * 1000) = 2% of itself.
DEFAULT_BOOTSTRAP_ITERS = 1000


@dataclass
class Entry:
    """One scored task: a requested name with the lm-eval Task or Group that answers it."""

    name: str
    requested: str  # the name in the config (differs from `name` only for a tag's tasks)
    obj: Any  # lm_eval Task or Group
    leaves: list  # the leaf Tasks that run
    kind: str  # "mc" | "gen"
    metric: str  # the "metric,filter" key lm-eval reports

    @property
    def unsafe(self) -> bool:
        # lm-eval sets Task.UNSAFE_CODE from the YAML's `unsafe_code` (code-executing tasks).
        return any(getattr(task, "UNSAFE_CODE", False) for task in self.leaves)


# ---------------------------------------------------------------- config checks (no model needed)
def task_names(cfg) -> list[str]:
    """The task names an eval config asks for; none for `name: none`."""
    cfg = _as_dict(cfg)
    if cfg.get("name") == "none":
        return []
    return list(cfg.get("tasks") or [])


def check_tasks(cfg) -> list[str]:
    """Validates an eval config before any model work and returns its task names.

    Raises ConfigError naming unknown tasks (checked against lm-eval's local task index, which needs
    no network), stray keys in the per-task `num_fewshot` / `metrics` mappings, a missing
    include_path, an unknown backend, or backend=vllm when vllm is not installed.
    """
    cfg = _as_dict(cfg)
    names = task_names(cfg)
    if not names:
        return []
    _check_backend(cfg.get("backend") or "hf")
    _check_tensor_parallel(cfg)
    check_eval_settings(cfg)
    known = set(_task_manager(_include_path(cfg)).all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(
            f"eval '{cfg.get('name')}': unknown lm-eval task(s) {unknown}; "
            "names must be lm-eval tasks, groups or tags (`lm-eval ls tasks`) or be defined "
            "in eval.include_path"
        )
    for key in ("num_fewshot", "metrics"):
        stray = [k for k in _mapping(cfg.get(key)) if k not in names]
        if stray:
            raise ConfigError(f"eval.{key} names task(s) {stray} that are not in eval.tasks")
    if cfg.get("allow_code_eval"):
        _check_code_tasks_contained(names, _task_manager(_include_path(cfg)).task_index)
    return names


def _check_code_tasks_contained(names: list[str], index) -> None:
    """Refuses, before any weights load, a code-executing task whose scoring hooks are not contained.

    The task's YAML is read with its `!function` hooks resolved (lm-eval's own loader: it imports the
    task's utils module, builds no dataset); `evaluate` checks the built tasks again.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    uncontained = []
    for leaf in sorted({leaf for name in names for leaf, _ in _leaf_tasks(index, name, set()) if leaf}):
        entry = index.get(leaf)
        if entry is None or not (entry.cfg or {}).get("unsafe_code") or not getattr(entry, "yaml_path", None):
            continue
        cfg = load_yaml(entry.yaml_path, resolve_func=True)
        hooks = [cfg.get("process_results")] + [m.get("metric") for m in cfg.get("metric_list") or []]
        if not any(callable(h) and is_contained(h) for h in hooks):
            uncontained.append(leaf)
    if uncontained:
        raise ConfigError(f"eval.tasks: {uncontained} execute model-written code outside ream_exp.sandbox; "
                          f"with eval.allow_code_eval the code-executing tasks allowed are {CONTAINED_CODE_TASKS} "
                          "(ream_exp/code_tasks/ holds the contained replacements of lm-eval tasks)")


def check_eval_settings(cfg) -> None:
    """eval.bootstrap_iters: a non-negative integer; eval.log_samples: a boolean."""
    cfg = _as_dict(cfg)
    iters = cfg.get("bootstrap_iters")
    meaning = "the bootstrap resamples behind non-mean metrics' stderrs (0 turns every stderr off)"
    if iters is not None and require_number("eval.bootstrap_iters", iters, meaning, integer=True) < 0:
        raise ConfigError(f"eval.bootstrap_iters={iters} must be 0 or more: eval.bootstrap_iters is {meaning}")
    if not isinstance(cfg.get("log_samples", False), bool):
        raise ConfigError(f"eval.log_samples={cfg.get('log_samples')!r}: choose true or false")


# Data files a task loads at run time besides its dataset, by the directory of lm-eval's task YAML:
# {directory name: [(nltk resource, package name for `python -m nltk.downloader`)]}.
NLTK_DATA = {"ifeval": [("tokenizers/punkt_tab", "punkt_tab")]}


def check_runtime_data(cfg) -> None:
    """Refuses, before any load, a run whose tasks need nltk data that is not installed (ifeval's
    punkt_tab, which lm-eval would otherwise try to download mid-run: a node without network fails
    after the compression). One line naming the tasks and the command that fetches the data once."""
    cfg = _as_dict(cfg)
    names = task_names(cfg)
    if not names:
        return
    index = _task_manager(_include_path(cfg)).task_index
    needs: dict[str, list[str]] = {}
    for name in names:
        for leaf, _ in _leaf_tasks(index, name, set()):
            path = getattr(index.get(leaf), "yaml_path", None) if leaf else None
            for part in Path(path).parent.parts if path else ():
                for resource, package in NLTK_DATA.get(part, []):
                    needs.setdefault(package, [resource])
                    needs[package].append(name)
    missing = {package: sorted(set(users[1:])) for package, users in needs.items() if not _nltk_has(users[0])}
    if missing:
        packages = " ".join(sorted(missing))
        users = sorted({user for names in missing.values() for user in names})
        raise ConfigError(f"eval.tasks {users} need nltk data {sorted(missing)}, which is not installed "
                          f"(nltk.data.path); fetch it once with `python -m nltk.downloader {packages}` "
                          "(or drop the task from eval.tasks)")


def _nltk_has(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
    except LookupError:
        return False
    return True


# The code-executing tasks shipped with contained scoring (ream_exp.sandbox): named in refusals.
CONTAINED_CODE_TASKS = ("toy_code, humaneval, humaneval_instruct and livecodebench (and its window "
                        "livecodebench_2502_2505)")

# dataset_path values that name a datasets builder of local files, not a hub dataset
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


def task_datasets(cfg) -> list[tuple[str, tuple]]:
    """(f"eval task {name}", (hub id, config, revision)) for every hub dataset the eval's tasks read.

    Read from lm-eval's task index (groups and tags expanded to their tasks), without building a task;
    code-executing tasks that will be skipped, custom_dataset loaders and local files need none.
    """
    cfg = _as_dict(cfg)
    names = task_names(cfg)
    if not names:
        return []
    index = _task_manager(_include_path(cfg)).task_index
    needed = []
    for name in names:
        for task in _leaf_configs(index, name, set()):
            path = task.get("dataset_path")
            if (not path or task.get("custom_dataset") or path in LOCAL_BUILDERS or Path(path).exists()
                    or (task.get("unsafe_code") and not cfg.get("allow_code_eval"))):
                continue
            revision = _mapping(task.get("dataset_kwargs")).get("revision")
            needed.append((f"eval task {name}", (str(path), task.get("dataset_name"), revision)))
    return needed


def _leaf_tasks(index, name: str, seen: set, groups: dict | None = None) -> list[tuple[str, dict]]:
    """(leaf task name, its YAML config) for each leaf task a task, group or tag name stands for; the
    groups passed through go into `groups` ({name: YAML config}) when given."""
    entry = index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    kind = entry.kind.name
    if kind == "TAG":
        members = [other for other, e in index.items() if name in e.tags]
    elif kind == "GROUP":
        members = list((entry.cfg or {}).get("task") or [])
        if groups is not None:
            groups[name] = entry.cfg or {}
    else:
        return [(name, entry.cfg or {})]
    leaves = []
    for member in members:
        if isinstance(member, dict):  # an inline task: its own keys over the task it names
            base = index.get(member.get("task"))
            leaves.append((member.get("task"), {**((base.cfg or {}) if base is not None else {}), **member}))
        else:
            leaves += _leaf_tasks(index, str(member), seen, groups)
    return leaves


def task_versions(cfg) -> dict:
    """{task or group name: the version its YAML declares (metadata.version, None if none)} for every
    task, group and leaf task the eval config names, read from lm-eval's task index without building one."""
    cfg = _as_dict(cfg)
    names = task_names(cfg)
    if not names:
        return {}
    index = _task_manager(_include_path(cfg)).task_index
    configs, seen = {}, set()
    for name in names:
        configs.update((leaf, leaf_cfg) for leaf, leaf_cfg in _leaf_tasks(index, name, seen, configs) if leaf)
    return {name: _mapping(configs[name].get("metadata")).get("version") for name in sorted(configs)}


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def scores_made_by(cfg) -> dict:
    """What makes this eval config's scores now (cache_meta.made_by): EVAL_VERSION, lm-eval's version and
    each task's declared version ("task <name>")."""
    return made_by({"evaluate": EVAL_VERSION}, **{"lm-eval": lm_eval_version()},
                   **{f"task {name}": version for name, version in task_versions(cfg).items()})


def _leaf_configs(index, name: str, seen: set) -> list[dict]:
    """The YAML configs of the leaf tasks a task, group or tag name stands for."""
    return [cfg for _, cfg in _leaf_tasks(index, name, seen)]


def _check_backend(backend: str) -> None:
    if backend not in LM_BUILDERS:
        raise ConfigError(f"eval.backend={backend!r}: choose one of {sorted(LM_BUILDERS)}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "eval.backend=vllm needs the `vllm` package, which is not installed "
            "(pip install vllm), or use eval.backend=hf"
        )


def _check_tensor_parallel(cfg: dict) -> None:
    """eval.tensor_parallel_size: the GPUs vLLM splits each layer over (backend=vllm), a positive integer."""
    if cfg.get("tensor_parallel_size") is not None:
        require_positive_int("eval.tensor_parallel_size", cfg["tensor_parallel_size"],
                             "the number of GPUs vLLM splits the model over (eval.backend=vllm)")
    if "tensor_parallel_size" in _mapping(cfg.get("vllm_args")):
        raise ConfigError("eval.vllm_args.tensor_parallel_size: set eval.tensor_parallel_size instead")


def _include_path(cfg) -> str | None:
    path = cfg.get("include_path")
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"eval.include_path {str(path)!r} is not a directory")
    return str(path)


class _OwnOverrides(logging.Filter):
    """Drops lm-eval's "Task 'humaneval' from <ream_exp/code_tasks/...> overrides existing task from ..."
    warning, logged by every run: replacing lm-eval's humaneval is ream-exp's design (README: evaluation),
    not news. An override by a task of eval.include_path is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Task '%s' from %s overrides existing task") and len(args) > 1
                    and Path(str(args[1])).resolve().is_relative_to(CODE_TASKS_DIR.resolve()))


class _NothingToAct(logging.Filter):
    """lm-eval's notices a ream-exp user cannot act on: `--metadata` hints for tasks that take no kwargs,
    and the HF wrapper's remarks on being handed an already-loaded model (which is how ream-exp calls it)."""

    NOTICES = ("Custom kwargs can be passed to `--metadata`", "`pretrained` model kwarg is not of type",
               "Passed an already-initialized model through `pretrained`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES) and not any(n in str(record.msg) for n in self.NOTICES)


def _quiet_lm_eval() -> None:
    """Only lm-eval's warnings a user can act on are shown: not its progress notes (INFO), nor the notices
    _OwnOverrides and _NothingToAct drop."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name, kind in (("lm_eval.tasks._index", _OwnOverrides), ("lm_eval.api.task", _NothingToAct),
                       ("lm_eval.models.huggingface", _NothingToAct)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    # Indexing every lm-eval YAML takes seconds, so one manager per include_path is kept.
    # CODE_TASKS_DIR comes after lm-eval's tasks, so its humaneval replaces the built-in one.
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    paths = [str(CODE_TASKS_DIR)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths)


# ---------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, cfg, checkpoint_dir: str | os.PathLike | None = None,
             output_dir: str | os.PathLike | None = None) -> dict:
    """Scores `model` on the eval config `cfg`; returns a JSON-serialisable dict.

    {"tasks": {name: {"score", "stderr", "metric", "kind", "n", "fewshot", "metrics", "protocol"}}, "mc",
    "gen", "avg"
    (fractions in [0, 1], None when a side has no task or misses a score), "mc_stderr", "gen_stderr",
    "avg_stderr" (same units), "percent": those six x 100, "mc_tasks", "gen_tasks": the task set of
    each suite, "gen_protocol": {GEN task: its "protocol"},
    "limit", "bootstrap_iters": the eval settings, "skipped": {name: reason}, "versions": {task or
    group: the version lm-eval reports}}.
    `checkpoint_dir` (the saved model) is needed only by backend=vllm; `output_dir` receives lm-eval's
    own results (and per-sample) files.
    """
    cfg = _as_dict(cfg)
    names = check_tasks(cfg)
    settings = {"limit": cfg.get("limit"), "bootstrap_iters": _bootstrap_iters(cfg)}
    if not names:  # eval=none: lm-eval is not even imported
        return {**summarise({}), **settings, "skipped": {}, "versions": {}}
    if cfg.get("backend") == "vllm" and checkpoint_dir is None:
        raise ValueError("eval.backend=vllm loads the model from disk: pass checkpoint_dir")
    task_manager = _task_manager(_include_path(cfg))
    entries = [e for name in names for e in _entries_for(task_manager, name, cfg)]
    entries, skipped = _drop_unsafe(entries, bool(cfg.get("allow_code_eval")))
    _apply_num_fewshot(entries, cfg.get("num_fewshot"))
    scores, versions = {}, {}
    for kind, group in _by_kind(entries).items():
        lm = _make_lm(kind, model, tokenizer, cfg, checkpoint_dir)
        tracker = None if output_dir is None else lm_eval_tracker(Path(output_dir), kind)
        raw = _run(lm, group, kind, cfg, task_manager, tracker)
        scores.update({e.name: {**_score(e, raw), "protocol": _protocol(e, raw, cfg)} for e in group})
        versions.update(raw.get("versions") or {})
        if tracker is not None:
            save_lm_eval_output(tracker, raw, Path(output_dir), kind)
    return {**summarise(scores), **settings, "skipped": skipped, "versions": dict(sorted(versions.items()))}


def lm_eval_tracker(output_dir: Path, kind: str):
    """lm-eval's EvaluationTracker for one suite's files in output_dir (simple_evaluate fills it in)."""
    from lm_eval.loggers import EvaluationTracker

    output_dir.mkdir(parents=True, exist_ok=True)
    return EvaluationTracker(output_path=str(output_dir / f"results_{kind}.json"))


def save_lm_eval_output(tracker, raw: dict, output_dir: Path, kind: str) -> list[Path]:
    """The tracker writes `raw` as output_dir/results_<kind>_<time>.json and, when it holds per-sample
    logs (eval.log_samples), one samples_<task>_<time>.jsonl per task; returns the files written."""
    before = set(output_dir.iterdir())
    raw = dict(raw)  # the tracker adds its own keys; the caller's dict stays as lm-eval returned it
    samples = raw.pop("samples", None)
    tracker.save_results_aggregated(results=raw, samples=samples)
    for task_name in samples or {}:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    written = sorted(set(output_dir.iterdir()) - before)
    if not any(p.name.startswith(f"results_{kind}_") for p in written):  # the tracker only warns
        log.error("lm-eval's EvaluationTracker wrote no results file into %s", output_dir)
    return written


def summarise(tasks: dict) -> dict:
    """MC / GEN / AVG and their standard errors from per-task results (README: evaluation), the same in
    percent, the task sets and the GEN tasks' protocols.

    A suite's task set is every task of that kind in `tasks`; one without a score makes the suite's
    mean None (an error is logged), and AVG is None unless every suite that has tasks has a mean.
    Standard errors: see the module docstring (independent tasks; None where a task has none).
    """
    task_sets = {kind: [name for name, t in tasks.items() if t["kind"] == kind] for kind in SUITES}
    means = {kind: _suite_mean(kind, names, tasks) for kind, names in task_sets.items()}
    errors = {kind: _suite_stderr(names, tasks) if means[kind] is not None else None
              for kind, names in task_sets.items()}
    present = [kind for kind in SUITES if task_sets[kind]]
    avg = avg_stderr = None
    if present and None not in (means[kind] for kind in present):
        avg = sum(means[kind] for kind in present) / len(present)
        if None not in (errors[kind] for kind in present):
            avg_stderr = sum(errors[kind] ** 2 for kind in present) ** 0.5 / len(present)
    values = {**means, "avg": avg, **{f"{k}_stderr": v for k, v in errors.items()}, "avg_stderr": avg_stderr}
    percent = {k: None if v is None else round(100 * v, 2 if k in (*SUITES, "avg") else 3)
               for k, v in values.items()}
    gen_protocol = {name: tasks[name]["protocol"] for name in task_sets["gen"] if "protocol" in tasks[name]}
    return {"tasks": tasks, **values, "percent": percent,
            **{f"{kind}_tasks": names for kind, names in task_sets.items()}, "gen_protocol": gen_protocol}


def _suite_stderr(names: list[str], tasks: dict) -> float | None:
    """sqrt(sum SE_i^2) / k over a suite's k tasks (independent); None if one has no stderr."""
    errors = [tasks[name].get("stderr") for name in names]
    if not names or None in errors:
        return None
    return sum(e ** 2 for e in errors) ** 0.5 / len(errors)


def _suite_mean(kind: str, names: list[str], tasks: dict) -> float | None:
    missing = [name for name in names if tasks[name]["score"] is None]
    if missing:
        log.error("%s mean not computed: task(s) %s of its task set %s have no score",
                  kind.upper(), missing, names)
        return None
    return sum(tasks[name]["score"] for name in names) / len(names) if names else None


# ---------------------------------------------------------------- from names to scored entries
def _entries_for(task_manager, name: str, cfg: dict) -> list[Entry]:
    """Builds the lm-eval objects for one requested name (this loads the task's dataset)."""
    loaded = task_manager.load([name])
    override = _mapping(cfg.get("metrics")).get(name)
    if name in loaded.get("groups", {}):
        group = loaded["groups"][name]
        if not group.has_aggregation:
            raise ValueError(
                f"lm-eval group '{name}' reports no aggregate score (no aggregate_metric_list); "
                "list its subtasks in eval.tasks instead"
            )
        return [_entry(name, name, group, group.get_all_tasks(), override)]
    return [_entry(t.task_name, name, t, [t], override) for t in loaded["tasks"].values()]


def _entry(name: str, requested: str, obj, leaves: list, override: str | None) -> Entry:
    kinds = {"mc" if t.OUTPUT_TYPE in MC_OUTPUT_TYPES else "gen" for t in leaves}
    if len(kinds) != 1:
        raise ValueError(f"lm-eval group '{name}' mixes MC and GEN subtasks; list them separately")
    kind = kinds.pop()
    return Entry(name, requested, obj, leaves, kind, _primary_metric(obj, leaves[0], kind, override))


def _primary_metric(obj, first_leaf, kind: str, override: str | None) -> str:
    if override:
        metric = override
    elif kind == "mc":
        metric = MC_METRIC
    elif hasattr(obj, "aggregate_metric_list"):  # a GEN group: its first aggregated metric
        metric = obj.aggregate_metric_list[0].metric
    else:  # aggregation() lists the task's metrics in its metric_list order
        metric = next(iter(obj.aggregation()))
    return metric if "," in metric else f"{metric},{_first_filter(first_leaf)}"


def _first_filter(task) -> str:
    # lm-eval reports every metric once per filter; tasks without filters report under "none".
    filters = task.config.filter_list
    return filters[0]["name"] if isinstance(filters, list) and filters else "none"


def _drop_unsafe(entries: list[Entry], allowed: bool) -> tuple[list[Entry], dict]:
    """Leaves out code-executing tasks unless allowed (lm-eval would raise mid-suite instead);
    allowed ones must run their code through ream_exp.sandbox."""
    if allowed:
        _check_contained(entries)
        return entries, {}
    unsafe = [e.name for e in entries if e.unsafe]
    if unsafe:
        log.warning("Skipping code-executing task(s) %s: %s", unsafe, CODE_EVAL_HINT)
    skipped = {name: f"unsafe_code task skipped; {CODE_EVAL_HINT}" for name in unsafe}
    return [e for e in entries if not e.unsafe], skipped


def _check_contained(entries: list[Entry]) -> None:
    uncontained = sorted({t.task_name for e in entries for t in e.leaves
                          if getattr(t, "UNSAFE_CODE", False) and not _runs_code_contained(t)})
    if uncontained:
        raise ConfigError(
            f"eval.tasks: {uncontained} execute model-written code outside ream_exp.sandbox; "
            f"with eval.allow_code_eval the code-executing tasks allowed are {CONTAINED_CODE_TASKS} "
            "(ream_exp/code_tasks/ holds the contained replacements of lm-eval tasks)"
        )


def _runs_code_contained(task) -> bool:
    """Whether a code-executing task scores through a sandbox.contained hook (process_results or a
    metric function), the only places lm-eval runs a task's own code on the model's output."""
    hooks = [task.config.process_results] + [m.get("metric") for m in task.config.metric_list or []]
    return any(is_contained(hook) for hook in hooks if callable(hook))


def _apply_num_fewshot(entries: list[Entry], num_fewshot) -> None:
    """A per-task {name: n} mapping is set on each task here; a single int goes to lm-eval."""
    per_task = _mapping(num_fewshot)
    for entry in entries:
        if entry.requested in per_task:
            for task in entry.leaves:
                task.set_config(key="num_fewshot", value=int(per_task[entry.requested]))


def _by_kind(entries: list[Entry]) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.kind, []).append(entry)
    return groups


# ---------------------------------------------------------------- running lm-eval
def _hf_lm(model, tokenizer, cfg: dict, checkpoint_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.get("batch_size") or 1)


def _vllm_lm(model, tokenizer, cfg: dict, checkpoint_dir):
    _check_backend("vllm")
    from lm_eval.models.vllm_causallms import VLLM

    extra = _mapping(cfg.get("vllm_args"))  # e.g. gpu_memory_utilization, max_model_len
    return VLLM(pretrained=str(checkpoint_dir), batch_size=cfg.get("batch_size") or "auto",
                tensor_parallel_size=int(cfg.get("tensor_parallel_size") or 1), **extra)


LM_BUILDERS = {"hf": _hf_lm, "vllm": _vllm_lm}


def _make_lm(kind: str, model, tokenizer, cfg: dict, checkpoint_dir):
    # Only generation gains from vLLM; loglikelihood scoring stays on the in-memory model.
    backend = (cfg.get("backend") or "hf") if kind == "gen" else "hf"
    return LM_BUILDERS[backend](model, tokenizer, cfg, checkpoint_dir)


def _run(lm, entries: list[Entry], kind: str, cfg: dict, task_manager, tracker=None) -> dict:
    import lm_eval

    num_fewshot = cfg.get("num_fewshot")
    max_gen_toks = cfg.get("max_gen_toks")
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[e.obj for e in entries],
        task_manager=task_manager,
        limit=cfg.get("limit"),
        num_fewshot=num_fewshot if isinstance(num_fewshot, int) else None,
        gen_kwargs={"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None,
        apply_chat_template=_for_kind(cfg.get("apply_chat_template"), kind),
        confirm_run_unsafe_code=bool(cfg.get("allow_code_eval")),
        bootstrap_iters=_bootstrap_iters(cfg),
        log_samples=bool(cfg.get("log_samples")),
        evaluation_tracker=tracker,
    )


def _bootstrap_iters(cfg: dict) -> int:
    iters = cfg.get("bootstrap_iters")
    return DEFAULT_BOOTSTRAP_ITERS if iters is None else int(iters)


def _score(entry: Entry, raw: dict) -> dict:
    reported = raw["results"].get(entry.name, {})
    value = reported.get(entry.metric)
    n = sum(int(raw["n-samples"][t.task_name]["effective"]) for t in entry.leaves)
    if not isinstance(value, (int, float)):
        available = sorted(k for k in reported if "," in k and "_stderr" not in k)
        log.error("%s reports no %r (has %s): its suite's mean will be None", entry.name, entry.metric,
                  available)
        value = None
    every = {key: float(v) for key, v in sorted(reported.items())
             if "," in key and "_stderr" not in key and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"score": None if value is None else float(value), "stderr": _stderr(entry, reported),
            "metric": entry.metric, "kind": entry.kind, "n": n, "fewshot": _fewshot(entry, raw),
            "metrics": every}


def _protocol(entry: Entry, raw: dict, cfg: dict) -> dict:
    """How a task was run (docs/algorithms.md, "GEN protocol"): the prompt variant (the task YAML's
    metadata.variant, else lm-eval's task of that name) and its version, shots, metric, filter, chat
    template, stop sequences and generation cap (None: lm-eval's default, 256 tokens)."""
    config = entry.leaves[0].config
    metadata = _mapping(getattr(config, "metadata", None))
    generation = _mapping(getattr(config, "generation_kwargs", None))
    metric, filter_name = entry.metric.split(",", 1)
    cap = cfg.get("max_gen_toks")
    version = (raw.get("versions") or {}).get(entry.name, metadata.get("version"))
    protocol = {"variant": metadata.get("variant") or f"lm-eval {entry.name}",
                "version": None if version is None else str(version), "fewshot": _fewshot(entry, raw),
                "metric": metric, "filter": filter_name,
                "chat_template": _for_kind(cfg.get("apply_chat_template"), entry.kind)}
    if entry.kind == "gen":
        protocol.update(until=list(generation.get("until") or []),
                        max_gen_toks=int(cap) if cap else generation.get("max_gen_toks"))
    return protocol


def _stderr(entry: Entry, reported: dict) -> float | None:
    """The stderr lm-eval reports beside the primary metric ("acc,none" -> "acc_stderr,none");
    None when it reports "N/A" (bootstrap_iters=0, one item, a metric without a stderr)."""
    metric, filter_name = entry.metric.split(",", 1)
    value = reported.get(f"{metric}_stderr,{filter_name}")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fewshot(entry: Entry, raw: dict):
    """The few-shot count lm-eval used: the task's, or its leaves' when they agree (else a mapping)."""
    shots = raw.get("n-shot") or {}
    if entry.name in shots:
        return shots[entry.name]
    per_leaf = {t.task_name: shots.get(t.task_name) for t in entry.leaves}
    values = set(per_leaf.values())
    return values.pop() if len(values) == 1 else per_leaf


# ---------------------------------------------------------------- small helpers
def _as_dict(cfg) -> dict:
    if cfg is None:
        return {"name": "none", "tasks": []}
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _mapping(value) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def _for_kind(value, kind: str) -> bool:
    """A setting given as one bool or per kind ({mc: false, gen: true})."""
    return bool(value.get(kind, False)) if isinstance(value, dict) else bool(value)
