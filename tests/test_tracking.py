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


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="wandbb"):
        make_logger({"name": "wandbb"}, tmp_path)
    with pytest.raises(ValueError, match="onlin"):
        make_logger(wandb_cfg(mode="onlin"), tmp_path)
