"""Per-layer budgets (budget=global, docs/budgets.md): the ranking against a brute-force optimum, its
invariants, budget=uniform unchanged, the refusals before any load, and a checkpoint with per-layer expert
counts that reloads through ream_exp.load_compressed with the in-memory model's logits."""

import itertools
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from ream_exp import load_compressed
from ream_exp.config import ConfigError
from ream_exp.identity import run_identity
from ream_exp.methods.budget import global_counts, global_removed, uniform_counts
from ream_exp.moe import apply_plan, moe_layers
from ream_exp.moe.surgery import LAYER_EXPERTS_KEY
from ream_exp.moe.tiny import tiny_batch, tiny_model
from ream_exp.plan import LayerPlan, Plan
from ream_exp.run import run, validate
from tests.test_run import _cfg


def brute_force_removed(scores: dict[int, list[float]], n_remove: int, top_k: int) -> dict[int, list[int]]:
    """The set of n_remove experts with the least total of s / mean|s| (per layer) that leaves every layer
    at least top_k experts, by trying every set."""
    flat = [(layer, i, v / np.mean(np.abs(s))) for layer, s in scores.items() for i, v in enumerate(s)]
    best, best_set = None, None
    for chosen in itertools.combinations(range(len(flat)), n_remove):
        per_layer = {layer: 0 for layer in scores}
        for c in chosen:
            per_layer[flat[c][0]] += 1
        if any(len(scores[layer]) - k < top_k for layer, k in per_layer.items()):
            continue
        total = sum(flat[c][2] for c in chosen)
        if best is None or total < best:
            best, best_set = total, chosen
    out = {layer: [] for layer in scores}
    for c in best_set:
        out[flat[c][0]].append(flat[c][1])
    return {layer: sorted(v) for layer, v in out.items()}


HAND_MADE = {  # three layers of six experts on different scales; distinct normalised scores
    0: [0.9, 0.05, 0.4, 0.3, 0.02, 0.33],
    2: [10.0, 11.0, 9.5, 12.0, 30.0, 8.0],
    3: [0.001, 0.5, 0.2, 0.003, 0.25, 0.04],
}


@pytest.mark.parametrize("ratio", [0.17, 0.34, 0.5, 0.67])
def test_global_ranking_is_the_brute_force_optimum(ratio):
    scores = {layer: torch.tensor(s) for layer, s in HAND_MADE.items()}
    uniform = uniform_counts({layer: 6 for layer in HAND_MADE}, ratio)
    n_remove = sum(6 - k for k in uniform.values())
    expected = brute_force_removed(HAND_MADE, n_remove, top_k=2)
    assert global_removed(scores, ratio, top_k=2) == expected
    assert global_counts(scores, ratio, top_k=2) == {layer: 6 - len(v) for layer, v in expected.items()}


def test_hand_made_scores_move_experts_between_layers():
    """s / mean|s| at ratio 0.5 (9 of 18 removed): layer 3's three lowest (0.006, 0.018, 0.24) and layer 0's
    two (0.06, 0.15) go first, then layer 2's four below 0.9 (8, 9.5, 10, 11 over a mean of 13.4), down to
    top_k; layer 0's next (0.3 / 0.333 = 0.9) is the first kept."""
    counts = global_counts({layer: torch.tensor(s) for layer, s in HAND_MADE.items()}, 0.5, top_k=2)
    assert counts == {0: 4, 2: 2, 3: 3}


@pytest.mark.parametrize("seed", range(6))
def test_invariants_on_random_scores(seed):
    gen = torch.Generator().manual_seed(seed)
    n, top_k = 16, 4
    scores = {i: torch.rand(n, generator=gen) ** (1 + 4 * torch.rand(1, generator=gen)) * (i + 1)
              for i in range(5)}
    scores[3][:] = 0  # a layer that is never routed: all its scores are 0
    for ratio in (0.1, 0.25, 0.5, 0.75):
        uniform = uniform_counts({i: n for i in scores}, ratio)
        counts = global_counts(scores, ratio, top_k)
        assert sum(counts.values()) == sum(uniform.values())  # as many experts removed in all
        assert all(top_k <= k <= n for k in counts.values())
        # within a layer the lowest scores go; rescaling a layer changes nothing
        scaled = {i: s * (10.0 ** i) for i, s in scores.items()}
        assert global_counts(scaled, ratio, top_k) == counts


