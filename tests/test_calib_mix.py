"""Calibration mixes as {source: weight} mappings over any declared sources, the [general, math, code]
shorthand, and proof (digests computed from main before mappings existed) that old configs' tokens and
cache keys did not change."""

import json
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from analysis.collect import collect_runs
from analysis.rows import make_row
from analysis.naming import format_mix, mix_weights, other_sources, parse_mix
from ream_exp.calib import (DOMAINS, build_calibration, counts_for_mix, mix_as_weights, recorded_mix, used_sources,
                            without_unread_sources)
from ream_exp.calib.cache import calibration_key, calibration_key_material, tensor_checksum
from ream_exp.config import ConfigError
from ream_exp.moe.tiny import tiny_tokenizer
from ream_exp.identity import run_identity
from ream_exp.run import run
from ream_exp.settings import check_group
from tests import calib_digests
from tests.test_config import make_cfg

FIXTURE = json.loads((Path(__file__).parent / "data" / "calib_digests.json").read_text())
TOOL_TEXTS = [f"call lookup(name=\"N{i}\", field=\"town\")\nresult: \"T{i}\" and then {i} more steps." for i in range(40)]


@pytest.fixture(scope="module")
def toy_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(calib_digests.TOY_TOKENIZER)


@pytest.fixture(scope="module")
def four_files(calib_files, tmp_path_factory):
    """The conftest's general/math/code files plus a fourth source, `tool`."""
    tool = tmp_path_factory.mktemp("tool") / "tool.jsonl"
    tool.write_text("".join(json.dumps({"text": t}) + "\n" for t in TOOL_TEXTS))
    return {**calib_files, "tool": tool}


def _local(files, *extra):
    """calib=local with every file of `files` declared as a source (tool appended after code)."""
    return make_cfg("calib=local", "calib.n=20", "calib.seq_len=16", "calib.min_fill=0.5",
                    *[f"{'+' if d not in DOMAINS else ''}calib.sources.{d}.path={p}" for d, p in files.items()],
                    "+calib.sources.tool.field=text" if "tool" in files else "calib.n=20", *extra).calib


# ---------------------------------------------------------------- nothing changed for existing configs

def test_fixture_covers_every_named_mix():
    assert {key.split("/")[0] for key in FIXTURE} == {"toy_default", *calib_digests.NAMED}
    assert len(calib_digests.NAMED) == 13 and len(FIXTURE) == 2 * 14


@pytest.mark.parametrize("case", sorted(FIXTURE))
def test_old_configs_build_the_same_tokens_and_cache_keys(case, toy_tokenizer):
    """Every named mix on the toy, as the three-number list and as the mapping that means the same:
    the tokens and the cache key material are main's (from before mixes were mappings), bit for bit."""
    name, variant = case.split("/")
    expected = FIXTURE[case]
    overrides = calib_digests.cases()[name]
    assert calib_digests.digests(calib_digests.toy_calib(overrides, variant), toy_tokenizer) == \
        {"tokens": expected["tokens"], "key_material": expected["key_material"]}
    ratios = [float(x) for x in calib_digests.toy_calib(overrides, variant).mix]
    pairs = [f"{d}:{r!r}" for d, r in zip(DOMAINS, ratios) if r]  # zero weights left out
    random.Random(case).shuffle(pairs)  # the order a mapping is written in does not matter
    mapping = calib_digests.toy_calib([f"calib.mix={{{','.join(pairs)}}}"], variant)
    assert isinstance(OmegaConf.to_container(mapping, resolve=True)["mix"], dict)
    assert calib_digests.digests(mapping, toy_tokenizer) == \
        {"tokens": expected["tokens"], "key_material": expected["key_material"]}


