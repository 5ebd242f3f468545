"""Every check of an eval config that needs no model: task names, per-task settings, backend, stderr
settings and code containment, each refused with one ConfigError naming the setting."""

from __future__ import annotations

import importlib.util

from ..config import ConfigError, require_number, require_positive_int
from .code_policy import check_code_tasks_contained
from .eval_config import as_dict, include_path, mapping, task_names
from .task_index import task_index, task_manager

BACKENDS = ("hf", "vllm")  # harness.LM_BUILDERS has one builder for each


def check_tasks(cfg) -> list[str]:
    """Validates an eval config before any model work and returns its task names.

    Raises ConfigError naming unknown tasks (checked against lm-eval's local task index, which needs
    no network), stray keys in the per-task `num_fewshot` / `metrics` mappings, a missing
    include_path, an unknown backend, or backend=vllm when vllm is not installed.
    """
    cfg = as_dict(cfg)
    names = task_names(cfg)
    if not names:
        return []
    check_backend(cfg.get("backend") or "hf")
    _check_tensor_parallel(cfg)
    check_eval_settings(cfg)
    known = set(task_manager(include_path(cfg)).all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(
            f"eval '{cfg.get('name')}': unknown lm-eval task(s) {unknown}; "
            "names must be lm-eval tasks, groups or tags (`lm-eval ls tasks`) or be defined "
            "in eval.include_path"
        )
    for key in ("num_fewshot", "metrics"):
        stray = [k for k in mapping(cfg.get(key)) if k not in names]
        if stray:
            raise ConfigError(f"eval.{key} names task(s) {stray} that are not in eval.tasks")
    if cfg.get("allow_code_eval"):
        check_code_tasks_contained(names, task_index(cfg))
    return names


def check_eval_settings(cfg) -> None:
    """eval.bootstrap_iters: a non-negative integer; eval.log_samples: a boolean."""
    cfg = as_dict(cfg)
    iters = cfg.get("bootstrap_iters")
    meaning = "the bootstrap resamples behind non-mean metrics' stderrs (0 turns every stderr off)"
    if iters is not None and require_number("eval.bootstrap_iters", iters, meaning, integer=True) < 0:
        raise ConfigError(f"eval.bootstrap_iters={iters} must be 0 or more: eval.bootstrap_iters is {meaning}")
    if not isinstance(cfg.get("log_samples", False), bool):
        raise ConfigError(f"eval.log_samples={cfg.get('log_samples')!r}: choose true or false")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"eval.backend={backend!r}: choose one of {sorted(BACKENDS)}")
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
    if "tensor_parallel_size" in mapping(cfg.get("vllm_args")):
        raise ConfigError("eval.vllm_args.tensor_parallel_size: set eval.tensor_parallel_size instead")
