"""A Hydra sweeper that searches the calibration mix: `hydra/sweeper=mix_search`.

Every trial is one ream-exp run whose calib.mix the sampler proposes (ream_exp.search turns its K-1 numbers
into a mix on the step grid over the searched sources); the run's MC and GEN are the two objectives, both
maximised. Every other setting (method, ratio, model, eval ...) is fixed for the study: it comes from the
sweep config and the command line, and a sweep over one of them is refused.

Resumable. The study lives in <sweep dir>/study.db (SQLite), its name made from the method, the ratio and
a digest of the config without calib.mix and the sources not searched, so a relaunch with the same config loads it:
  - n_trials is the number of distinct mixes the study should hold finished; a launch runs only the
    missing ones, so a relaunch with the same n_trials runs nothing and a larger one adds the difference;
  - a proposal whose mix the study already finished is told the same scores (a duplicate, not counted);
  - a proposal whose run directory already holds finished results of this config (metrics.json) is told
    those, with no job launched;
  - a failed run (its job raised or returned no metrics, or an eval without MC and GEN) is told to the
    sampler as TrialState.FAIL and is not retried in that launch; a relaunch proposes new mixes for it;
  - a trial left RUNNING by a launch that was killed is marked FAIL and its mix is tried first again.

Plugin modules are imported whenever Hydra scans for plugins, so optuna and ream_exp load only in setup.
"""
# No `from __future__ import annotations`: Hydra imports plugin modules outside sys.modules, where a
# dataclass cannot resolve string annotations.

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("ream_exp.search")

MIX_KEY = "calib.mix"
STUDY_FILE = "study.db"
DIRECTIONS = ("maximize", "maximize")  # (MC, GEN)
MAX_REPEATS = 200  # proposals in a row that repeat finished mixes before the launch gives up


@dataclass
class MixSearchConf:
    _target_: str = "hydra_plugins.ream_mix_search.mix_search_sweeper.MixSearchSweeper"
    _recursive_: bool = False  # the sampler is built in setup, once its settings are checked
    n_trials: int = 8          # distinct mixes the study should hold finished
    step: float = 0.1          # grid of the weights: every weight a multiple of step
    sources: Optional[List[str]] = None   # the sources searched; null = every key of calib.sources
    initial: List[Any] = field(default_factory=list)  # mixes ({source: weight}) run first, before proposals
    n_jobs: int = 1            # runs launched together (a parallel launcher, e.g. hydra/launcher=slurm)
    study_name: Optional[str] = None      # null = <method>_r<ratio>_<digest of the config without the mix>
    storage: Optional[str] = None         # null = sqlite:///<sweep dir>/study.db
    # The sampler: Gaussian-process log-EHVI, made for budgets of tens of trials (see docs/sweeps.md)
    sampler: Dict[str, Any] = field(default_factory=lambda: {
        "_target_": "optuna.samplers.GPSampler", "seed": 0, "n_startup_trials": 3})


ConfigStore.instance().store(group="hydra/sweeper", name="mix_search", node=MixSearchConf, provider="ream_exp")


