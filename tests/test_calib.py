"""Calibration: sources mixed by int(n*ratio), seeded, truncated/padded or packed, pads masked."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from ream_exp.calib import build_calibration, calibration_batches, counts_for_mix
from ream_exp.config import ConfigError
from ream_exp.moe.tiny import tiny_tokenizer


def _cfg(calib_files, **over):
    base = dict(name="local", mix=[0.5, 0.25, 0.25], n=8, seq_len=24, seed=42, min_fill=0.9, pack=False,
                sources={d: {"path": str(p), "field": "text"} for d, p in calib_files.items()})
    return OmegaConf.create({**base, **over})


def test_counts_follow_int_n_times_ratio():
    assert counts_for_mix(3072, [0.2, 0.25, 0.55]) == {"general": 614, "math": 768, "code": 1689}
    assert counts_for_mix(10, [0.3, 0.3, 0.3]) == {"general": 3, "math": 3, "code": 3}  # need not sum to 1


def test_mix_order_and_shapes(calib_files):
    tok = tiny_tokenizer()
    calib = build_calibration(_cfg(calib_files), tok)
    assert calib["input_ids"].shape == (8, 24) and calib["input_ids"].dtype == torch.long
    texts = [tok.decode(r[m.bool()]) for r, m in zip(calib["input_ids"], calib["attention_mask"])]
    assert all(t.startswith(("The river", "Story")) for t in texts[:4])
    assert all(t.startswith("Question") for t in texts[4:6])
    assert all(t.startswith("def add_") for t in texts[6:])


def test_seeded_and_seed_sensitive(calib_files):
    tok = tiny_tokenizer()
    a = build_calibration(_cfg(calib_files, seed=1), tok)
    b = build_calibration(_cfg(calib_files, seed=1), tok)
    c = build_calibration(_cfg(calib_files, seed=2), tok)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])


def test_padding_and_min_fill(calib_files):
    tok = tiny_tokenizer()
    calib = build_calibration(_cfg(calib_files, seq_len=100, min_fill=0.7, mix=[0, 1, 0]), tok)
    mask = calib["attention_mask"]
    assert (mask.sum(1) >= 70).all() and (mask.sum(1) < 100).any()
    assert (calib["input_ids"][mask == 0] == tok.pad_token_id).all()
    # mask is 1 then 0 (right padding), never a hole
    assert torch.equal(mask, torch.sort(mask, dim=1, descending=True).values)


def test_packing_fills_every_position(calib_files):
    calib = build_calibration(_cfg(calib_files, seq_len=64, pack=True), tiny_tokenizer())
    assert calib["attention_mask"].all()


def test_too_little_data_is_a_clear_error(calib_files):
    with pytest.raises(ValueError, match="gave only .* of 64"):
        build_calibration(_cfg(calib_files, n=128, mix=[0, 0, 0.5]), tiny_tokenizer())


def test_missing_field_and_file(calib_files, tmp_path):
    cfg = _cfg(calib_files)
    cfg.sources.math.field = "solution"
    with pytest.raises(ValueError, match="no field 'solution'"):
        build_calibration(cfg, tiny_tokenizer())
    cfg = _cfg(calib_files)
    cfg.sources.code.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="missing.jsonl"):
        build_calibration(cfg, tiny_tokenizer())


def test_filters_and_other_formats(tmp_path):
    """Row filters (min_chars, where) and parquet/text files go through the same datasets path."""
    import pandas as pd

    rows = [{"solution": ("x" if i % 2 else "z") * 50 + f" {i}", "source": "olympiads" if i % 2 else "amc"}
            for i in range(20)]
    rows += [{"solution": "short", "source": "olympiads"}] * 5
    pd.DataFrame(rows).to_parquet(tmp_path / "math.parquet")
    (tmp_path / "general.txt").write_text("\n".join(f"line {i} " + "y" * 40 for i in range(10)))
    cfg = OmegaConf.create(dict(
        mix=[0.5, 0.5, 0], n=8, seq_len=20, seed=0, sources={
            "general": {"path": str(tmp_path / "general.txt"), "field": "text"},
            "math": {"path": str(tmp_path / "math.parquet"), "field": "solution", "min_chars": 20,
                     "where": {"source": ["olympiads"]}}}))
    tok = tiny_tokenizer()
    calib = build_calibration(cfg, tok)
    math_rows = [tok.decode(r) for r in calib["input_ids"][4:]]
    assert all(r.startswith("x" * 20) for r in math_rows)


def test_batches_cover_all_rows(calib_files):
    calib = build_calibration(_cfg(calib_files), tiny_tokenizer())
    batches = calibration_batches(calib, 3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), calib["input_ids"])
