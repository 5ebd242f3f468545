"""ream_exp/tracking.py: offline W&B runs under the run dir, the NullLogger, and the online->offline fallback.

    pytest tests/test_tracking.py

Nothing leaves the machine: W&B's server address points at a closed port on 127.0.0.1 and no API key
is available (WANDB_API_KEY unset, NETRC and the W&B config dir point into tmp).
"""

import json
import logging
from pathlib import Path

import pytest
import yaml

from ream_exp import tracking
from ream_exp.config import ConfigError
from ream_exp.settings import check_group
from ream_exp.tracking import NullLogger, WandbLogger, make_logger

CONF_LOGGER = Path(__file__).resolve().parents[1] / "conf" / "logger"
METRICS = {"status": "done", "ratio": 0.25, "mix": [0.1, 0.1, 0.8], "baseline": None,
           "eval": {"mc": 0.5, "gen": 0.25, "tasks": {"arc_easy": {"score": 0.5, "kind": "mc"}}}}


@pytest.fixture(autouse=True)
def no_wandb_account(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the tests choose the mode through the config
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed local port
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_cfg(**overrides):
    return {**yaml.safe_load((CONF_LOGGER / "wandb.yaml").read_text()), "init_timeout": 5, **overrides}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_offline_run_writes_under_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    logger = make_logger(wandb_cfg(tags=["t1"], run_name="tiny"), run_dir, {"ratio": 0.25, "method": {"name": "reap"}})
    assert isinstance(logger, WandbLogger) and logger.run.offline
    plan = {"layers": {"0": {"keep": [0, 2, 3]}}}
    logger.log_plan(plan)
    (run_dir / "plan.json").write_text(json.dumps(plan))
    logger.log_plan(run_dir / "plan.json")
    logger.log_config({"extra": 1})
    logger.log_metrics(METRICS)
    summary = dict(logger.run.summary)
    logger.finish()
    logger.finish()  # a second finish is harmless
    assert summary["eval/mc"] == 0.5 and summary["eval/tasks/arc_easy/score"] == 0.5 and summary["status"] == "done"
    [run] = offline_runs(run_dir)
    assert list(run.glob("*.wandb")), "the run's record file is missing"
    assert json.loads((run / "files" / "plan.json").read_text()) == plan


def test_flatten_nests_keys_with_slashes():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1]}) == {"a/b": 1, "a/c/d": "x", "e": [1]}


@pytest.mark.parametrize("cfg", [{"name": "none"}, None, {"name": "wandb", "mode": "disabled"}])
def test_null_logger_does_nothing_and_writes_nothing(tmp_path, cfg):
    if cfg == {"name": "none"}:
        assert yaml.safe_load((CONF_LOGGER / "none.yaml").read_text()) == cfg
    logger = make_logger(cfg, tmp_path / "run", {"a": 1})
    assert isinstance(logger, NullLogger)
    for call in (lambda: logger.log_metrics(METRICS), lambda: logger.log_plan({"x": 1}),
                 lambda: logger.log_config({}), logger.finish):
        assert call() is None
    assert not (tmp_path / "run").exists()


def test_online_without_api_key_falls_back_to_offline(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=tracking.__name__)
    run_dir = tmp_path / "run"
    logger = make_logger(wandb_cfg(mode="online"), run_dir, {"ratio": 0.5})
    try:
        assert isinstance(logger, WandbLogger) and logger.run.offline
        logger.log_metrics({"mc": 0.4})
    finally:
        logger.finish()
    assert offline_runs(run_dir)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "online" in warning and "OFFLINE" in warning


@pytest.mark.slow
def test_online_with_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    """A key is present but the server cannot be reached: init gives up after init_timeout."""
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    caplog.set_level(logging.WARNING, logger=tracking.__name__)
    logger = make_logger(wandb_cfg(mode="online", init_timeout=3), tmp_path / "run")
    try:
        assert isinstance(logger, WandbLogger) and logger.run.offline
    finally:
        logger.finish()
    assert "OFFLINE" in caplog.text