def test_old_toy_run_configs_are_the_same_run_with_the_new_tool_source():
    """Declaring `tool` in conf/calib/toy.yaml leaves a run that does not read it the same run."""
    cfg = make_cfg()
    assert "tool" in cfg.calib.sources
    before = OmegaConf.to_container(cfg, resolve=True)
    del before["calib"]["sources"]["tool"]
    assert run_identity(OmegaConf.create(before)) == run_identity(cfg)
    with_tool = make_cfg("calib.mix={general:0.4,math:0.3,code:0.3,tool:0.1}")
    assert "tool" in run_identity(with_tool)["calib"]["sources"]
    zero_tool = OmegaConf.to_container(make_cfg("calib.mix={general:0.4,math:0.3,code:0.3,tool:0}"), resolve=True)
    assert "tool" not in without_unread_sources(zero_tool["calib"])["sources"]


# ---------------------------------------------------------------- mappings over any sources

def test_weights_are_fractions_of_n_in_a_fixed_source_order():
    sources = {"tool": {}, "general": {}, "chat": {}, "math": {}, "code": {}}
    weights = mix_as_weights({"chat": 0.1, "tool": 0.2, "code": 0.3, "general": 0.25}, sources)
    assert list(weights) == ["general", "code", "tool", "chat"]  # shorthand's order, then calib.sources'
    assert counts_for_mix(10, {"chat": 0.1, "tool": 0.2, "code": 0.3, "general": 0.25}, sources) == \
        {"general": 2, "math": 0, "code": 3, "tool": 2, "chat": 1}
    # not normalised: the same int(n * weight) rule as the list, whatever the sum
    assert counts_for_mix(10, {"general": 0.3, "math": 0.3, "code": 0.3}) == counts_for_mix(10, [0.3, 0.3, 0.3])
    assert counts_for_mix(10, {"general": 1.5}) == {"general": 15, "math": 0, "code": 0}
    assert mix_as_weights([0, 0.5, 0.5]) == {"general": 0.0, "math": 0.5, "code": 0.5}


@pytest.mark.parametrize("mix,message", [
    ({}, r"^calib.mix=\{\} names no source"),
    ({"tol": 1}, r"^calib.mix names source 'tol', which calib.sources does not declare: calib.sources declares "
                 r"general, math, code, tool"),
    ({"general": 0.5, "tool": -1}, r"^calib.mix.tool=-1.0 must be >= 0: calib.mix.tool is the weight of its source"),
    ({"general": "lots"}, r"^calib.mix.general='lots' is not a number"),
    ({"general": True}, r"^calib.mix.general=true is not a number"),
    ({"general": None}, r"^calib.mix.general=null is not a number"),
    ({"general": 0, "tool": 0.0}, r"^calib.mix is all zero"),
    ("general", r"^calib.mix='general' is not a mapping or a list"),
    (0.5, r"^calib.mix=0.5 is not a mapping or a list"),
])
def test_bad_mappings_are_one_config_error(mix, message, four_files):
    cfg = _local(four_files)
    cfg.mix = mix
    with pytest.raises(ConfigError, match=message) as caught:
        check_group("calib", cfg)
    assert "\n" not in str(caught.value)


def test_a_weight_on_an_undeclared_source_is_refused_even_when_zero(calib_files):
    cfg = _local(calib_files, "calib.mix={general:1,tool:0}")
    with pytest.raises(ConfigError, match="'tool', which calib.sources does not declare: calib.sources declares "
                                          "general, math, code"):
        check_group("calib", cfg)


def test_the_shorthand_still_needs_only_the_sources_it_reads():
    """calib=reap declares only code: [0, 0, 1] passes, and [0.5, 0, 0.5] names the missing source."""
    cfg = make_cfg("calib=reap", "calib.n=4").calib
    assert list(used_sources(cfg)) == ["code"]
    cfg.mix = [0.5, 0, 0.5]
    with pytest.raises(ConfigError, match=r"asks for 2 general sequences but calib.sources has no 'general' "
                                          r"\(it declares code\)"):
        check_group("calib", cfg)


