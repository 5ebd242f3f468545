"""Experiment tracking: a W&B run for logger=wandb, a NullLogger that does nothing for logger=none.

    logger = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
    logger.log_plan(run_dir / "plan.json"); logger.log_metrics(metrics)
    logger.log_results(run_dir / "metrics.json"); logger.finish()   # finish(exit_code=1): the run failed

Both loggers have the same methods, so the pipeline never asks whether logging is on.
W&B runs offline by default: files go under <run_dir>/wandb/, no login is needed, and
`wandb sync <run_dir>/wandb/offline-run-*` uploads them later (a relaunch moves the wandb/ of an unfinished
attempt to attempts/ with the rest of it: ream_exp.run_records). A mode=online run that cannot start
(no API key, no network) continues offline with a warning. Logging never stops a run: every W&B
call is guarded, and a W&B that cannot start at all leaves a NullLogger in its place.

Each W&B run is named like its run directory, from what tells runs of a sweep apart: method, ratio and
calibration mix ("reap_r0.25_0:.5:.5"; logger.run_name overrides it). Inside a Hydra multirun its
group is the sweep (the sweep directory's name, e.g. toy_pareto; logger.group overrides it), so a
sweep's runs sit together in the W&B UI. plan.json and metrics.json are logged as artifacts (types
`plan` and `metrics`), besides the metrics in the run's summary and history.
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
from pathlib import Path

from .mix_labels import format_mix

log = logging.getLogger(__name__)

# Modes tried in order: an online run that cannot reach W&B still records everything offline.
MODES = {"online": ("online", "offline"), "offline": ("offline",)}
DEFAULT_INIT_TIMEOUT_S = 60.0


class NullLogger:
    """The logger for logger=none (and for a W&B that could not start): every method does nothing."""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_config(self, config: dict) -> None:
        pass

    def log_plan(self, plan: str | Path | dict) -> None:
        pass

    def log_results(self, path: str | Path) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _guarded(method):
    """A failing W&B call is reported and otherwise ignored: tracking must not sink a finished run."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B failure, by design
            log.warning("W&B %s failed (%s: %s); the run goes on", method.__name__, type(err).__name__, err)
            return None

    return wrapper


class WandbLogger:
    """One W&B run. Metrics go to the run summary (all of them) and history (the numbers)."""

    def __init__(self, run):
        self.run = run
        self._finished = False

    @_guarded
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        flat = flatten(metrics)
        # a task's protocol (shots, token cap) describes how it was scored: summary only, never a chart
        numbers_only = {k: v for k, v in flat.items() if _is_number(v) and "protocol/" not in k}
        if numbers_only:
            self.run.log(numbers_only, step=step)
        # The summary is what run tables show; strings and lists (method, mix) belong there too.
        self.run.summary.update({k: v for k, v in flat.items() if v is not None})

    @_guarded
    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    @_guarded
    def log_plan(self, plan: str | Path | dict) -> None:
        """The compression plan (which experts are kept/merged) as a versioned `plan` artifact."""
        import wandb

        path = Path(plan) if isinstance(plan, (str, Path)) else _write_json(Path(self.run.dir) / "plan.json", plan)
        self._log_file("plan", path)

    @_guarded
    def log_results(self, path: str | Path) -> None:
        """metrics.json, as written, as a versioned `metrics` artifact."""
        self._log_file("metrics", Path(path))

    def _log_file(self, kind: str, path: Path) -> None:
        import wandb

        artifact = wandb.Artifact(f"{kind}-{self.run.id}", type=kind)
        artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)

    @_guarded
    def finish(self, exit_code: int = 0) -> None:
        """Ends the W&B run; a non-zero exit_code (the run failed or was interrupted) marks it failed."""
        if not self._finished:
            self._finished = True
            if exit_code:
                self.run.finish(exit_code=exit_code)
            else:
                self.run.finish()


def wandb_mode(cfg) -> str | None:
    """The W&B mode a logger config asks for (online or offline), None for no logging; its name and mode
    are checked with every other setting (ream_exp.settings)."""
    cfg = _as_dict(cfg)
    name, mode = cfg.get("name") or "none", cfg.get("mode") or "offline"
    return None if name != "wandb" or mode == "disabled" else mode


def make_logger(cfg, run_dir: str | Path, config_dict: dict | None = None) -> NullLogger | WandbLogger:
    """The logger a conf/logger/*.yaml asks for. cfg keys: name (wandb | none), project, entity,
    mode (offline | online | disabled), group (default: the sweep), tags, run_name (default: method,
    ratio, mix), init_timeout (seconds)."""
    cfg = _as_dict(cfg)
    mode = wandb_mode(cfg)
    if mode is None:
        return NullLogger()
    cfg = {**cfg, "run_name": cfg.get("run_name") or run_name(config_dict or {}),
           "group": cfg.get("group") or sweep_name()}
    run = _start_first(cfg, Path(run_dir), config_dict, MODES[mode])
    return NullLogger() if run is None else WandbLogger(run)


def run_name(config: dict) -> str | None:
    """method_r<ratio>[_<mix>] from a resolved run config, the settings a sweep's run directories differ
    in; None when the config names no method."""
    method = (config.get("method") or {}).get("name")
    if not method:
        return None
    name = f"{method}_r{float(config['ratio']):g}" if config.get("ratio") is not None else str(method)
    mix = (config.get("calib") or {}).get("mix")
    if mix is not None and method != "none":
        name += f"_{_mix_label(mix)}"
    return name


def _mix_label(mix) -> str:
    try:
        return format_mix(mix)
    except (TypeError, ValueError):  # a mix format_mix does not know: shown as given
        return str(mix)


def sweep_name() -> str | None:
    """The sweep directory's name when this process runs a Hydra multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        return Path(str(hydra_cfg.sweep.dir)).name or None
    except Exception:  # noqa: BLE001 - no Hydra state: no group
        return None


def _start_first(cfg: dict, run_dir: Path, config_dict: dict | None, modes: tuple):
    for mode in modes:
        try:
            return _start(cfg, run_dir, config_dict, mode)
        except Exception as err:  # noqa: BLE001 - no key, no network, bad settings: all non-fatal
            rest = modes[modes.index(mode) + 1:]
            then = f"continuing {rest[0].upper()} under {run_dir}" if rest else "logging is off for this run"
            log.warning("W&B could not start in %s mode (%s: %s); %s", mode, type(err).__name__, err, then)
    return None


def _start(cfg: dict, run_dir: Path, config_dict: dict | None, mode: str):
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    timeout = float(cfg.get("init_timeout") or DEFAULT_INIT_TIMEOUT_S)
    return wandb.init(
        project=cfg.get("project") or "ream-exp",
        entity=cfg.get("entity"),
        group=cfg.get("group"),
        tags=list(cfg.get("tags") or []) or None,
        name=cfg.get("run_name"),
        dir=str(run_dir),
        mode=mode,
        config=config_dict,
        # A Hydra multirun starts its runs in one process; each job gets a fresh W&B run.
        reinit="finish_previous",
        # Both timeouts bound how long an unreachable server can hold up the start.
        # quiet: no run summary printed around ream-exp's own score table (the run's files hold it all)
        settings=wandb.Settings(init_timeout=timeout, login_timeout=timeout, quiet=True),
    )


def flatten(metrics: dict, prefix: str = "") -> dict:
    """{"eval": {"mc": 0.6}} -> {"eval/mc": 0.6}: W&B charts and tables want flat keys."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _is_number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
