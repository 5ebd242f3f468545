"""Checkpoints that say how they were made and load in older stacks (ream_exp/checkpoint.py), the plan's
permutations on disk, local models in their own dtype, and REAM's group-size rule for models without a table."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from ream_exp import PACKAGE_DIR, __version__
from ream_exp.checkpoint import git_commit, rewrite_config, write_model_card
from ream_exp.config import rule_group_size
from ream_exp.methods import ream
from ream_exp.moe import apply_plan, canonical_weights, moe_layers
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model, tiny_tokenizer
from ream_exp.plan import LayerPlan, Plan
from ream_exp.run import run
from tests.merging_helpers import method_cfg, planned_copy
from tests.test_config import make_cfg
from tests.test_run import _cfg

# The expert-count key each family's config class reads in transformers 4.57 (from its configuration_*.py).
TF4_COUNT_KEY = {"qwen3_moe": "num_experts", "qwen2_moe": "num_experts", "mixtral": "num_local_experts",
                 "olmoe": "num_experts", "deepseek_v3": "n_routed_experts", "gpt_oss": "num_local_experts",
                 "qwen3_next": "num_experts", "glm4_moe": "n_routed_experts", "deepseek_v2": "n_routed_experts"}
COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts")


# ---- config.json: legacy keys ------------------------------------------------------------------------

def pruned_tiny(family: str, rope_theta: float = 54321.0):
    """A tiny model of `family` with a non-default rope_theta, pruned from 8 to 4 experts per layer."""
    model = tiny_model(family, num_experts=8, top_k=2)
    model.config.rope_parameters["rope_theta"] = rope_theta
    model = type(model)(model.config).eval()  # rotary tables rebuilt with this rope_theta
    layers = [LayerPlan(l.index, l.num_experts, [0, 2, 5, 7]) for l in moe_layers(model)]
    apply_plan(model, Plan("test", 0.5, layers))
    return model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_legacy_keys_agree_with_the_new_ones(family, tmp_path):
    model = pruned_tiny(family)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    saved = rewrite_config(tmp_path, model.config, {"method": "test"})
    assert json.loads((tmp_path / "config.json").read_text()) == saved
    # the transformers 4.57 name and every name either stack writes hold the new count
    assert saved[TF4_COUNT_KEY[family]] == 4
    assert {k: saved[k] for k in COUNT_NAMES if k in written} == {k: 4 for k in COUNT_NAMES if k in written}
    assert all(saved[k] == 4 for k in COUNT_NAMES if k in saved)
    rope = written["rope_parameters"]
    assert saved["rope_theta"] == rope["rope_theta"] == 54321.0
    # Qwen3-Next and GLM-4.5 rotate part of each head; transformers 4.57 reads the fraction at the top level
    partial = {"qwen3_next": 0.25, "glm4_moe": 0.5}.get(family)
    assert rope.get("partial_rotary_factor") == saved.get("partial_rotary_factor") == partial
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    assert saved["rope_scaling"] == (scaling if rope["rope_type"] != "default" else None)
    assert saved["compression"] == {"method": "test"}
    # transformers 5 reads the augmented file exactly as it wrote it, and the model computes the same
    again = AutoConfig.from_pretrained(tmp_path)
    assert again.rope_parameters == model.config.rope_parameters
    assert getattr(again, TF4_COUNT_KEY[family]) == 4
    ids, mask = tiny_batch()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


TF457_PYTHON = os.environ.get("REAM_EXP_TF457_PYTHON")
IN_CI = os.environ.get("CI") == "true"


# Every tiny family exists in transformers 4.57 (Qwen3-Next, GLM-4.5 and DeepSeek-V2 included), so none is
# skipped. CI runs it (`make test` with CI=true builds the environment and sets REAM_EXP_TF457_PYTHON).
@pytest.mark.slow
@pytest.mark.skipif(not TF457_PYTHON and not IN_CI,
                    reason="set REAM_EXP_TF457_PYTHON to a python with transformers 4.57 "
                           "(`make test LEGACY_CHECK=true` or `make tf457` builds one)")
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_checkpoints_load_in_transformers_4_57(family, tmp_path):
    from ream_exp.bench.legacy import check_family

    if not TF457_PYTHON:  # CI=true: this check must run there, not skip
        pytest.fail("CI=true but REAM_EXP_TF457_PYTHON is not set: run the tests with `make test`, "
                    "which builds the transformers 4.57 environment and sets it")
    result = check_family(family, Path(TF457_PYTHON), tmp_path)
    assert result["transformers"].startswith("4.57.")
    assert result["experts"] == 4


# ---- the plan's permutations -------------------------------------------------------------------------

def test_plan_round_trips_with_its_permutations(tmp_path):
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2)
    ids, mask = tiny_batch()
    merged, plan = planned_copy(model, method_cfg("ream", "method.group_size=4"), ids, mask, ratio=0.5)
    assert all(lp.perms for lp in plan.layers)
    plan.save(tmp_path)
    loaded = Plan.load(tmp_path / "plan.json")
    assert [lp.perms for lp in loaded.layers] == [lp.perms for lp in plan.layers]
    assert [lp.groups for lp in loaded.layers] == [lp.groups for lp in plan.layers]
    # the loaded plan merges exactly as the original did
    again = tiny_model("qwen3_moe", num_experts=8, top_k=2)
    apply_plan(again, loaded)
    for a, b in zip(moe_layers(again), moe_layers(merged)):
        got, want = canonical_weights(a.experts, range(4)), canonical_weights(b.experts, range(4))
        for x, y in zip(got.values(), want.values()):
            assert x is None or torch.equal(x, y)
    # a plan whose permutations are missing or belong to no merged expert is refused
    (tmp_path / "plan_perms.pt").rename(tmp_path / "elsewhere.pt")
    with pytest.raises(FileNotFoundError, match="plan_perms.pt"):
        Plan.load(tmp_path / "plan.json")
    perms = torch.load(tmp_path / "elsewhere.pt", weights_only=True)
    centroid = plan.layers[0].groups[0][0]
    perms[plan.layers[0].layer][centroid] = list(range(16))
    torch.save(perms, tmp_path / "plan_perms.pt")
    with pytest.raises(ValueError, match=f"experts \\[{centroid}\\]"):
        Plan.load(tmp_path / "plan.json")


def test_a_plan_without_alignment_needs_no_permutations_file(tmp_path):
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2)
    ids, mask = tiny_batch()
    _, plan = planned_copy(model, method_cfg("ream", "method.group_size=4", "method.align=none"), ids, mask)
    plan.save(tmp_path)
    assert not (tmp_path / "plan_perms.pt").exists()
    assert all(lp.perms is None for lp in Plan.load(tmp_path / "plan.json").layers)


# ---- a run's checkpoint -------------------------------------------------------------------------------

def _front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.mark.slow
def test_run_checkpoint_says_how_it_was_made(tiny_checkpoint, calib_files, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_checkpoint, calib_files, tmp_path, "method=ream", "ratio=0.5", "logger=none", "seed=3")
    metrics = run(cfg, out)
    ckpt = out / "checkpoint"
    assert (ckpt / "plan.json").read_text() == (out / "plan.json").read_text()
    plan = Plan.load(ckpt / "plan.json")
    assert all(lp.perms for lp in plan.layers)
    block = json.loads((ckpt / "config.json").read_text())["compression"]
    assert (block["method"], block["kind"], block["ratio"], block["seed"]) == ("ream", "merging", 0.5, 3)
    assert block["experts_per_layer"] == {"before": 8, "after": 4}
    assert {k: block["calibration"][k] for k in ("n", "seq_len", "seed", "mix")} == \
        {"n": 16, "seq_len": 32, "seed": int(cfg.calib.seed), "mix": list(cfg.calib.mix)}
    assert block["calibration"]["sources"]["code"]["path"] == str(calib_files["code"])
    # no table for a local model: C from the rule, as the plan used it
    assert block["settings"]["group_size"] == plan.info["settings"]["group_size"] == rule_group_size(8, 4) == 2
    assert block["settings"]["pca_seed"] is None
    assert block["layers"] == {str(lp.layer): {"keep": lp.keep, "groups": lp.groups} for lp in plan.layers}
    assert block["ream_exp"]["version"] == __version__
    head = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert block["ream_exp"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    # the model card: hub front matter and the scores against the uncompressed model
    meta, body = _front_matter((ckpt / "README.md").read_text())
    assert meta["library_name"] == "transformers" and "base_model" not in meta  # a local path is no hub id
    assert meta["tags"] == ["ream-exp", "moe", "expert-merging", "ream"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in body.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    tasks = sorted(metrics["eval"]["tasks"])
    for name, scores in (("uncompressed", metrics["baseline"]), ("ream (4/8 experts)", metrics["eval"])):
        want = [scores["mc"], scores["gen"], scores["avg"]] + [scores["tasks"][t]["score"] for t in tasks]
        assert rows[name] == ["-" if v is None else f"{100 * v:.1f}" for v in want]


def test_model_card_before_evaluation_and_hub_base_model(tmp_path):
    block = {"method": "reap", "kind": "pruning", "ratio": 0.25, "seed": 0, "calibration": None,
             "experts_per_layer": {"before": 128, "after": 96}, "ream_exp": {"version": "x", "commit": None},
             "base_model": {"name": "qwen3_30b_a3b", "path": "Qwen/Qwen3-30B-A3B-Instruct-2507", "dtype": "bfloat16"}}
    (tmp_path / "config.json").write_text(json.dumps({"compression": block, "dtype": "bfloat16"}))
    card = write_model_card(tmp_path)
    meta, body = _front_matter(card.read_text())
    assert ModelCard.load(card).data.to_dict() == meta  # the hub's reader reads the same header
    assert (meta["library_name"], meta["pipeline_tag"]) == ("transformers", "text-generation")
    assert meta["base_model"] == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    assert meta["tags"] == ["ream-exp", "moe", "expert-pruning", "reap"]
    assert "Not evaluated" in body and "128 -> 96" in body


def test_git_commit_is_none_outside_a_git_checkout(tmp_path, monkeypatch):
    import ream_exp.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "PACKAGE_DIR", tmp_path / "ream_exp")
    (tmp_path / "ream_exp").mkdir()
    assert git_commit() == {"commit": None, "dirty": None}


def test_lm_eval_records_this_codes_commit_quietly(tmp_path, monkeypatch, capfd):
    """lm-eval's results files get git_commit's commit, "unknown" outside a checkout, with nothing on
    stderr (lm-eval's own `git describe` prints git's "fatal: not a git repository"; docs/getting-started.md,
    Install)."""
    import ream_exp.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "PACKAGE_DIR", tmp_path / "ream_exp")
    (tmp_path / "ream_exp").mkdir()
    monkeypatch.chdir(tmp_path)
    assert checkpoint.lm_eval_git_hash() == "unknown"
    assert capfd.readouterr().err == ""


# ---- local models keep their dtype -------------------------------------------------------------------

def test_bf16_checkpoint_is_loaded_merged_and_saved_in_bf16(calib_files, tmp_path):
    from ream_exp.loading import load_model

    base = tmp_path / "bf16"
    tiny_model("qwen3_moe", num_experts=8, top_k=2).to(torch.bfloat16).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    cfg = _cfg(base, calib_files, tmp_path, "method=ream", "ratio=0.5", "eval.tasks=[]", "logger=none")
    assert cfg.model.dtype == "auto"
    model = load_model(cfg.model, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    run(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    # the same plan merged in float32 on the float32 copy of the bf16 weights, rounded to bf16
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    apply_plan(reference, Plan.load(tmp_path / "run" / "plan.json"))
    expected = {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, expected[k]), k


# ---- REAM's group size where none is configured ------------------------------------------------------

def test_group_size_rule_matches_the_paper_and_always_fits():
    assert (rule_group_size(128, 96), rule_group_size(128, 64)) == (16, 32)  # the paper's C for 128 experts
    for n in range(2, 70):
        for n_keep in range(1, n + 1):
            c = rule_group_size(n, n_keep)
            rule = max(2, math.ceil((n - n_keep) / 2))
            assert c == rule or (n_keep * rule < n and c == math.ceil(n / n_keep)), (n, n_keep)
            assert n_keep * c >= n


def test_local_model_without_a_table_resolves_c_from_its_expert_count(tiny_checkpoint):
    cfg = make_cfg("model=local", f"model.path={tiny_checkpoint}", "method=ream", "ratio=0.5")
    method = dict(cfg.method)
    assert method["group_size"] is None  # nothing configured: left to the rule, not 16
    ream.check(method, 8, 4)
    assert ream.group_size(ream.settings(method), 128, 96) == 16
    assert ream.group_size(ream.settings({**method, "group_size": 5}), 128, 96) == 5  # an explicit C wins
    with pytest.raises(ValueError, match="group_size=1"):
        ream.check({**method, "group_size": 1}, 8, 4)
