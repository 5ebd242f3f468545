"""The quant stage (docs/quantization.md): its settings checked before any load, and, where the quantization
environment exists (REAM_EXP_QUANT_PYTHON; `make test` with CI=true builds it), real runs whose
compressed-tensors checkpoint stock transformers reloads as llm-compressor quantized it, with the config
vLLM's compressed-tensors loader reads."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ream_exp.config import ConfigError
from ream_exp.identity import run_identity
from ream_exp.moe import family_for, moe_layers
from ream_exp.moe.discover import meta_model
from ream_exp.moe.tiny import tiny_model
from ream_exp.quant import GROUP_SIZES, NAMES, check_quant, ignored_modules, input_widths, is_ignored, \
    resolve_group_size
from ream_exp.quant.env import quant_python
from ream_exp.settings import check_settings
from tests.test_config import make_cfg
from tests.tolerances import f32_atol

QUANT_PYTHON = os.environ.get("REAM_EXP_QUANT_PYTHON")
IN_CI = os.environ.get("CI") == "true"
CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"

needs_env = pytest.mark.skipif(not QUANT_PYTHON and not IN_CI,
                               reason="set REAM_EXP_QUANT_PYTHON to the quantization environment's python "
                                      "(`make quant-env` builds it; `make test` with CI=true builds and sets it)")


# ---- settings, before any load -----------------------------------------------------------------------

def test_every_quant_option_composes_to_a_known_name():
    names = set()
    for path in sorted(CONF.glob("*.yaml")):
        cfg = make_cfg(f"quant={path.stem}")
        check_settings(cfg)
        names.add(cfg.quant.name)
        assert cfg.quant.name == path.stem or path.stem == "w4a16", path.stem
    assert names == set(NAMES)
    assert make_cfg("quant=w4a16").quant == make_cfg("quant=w4a16_gptq").quant  # an alias: the same run
    assert make_cfg().quant.name == "none"


def test_unknown_quant_name_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"quant.name='int3'; valid: none, fp8, w8a8, w4a16_gptq, w4a16_awq"):
        check_settings(make_cfg("quant=w4a16", "quant.name=int3"))


def test_quant_none_leaves_the_identity_of_runs_made_before_it():
    cfg = make_cfg()
    before = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "quant"})
    assert run_identity(cfg) == run_identity(before)
    assert run_identity(make_cfg("quant=fp8")) != run_identity(cfg)
    assert run_identity(make_cfg("quant=w4a16_gptq")) != run_identity(make_cfg("quant=w4a16_awq"))


def test_gptq_reads_the_calibration_even_for_a_method_that_reads_none():
    from ream_exp.quant import needs_calibration

    assert needs_calibration(make_cfg("method=none", "quant=w4a16")) and needs_calibration(make_cfg("quant=w8a8"))
    assert not needs_calibration(make_cfg("quant=fp8")) and not needs_calibration(make_cfg())


def _widths_by_brute_force(model, ignore):
    """Input widths of every Linear llm-compressor would quantize, the fused experts split per expert."""
    widths = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not is_ignored(name, ignore):
            widths.add(module.in_features)
    for layer in moe_layers(model):  # gate/up read the hidden state, down the expert's intermediate
        widths |= {model.config.hidden_size, layer.experts.down_proj.shape[-1]}
    return widths


@pytest.mark.parametrize("hidden,width", [(32, 16), (128, 64), (256, 96)])
def test_input_widths_are_every_quantized_layers(hidden, width):
    model = tiny_model("qwen3_moe", hidden=hidden, width=width, layers=2)
    ignore = ignored_modules(family_for(model.config))
    assert set(input_widths(model, ignore)) == _widths_by_brute_force(model, ignore)


def test_group_size_null_takes_the_largest_that_divides_every_width():
    config = tiny_model("qwen3_moe", hidden=128, width=64, layers=2).config  # the toy's widths
    family = family_for(config)
    assert resolve_group_size({"name": "w4a16_gptq", "group_size": None}, config, family) == 64
    assert resolve_group_size({"name": "w4a16_gptq", "group_size": 32}, config, family) == 32
    assert resolve_group_size({"name": "fp8"}, config, family) is None  # per channel: no groups
    with pytest.raises(ConfigError, match=r"quant.group_size=128 does not divide the input width 64 of "
                                          r"model.layers.0.mlp.experts.down_proj.*quant.group_size=64"):
        resolve_group_size({"name": "w4a16_gptq", "group_size": 128}, config, family)
    narrow = tiny_model("qwen3_moe", hidden=32, width=16, layers=2).config
    with pytest.raises(ConfigError, match="none of the group sizes 128, 64, 32 divides"):
        resolve_group_size({"name": "w4a16_awq", "group_size": None}, narrow, family_for(narrow))
    assert min(GROUP_SIZES) == 32


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_the_routers_and_the_head_are_kept_and_nothing_else(family):
    model = meta_model(tiny_model(family).config)
    fam = family_for(model.config)
    ignore = ignored_modules(fam)
    matched = {name for name, _ in model.named_modules() if is_ignored(name, ignore)}
    routers = {f"model.layers.{i}.{fam.block_path}.{fam.router_attr}" for i in fam.moe_layers}
    shared_gates = {f"model.layers.{i}.{fam.block_path}.{s}" for i in fam.moe_layers for s in fam.shared if "gate" in s}
    assert matched == routers | {"lm_head"} | (shared_gates & {n for n, _ in model.named_modules()})


def test_quant_without_its_environment_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("REAM_EXP_QUANT_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(ConfigError, match=r"quant=fp8 needs the quantization environment.*make quant-env"):
        quant_python(None, "fp8")
    monkeypatch.delenv("REAM_EXP_QUANT_PYTHON")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "quant-venv"))):
        quant_python(tmp_path, "w8a8")


def _fake_env(tmp_path, cuda: bool) -> Path:
    """A stand-in for the quantization environment's python that answers the probe as llm-compressor's would."""
    python = tmp_path / "fake-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\necho 0.14.0.1 5.17.0 {cuda}\n")
    python.chmod(0o755)
    return python


def test_the_environment_is_found_and_awq_needs_cuda_there(tmp_path, monkeypatch, tiny_checkpoint):
    from ream_exp.loading import load_model_config

    monkeypatch.setenv("REAM_EXP_QUANT_PYTHON", str(_fake_env(tmp_path, cuda=False)))
    assert quant_python(None, "fp8") == tmp_path / "fake-venv" / "bin" / "python"
    cfg = make_cfg("model=local", f"model.path={tiny_checkpoint}", "quant=w4a16_awq", "quant.group_size=16")
    with pytest.raises(ConfigError, match=r"quant=w4a16_awq runs llm-compressor's AWQ, which needs a CUDA device"):
        check_quant(cfg, load_model_config(cfg.model))
    monkeypatch.setenv("REAM_EXP_QUANT_PYTHON", str(_fake_env(tmp_path / "gpu", cuda=True)))
    settings = check_quant(cfg, load_model_config(cfg.model))
    assert (settings["scheme"], settings["algorithm"], settings["group_size"]) == ("W4A16", "awq", 16)


def test_the_quantized_config_is_the_unquantized_one_plus_its_quantization(tmp_path):
    from ream_exp.quant.stage import merged_config

    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir(), after.mkdir()
    unquantized = {"num_experts": 6, "num_local_experts": 6, "rope_theta": 5.0, "compression": {"method": "reap"}}
    (before / "config.json").write_text(json.dumps(unquantized))
    written = {"num_local_experts": 6, "quantization_config": {"quant_method": "compressed-tensors", "ignore": []}}
    (after / "config.json").write_text(json.dumps(written))
    merged = json.loads(merged_config(before, after, {"name": "fp8"}))
    assert merged == {**unquantized, "quantization_config": written["quantization_config"],
                      "compression": {"method": "reap", "quantization": {"name": "fp8"}}}


def test_w8a8_is_refused_before_anything_runs_as_transformers_cannot_load_it(tiny_checkpoint):
    from ream_exp.loading import load_model_config

    cfg = make_cfg("model=local", f"model.path={tiny_checkpoint}", "quant=w8a8")
    with pytest.raises(ConfigError, match=r"quant=w8a8: transformers 5\.\S+ cannot load the INT8 .*use quant=fp8"):
        check_quant(cfg, load_model_config(cfg.model))


def test_quant_needs_the_checkpoint_saved(tiny_checkpoint):
    from ream_exp.loading import load_model_config

    cfg = make_cfg("model=local", f"model.path={tiny_checkpoint}", "quant=fp8", "save=false")
    with pytest.raises(ConfigError, match=r"quant=fp8 quantizes the saved checkpoint: set save=true"):
        check_quant(cfg, load_model_config(cfg.model))
    assert check_quant(make_cfg("model=local", f"model.path={tiny_checkpoint}"), None) == {}


# ---- with the quantization environment -----------------------------------------------------------------


def _quantized_run(tmp_path, overrides):
    from ream_exp.run import run

    if not QUANT_PYTHON:  # CI=true: this must run there, not skip
        pytest.fail("CI=true but REAM_EXP_QUANT_PYTHON is not set: run the tests with `make test`, which builds "
                    "the quantization environment and sets it")
    cfg = make_cfg("eval=none", "logger=none", "progress=false", f"cache_dir={tmp_path / 'cache'}", *overrides)
    return run(cfg, tmp_path / "run"), tmp_path / "run"


def vllm_reads(config: dict) -> dict:
    """What vLLM's compressed-tensors loader takes from config.json: quant_method selects it, then every
    config group's targets and weight/activation settings, the ignored modules, the format; the MoE model
    reads the expert count (num_experts on transformers 4.x configs) and the top-k."""
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    groups = {name: (g["targets"], g["weights"], g.get("input_activations")) for name, g in q["config_groups"].items()}
    return {"groups": groups, "ignore": q["ignore"], "format": q["format"], "experts": config["num_experts"],
            "top_k": config["num_experts_per_tok"]}


@pytest.mark.slow
@needs_env
def test_w4a16_on_the_toy_reloads_as_quantized_and_reads_as_vllm_expects(tmp_path):
    """`ream-exp method=ream_official ratio=0.25 quant=w4a16` on the toy (with a small calibration)."""
    metrics, run_dir = _quantized_run(tmp_path, ["method=ream_official", "ratio=0.25", "quant=w4a16",
                                                 "calib.n=8", "calib.seq_len=64"])
    saved = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    read = vllm_reads(saved)
    assert read["experts"] == saved["num_local_experts"] == metrics["experts_after"] == 24
    assert read["format"] == "pack-quantized"
    ((targets, weights, acts),) = read["groups"].values()
    assert targets == ["Linear"] and weights["num_bits"] == 4 and weights["group_size"] == 64 and acts is None
    layers = saved["num_hidden_layers"]
    assert {f"model.layers.{i}.mlp.gate" for i in range(layers)} | {"lm_head"} == set(read["ignore"])
    block = saved["compression"]["quantization"]
    assert block["name"] == "w4a16_gptq" and 0 < block["calibration_sequences"] <= 8
    assert metrics["quant"]["name"] == "w4a16_gptq"
    # weight-only: the checkpoint transformers loads is the model llm-compressor quantized, up to float32
    # rounding of per-expert products against fused ones (hidden-size sums, two per layer)
    atol = f32_atol(metrics["quant"]["probe_logits_max_abs"], terms=saved["hidden_size"], stages=2 * layers)
    assert metrics["quant"]["reload_max_abs_diff"] <= atol
    before = json.loads((run_dir / "checkpoint_unquantized" / "config.json").read_text())
    assert "quantization_config" not in before and before["compression"] == {
        k: v for k, v in saved["compression"].items() if k != "quantization"}
    weights_bytes = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert weights_bytes(run_dir / "checkpoint") < weights_bytes(run_dir / "checkpoint_unquantized") / 3
    card = (run_dir / "checkpoint" / "README.md").read_text()
    assert "quantized after compression: `w4a16_gptq` (W4A16 by gptq, groups of 64" in card


@pytest.mark.slow
@needs_env
def test_fp8_of_the_uncompressed_model_is_a_run_like_any_other(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    metrics, run_dir = _quantized_run(tmp_path, ["model=local", f"model.path={tiny_checkpoint}", "method=none",
                                                 "quant=fp8", "quant.keep_unquantized=false"])
    assert not (run_dir / "checkpoint_unquantized").exists()
    saved = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    read = vllm_reads(saved)
    ((_, weights, acts),) = read["groups"].values()
    assert weights["type"] == "float" and weights["num_bits"] == 8 and acts["dynamic"] is True
    assert read["experts"] == 8 and saved["compression"]["quantization"]["calibration_sequences"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    assert moe_layers(reloaded)[0].num_experts == 8
    # FP8 activations are not quantized by the reload of fused experts: recorded, not hidden
    assert metrics["quant"]["reload_max_abs_diff"] > 0


def test_quant_refused_with_per_layer_budgets(tiny_checkpoint):
    """budget=global writes per-layer expert counts, which the quantization environment's stock transformers
    cannot load: refused before anything runs."""
    from ream_exp.loading import load_model_config

    cfg = make_cfg("model=local", f"model.path={tiny_checkpoint}", "quant=fp8", "budget=global", "method=reap")
    with pytest.raises(ConfigError, match=r"^quant=fp8: .*per-layer expert counts \(budget=global\); use "
                                          r"budget=uniform or quant=none$"):
        check_quant(cfg, load_model_config(cfg.model))
