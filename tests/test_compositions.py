"""Merging as a composition (docs/algorithms.md, "Merging as a composition"): every composition preset on a tiny
model (its operator applied to the aligned members, a checkpoint stock transformers reloads), one method's
grouping and alignment switched to another's giving that method's plan, the default presets' plans as before,
the new settings refused in one line before anything loads, and the analysis naming runs by their switches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from analysis.naming import method_label, method_name
from analysis.rows import make_row
from ream_exp.config import ConfigError
from ream_exp.methods import COMPOSED, get_method
from ream_exp.moe import canonical_weights, moe_layers
from ream_exp.moe.merge_ops import merge_tensor
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model
from ream_exp.plan import Plan
from ream_exp.settings import check_settings
from tests.merging_helpers import method_cfg, planned_copy, tiny_fixtures
from tests.test_config import make_cfg


tiny, batch = tiny_fixtures("tiny", num_experts=8, top_k=2, layers=2, seed=4, seq=12, batch_seed=5)


def aligned_members(layer, group, perms) -> dict:
    """The group's canonical tensors, each non-centroid member's neurons permuted onto the centroid's."""
    w = canonical_weights(layer.experts, group)
    out = {}  # (copies: canonical_weights of a list of experts)
    for name, t in w.items():
        if t is None:
            continue
        t = t.detach().float().clone()
        for j, member in enumerate(group):
            if perms and member in perms and name != "down_bias":
                p = torch.as_tensor(perms[member])
                t[j] = t[j][:, p] if name == "down" else t[j][p]
        out[name] = t
    return out


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_every_composition_preset_runs_and_merges_by_its_operator(name, tiny, batch, tmp_path):
    cfg = method_cfg(name)
    ids, mask = batch
    twin, plan = planned_copy(tiny, cfg, ids, mask, ratio=0.25)
    assert all(layer.num_experts == 6 for layer in moe_layers(twin))
    lp = plan.layers[0]  # the first MoE layer is observed on the original model, sequential or not
    assert lp.merge["op"] == cfg["merge"]
    plan.save(tmp_path)
    assert [x.merge for x in Plan.load(tmp_path / "plan.json").layers] == [x.merge for x in plan.layers]
    layer, merged = moe_layers(tiny)[0], moe_layers(twin)[0]
    for i, (group, weights) in enumerate(zip(lp.groups, lp.merge_weights)):
        if len(group) == 1:
            continue
        got = canonical_weights(merged.experts, [i])
        for key, t in aligned_members(layer, group, lp.perms).items():
            torch.testing.assert_close(got[key], merge_tensor(t, weights, lp.merge), rtol=0, atol=0)
    with torch.no_grad():
        logits = twin(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    twin.save_pretrained(tmp_path / "checkpoint")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("name", ["ream", "hc_smoe", "m_smoe"])
def test_the_methods_presets_average_and_their_plans_read_as_before(name, tiny, batch):
    ids, mask = batch
    plan = planned_copy(tiny, method_cfg(name), ids, mask, ratio=0.25)[1]
    assert all(lp.merge is None for lp in plan.layers)
    assert all("merge" not in layer for layer in plan.to_dict()["layers"])


def _same_plan(a, b):
    for x, y in zip(a.layers, b.layers):
        assert (x.groups, x.merge_weights, x.keep, x.perms) == (y.groups, y.merge_weights, y.keep, y.perms)


def test_hc_smoe_with_m_smoes_grouping_and_alignment_is_m_smoe(tiny, batch):
    ids, mask = batch
    switched = method_cfg("hc_smoe", "+method.grouping=m_smoe", "method.align=matching")
    _same_plan(planned_copy(tiny, switched, ids, mask, ratio=0.5)[1],
               planned_copy(tiny, method_cfg("m_smoe"), ids, mask, ratio=0.5)[1])


def test_m_smoe_with_hc_smoes_grouping_and_alignment_is_hc_smoe(tiny, batch):
    ids, mask = batch
    switched = method_cfg("m_smoe", "+method.grouping=hc_smoe", "+method.align=activations")
    _same_plan(planned_copy(tiny, switched, ids, mask, ratio=0.5)[1],
               planned_copy(tiny, method_cfg("hc_smoe"), ids, mask, ratio=0.5)[1])


def test_hc_smoe_with_reams_grouping_uses_pseudo_pruning_groups(tiny, batch):
    ids, mask = batch
    cfg = method_cfg("hc_smoe", "+method.grouping=ream", "+method.group_size=2")
    plan = planned_copy(tiny, cfg, ids, mask, ratio=0.5)[1]
    for lp in plan.layers:
        assert all(len(g) == 2 for g in lp.groups)  # N' = 4 groups of C = 2 hold all 8 experts


# ---- settings refused before anything loads -----------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("method.merge=mean", "method.merge='mean'; valid: average, ties, multislerp, karcher, sub_moe"),
    ("+method.grouping=kmeans", "method.grouping='kmeans'; valid: ream, hc_smoe, m_smoe"),
    ("method.align=hungarian", "method.align='hungarian'; valid: both, activations, weights, none, matching"),
    ("method.merge_density=0", "method.merge_density=0 is outside (0, 1]"),
    ("method.merge_density=1.5", "method.merge_density=1.5 is outside (0, 1]"),
    ("+method.merge_rank=0", "method.merge_rank=0 is not a rank"),
    ("+method.merge_rank=1.5", "method.merge_rank=1.5 is not a rank"),
    ("+method.merge_tol=0", "method.merge_tol=0 must be a number > 0"),
    ("+method.merge_max_iter=0", "method.merge_max_iter=0 must be a positive integer"),
])
def test_bad_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        check_settings(make_cfg("method=ream_ties", override))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, overrides, message", [
    ("ream_ties", ["+method.merge_rank=4"], "method.merge_rank applies to method.merge=sub_moe only"),
    ("ream", ["+method.merge_density=0.3"], "method.merge_density applies to method.merge=ties only"),
    ("hc_smoe", ["+method.group_size=4"], "method.group_size applies to method.grouping=ream only"),
    ("m_smoe", ["+method.grouping=ream", "+method.group_size=1"], "group_size=1: 6 groups of at most 1"),
])
def test_settings_of_another_switch_are_refused_before_loading(name, overrides, message):
    cfg = method_cfg(name, *overrides)
    with pytest.raises(ConfigError) as err:
        get_method(name).check(cfg, 8, 6)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_composition_presets_pass_their_checks():
    for name in COMPOSED:
        check_settings(make_cfg(f"method={name}"))
        get_method(name).check(method_cfg(name), 8, 6)


