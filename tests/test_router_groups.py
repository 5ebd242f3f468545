"""Group-limited routers (DeepSeek-V3 with n_group > 1) keep their groups through pruning and merging.

The model: a tiny DeepSeek-V3, 16 experts in n_group = 2 router groups of 8, top-2. Two experts of each
group get an e_score_correction_bias of -1e4, so they are never routed by construction: their biased
score never makes a group's top two (each group has six others above it) nor a token's top-k. Removing
exactly those must leave the routing, hence the logits, as they were (rounding only: smaller router
matmuls), keep n_group and topk_group in config.json and survive a save/reload bit for bit.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config

from ream_exp.config import check_expert_counts
from ream_exp.methods import Context, get_method, top_experts
from ream_exp.moe import apply_plan, moe_layers
from ream_exp.moe.tiny import tiny_batch, tiny_model
from ream_exp.plan import LayerPlan, Plan
from ream_exp.run import validate
from tests.test_config import make_cfg
from tests.tolerances import assert_f32_close

N, GROUPS = 16, 2
NEVER_ROUTED = [1, 6, 10, 13]  # two per router group (0..7, 8..15)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _grouped_model(topk_group: int, n_group: int = GROUPS):
    model = tiny_model("deepseek_v3", num_experts=N, top_k=2, layers=2, seed=3, n_group=n_group,
                       topk_group=topk_group)
    for layer in moe_layers(model):
        layer.router.e_score_correction_bias[NEVER_ROUTED] = -1e4
    return model


def _calib():
    ids, mask = tiny_batch(batch=8, seq=16)  # enough tokens that every other expert is routed (seed 3)
    return ids, mask, {"input_ids": ids, "attention_mask": mask}


def _ctx(model, calib, ratio, name, **cfg):
    return Context(model, calib, ratio, {"name": name, **cfg}, progress=False)


def _router_group(e: int, num_experts: int) -> int:
    return e // (num_experts // GROUPS)


def _balanced(keep: list[int]) -> bool:
    """Each router group keeps N'/n_group of its own experts, in order: new j is in group j // (N'/n_group)."""
    per = len(keep) // GROUPS
    return len(keep) % GROUPS == 0 and all(_router_group(e, N) == j // per for j, e in enumerate(keep))


def test_top_experts_keeps_the_best_within_each_router_group():
    score = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0])
    assert top_experts(score, 4) == [0, 5, 6, 7]  # the layer's best four: three from the second group
    assert top_experts(score, 4, router_groups=2) == [0, 2, 5, 6]  # two per group
    with pytest.raises(ValueError, match="n_group=2"):
        top_experts(score, 3, router_groups=2)


@pytest.mark.parametrize("topk_group", [1, 2])
@pytest.mark.parametrize("name", ["freq", "ean", "reap"])
def test_removing_never_routed_experts_keeps_logits_and_groups(name, topk_group, tmp_path):
    model = _grouped_model(topk_group)
    ids, mask, calib = _calib()
    before = _logits(model, ids, mask)
    stats = _ctx(model, calib, 0.0, name).stats()
    for s in stats.values():  # precondition: exactly the constructed experts go unrouted on these tokens
        assert torch.nonzero(s.count == 0).flatten().tolist() == NEVER_ROUTED
    bias = {l.index: l.router.e_score_correction_bias.clone() for l in moe_layers(model)}

    plan = get_method(name).plan(_ctx(model, calib, len(NEVER_ROUTED) / N, name))
    assert all(lp.removed == NEVER_ROUTED and _balanced(lp.keep) for lp in plan.layers)
    apply_plan(model, plan)

    assert (model.config.n_group, model.config.topk_group, model.config.n_routed_experts) == (GROUPS, topk_group, 12)
    for layer, lp in zip(moe_layers(model), plan.layers):
        assert (layer.router.num_group, layer.router.topk_group, layer.num_experts) == (GROUPS, topk_group, 12)
        assert torch.equal(layer.router.e_score_correction_bias, bias[layer.index][lp.keep])
    after = _logits(model, ids, mask)
    # the same experts with the same weights in every layer; only the router matmuls over fewer rows differ
    assert_f32_close(after, before, model.config.hidden_size, model.config.num_hidden_layers + 1)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["n_group"], saved["topk_group"], saved["n_routed_experts"]) == (GROUPS, topk_group, 12)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded, ids, mask), after)


def test_the_router_groups_matter_for_these_logits():
    """The flip side (so the test above can fail): routing over all experts, as the old fallback to
    n_group = topk_group = 1 did, moves the logits of this model."""
    model = _grouped_model(topk_group=1)
    ids, mask, _ = _calib()
    before = _logits(model, ids, mask)
    for layer in moe_layers(model):
        layer.router.num_group = 1
    assert (_logits(model, ids, mask) - before).abs().max() > 1e-2


def test_random_prunes_equally_from_each_router_group():
    model = _grouped_model(topk_group=1)
    plan = get_method("random").plan(_ctx(model, None, 0.5, "random", seed=7))
    assert all(len(lp.keep) == 8 and _balanced(lp.keep) for lp in plan.layers)
    apply_plan(model, plan)
    assert model.config.n_group == GROUPS


def _crosses(groups, num_experts) -> bool:
    return any(len({_router_group(e, num_experts) for e in g}) > 1 for g in groups)


@pytest.mark.parametrize("name,cfg", [("ream", {"group_size": 0, "pca_dim": 8, "align": "both"}),
                                      ("ream", {"group_size": 3, "pca_dim": 8, "align": "weights"}),
                                      ("hc_smoe", {"pca_dim": 8}), ("m_smoe", {})])
def test_merge_groups_stay_in_their_router_group(name, cfg):
    ids, mask, calib = _calib()
    ratio = 0.5
    # the same weights routed over all experts (n_group = 1): the method's groups cross the router groups,
    # so the check below can fail
    ungrouped = get_method(name).plan(_ctx(_grouped_model(topk_group=1, n_group=1), calib, ratio, name, **cfg))
    assert any(_crosses(lp.groups, N) for lp in ungrouped.layers)

    model = _grouped_model(topk_group=1)
    plan = get_method(name).plan(_ctx(model, calib, ratio, name, **cfg))
    for lp in plan.layers:
        assert not _crosses(lp.groups, N) and _balanced(lp.keep)
        assert sorted(e for g in lp.groups for e in g) == list(range(N))  # every expert merged exactly once
        assert lp.keep == [g[0] for g in lp.groups]
    assert (model.config.n_group, model.config.topk_group) == (GROUPS, 1)
    assert all(l.num_experts == 8 and l.router.num_group == GROUPS for l in moe_layers(model))
    assert torch.isfinite(_logits(model, ids, mask)).all()


def test_surgery_refuses_plans_that_ignore_the_router_groups():
    model = _grouped_model(topk_group=1)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    layers = moe_layers(model)
    three_and_five = Plan("test", 0.5, [LayerPlan(l.index, N, [0, 1, 2, 8, 9, 10, 11, 12]) for l in layers])
    with pytest.raises(ValueError, match="group-limited routing .*n_group=2"):
        apply_plan(model, three_and_five)
    merged = [[0, 8]] + [[e] for e in range(1, 16) if e != 8]
    crossing = Plan("test", 1 / 16, [LayerPlan(l.index, N, [g[0] for g in merged], groups=merged,
                                               merge_weights=[[1.0 / len(g)] * len(g) for g in merged])
                                     for l in layers])
    with pytest.raises(ValueError, match=r"merge group \[0, 8\] spans router groups"):
        apply_plan(model, crossing)
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())  # refused before any weight changed


def _v3_config(**kw):
    return DeepseekV3Config(n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2, **kw)


def test_ratios_that_break_the_router_groups_are_refused_before_loading():
    assert check_expert_counts(_v3_config(), 0.25) == (16, 12)
    with pytest.raises(ValueError, match=r"ratio=0\.125 .*N=16 .*n_group=4.*allowed ratios: .*0\.25, 0\.5\b"):
        check_expert_counts(_v3_config(), 0.125)  # 2 removed: not one per group
    with pytest.raises(ValueError, match=r"ratio=0\.75 .*its 2 best.*allowed ratios: .* up to 8/16"):
        check_expert_counts(_v3_config(), 0.75)  # one expert left per group: its top-2 group score fails
    with pytest.raises(ValueError, match=r"topk_group=1 groups .* hold 2 < top_k=4"):
        check_expert_counts(DeepseekV3Config(n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                             topk_group=1), 0.5)


def test_run_refuses_such_a_ratio_before_loading_the_model(tmp_path, monkeypatch):
    _v3_config(vocab_size=112).save_pretrained(tmp_path)  # config.json alone: no weights to load
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    cfg = make_cfg("model=local", f"model.path={tmp_path}", "method=random", "ratio=0.125", "eval=none",
                   "logger=none")
    with pytest.raises(ValueError, match=r"ratio=0\.125 .*n_group=4"):
        validate(cfg)
