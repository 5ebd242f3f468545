"""method.pca_seed: the alignment PCA follows it, not the run seed (ream_official: 0, as the official code).

What the run seed still drives in REAM is the token samples (sim_tokens, align_tokens); with samples that
cover every token, ream_official's plan must not depend on the run seed at all.
"""

from __future__ import annotations

import pytest
import torch

import ream_exp.methods.merging as merging
from ream_exp.methods.merging import pca_weight_features
from ream_exp.moe import moe_layers
from ream_exp.moe.tiny import tiny_batch, tiny_model
from tests.merging_helpers import method_cfg, planned_copy


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe", num_experts=8, top_k=2, seed=4)


@pytest.fixture(scope="module")
def batch():
    return tiny_batch(batch=4, seq=16, seed=5)


def seeds_seen(monkeypatch) -> list[int]:
    """Record the seed of every alignment PCA (the real function still runs)."""
    seen = []

    def recording(layer, dim, seed, spill=None):
        seen.append(seed)
        return pca_weight_features(layer, dim, seed, spill)

    monkeypatch.setattr(merging, "pca_weight_features", recording)
    return seen


C4 = "method.group_size=4"


@pytest.mark.parametrize("name, overrides, run_seed, want", [
    ("ream_official", (C4,), 42, 0),                    # the official code's fixed 0
    ("ream_official", (C4, "method.pca_seed=7"), 42, 7),
    ("ream", (C4,), 42, 42),                            # null: the run seed
    ("ream_nonseq", (C4,), 5, 5),
    ("hc_smoe", ("method.align=both",), 9, 9),
    ("hc_smoe", ("method.align=both", "method.pca_seed=3"), 9, 3),
])
def test_the_pca_is_seeded_with_pca_seed(model, batch, monkeypatch, name, overrides, run_seed, want):
    seen = seeds_seen(monkeypatch)
    planned_copy(model, method_cfg(name, *overrides), *batch, seed=run_seed)
    assert seen == [want] * len(moe_layers(model))


def _plan_facts(plan):
    return [(lp.groups, lp.merge_weights, lp.perms) for lp in plan.layers]


def test_ream_official_does_not_depend_on_the_run_seed(model, batch):
    # align_tokens (32768) covers every token of the batch, so no token sample depends on the seed either;
    # pca_dim=8 (of 96 feature columns) makes the randomised PCA's seed visible on this tiny model
    cfg = ("method.group_size=4", "method.pca_dim=8")
    merged0, plan0 = planned_copy(model, method_cfg("ream_official", *cfg), *batch, seed=0)
    merged42, plan42 = planned_copy(model, method_cfg("ream_official", *cfg), *batch, seed=42)
    assert all(lp.perms for lp in plan0.layers)
    assert _plan_facts(plan0) == _plan_facts(plan42)
    for a, b in zip(merged0.state_dict().values(), merged42.state_dict().values()):
        assert torch.equal(a, b)
    # control: tied to the run seed (pca_seed null, as method=ream), the same two runs align differently
    _, tied0 = planned_copy(model, method_cfg("ream_official", *cfg, "method.pca_seed=null"), *batch, seed=0)
    _, tied42 = planned_copy(model, method_cfg("ream_official", *cfg, "method.pca_seed=null"), *batch, seed=42)
    assert _plan_facts(tied0) == _plan_facts(plan0)  # run seed 0 = pca_seed 0
    assert [lp.perms for lp in tied42.layers] != [lp.perms for lp in plan42.layers]


def test_the_pca_seed_changes_the_alignment_features_and_permutations(model, batch):
    layer = moe_layers(model)[0]
    assert torch.equal(pca_weight_features(layer, 4, 0), pca_weight_features(layer, 4, 0))
    assert not torch.allclose(pca_weight_features(layer, 4, 0), pca_weight_features(layer, 4, 1))
    # weights-only alignment with a small randomised PCA: the permutations follow pca_seed, not the run seed
    # (non-sequential, so the later layer sees the same inputs whatever the earlier merge)
    cfg = ("method.group_size=4", "method.align=weights", "method.pca_dim=4", "method.sequential=false")
    _, base = planned_copy(model, method_cfg("ream_official", *cfg), *batch, seed=0)
    _, other_run = planned_copy(model, method_cfg("ream_official", *cfg), *batch, seed=42)
    _, other_pca = planned_copy(model, method_cfg("ream_official", *cfg, "method.pca_seed=1"), *batch, seed=0)
    assert _plan_facts(base) == _plan_facts(other_run)
    assert [lp.groups for lp in base.layers] == [lp.groups for lp in other_pca.layers]
    assert [lp.perms for lp in base.layers] != [lp.perms for lp in other_pca.layers]