def test_uniform_budget_is_todays_run_identity_and_surgery(tiny_checkpoint, calib_files, tmp_path):
    """budget=uniform (the default) keeps a run's identity as before the setting existed, and a uniform
    plan leaves config.json without per-layer counts."""
    cfg = _cfg(tiny_checkpoint, calib_files, tmp_path, "method=freq", "ratio=0.5")
    assert cfg.budget == "uniform"
    before = OmegaConf.to_container(cfg, resolve=True)
    del before["budget"]
    assert run_identity(cfg) == run_identity(before)
    assert run_identity({**before, "budget": "global"}) != run_identity(cfg)
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2)
    apply_plan(model, Plan("freq", 0.5, [LayerPlan(l.index, 8, [0, 2, 4, 6]) for l in moe_layers(model)]))
    assert not hasattr(model.config, LAYER_EXPERTS_KEY) and model.config.num_experts == 4


@pytest.mark.parametrize("override, says", [
    ("method=ream", "group size C"), ("method=random", "no score"), ("method=reap_official", "saliency_form=official"),
    ("model.stream=true", "model.stream=false"), ("eval.backend=vllm", "vLLM"),
])
def test_global_budget_refusals_before_any_load(override, says, tiny_checkpoint, calib_files, tmp_path):
    method = [] if override.startswith("method=") else ["method=reap"]
    cfg = _cfg(tiny_checkpoint, calib_files, tmp_path, "budget=global", "ratio=0.5", override, *method)
    with pytest.raises(ConfigError, match=says) as err:
        validate(cfg, tokenizer=lambda: pytest.fail("loaded"))
    assert "\n" not in str(err.value) and "budget=global" in str(err.value)


def _logits(model):
    ids, mask = tiny_batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_per_layer_counts_save_and_reload_through_load_compressed(tmp_path):
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3).eval()
    layers = moe_layers(model)
    keeps = {layers[0].index: [1, 3, 4], layers[1].index: [0, 2, 3, 5, 6, 7]}
    apply_plan(model, Plan("freq", 0.5, [LayerPlan(i, 8, k) for i, k in keeps.items()]))
    assert [l.num_experts for l in moe_layers(model)] == [3, 6]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved[LAYER_EXPERTS_KEY] == [3, None, 6] and saved.get("num_local_experts", saved.get("num_experts")) == 6
    reloaded = load_compressed(tmp_path)
    assert [l.num_experts for l in moe_layers(reloaded)] == [3, 6]
    assert torch.equal(_logits(reloaded), _logits(model))
    _stock_transformers_cannot(tmp_path, _logits(model))


def _stock_transformers_cannot(path, logits):
    """Stock transformers refuses the checkpoint or loads something else."""
    try:
        stock = AutoModelForCausalLM.from_pretrained(path).eval()
    except (RuntimeError, ValueError):
        return
    assert not torch.equal(_logits(stock), logits)


def test_global_budget_run_reloads_with_the_same_logits(tiny_checkpoint, calib_files, tmp_path):
    out = tmp_path / "run"
    metrics = run(_cfg(tiny_checkpoint, calib_files, tmp_path, "method=ean", "ratio=0.5", "budget=global",
                       "baseline=false", "eval.tasks=[]", "logger=none"), out)
    counts = metrics["layer_experts"]
    assert metrics["budget"] == "global" and metrics["experts_after"] == 4
    assert sum(counts.values()) == 4 * len(counts) and all(2 <= k <= 8 for k in counts.values())
    plan = Plan.load(out / "plan.json")
    assert plan.info["layer_experts"] == counts and all(len(lp.keep) == counts[str(lp.layer)] for lp in plan.layers)
    block = json.loads((out / "checkpoint" / "config.json").read_text())["compression"]
    assert block["layer_experts"] == counts and block["budget"] == "global"
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    apply_plan(original, plan)  # the in-memory compressed model
    reloaded = load_compressed(out / "checkpoint")
    assert [l.num_experts for l in moe_layers(reloaded)] == [counts[str(l.index)] for l in moe_layers(reloaded)]
    assert torch.equal(_logits(reloaded), _logits(original))
    assert len(set(counts.values())) > 1, counts  # EAN's scores differ enough between the tiny model's layers
    _stock_transformers_cannot(out / "checkpoint", _logits(original))


