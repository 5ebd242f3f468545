"""HC-SMoE and M-SMoE (docs/algorithms.md): clustering against scipy, grouping and weights against independent
computations on a tiny model, weight matching, and end-to-end compression with a reload check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import linkage
from transformers import AutoModelForCausalLM

from ream_exp.methods.merging import average_linkage, closest_to_mean, weight_matching
from ream_exp.moe import moe_layers
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model
from ream_exp.observe import observe
from ream_exp.plan import experts_to_keep
from tests.merging_helpers import (as_partition, expert_weights64, method_cfg, moe_inputs, planned_copy, run_method,
                                   tiny_fixtures)
from tests.test_ream import _permute_expert


qwen16, batch = tiny_fixtures()


def scipy_average_clusters(features: torch.Tensor, n_clusters: int) -> set[frozenset]:
    """The partition after scipy's first N - n_clusters average-linkage merges."""
    z = linkage(features.double().numpy(), method="average", metric="euclidean")
    n = len(features)
    clusters = {i: {i} for i in range(n)}
    for step, (a, b, _, _) in enumerate(z[: n - n_clusters]):
        clusters[n + step] = clusters.pop(int(a)) | clusters.pop(int(b))
    return {frozenset(c) for c in clusters.values()}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_clusters", [1, 5, 11])
def test_average_linkage_matches_scipy(seed, n_clusters):
    features = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed))
    assert as_partition(average_linkage(features, n_clusters)) == scipy_average_clusters(features, n_clusters)


def test_representative_is_the_member_closest_to_the_cluster_mean():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0], [1.2, 0.1]])  # mean (1.55, 0.025)
    assert closest_to_mean(features, [0, 1, 2, 3]) == 3
    assert closest_to_mean(features, [0, 2]) == 0  # tie: lower index


@torch.no_grad()
def _mean_expert_outputs(layer, x):
    """mean over tokens of E_i(x), every expert on every token (Qwen3-MoE: SiLU-gated experts)."""
    outs = []
    for i in range(layer.num_experts):
        w = expert_weights64(layer, i)
        xd = x.double()
        outs.append((F.silu(xd @ w["gate"].T) * (xd @ w["up"].T) @ w["down"].T).mean(0))
    return torch.stack(outs)


def _planned_and_observed(model, batch, method: str):
    """The method's plan (on a copy of `model`), and the model's MoE inputs, routing statistics and non-pad mask."""
    ids, mask = batch
    _, plan = planned_copy(model, method_cfg(method), ids, mask)
    inputs = moe_inputs(model, ids, mask)
    stats = observe(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    return plan, inputs, stats, mask.reshape(-1).bool()


def _frequency_weights(freq, group) -> torch.Tensor:
    """The group's merge weights by frequency (uniform where no member was routed), in float64."""
    f = freq[group]
    return (f / f.sum() if f.sum() > 0 else torch.full((len(group),), 1 / len(group))).double()


def test_hc_smoe_clusters_mean_outputs_like_scipy(qwen16, batch):
    plan, inputs, stats, valid = _planned_and_observed(qwen16, batch, "hc_smoe")
    for layer, lp in zip(moe_layers(qwen16), plan.layers):
        features = _mean_expert_outputs(layer, inputs[layer.index][valid])
        n_keep = experts_to_keep(layer.num_experts, 0.5)
        assert as_partition(lp.groups) == scipy_average_clusters(features, n_keep)
        freq = stats[layer.index].freq
        for group, weights in zip(lp.groups, lp.merge_weights):
            # the reference features are float64, the method's come from float32 expert outputs
            # (relative error ~ eps32 * sqrt(hidden)): near-ties between members may resolve either way
            dist = (features[group] - features[group].mean(0)).norm(dim=1)
            assert dist[0] <= dist.min() + 1e-4 * dist.max()
            if len(group) == 2:  # a pair is an exact tie: the lower index represents it
                assert group[0] == min(group)
            torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), _frequency_weights(freq, group))
        assert lp.keep == lp.centroids == sorted(g[0] for g in lp.groups)


def test_m_smoe_groups_by_frequency_and_router_logit_cosine(qwen16, batch):
    plan, inputs, stats, valid = _planned_and_observed(qwen16, batch, "m_smoe")
    for layer, lp in zip(moe_layers(qwen16), plan.layers):
        freq = stats[layer.index].freq
        n_keep = experts_to_keep(layer.num_experts, 0.5)
        dominant = sorted(range(len(freq)), key=lambda i: (-float(freq[i]), i))[:n_keep]
        assert sorted(lp.centroids) == sorted(dominant)
        logits = (inputs[layer.index][valid].double() @ layer.router.weight.double().T).detach()  # tokens x N
        cos = F.cosine_similarity(logits[:, :, None], logits[:, None, :], dim=0)
        for group, weights in zip(lp.groups, lp.merge_weights):
            for j in group[1:]:
                assert group[0] == max(dominant, key=lambda c: (float(cos[j, c]), -dominant.index(c)))
            torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), _frequency_weights(freq, group))


def test_weight_matching_recovers_a_permuted_copy():
    model = tiny_model("mixtral", num_experts=8, top_k=2, layers=1, seed=3)
    layer = moe_layers(model)[0]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(9))
    _permute_expert(layer, 1, 4, perm)
    assert weight_matching(layer, [[1, 4], [0]]) == {4: torch.argsort(perm).tolist()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["hc_smoe", "m_smoe"])
def test_baselines_end_to_end(family, method, tmp_path):
    model = tiny_model(family, num_experts=8, top_k=2, layers=3)
    ids, mask = tiny_batch(batch=4, seq=12, seed=2)
    run_method(model, method_cfg(method), ids, mask, ratio=0.25)
    assert all(layer.num_experts == 6 for layer in moe_layers(model))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, logits)
