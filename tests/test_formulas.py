"""Formulas of docs/algorithms.md that a wrong implementation could pass the other tests with, each checked against
a reference derived by hand or computed another way: the half-way rounding of N', the zero-saliency
floor on experts that are never routed, the singular-value scaling of the PCA weight features, the
normalised activation rows of the alignment cost, the GPT-OSS down-projection bias in the mean outputs,
and sequential observation on the already-compressed layers. `make mutate` runs the deliberate bugs
these tests must catch (tests/mutate.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tests.merging_helpers import as_partition, method_cfg, moe_inputs, planned_copy
from tests.test_moe_families import _reference_expert
from tests.test_ream import _permute_expert, reference_layer
from tests.tolerances import assert_f32_close

from ream_exp.methods.observation import LayerObservation
from ream_exp.methods import merging
from ream_exp.methods.merging import align_groups, floor_zero_saliency, pca_weight_features, weight_features
from ream_exp.moe import (apply_layer_plan, canonical_weights, expert_hidden, expert_output, moe_layers,
                          write_canonical_weights)
from ream_exp.moe.tiny import tiny_batch, tiny_model
from ream_exp.observe import observe
from ream_exp.plan import experts_to_keep

# ---- docs/algorithms.md: N' = N - round(N * ratio), halves rounded up ---------------------------------------------

# (N, ratio, N'): N * ratio is exactly representable, so each line is the rule applied by hand.
HALF_WAY = [
    (4, 0.125, 3),     # N * ratio = 0.5 -> 1 (round-half-even would give 0 and keep all 4)
    (8, 0.0625, 7),    # 0.5 -> 1
    (8, 0.1875, 6),    # 1.5 -> 2
    (8, 0.3125, 5),    # 2.5 -> 3 (round-half-even: 2)
    (16, 0.15625, 13),  # 2.5 -> 3
    (128, 0.25, 96),   # 32 exactly: the paper's 128 -> 96
    (128, 0.5, 64),    # 64 exactly: 128 -> 64
    (8, 0.3, 6),       # 2.4 -> 2
    (8, 0.33, 5),      # 2.64 -> 3
]


@pytest.mark.parametrize("n, ratio, n_keep", HALF_WAY)
def test_experts_to_keep_rounds_halves_up(n, ratio, n_keep):
    assert experts_to_keep(n, ratio) == n_keep


def test_ream_keeps_n_minus_rounded_half_up_experts():
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=1, seed=1)
    ids, mask = tiny_batch(batch=2, seq=12)
    _, plan = planned_copy(model, method_cfg("ream", "method.group_size=4"), ids, mask, ratio=0.3125)
    assert [len(lp.keep) for lp in plan.layers] == [5]  # 8 - round(2.5) = 8 - 3


# ---- docs/algorithms.md REAM 1: the zero-saliency floor ------------------------------------------------------------

def test_floor_is_the_smaller_of_one_half_and_the_smallest_non_zero_score():
    torch.testing.assert_close(floor_zero_saliency(torch.tensor([0.0, 0.3, 0.2, 0.0, 0.9])),
                               torch.tensor([0.2, 0.3, 0.2, 0.2, 0.9], dtype=torch.float64))
    torch.testing.assert_close(floor_zero_saliency(torch.tensor([0.8, 0.0, 0.6])),
                               torch.tensor([0.8, 0.5, 0.6], dtype=torch.float64))
    torch.testing.assert_close(floor_zero_saliency(torch.zeros(3)), torch.full((3,), 0.5, dtype=torch.float64))


UNROUTED = (5, 11)


@torch.no_grad()
def model_with_unrouted_experts():
    """One MoE layer (16 experts, top-4) whose router can never pick experts UNROUTED.

    Hidden dimension 0 is held at 1 for every token (embedding column 1, attention writes nothing into it),
    so after the RMSNorm the router input has x_0 = 1 / rms > 0; routing rows that are -50 on dimension 0
    and zero elsewhere give those experts a logit of about -150, far below every other expert's.
    """
    model = tiny_model("qwen3_moe", num_experts=16, top_k=4, layers=1, seed=1)
    model.model.embed_tokens.weight[:, 0] = 1.0
    model.model.layers[0].self_attn.o_proj.weight[0, :] = 0.0
    router = moe_layers(model)[0].router.weight
    router[list(UNROUTED)] = 0.0
    router[list(UNROUTED), 0] = -50.0
    return model


def test_ream_floors_the_saliency_of_never_routed_experts():
    model = model_with_unrouted_experts()
    ids, mask = tiny_batch(batch=4, seq=16, seed=3)
    _, plan = planned_copy(model, method_cfg("ream", "method.group_size=4"), ids, mask, ratio=0.5)
    lp, layer = plan.layers[0], moe_layers(model)[0]
    assert [lp.scores["freq"][e] for e in UNROUTED] == [0.0, 0.0]  # precondition: never routed
    valid = mask.reshape(-1).bool()
    s, centroids, groups = reference_layer(layer, moe_inputs(model, ids, mask)[0], valid, 8, 4, "paper")
    routed = [float(v) for i, v in enumerate(s) if i not in UNROUTED]
    assert min(routed) < 0.5, "test precondition: the floor is the smallest score, not 1/2"
    assert [float(s[e]) for e in UNROUTED] == [min(routed)] * 2
    saliency = torch.tensor(lp.saliency, dtype=torch.float64)
    assert_f32_close(saliency, s, model.config.hidden_size, model.config.num_hidden_layers + 1)
    assert lp.centroids == centroids and as_partition(lp.groups) == as_partition(groups)
    for group, weights in zip(lp.groups, lp.merge_weights):
        torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), saliency[group] / saliency[group].sum())


# ---- docs/algorithms.md REAM 4: alignment features -----------------------------------------------------------------

def test_pca_weight_features_are_scaled_by_the_singular_values():
    """With q = the full feature width, X V diag(s) has the Gram matrix X (X^T X) X^T whatever the signs and
    basis the PCA picks, so the normalised features' cosines follow from X alone (float64)."""
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=1, seed=2)
    layer = moe_layers(model)[0]
    x = weight_features(layer).double().reshape(-1, 3 * model.config.hidden_size)  # [N*I, 3H] = [128, 96]
    x = x / x.norm(dim=1, keepdim=True)
    x = x - x.mean(0, keepdim=True)
    gram = x @ (x.T @ x) @ x.T
    norm = gram.diagonal().sqrt()
    expected = gram / norm[:, None] / norm[None, :]
    z = pca_weight_features(layer, dim=x.shape[1], seed=0).double().reshape(x.shape[0], -1)
    assert z.shape[1] == x.shape[1]
    # float32 PCA of a 96-wide matrix: a few chained reductions (QR, power iterations, SVD, projection)
    assert_f32_close(z @ z.T, expected, x.shape[1], stages=8)