# ---- the analysis names runs by their switches -------------------------------------------------------

def test_runs_are_named_by_their_preset_and_the_switches_they_change():
    assert method_name("ream_ties", method_cfg("ream_ties")) == "ream_ties"
    assert method_name("ream_official", method_cfg("ream_official")) == "ream_official"
    assert method_name("ream", method_cfg("ream", "+method.merge=karcher")) == "ream+merge=karcher"
    changed = method_cfg("hc_smoe", "+method.grouping=m_smoe", "method.align=matching")
    assert method_name("hc_smoe", changed) == "hc_smoe+grouping=m_smoe+align=matching"
    assert method_name("reap", method_cfg("reap")) == "reap"
    assert method_name("ream", {"name": "ream", "align": "both"}) == "ream"  # runs from before the switches
    assert method_label("ream_ties") == "REAM + TIES" and method_label("ream+merge=karcher") == "REAM [merge=karcher]"
    config = {"method": method_cfg("ream", "+method.merge=ties"), "ratio": 0.25}
    assert make_row(config, {"method": "ream"}, run_dir="r", status="failed")["method"] == "ream+merge=ties"


# ---- every tiny family, one operator each ----------------------------------------------------------------

FAMILY_PRESETS = ("m_smoe_ties", "hc_smoe_sub_moe", "m_smoe_multislerp", "hc_smoe_karcher")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_operators_on_every_family_reload_in_stock_transformers(family, tmp_path):
    """Biases (gpt_oss), shared experts, group-limited routers: the operators leave a plain MoE of N' experts."""
    name = FAMILY_PRESETS[TINY_FAMILIES.index(family) % len(FAMILY_PRESETS)]
    model = tiny_model(family, num_experts=8, top_k=2, layers=2)
    ids, mask = tiny_batch(batch=2, seq=10, seed=2)
    twin, plan = planned_copy(model, method_cfg(name), ids, mask, ratio=0.25)
    assert all(layer.num_experts == 6 for layer in moe_layers(twin)) and plan.layers[0].merge["op"]
    with torch.no_grad():
        logits = twin(input_ids=ids, attention_mask=mask).logits
    twin.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.isfinite(logits).all() and torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("grouping", ["hc_smoe", "m_smoe"])
def test_ream_with_another_grouping_keeps_its_saliency_weights(grouping, tiny, batch):
    ids, mask = batch
    cfg = method_cfg("ream", f"+method.grouping={grouping}", "method.align=none")
    plan = planned_copy(tiny, cfg, ids, mask, ratio=0.5)[1]
    for lp in plan.layers:
        assert sorted(e for g in lp.groups for e in g) == list(range(8)) and len(lp.groups) == 4
        for group, weights in zip(lp.groups, lp.merge_weights):
            s = torch.tensor(lp.saliency, dtype=torch.float64)[group]
            torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), s / s.sum())


def test_ream_grouped_as_m_smoe_has_m_smoes_groups(tiny, batch):
    ids, mask = batch
    ream = planned_copy(tiny, method_cfg("ream_nonseq", "+method.grouping=m_smoe", "method.align=none"), ids, mask,
                        ratio=0.5)[1]
    m_smoe = planned_copy(tiny, method_cfg("m_smoe"), ids, mask, ratio=0.5)[1]
    assert [lp.groups for lp in ream.layers] == [lp.groups for lp in m_smoe.layers]