class MixSearchSweeper(Sweeper):
    def __init__(self, n_trials: int, step: float, sources, initial, n_jobs: int, study_name, storage,
                 sampler) -> None:
        super().__init__()
        self.n_trials, self.step, self.n_jobs = n_trials, step, n_jobs
        self.sources_setting = None if sources is None else list(sources)
        self.initial = [OmegaConf.to_container(m) if OmegaConf.is_config(m) else m for m in (initial or [])]
        self.study_name, self.storage, self.sampler_cfg = study_name, storage, sampler
        self.launched = 0  # jobs this launch started (tests count them)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ------------------------------------------------------------ settings, checked before any run

    def _settings(self, arguments: List[str]):
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from ream_exp.config import ConfigError, require_positive_int
        from ream_exp.search import grid_size, grid_units

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for override in parser.parse_overrides(arguments):
            key = override.get_key_element()
            if key == MIX_KEY:
                raise ConfigError(f"{MIX_KEY} is what hydra/sweeper=mix_search chooses: remove {override.input_line!r}")
            if override.is_sweep_override():
                raise ConfigError(f"hydra/sweeper=mix_search searches the mix for one config; {override.input_line!r} "
                                  "sweeps another setting: launch one search per value (e.g. one per method)")
        self.n_trials = require_positive_int("hydra.sweeper.n_trials", self.n_trials, "the number of mixes to run")
        self.n_jobs = require_positive_int("hydra.sweeper.n_jobs", self.n_jobs, "the number of runs launched together")
        self.units = grid_units(self.step)
        declared = list((OmegaConf.select(self.config, "calib.sources") or {}).keys())
        sources = declared if self.sources_setting is None else self.sources_setting
        unknown = [s for s in sources if s not in declared]
        if unknown or len(set(sources)) != len(sources) or len(sources) < 2:
            raise ConfigError(f"hydra.sweeper.sources={sources}: the search needs two or more distinct sources "
                              f"declared in calib.sources ({declared})")
        self.sources, self.declared = sources, declared
        size = grid_size(len(sources), self.units)
        if self.n_trials > size:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials} is more than the {size} mixes of step "
                              f"{self.step} over {len(sources)} sources")
        self.initial_units = [self._initial_units(i, m) for i, m in enumerate(self.initial)]

    def _initial_units(self, index: int, mix) -> tuple:
        from ream_exp.config import ConfigError
        from ream_exp.search import round_to_grid

        setting = f"hydra.sweeper.initial[{index}]"
        if not isinstance(mix, dict) or set(mix) - set(self.sources):
            raise ConfigError(f"{setting}={mix!r} is not a mapping over the searched sources {self.sources}")
        weights = [mix.get(s, 0) for s in self.sources]
        if any(not isinstance(w, (int, float)) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"{setting}={mix!r}: weights must be numbers >= 0, not all zero")
        return round_to_grid(weights, self.units)

    def _study(self, sweep_dir: Path):
        import optuna
        from hydra.utils import instantiate
        from ream_exp.config import ConfigError

        storage = self.storage or f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"
        name = self.study_name or self._default_study_name()
        with warnings.catch_warnings():  # GPSampler is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = instantiate(self.sampler_cfg)
        study = optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS),
                                    sampler=sampler, load_if_exists=True)
        space = {"sources": self.sources, "step": float(self.step)}
        if "space" not in study.user_attrs:
            study.set_user_attr("space", space)
        elif study.user_attrs["space"] != space:
            raise ConfigError(f"the study {name!r} in {storage} searches {study.user_attrs['space']}, not {space}: "
                              "keep hydra.sweeper.sources and step, or use another hydra.sweep.dir or study_name")
        log.info("mix search: study %r in %s, sampler %s", name, storage, type(study.sampler).__name__)
        return study

    def _default_study_name(self) -> str:
        from ream_exp.identity import config_digest

        cfg = OmegaConf.masked_copy(self.config, [k for k in self.config if k != "hydra"])
        with open_dict(cfg):  # what the search chooses, and sources it never reads, do not name the study
            cfg.calib.pop("mix", None)
            cfg.calib.sources = {s: cfg.calib.sources[s] for s in self.sources}
        return f"{self.config.method.name}_r{self.config.ratio}_{config_digest(cfg)[:10]}"

    # ------------------------------------------------------------ the search

    def sweep(self, arguments: List[str]) -> Any:
        import optuna

        self._settings(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = self._study(sweep_dir)
        self._recover_interrupted(study)
        if not study.user_attrs.get("initial_enqueued"):
            for units in self.initial_units:
                study.enqueue_trial(self._params_for(units), skip_if_exists=True)
            study.set_user_attr("initial_enqueued", True)

        finished = self._finished_mixes(study)
        missing = self.n_trials - len(finished)
        log.info("mix search: %d of %d mixes finished, %d to run", len(finished), self.n_trials, max(missing, 0))
        returns, repeats = [], 0
        while missing > 0:
            batch = []  # (trial, mix, overrides) to launch
            while len(batch) < min(self.n_jobs, missing) and repeats < MAX_REPEATS:
                trial = study.ask()
                units = self._propose(trial)
                mix = self._mix(units)
                key = self._label(mix)
                trial.set_user_attr("mix", key)
                if key in finished:  # the sampler repeated a finished mix: same scores, nothing run
                    trial.set_user_attr("duplicate_of", finished[key][0])
                    study.tell(trial, finished[key][1])
                    repeats += 1
                    continue
                if any(key == self._label(m) for _, m, _ in batch):  # the same mix is launching now
                    trial.set_user_attr("duplicate_of_pending", True)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    repeats += 1
                    continue
                repeats = 0
                overrides = [*arguments, self._override(mix)]
                values = self._finished_in_run_dir(overrides)
                if values is not None:
                    log.info("mix search: %s already finished in its run directory, its scores reused", key)
                    trial.set_user_attr("reused_run_dir", True)
                    study.tell(trial, values)
                    finished[key] = (trial.number, values)
                    missing -= 1
                    continue
                batch.append((trial, mix, overrides))
            if not batch:
                if repeats >= MAX_REPEATS:
                    log.warning("mix search: the sampler proposed %d finished mixes in a row; stopping with %d "
                                "of %d mixes", MAX_REPEATS, len(finished), self.n_trials)
                break
            results = self.launcher.launch([o for _, _, o in batch], initial_job_idx=self.launched)
            self.launched += len(batch)
            returns.append(results)
            for (trial, mix, _), result in zip(batch, results):
                self._tell(study, trial, mix, result, finished)
            missing -= len(batch)  # a failed run is not retried in this launch
        self._write_summary(study, sweep_dir)
        return returns

    def _propose(self, trial) -> tuple:
        from ream_exp.search import round_to_grid, simplex_weights

        u = [trial.suggest_float(f"u{i}", 0.0, 1.0) for i in range(len(self.sources) - 1)]
        return round_to_grid(simplex_weights(u), self.units)

    def _params_for(self, units: tuple) -> dict:
        """The trial parameters whose proposal is exactly `units`."""
        from ream_exp.search import simplex_params

        return {f"u{i}": u for i, u in enumerate(simplex_params(units, self.units))}

    def _mix(self, units: tuple) -> dict:
        from ream_exp.search import mix_from_units

        return mix_from_units(self.sources, units, self.units)

    @staticmethod
    def _label(mix: dict) -> str:
        from ream_exp.search import mix_label

        return mix_label(mix)

    def _override(self, mix: dict) -> str:
        """calib.mix over every declared source, the unsearched at 0: a mapping given as the default mix
        would otherwise keep their weights (Hydra merges a mapping override into a mapping)."""
        from ream_exp.search import mix_override

        return mix_override({**{s: 0.0 for s in self.declared}, **mix})

    def _finished_in_run_dir(self, overrides: List[str]):
        """(MC, GEN) of this job's run directory when it already holds finished results of this config."""
        from ream_exp.run_records import finished_metrics
        from ream_exp.search import objectives

        job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        run_dir = Path(str(job_cfg.hydra.sweep.dir)) / str(job_cfg.hydra.sweep.subdir)
        with open_dict(job_cfg):
            del job_cfg["hydra"]
        metrics = finished_metrics(run_dir, job_cfg)
        try:
            return list(objectives(metrics)) if metrics is not None else None
        except ValueError:
            return None

    def _tell(self, study, trial, mix: dict, result, finished: dict) -> None:
        import optuna
        from hydra.core.utils import JobStatus
        from ream_exp.search import objectives

        key = self._label(mix)
        try:
            if result.status != JobStatus.COMPLETED:
                raise ValueError(f"the job raised {type(result._return_value).__name__}: {result._return_value}")
            values = list(objectives(result.return_value))
        except ValueError as exc:
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("mix search: trial %d (%s) failed: %s", trial.number, key, exc)
            return
        study.tell(trial, values)
        finished[key] = (trial.number, values)
        log.info("mix search: trial %d (%s) MC %.4f GEN %.4f", trial.number, key, *values)

    def _finished_mixes(self, study) -> dict:
        """{mix label: (trial number, [MC, GEN])} over the study's finished trials, first of each mix."""
        import optuna

        finished = {}
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            finished.setdefault(t.user_attrs.get("mix"), (t.number, list(t.values)))
        finished.pop(None, None)
        return finished

    def _recover_interrupted(self, study) -> None:
        """Trials left RUNNING by a launch that died: FAIL, and their mixes are proposed first again.

        (A study run by one launch at a time: two launches into one sweep directory would see each other's
        running trials as interrupted; their runs would still never collide, the run directories are locked.)"""
        import optuna

        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            if t.params:
                study.enqueue_trial(t.params)
            log.warning("mix search: trial %d (%s) was left running by an earlier launch: marked failed, its mix "
                        "queued again", t.number, t.user_attrs.get("mix"))

    def _write_summary(self, study, sweep_dir: Path) -> None:
        """search.json: every trial (number, state, mix, MC, GEN) and the Pareto front's trial numbers."""
        from ream_exp.atomic import write_json

        trials = [{"number": t.number, "state": t.state.name, "mix": t.user_attrs.get("mix"),
                   "values": list(t.values) if t.values else None,
                   **{k: t.user_attrs[k] for k in ("duplicate_of", "reused_run_dir", "error") if k in t.user_attrs}}
                  for t in study.get_trials(deepcopy=False)]
        front = [t.number for t in study.best_trials] if any(t["state"] == "COMPLETE" for t in trials) else []
        write_json(sweep_dir / "search.json", {"study": study.study_name, "sources": self.sources,
                                               "step": float(self.step), "trials": trials, "pareto_front": front})