def test_wandb_that_cannot_start_leaves_a_null_logger(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("wandb-core could not start")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = make_logger(wandb_cfg(), tmp_path / "run")
    assert isinstance(logger, NullLogger) and "logging is off" in caplog.text


def test_failing_wandb_calls_never_raise(caplog):
    class BrokenRun:
        id, dir, offline = "x", "/nonexistent", True

        def __getattr__(self, name):
            raise OSError(f"{name} failed")

        def log(self, *args, **kwargs):
            raise OSError("disk full")

        def finish(self):
            raise OSError("sync failed")

    logger = WandbLogger(BrokenRun())
    logger.log_metrics({"mc": 0.5})
    logger.log_plan({"x": 1})
    logger.finish()
    assert "disk full" in caplog.text and "sync failed" in caplog.text


def test_a_failed_or_interrupted_run_finishes_its_wandb_run_as_failed():
    class Run:
        def __init__(self):
            self.finished = []

        def finish(self, **kwargs):
            self.finished.append(kwargs)

    failed, done = Run(), Run()
    WandbLogger(failed).finish(exit_code=1)
    WandbLogger(done).finish()
    assert failed.finished == [{"exit_code": 1}] and done.finished == [{}]


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"^logger.name='wandbb'; valid: wandb, none \(did you mean wandb\?\)$"):
        check_group("logger", {"name": "wandbb"})
    with pytest.raises(ConfigError, match=r"^logger.mode='onlin'; valid: null, offline, online, disabled"):
        check_group("logger", wandb_cfg(mode="onlin"))


RUN_CONFIG = {"method": {"name": "reap"}, "ratio": 0.25, "calib": {"mix": [0, 0.5, 0.5]}, "seed": 0}


class ArtifactSpy:
    """Records (type, file names) of every artifact a W&B run logs, then logs it for real."""

    def __init__(self, run):
        self.real, self.logged = run.log_artifact, []
        run.log_artifact = self

    def __call__(self, artifact, *args, **kwargs):
        self.logged.append((artifact.type, sorted(artifact.manifest.entries)))
        return self.real(artifact, *args, **kwargs)


def test_offline_run_is_named_like_its_run_dir_and_logs_plan_and_metrics_artifacts(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text(json.dumps({"layers": []}))
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    logger = make_logger(wandb_cfg(), run_dir, RUN_CONFIG)
    try:
        assert logger.run.offline and logger.run.name == "reap_r0.25_0:.5:.5"
        assert not logger.run.group  # not in a sweep
        spy = ArtifactSpy(logger.run)
        logger.log_plan(run_dir / "plan.json")
        logger.log_results(run_dir / "metrics.json")
    finally:
        logger.finish()
    assert spy.logged == [("plan", ["plan.json"]), ("metrics", ["metrics.json"])]
    named = make_logger(wandb_cfg(run_name="mine", group="g"), tmp_path / "other", RUN_CONFIG)
    try:
        assert (named.run.name, named.run.group) == ("mine", "g")  # settings win over the defaults
    finally:
        named.finish()
    assert tracking.run_name({"method": {"name": "none"}, "ratio": 0.0, "calib": {"mix": [1, 0, 0]}}) == "none_r0"
    assert tracking.run_name({}) is None


def test_group_is_the_sweep_in_a_hydra_multirun(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from ream_exp import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.sweep.dir={tmp_path / 'toy_pareto'}"], return_hydra_config=True)
    assert tracking.sweep_name() is None  # no Hydra job in this process yet
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)
    try:
        assert tracking.sweep_name() == "toy_pareto"
        logger = make_logger(wandb_cfg(), tmp_path / "toy_pareto" / "0", RUN_CONFIG)
        try:
            assert logger.run.group == "toy_pareto" and logger.run.offline
        finally:
            logger.finish()
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.mode = "RUN"
        HydraConfig.instance().set_config(cfg)
        assert tracking.sweep_name() is None  # a single run has no sweep
    finally:
        HydraConfig.instance().cfg = None


def test_toy_sweeps_log_to_wandb_offline():
    """Every toy sweep records its runs with W&B, offline: no login, no network (the sweep file's own
    settings come after the main config's in its defaults list, so these are the ones that apply)."""
    from omegaconf import OmegaConf

    toy = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("toy_*.yaml"))
    assert toy
    for path in toy:
        sweep = OmegaConf.load(path)
        assert list(sweep.defaults)[-1] == "_self_", path.name
        assert (sweep.logger.name, sweep.logger.mode) == ("wandb", "offline"), path.name
        assert tracking.wandb_mode(sweep.logger) == "offline"