@torch.no_grad()
def _rescale_neurons(layer, e: int, scale: torch.Tensor) -> None:
    """Scale expert e's up row p by scale[p] and its down column p by 1 / scale[p]: the same function,
    activations a_p scaled by scale[p]."""
    w = {k: None if v is None else v.clone() for k, v in canonical_weights(layer.experts, [e]).items()}
    w["up"] = w["up"] * scale[None, :, None]
    w["down"] = w["down"] / scale[None, None, :]
    write_canonical_weights(layer.experts, [e], w)


@torch.no_grad()
def _neurons_of_one_direction(layer, e: int, gen: torch.Generator) -> None:
    """Give expert e neurons whose gate/up rows are one shared row plus a little noise and whose up rows
    have norms spread over e^-1 .. e: activation rows of nearly one direction, told apart mostly by size."""
    w = {k: None if v is None else v.clone() for k, v in canonical_weights(layer.experts, [e]).items()}
    i, h = w["gate"].shape[1:]
    noise = lambda: 0.02 * torch.randn(i, h, generator=gen)
    size = torch.exp(torch.empty(i).uniform_(-1.0, 1.0, generator=gen))
    w["gate"][0] = w["gate"][0, 0] + noise()
    w["up"][0] = size[:, None] * (w["up"][0, 0] + noise())
    write_canonical_weights(layer.experts, [e], w)


def test_activation_alignment_ignores_the_scale_of_each_neuron():
    """A permuted copy with rescaled neurons computes the same function; each activation row differs from
    its counterpart's only by a factor, so once rows are L2-normalised (docs/algorithms.md REAM 4) the match is exact,
    even when the centroid's neurons point almost the same way and differ mainly in size."""
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=1, width=16, seed=2)
    layer = moe_layers(model)[0]
    gen = torch.Generator().manual_seed(5)
    _neurons_of_one_direction(layer, 3, gen)
    perm = torch.randperm(16, generator=gen)
    _permute_expert(layer, 3, 6, perm)
    _rescale_neurons(layer, 6, torch.exp(torch.empty(16).uniform_(-1.5, 1.5, generator=gen)))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(6))
    # sanity: the same function (two matmuls over H, after rounding the weights once by the rescaling)
    assert_f32_close(expert_output(layer.experts, 6, x), expert_output(layer.experts, 3, x), 32, stages=3)
    assert align_groups(layer, [[3, 6]], x, "activations")[6] == torch.argsort(perm).tolist()


