"""calib=pretokenized calib.path=FILE: the stored tokens are used exactly as given, bad files fail clearly."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ream_exp.calib import build_calibration, validate_calib
from ream_exp.config import ConfigError
from ream_exp.methods import Context, get_method
from ream_exp.moe.tiny import tiny_batch, tiny_model
from ream_exp.settings import check_group

CONF = Path(__file__).resolve().parents[1] / "conf"


def _tokens(n=5, seq=12, seed=0):
    ids, mask = tiny_batch(batch=n, seq=seq, seed=seed, pad_last=4)
    return {"input_ids": ids, "attention_mask": mask}


def _calib_cfg(path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=["+calib=pretokenized", f"calib.path={path}"]).calib


def test_tokens_come_back_exactly_as_stored(tmp_path):
    data = _tokens()
    torch.save(data, tmp_path / "calib.pt")
    cfg = _calib_cfg(tmp_path / "calib.pt")
    assert cfg.name == "pretokenized" and cfg.mix is None
    calib = build_calibration(cfg, tokenizer=None)  # no tokenizer needed
    assert set(calib) == {"input_ids", "attention_mask"}
    for k in calib:
        assert calib[k].dtype == torch.long and torch.equal(calib[k], data[k])


def test_a_path_alone_selects_the_file(tmp_path):
    data = _tokens(seed=4)
    torch.save(data, tmp_path / "c.pt")
    cfg = OmegaConf.create({"name": "local", "path": str(tmp_path / "c.pt"), "mix": [1, 0, 0], "n": 99})
    assert torch.equal(build_calibration(cfg, None)["input_ids"], data["input_ids"])


def test_validation_needs_no_mix_for_a_file_and_keeps_checking_mixes(tmp_path):
    torch.save(_tokens(), tmp_path / "calib.pt")
    validate_calib(_calib_cfg(tmp_path / "calib.pt"))
    with pytest.raises(ValueError, match="all zero"):
        check_group("calib", OmegaConf.create({"name": "local", "mix": [0, 0, 0]}))


def _bad(tmp_path, data, match):
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    with pytest.raises(ValueError, match=match):
        build_calibration(_calib_cfg(path), None)
    with pytest.raises(ValueError, match=match):
        validate_calib(_calib_cfg(path))


def test_missing_file_and_missing_path_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_calibration(_calib_cfg(tmp_path / "nope.pt"), None)
    with pytest.raises(ValueError, match="needs calib.path"):
        build_calibration(OmegaConf.create({"name": "pretokenized", "path": None, "mix": None}), None)


def test_wrong_keys(tmp_path):
    _bad(tmp_path, {"input_ids": _tokens()["input_ids"]}, "missing key.*attention_mask")
    _bad(tmp_path, [_tokens()["input_ids"]], "expected a dict")


def test_wrong_dtypes(tmp_path):
    data = _tokens()
    _bad(tmp_path, {**data, "input_ids": data["input_ids"].int()}, "input_ids must be int64")
    _bad(tmp_path, {**data, "attention_mask": data["attention_mask"].bool()}, "attention_mask must be int64")


def test_wrong_shapes_and_values(tmp_path):
    data = _tokens()
    _bad(tmp_path, {**data, "input_ids": data["input_ids"].reshape(-1)}, r"shape \[n, seq_len\]")
    _bad(tmp_path, {**data, "attention_mask": data["attention_mask"][:, :-1]}, "differ in shape")
    _bad(tmp_path, {**data, "attention_mask": data["attention_mask"] * 2}, "only 0 .* and 1")
    _bad(tmp_path, {**data, "attention_mask": torch.zeros_like(data["attention_mask"])}, "no token")


def test_a_method_on_the_file_equals_the_method_on_the_tensors(tmp_path):
    data = _tokens(n=4, seq=16)
    torch.save(data, tmp_path / "calib.pt")
    loaded = build_calibration(_calib_cfg(tmp_path / "calib.pt"), None)
    plans = []
    for calib in (data, loaded):
        ctx = Context(tiny_model("qwen3_moe"), calib, 0.5, {"name": "reap"}, progress=False)
        plans.append(get_method("reap").plan(ctx).to_dict())
    assert plans[0] == plans[1]