def test_four_sources_build_source_by_source(four_files):
    """A 4-source set is the single-source sets one after another (general, math, code, tool), whatever
    the order the mapping is written in; each source's rows are its own."""
    tok = tiny_tokenizer()
    calib = build_calibration(_local(four_files, "calib.mix={tool:0.25,code:0.25,general:0.25,math:0.25}"), tok)
    parts = [build_calibration(_local(four_files, f"calib.mix={{{d}:0.25}}"), tok) for d in (*DOMAINS, "tool")]
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(calib[name], torch.cat([p[name] for p in parts]))
    assert [p["input_ids"].shape[0] for p in parts] == [5, 5, 5, 5]
    tool_text = tok.decode(parts[-1]["input_ids"][0][parts[-1]["attention_mask"][0].bool()])
    assert tool_text in "".join(TOOL_TEXTS)  # the tool rows are the tool file's text


def test_the_cache_key_names_every_source_read(four_files):
    tok = tiny_tokenizer()
    cfg = _local(four_files, "calib.mix={general:0.5,tool:0.5}")
    material = calibration_key_material(cfg, tok)
    assert material["mix"] == {"general": 0.5, "tool": 0.5} and set(material["sources"]) == {"general", "tool"}
    assert material["counts"] == {"general": 10, "math": 0, "code": 0, "tool": 10}
    keys = {calibration_key(_local(four_files, f"calib.mix={m}"), tok)
            for m in ("{general:0.5,tool:0.5}", "{general:0.5,tool:0.25}", "{general:0.5,code:0.5}", "[0.5,0,0.5]")}
    assert len(keys) == 3  # {general, code} and its list share a key; a different tool weight does not
    assert calibration_key(_local(four_files, "calib.mix={tool:0.5,general:0.5}"), tok) == \
        calibration_key(cfg, tok)


def test_the_recorded_mix_is_a_mapping(four_files):
    assert recorded_mix(_local(four_files, "calib.mix=[0,0.3,0.7]")) == {"general": 0.0, "math": 0.3, "code": 0.7}
    assert recorded_mix(_local(four_files, "calib.mix={tool:0.5,general:0.5}")) == {"general": 0.5, "tool": 0.5}
    assert recorded_mix(make_cfg("calib=pretokenized").calib) is None


@pytest.mark.parametrize("calib", ["toy", "paper", "local", "reap", "mix_2_5_3", "mix_general_only"])
def test_either_form_replaces_any_default_on_the_command_line(calib):
    mapping = make_cfg(f"calib={calib}", "calib.mix={general:0.2,math:0.3,code:0.4,tool:0.1}").calib
    assert OmegaConf.to_container(mapping.mix) == {"general": 0.2, "math": 0.3, "code": 0.4, "tool": 0.1}
    listed = make_cfg(f"calib={calib}", "calib.mix=[0.1,0.1,0.8]").calib
    assert list(listed.mix) == [0.1, 0.1, 0.8]
    assert OmegaConf.to_container(make_cfg(f"calib={calib}", "calib.mix={tool:1}").calib.mix) == {"tool": 1}


# ---------------------------------------------------------------- labels and analysis

@pytest.mark.parametrize("mix,label", [
    ([0, 0.3, 0.7], "0:.3:.7"),
    ({"code": 0.7, "math": 0.3}, "0:.3:.7"),
    ({"general": 0.2, "math": 0.5, "code": 0.3, "tool": 0}, ".2:.5:.3"),
    ({"tool": 0.1, "code": 0.4, "general": 0.2, "math": 0.3}, "general .2, math .3, code .4, tool .1"),
    ({"zh": 0.5, "chat": 0.25, "general": 0.25}, "general .25, chat .25, zh .5"),
    ({"tool": 1.0, "general": 0.0}, "tool 1"),
])
def test_mix_labels(mix, label):
    assert format_mix(mix) == label
    assert format_mix(label) == label  # a label reads back as the same mix
    weights = {k: float(v) for k, v in (mix.items() if isinstance(mix, dict) else zip(DOMAINS, mix)) if v}
    assert {k: v for k, v in mix_weights(label).items() if v} == weights
    assert parse_mix(mix) == tuple(weights.get(d, 0.0) for d in DOMAINS)


