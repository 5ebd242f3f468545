"""Every config composes; bad input fails with one clear error before any model is loaded."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import ream_exp.config  # noqa: F401  (the ${pkg:...} resolver)
from ream_exp import PACKAGE_DIR
from ream_exp.config import ConfigError
from ream_exp.run import run, validate

CONF = PACKAGE_DIR.parent / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_groups_exist():
    for group in ("model", "calib", "method", "eval", "quant", "logger"):
        assert options(group), group


@pytest.mark.parametrize("group", ["model", "calib", "method", "eval", "logger"])
def test_every_option_composes_and_resolves(group):
    for option in options(group):
        cfg = make_cfg(f"{group}={option}")
        OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=False)
        assert cfg[group].name == option, f"{group}/{option}.yaml should set name: {option}"


def test_documented_overrides_compose(tmp_path):
    cfg = make_cfg(f"model=local", f"model.path={tmp_path}", "method=reap", "ratio=0.5", "eval=none",
                   "logger=none", "calib.mix=[0.0,0.3,0.7]")
    assert cfg.model.path == str(tmp_path) and cfg.ratio == 0.5 and list(cfg.calib.mix) == [0.0, 0.3, 0.7]


def _local(tiny_checkpoint, calib_files, *extra):
    return make_cfg("model=local", f"model.path={tiny_checkpoint}", "eval=none", "logger=none", "calib=local",
                    *[f"calib.sources.{d}.path={p}" for d, p in calib_files.items()], *extra)


BAD = [
    (["ratio=1.0"], "ratio=1.0 is outside"),
    (["ratio=-0.1"], "ratio=-0.1 is outside"),
    (["ratio=0.9"], "fewer than top_k=2"),
    (["calib.mix=[0.5,-0.1,0.5]"], "must be >= 0"),
    (["calib.mix=[0,0,0]"], "all zero"),
    (["calib.mix=[0.5,0.5]"], "3 ratios"),
    (["method.name=magic"], "unknown method 'magic'; valid: .*reap"),
    (["method=ream", "ratio=0.5", "method.group_size=1"], "group_size=1: 4 groups of at most 1"),
    (["method=ream", "method.align=magic"], "method.align='magic'; valid"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_is_rejected_before_loading(overrides, message, tiny_checkpoint, calib_files, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("model loaded despite bad input"))
    with pytest.raises(ValueError, match=message):
        validate(_local(tiny_checkpoint, calib_files, *overrides))


def test_missing_model_path(tmp_path):
    cfg = make_cfg("model=local", f"model.path={tmp_path / 'nope'}", "eval=none", "logger=none")
    with pytest.raises(ConfigError, match="nope"):
        validate(cfg)


def test_unknown_group_option_lists_valid_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Available options"):
        make_cfg("method=magic")


def test_existing_results_are_never_overwritten(tiny_checkpoint, calib_files, tmp_path):
    (tmp_path / "metrics.json").write_text('{"status": "done"}')
    with pytest.raises(FileExistsError, match="already holds results of a different config"):
        run(_local(tiny_checkpoint, calib_files, "method=reap"), tmp_path)
    assert (tmp_path / "metrics.json").read_text() == '{"status": "done"}'


def test_ream_group_size_follows_model_and_ratio():
    assert make_cfg("method=ream", "ratio=0.25").method.group_size == 16  # toy: no table, default
    assert make_cfg("method=ream", "model=qwen3_30b_a3b", "ratio=0.25").method.group_size == 16
    assert make_cfg("method=ream_official", "model=qwen3_30b_a3b", "ratio=0.5").method.group_size == 32
    assert make_cfg("method=ream", "model=qwen3_30b_a3b", "ratio=0.5", "method.group_size=4").method.group_size == 4
