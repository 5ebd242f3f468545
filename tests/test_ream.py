"""REAM (docs/algorithms.md): the formulas against a float64 reference, grouping, alignment, merging, sequential
vs non-sequential, and end-to-end compression of every supported family with a reload check."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tests.merging_helpers import (as_partition, expert_weights64, method_cfg, moe_inputs, planned_copy, run_method,
                                   tiny_fixtures)
from transformers import AutoModelForCausalLM

from ream_exp.methods import METHODS, REAM_VARIANTS, Context, ream
from ream_exp.methods.capture import advance, capture_inputs
from ream_exp.methods.observation import LayerObservation, token_sample
from ream_exp.methods.merging import align_groups, group_by_pseudo_pruning
from ream_exp.moe import apply_layer_plan, canonical_weights, decoder_layers, moe_layers, write_canonical_weights
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model
from ream_exp.observe import observe
from ream_exp.plan import LayerPlan
from tests.tolerances import assert_f32_close


qwen16, batch = tiny_fixtures()  # 16 experts, top-4; MoE layers 0 and 2 with a dense layer between


# ---- the float64 reference of docs/algorithms.md, REAM 1-3 (every expert on every token, plain loops) --------------

@torch.no_grad()
def reference_layer(layer, x, valid, n_keep, group_size, form):
    """Saliency (floored), centroids and groups of one Qwen3-MoE layer straight from docs/algorithms.md."""
    n, k = layer.num_experts, layer.top_k
    wg = layer.router.weight.double()
    experts = [expert_weights64(layer, e) for e in range(n)]
    tokens = [x[t].double() for t in range(x.shape[0]) if valid[t]]
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    gated_sum = torch.zeros(n, x.shape[1], dtype=torch.float64)
    logit_rows = []
    for xt in tokens:
        logits = wg @ xt
        logit_rows.append(logits)
        sigma = torch.softmax(logits, dim=0)
        top = torch.argsort(sigma, descending=True)[:k].tolist()
        g = {i: float(sigma[i] / sigma[top].sum()) for i in top}  # renormalised (norm_topk_prob)
        for i in range(n):
            w = experts[i]
            out = w["down"] @ (F.silu(w["gate"] @ xt) * (w["up"] @ xt))
            gated_sum[i] += sigma[i] * out
            if i in top:
                count[i] += 1
                weight = g[i] if form == "paper" else float(sigma[i]) ** 2
                total[i] += weight * out.norm()
    s = torch.tensor([float(total[i] / count[i]) if count[i] else 0.0 for i in range(n)], dtype=torch.float64)
    smallest = min([float(v) for v in s if v > 0], default=0.5)
    s = torch.tensor([float(v) if v > 0 else min(0.5, smallest) for v in s], dtype=torch.float64)

    means = gated_sum / len(tokens)
    logits = torch.stack(logit_rows)  # tokens x N
    cols = [logits[:, i] / logits[:, i].norm() for i in range(n)]
    d = torch.tensor([[float((cols[i] - cols[j]).norm()) for j in range(n)] for i in range(n)])
    dist = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            delta_e = (float(F.cosine_similarity(means[i], means[j], dim=0)) + 1) / 2
            delta_g = 1 - float(d[i, j]) / float(d.max())
            dist[i, j] = 1 - (delta_e + delta_g) / 2

    order = sorted(range(n), key=lambda i: (-float(s[i]), i))
    centroids, left = order[:n_keep], set(order[n_keep:])
    groups = []
    for c in centroids:
        members = [c]
        while left and len(members) < group_size:
            nearest = min(left, key=lambda j: (float(dist[c, j]), j))
            members.append(nearest)
            left.remove(nearest)
        groups.append(members)
    return s, sorted(centroids), groups


@pytest.mark.parametrize("name", ["ream_official", "ream"])
def test_presets_match_the_float64_reference(qwen16, batch, name):
    ids, mask = batch
    overrides = ("method.sequential=false", "method.group_size=4")
    _, plan = planned_copy(qwen16, method_cfg(name, *overrides), ids, mask, ratio=0.5)
    inputs = moe_inputs(qwen16, ids, mask)
    valid = mask.reshape(-1).bool()
    forms = {}
    for layer, lp in zip(moe_layers(qwen16), plan.layers):
        n_keep = 8  # N' = 16 - round(16 * 0.5), by hand (docs/algorithms.md)
        for form in ("paper", "official"):
            forms[layer.index, form] = reference_layer(layer, inputs[layer.index], valid, n_keep, 4, form)
        s, centroids, groups = forms[layer.index, "official" if name == "ream_official" else "paper"]
        assert_f32_close(torch.tensor(lp.saliency, dtype=torch.float64), s, qwen16.config.hidden_size,
                         qwen16.config.num_hidden_layers + 1)  # float32 model after up to every layer vs float64
        assert lp.centroids == centroids == lp.keep
        assert [g[0] for g in lp.groups] == lp.centroids
        assert as_partition(lp.groups) == as_partition(groups)
    # The two presets differ exactly where the saliency form does: same similarity, other saliency.
    for layer in moe_layers(qwen16):
        assert not torch.allclose(forms[layer.index, "paper"][0], forms[layer.index, "official"][0])


def test_the_two_presets_share_everything_but_the_saliency_form_and_pca_seed():
    paper, official = method_cfg("ream"), method_cfg("ream_official")
    diff = {k for k in paper if paper[k] != official.get(k)}
    assert diff == {"name", "saliency_form", "pca_seed"}
    assert (paper["saliency_form"], official["saliency_form"]) == ("paper", "official")
    assert (paper["pca_seed"], official["pca_seed"]) == (None, 0)  # the run seed vs the official code's 0


# ---- grouping ----------------------------------------------------------------------------------------

def test_greedy_grouping_hand_worked_example():
    # saliency ranks centroids 1 (0.9), 4 (0.7), 2 (0.5); non-centroids 3 (0.3), 5 (0.2), 0 (0.1)
    saliency = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    dist = torch.ones(6, 6)
    for c, row in {1: {0: 0.2, 3: 0.1, 5: 0.45}, 4: {0: 0.3, 3: 0.2, 5: 0.5}, 2: {0: 0.9, 3: 0.8, 5: 0.7}}.items():
        for j, v in row.items():
            dist[c, j] = dist[j, c] = v
    # C = 2: 1 takes its nearest (3); 4 takes 0 (0.3 < 0.5); 2 is left with 5.
    assert group_by_pseudo_pruning(saliency, dist, 3, 2) == [[1, 3], [4, 0], [2, 5]]
    # C = 3: 1 takes 3 and 0; 4 takes 5; every non-centroid is assigned, so 2 stays alone.
    assert group_by_pseudo_pruning(saliency, dist, 3, 3) == [[1, 3, 0], [4, 5], [2]]
    # C = 0 (MC-SMoE): each non-centroid joins its nearest centroid; 5 goes to 1 (0.45 < 0.5).
    assert group_by_pseudo_pruning(saliency, dist, 3, 0) == [[1, 3, 5, 0], [4], [2]]


@pytest.mark.parametrize("group_size", [0, 2, 3, 5])
def test_groups_partition_the_experts(group_size):
    gen = torch.Generator().manual_seed(group_size)
    n, n_keep = 16, 9
    saliency = torch.rand(n, generator=gen)
    a = torch.rand(n, n, generator=gen)
    groups = group_by_pseudo_pruning(saliency, (a + a.T) / 2, n_keep, group_size)
    assert sorted(e for g in groups for e in g) == list(range(n))
    assert len(groups) == n_keep
    assert all(len(g) <= group_size for g in groups) or group_size == 0
    top = set(torch.argsort(saliency, descending=True)[:n_keep].tolist())
    assert {g[0] for g in groups} == top


def test_too_small_group_size_is_refused_before_calibration(qwen16):
    ctx = Context(qwen16, None, 0.5, method_cfg("ream", "method.group_size=1"), progress=False)
    with pytest.raises(ValueError, match="group_size=1"):
        ream.plan(ctx)


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="align"):
        ream.settings({"name": "ream", "align": "sideways"})
    with pytest.raises(ValueError, match=r"unknown setting method.groupsize \(method=ream\)"):
        ream.settings({"name": "ream", "groupsize": 4})


# ---- alignment and merging ---------------------------------------------------------------------------

def _permute_expert(layer, src: int, dst: int, perm: torch.Tensor) -> None:
    """Make expert dst a neuron-permuted copy of expert src (same function, other neuron order)."""
    w = canonical_weights(layer.experts, [src])
    p = {k: None if v is None else v.clone() for k, v in w.items()}
    for name in ("gate", "up", "gate_bias", "up_bias"):
        if p[name] is not None:
            p[name] = p[name][:, perm]
    p["down"] = p["down"][:, :, perm]
    write_canonical_weights(layer.experts, [dst], p)


def _merged_plan(layer, group, weights, perms):
    n = layer.num_experts
    keep = sorted(set(range(n)) - set(group[1:]))
    groups = [group if e == group[0] else [e] for e in keep]
    return LayerPlan(layer.index, n, keep, groups=groups,
                     merge_weights=[weights if g == group else [1.0] for g in groups], perms=perms)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("mode", ["both", "activations", "weights"])
def test_permuted_copy_merges_back_into_that_expert(family, mode):
    model = tiny_model(family, num_experts=8, top_k=2, layers=1, width=16, seed=2)
    layer = moe_layers(model)[0]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    _permute_expert(layer, 3, 6, perm)
    original = expert_weights64(layer, 3)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(6))
    perms = align_groups(layer, [[3, 6]], x, mode, pca_dim=8)
    assert perms[6] == torch.argsort(perm).tolist()  # exactly the permutation that undoes perm
    apply_layer_plan(layer, _merged_plan(layer, [3, 6], [0.3, 0.7], perms))
    merged = expert_weights64(layer, 3)
    for name, value in original.items():
        if value is not None:  # 0.3 w + 0.7 w in float32: a sum of 2 rounded terms
            assert_f32_close(merged[name], value, terms=2)


def test_without_alignment_a_permuted_copy_does_not_merge_back():
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=1, seed=2)
    layer = moe_layers(model)[0]
    _permute_expert(layer, 3, 6, torch.randperm(16, generator=torch.Generator().manual_seed(5)))
    original = expert_weights64(layer, 3)
    assert align_groups(layer, [[3, 6]], None, "none") == {}
    apply_layer_plan(layer, _merged_plan(layer, [3, 6], [0.5, 0.5], {}))
    assert not torch.allclose(expert_weights64(layer, 3)["gate"], original["gate"], atol=1e-3)


def test_merging_identical_experts_gives_that_expert():
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=1, seed=4)
    layer = moe_layers(model)[0]
    w = canonical_weights(layer.experts, [2])
    for e in (5, 7):
        write_canonical_weights(layer.experts, [e], w)
    original = expert_weights64(layer, 2)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    perms = align_groups(layer, [[2, 5, 7]], x, "both", pca_dim=8)
    apply_layer_plan(layer, _merged_plan(layer, [2, 5, 7], [0.2, 0.3, 0.5], perms))
    for name, value in original.items():
        if value is not None:  # a float32 weighted sum of 3 copies
            assert_f32_close(expert_weights64(layer, 2)[name], value, terms=3)


def test_merged_weights_are_the_saliency_weighted_aligned_sum(qwen16, batch):
    ids, mask = batch
    model, plan = planned_copy(qwen16, method_cfg("ream", "method.group_size=4"), ids, mask)
    perms = plan.layers[0].perms
    layer0, new0 = moe_layers(qwen16)[0], moe_layers(model)[0]
    for i, (group, weights) in enumerate(zip(plan.layers[0].groups, plan.layers[0].merge_weights)):
        s = torch.tensor(plan.layers[0].saliency, dtype=torch.float64)[group]
        torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), s / s.sum())
        expected, gates = 0, []
        for j, w in zip(group, weights):
            gate = expert_weights64(layer0, j)["gate"]
            gates.append(gate)
            expected = expected + w * (gate[perms[j]] if j in perms else gate)
        # a float32 sum over the group; its partial sums are bounded by the members' weights (weights sum to 1)
        assert_f32_close(expert_weights64(new0, i)["gate"], expected, len(group), scale=torch.stack(gates))
        torch.testing.assert_close(new0.router.weight[i], layer0.router.weight[group[0]])


# ---- observation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layer_by_layer_propagation_reproduces_the_model(family):
    """Captured inputs pushed through the decoder layers one at a time give the model's own hidden states
    (GPT-OSS: longer than its sliding window, so per-layer masks matter)."""
    model = tiny_model(family, num_experts=8, top_k=2, layers=3)
    ids, mask = tiny_batch(batch=3, seq=24, seed=1)
    outputs, hooks = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        def grab(_m, _a, out, i=i):
            outputs[i] = out[0] if isinstance(out, tuple) else out
        hooks.append(layer.register_forward_hook(grab))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    flags = torch.ones_like(mask)
    states = capture_inputs(model, [{"input_ids": ids, "attention_mask": mask, "sim": flags, "align": flags}])
    for i in range(len(decoder_layers(model))):
        advance(states, model, i, i + 1)
        assert_f32_close(states[0].load()[0], outputs[i], model.config.hidden_size, stages=i + 1)


def test_dense_means_match_every_expert_on_every_sampled_token(qwen16, batch):
    ids, mask = batch
    layer = moe_layers(qwen16)[0]
    x = moe_inputs(qwen16, ids, mask)[0][:20]
    sigma = torch.softmax(layer.router.weight @ x.T, dim=0).T  # [T, N]
    obs = LayerObservation(layer.num_experts)
    obs.add_dense(layer.experts, x[:7], sigma[:7])  # two calls: sums must accumulate
    obs.add_dense(layer.experts, x[7:], sigma[7:])
    obs.finish(layer.experts)
    for i in range(layer.num_experts):
        w = expert_weights64(layer, i)
        outs = [w["down"] @ (F.silu(w["gate"] @ t.double()) * (w["up"] @ t.double())) for t in x]
        terms = torch.stack([sigma[t, i].double() * outs[t] for t in range(len(x))])
        expected = terms.sum(0) / len(x)
        # float32 activations (sum over H), float32 sum over tokens, float64 down projection
        assert_f32_close(obs.mean_outputs[i], expected, max(x.shape), stages=3, scale=terms)


def test_token_samples_are_seeded_nested_and_pad_free(batch):
    _, mask = batch
    small, large = token_sample(mask, 10, seed=7), token_sample(mask, 30, seed=7)
    assert int(small.sum()) == 10 and int(large.sum()) == 30
    assert bool((small <= large).all()) and bool((large <= mask.bool()).all())
    assert torch.equal(small, token_sample(mask, 10, seed=7))
    assert torch.equal(token_sample(mask, None, seed=7), mask.bool())


def test_sampled_similarity_keeps_the_saliency_exact(qwen16, batch):
    ids, mask = batch
    cfg = ("method.sequential=false", "method.group_size=4", "method.align=none")
    _, exact = planned_copy(qwen16, method_cfg("ream", *cfg), ids, mask)
    _, sampled = planned_copy(qwen16, method_cfg("ream", *cfg, "method.sim_tokens=12"), ids, mask)
    for a, b in zip(exact.layers, sampled.layers):
        assert a.saliency == b.saliency and a.centroids == b.centroids


def test_sequential_and_non_sequential_differ_only_after_the_first_layer(qwen16, batch):
    ids, mask = batch
    reference = observe(qwen16, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    cfg = ("method.group_size=4",)
    seq_model, seq = planned_copy(qwen16, method_cfg("ream", *cfg), ids, mask)
    non_model, non = planned_copy(qwen16, method_cfg("ream_nonseq", *cfg), ids, mask)
    first, last = moe_layers(qwen16)[0].index, moe_layers(qwen16)[-1].index
    # non-sequential: every layer observed on the original model (checked against ream_exp.observe)
    for lp in non.layers:
        assert_f32_close(torch.tensor(lp.scores["reap"]), reference[lp.layer].reap_score.float(),
                         qwen16.config.hidden_size, qwen16.config.num_hidden_layers + 1)
    # the first MoE layer sees the same inputs either way: same plan, same merged weights
    assert seq.layers[0].groups == non.layers[0].groups and seq.layers[0].saliency == non.layers[0].saliency
    assert seq.layers[0].layer == first
    for a, b in zip(canonical_weights(moe_layers(seq_model)[0].experts, list(range(8))).values(),
                    canonical_weights(moe_layers(non_model)[0].experts, list(range(8))).values()):
        assert a is None or torch.equal(a, b)
    # later layers: sequential sees the compressed layer's outputs
    assert seq.layers[-1].layer == last
    assert not torch.allclose(torch.tensor(seq.layers[-1].scores["reap"]), reference[last].reap_score.float())


# ---- configs and end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REAM_VARIANTS)
def test_every_ream_variant_composes_to_the_one_implementation(name):
    cfg = method_cfg(name)
    assert cfg["name"] == name and METHODS[name] is ream
    ream.settings(cfg)


def test_ablation_variants_change_one_switch_each():
    base = method_cfg("ream")
    expected = {"ream_act_only_align": {"align": "activations"}, "ream_nonseq": {"sequential": False},
                "ream_no_gate_sim": {"gate_output": False}, "ream_no_pseudo_prune": {"group_size": 0},
                "ream_no_sigma": {"gated_sim": False}, "ream_freq_saliency": {"saliency": "freq"}}
    for name, change in expected.items():
        cfg = method_cfg(name)
        assert {k: v for k, v in cfg.items() if base[k] != v and k != "name"} == change


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ream_end_to_end_every_family(family, tmp_path):
    model = tiny_model(family, num_experts=8, top_k=2, layers=3)
    ids, mask = tiny_batch(batch=4, seq=16, seed=2)
    shared_before = {k: v.clone() for k, v in model.state_dict().items() if "shared_expert" in k}
    plan = run_method(model, method_cfg("ream", "method.group_size=4"), ids, mask, ratio=0.5)
    for layer in moe_layers(model):
        assert layer.num_experts == 4 and layer.experts.num_experts == 4
        assert layer.experts.gate_up_proj.shape[0] == 4
    assert getattr(model.config, moe_layers(model)[0].family.count_key) == 4
    for k, v in shared_before.items():  # shared experts untouched
        assert torch.equal(model.state_dict()[k], v)
    plan.save(tmp_path)
    saved = json.loads((tmp_path / "plan.json").read_text())["layers"]
    assert all(lp["groups"] and lp["centroids"] and lp["merge_weights"] and lp["saliency"] for lp in saved)
    assert (tmp_path / "plan_perms.pt").exists()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert all(layer.num_experts == 4 for layer in moe_layers(reloaded))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, logits)