def test_bad_mix_labels_are_refused():
    for bad in ("general", "general .2, math", ".2:.5"):
        with pytest.raises(ValueError):
            mix_weights(bad)


def test_collect_reads_a_mapping_mix_with_any_sources(tmp_path):
    config = {"model": {"name": "toy-moe"}, "method": {"name": "freq"}, "seed": 0,
              "calib": {"mix": {"general": 0.2, "math": 0.3, "code": 0.4, "tool": 0.1}}}
    row = make_row(config, {"status": "done", "experts_after": 24, "mc": 0.5, "gen": 0.25},
                   run_dir="r", status="done")
    assert row["mix"] == "general .2, math .3, code .4, tool .1"
    assert (row["mix_general"], row["mix_math"], row["mix_code"], row["mix_tool"]) == (0.2, 0.3, 0.4, 0.1)
    assert other_sources(config["calib"]["mix"]) == {"tool": 0.1}
    for name, mix in (("a", config["calib"]["mix"]), ("b", [0.5, 0, 0.5])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(OmegaConf.to_yaml({**config, "calib": {"mix": mix}}))
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": "done", "experts_after": 24,
                                                                  "mix": mix, "mc": 0.5, "gen": 0.25}))
    runs = collect_runs(tmp_path).set_index("run_dir")
    assert list(runs["mix"]) == ["general .2, math .3, code .4, tool .1", ".5:0:.5"]
    assert list(runs["mix_tool"].fillna(-1)) == [0.1, -1] and list(runs["mix_code"]) == [0.4, 0.5]
    assert runs.columns.get_loc("mix_tool") > runs.columns.get_loc("error")  # after the standard columns


# ---------------------------------------------------------------- end to end on the toy

@pytest.mark.slow
def test_a_four_source_mix_runs_end_to_end_on_the_toy(tmp_path):
    """The toy MoE compressed with a general/math/code/tool mix and evaluated; metrics.json records the
    mapping, the calibration set is the four sources' own sets in order, and analysis reads the run."""
    mix = "{general:0.3,math:0.2,code:0.3,tool:0.2}"
    common = ["calib.n=20", "calib.seq_len=64", f"cache_dir={tmp_path / 'cache'}", "logger=none", "progress=false"]
    cfg = make_cfg(f"calib.mix={mix}", "method=freq", "ratio=0.25", "eval.limit=3", "baseline=false", "save=false",
                   *common)
    metrics = run(cfg, tmp_path / "runs" / "four")
    assert metrics["status"] == "done" and metrics["experts_after"] == 24
    assert metrics["mix"] == {"general": 0.3, "math": 0.2, "code": 0.3, "tool": 0.2}
    assert json.loads((tmp_path / "runs" / "four" / "metrics.json").read_text())["mix"] == metrics["mix"]
    assert set(metrics["eval"]["tasks"]) == {"toy_facts", "toy_stories", "toy_arith", "toy_code"}
    assert metrics["eval"]["mc"] is not None and metrics["eval"]["gen"] is not None

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(calib_digests.TOY_TOKENIZER)
    whole = build_calibration(cfg.calib, tok)
    assert int(whole["attention_mask"].sum()) == metrics["calib_tokens"]
    counts = {"general": 6, "math": 4, "code": 6, "tool": 4}
    parts = [build_calibration(make_cfg(*common, f"calib.mix={{{d}:1}}", f"calib.n={c}").calib, tok)
             for d, c in counts.items()]
    assert [p["input_ids"].shape[0] for p in parts] == list(counts.values())
    assert torch.equal(whole["input_ids"], torch.cat([p["input_ids"] for p in parts]))
    tool_row = tok.decode(parts[-1]["input_ids"][0])
    assert "call " in tool_row and "result: " in tool_row

    runs = collect_runs(tmp_path / "runs")
    assert list(runs["mix"]) == ["general .3, math .2, code .3, tool .2"] and list(runs["mix_tool"]) == [0.2]
    assert list(runs["status"]) == ["done"]