@pytest.mark.parametrize("name", ["freq", "freq_official", "reap", "ean", "hc_smoe", "m_smoe", "man", "msan", "aimer",
                                  "router_norm"])
def test_every_supported_method_keeps_per_layer_counts(name):
    """Given per-layer counts (3 and 5 of 8), each method keeps them layer by layer, sequential ones included,
    and the model ends with them."""
    from ream_exp.methods import Context, get_method
    from tests.merging_helpers import method_cfg

    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3).eval()
    ids, mask = tiny_batch(batch=4, seq=16)
    ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.5, method_cfg(name), batch_size=2,
                  progress=False)
    first, second = (l.index for l in moe_layers(model))
    ctx.keep_counts = counts = {first: 3, second: 5}
    plan = get_method(name).plan(ctx)
    assert {lp.layer: len(lp.keep) for lp in plan.layers} == counts
    apply_plan(model, plan)
    assert {l.index: l.num_experts for l in moe_layers(model)} == counts
    assert getattr(model.config, LAYER_EXPERTS_KEY) == [3, None, 5]


def test_allot_ranks_the_methods_own_score():
    """allot() gives what global_counts gives on the method's statistic of the uncompressed model."""
    from ream_exp.methods import Context
    from ream_exp.methods.budget import allot

    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3).eval()
    ids, mask = tiny_batch(batch=4, seq=16)
    for name, score in (("ean", "ean"), ("reap", "reap"), ("m_smoe", "freq")):
        ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.5, {"name": name}, progress=False)
        stats = ctx.stats()
        expected = global_counts({l.index: stats[l.index].score(score) for l in moe_layers(model)}, 0.5, 2)
        assert allot(ctx) == expected


def test_allot_ranks_activation_norms_and_weights_only_scores():
    """man / msan rank by their statistic; aimer and router_norm by a float64 score recomputed here from the
    fused weights (AIMER: 1 / (mean|w| / rms w) over gate, up and down), with no calibration data at all."""
    from ream_exp.methods import Context
    from ream_exp.methods.budget import allot

    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3).eval()
    layers = moe_layers(model)
    ids, mask = tiny_batch(batch=4, seq=16)
    for name in ("man", "msan"):
        ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.5, {"name": name}, progress=False)
        stats = ctx.stats()
        assert allot(ctx) == global_counts({l.index: stats[l.index].score(name) for l in layers}, 0.5, 2)

    def aimer_reference(layer):
        gate_up, down = (layer.experts.gate_up_proj.detach().double(), layer.experts.down_proj.detach().double())
        w = torch.cat([gate_up.flatten(1), down.flatten(1)], dim=1)
        return 1 / (w.abs().mean(1) / w.square().mean(1).sqrt())

    references = {"aimer": aimer_reference, "router_norm": lambda l: l.router.weight.detach().double().norm(dim=1)}
    for name, reference in references.items():
        ctx = Context(model, None, 0.5, {"name": name}, progress=False)  # no calibration: stats() cannot run
        for ratio in (0.25, 0.5):
            ctx.ratio = ratio
            assert allot(ctx) == global_counts({l.index: reference(l) for l in layers}, ratio, 2)


def test_a_bad_budget_is_one_line():
    from ream_exp.settings import check_settings
    from tests.test_config import make_cfg

    with pytest.raises(ConfigError, match=r"^budget='layerwise'; valid: uniform, global$"):
        check_settings(make_cfg("budget=layerwise"))