@pytest.mark.parametrize("width", [16, 48])  # cdist's direct form (<= 25 rows) and its matrix-product form
@pytest.mark.parametrize("block", [merging.ALIGN_BLOCK, 1])  # the members in one batched product, or one each
def test_activation_costs_are_the_bits_of_cdist_on_the_normalised_rows(width, block, monkeypatch):
    """Each expert's rows normalised and laid out once, one product per member: the cost of docs/algorithms.md
    REAM 4 as torch.cdist gives it on the L2-normalised activation rows, to the bit (a cost rounded otherwise
    could flip a near-tied assignment)."""
    monkeypatch.setattr(merging, "ALIGN_BLOCK", block)
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=1, width=width, seed=3)
    layer = moe_layers(model)[0]
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(7))
    costs = dict(merging.activation_costs(layer.experts, 1, [4, 6, 0], x))
    rows = {e: merging.unit_neuron_rows(expert_hidden(layer.experts, e, x)) for e in (1, 4, 6, 0)}
    assert list(costs) == [4, 6, 0]
    for j in (4, 6, 0):
        assert torch.equal(costs[j], torch.cdist(rows[1], rows[j]))


def test_unit_neuron_rows_are_the_l2_normalised_rows():
    """Each neuron's row over the tokens divided by its L2 norm (F.normalize's, a zero row left zero); the norm from
    a float32 sum of squares over T tokens, so within T-term float32 rounding of F.normalize's."""
    a = torch.randn(300, 24, generator=torch.Generator().manual_seed(8)) * torch.logspace(-3, 3, 24)
    a[:, 5] = 0
    rows = merging.unit_neuron_rows(a)
    expected = F.normalize(a.double().T, dim=1)
    assert rows.shape == (24, 300) and rows.dtype == torch.float32
    assert_f32_close(rows.double(), expected, terms=300, stages=2, scale=torch.ones(()))
    assert torch.equal(rows[5], torch.zeros(300))
    out = torch.empty(300, 24)
    written = merging.unit_neuron_rows(a, out=out)
    assert torch.equal(written, rows) and written.data_ptr() == out.data_ptr()


# ---- docs/algorithms.md REAM 2: mean expert outputs, biases included -----------------------------------------------

@pytest.mark.parametrize("weighted", [True, False])
def test_gpt_oss_mean_outputs_include_the_down_projection_bias(weighted):
    model = tiny_model("gpt_oss", num_experts=8, top_k=2, layers=1, seed=4)
    layer = moe_layers(model)[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, model.config.hidden_size, generator=gen)
    weight = torch.rand(20, 8, generator=gen) if weighted else torch.ones(20, 8)
    obs = LayerObservation(8)
    for part in (slice(0, 7), slice(7, 20)):  # two calls: the sums must accumulate
        obs.add_dense(layer.experts, x[part], weight[part] if weighted else None)
    obs.finish(layer.experts)
    terms = torch.stack([weight[:, i, None].double() * _reference_expert(layer, i, x) for i in range(8)])
    expected = terms.mean(1)  # [N, H]: mean_t w_ti E_i(x_t), E with every bias, in float64
    assert float(canonical_weights(layer.experts, [0])["down_bias"].detach().abs().max()) > 0.1  # the bias matters
    # float32 activations (sum over H), float32 sum over tokens, float64 down projection
    assert_f32_close(obs.mean_outputs, expected, max(x.shape), stages=3, scale=terms)


# ---- docs/algorithms.md: sequential observation --------------------------------------------------------------------

def test_sequential_observes_each_layer_on_the_already_compressed_layers():
    """Layer l's statistics equal those a plain forward observes on a fresh copy whose MoE layers before l
    were compressed with the same layer plans (run once each: no layer applied twice, none skipped)."""
    model = tiny_model("qwen3_moe", num_experts=16, top_k=4, layers=3, seed=1)  # MoE layers 0 and 2
    ids, mask = tiny_batch(batch=4, seq=16, seed=3)
    compressed, plan = planned_copy(model, method_cfg("ream", "method.group_size=4"), ids, mask)
    first, last = plan.layers
    prefix = copy.deepcopy(model)
    apply_layer_plan(moe_layers(prefix)[0], dataclasses.replace(first, applied=False))
    for a, b in zip(canonical_weights(moe_layers(prefix)[0].experts, range(8)).values(),
                    canonical_weights(moe_layers(compressed)[0].experts, range(8)).values()):
        assert a is None or torch.equal(a, b)  # the same merge of the same numbers
    stats = observe(prefix, [{"input_ids": ids, "attention_mask": mask}], progress=False)[last.layer]
    assert last.scores["freq"] == stats.freq.tolist()
    assert_f32_close(torch.tensor(last.scores["reap"], dtype=torch.float64), stats.reap_score,
                     model.config.hidden_size, model.config.num_hidden_layers + 1)
    # and not the statistics of the original model (so the check above can fail)
    original = observe(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)[last.layer]
    assert not torch.allclose(original.reap_score, stats.reap_score, rtol=0, atol=1e-3)
