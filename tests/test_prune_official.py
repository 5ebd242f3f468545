"""reap_official / freq_official (the official REAM code's pruning baselines) against a float64 reference.

The reference is written from the formulas and computed another way: for each MoE layer in order it runs
the whole model (whose earlier MoE layers it has already pruned by its own choices, when sequential) to
get the layer's inputs, routes every non-pad token in float64 (sigma = the full softmax over N, the top-k
of sigma), scores S_i = mean over routed tokens of sigma_i^2 ||E_i(x)|| (reap) or routed tokens per
calibration batch (freq), floors zeros to min(0.5, smallest non-zero S), and keeps the top N' with ties
going to the higher expert index.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.merging_helpers import expert_weights64, method_cfg, moe_inputs, planned_copy

from ream_exp.config import ConfigError
from ream_exp.methods import get_method, top_experts
from ream_exp.moe import moe_layers
from ream_exp.moe.surgery import keep_experts
from ream_exp.moe.tiny import tiny_batch, tiny_model
from tests.tolerances import f32_atol

BATCH_SIZE = 2  # calibration batch size of every plan below (freq_official scores per batch)


@torch.no_grad()
def reference_scores(layer, x: torch.Tensor, kind: str, n_batches: int) -> torch.Tensor:
    """Floored official-form scores of one Qwen3-MoE layer on its non-pad inputs x [T, H], plain loops."""
    n, k = layer.num_experts, layer.top_k
    wg = layer.router.weight.double()
    experts = [expert_weights64(layer, e) for e in range(n)]
    total = [0.0] * n
    count = [0] * n
    for xt in x.double():
        sigma = torch.softmax(wg @ xt, dim=0)  # over all N experts, never renormalised
        for i in torch.topk(sigma, k).indices.tolist():
            w = experts[i]
            out = w["down"] @ (F.silu(w["gate"] @ xt) * (w["up"] @ xt))
            count[i] += 1
            total[i] += float(sigma[i]) ** 2 * float(out.norm())
    if kind == "reap":
        s = [total[i] / count[i] if count[i] else 0.0 for i in range(n)]
    else:
        s = [count[i] / n_batches for i in range(n)]
    smallest = min((v for v in s if v > 0), default=0.5)
    return torch.tensor([v if v > 0 else min(0.5, smallest) for v in s], dtype=torch.float64)


def reference_keep(score: torch.Tensor, n_keep: int) -> list[int]:
    """Top n_keep by score; among equal scores the higher index first."""
    order = sorted(range(len(score)), key=lambda i: (float(score[i]), i), reverse=True)
    return sorted(order[:n_keep])


@torch.no_grad()
def reference_plan(model, ids, mask, kind: str, n_keep: int, sequential: bool):
    """Per MoE layer in order: (scores, kept experts), pruning a copy of the model as it goes."""
    twin = copy.deepcopy(model)
    valid = mask.reshape(-1).bool()
    n_batches = math.ceil(ids.shape[0] / BATCH_SIZE)
    original = moe_inputs(model, ids, mask)
    out = []
    for layer in moe_layers(twin):
        x = (moe_inputs(twin, ids, mask) if sequential else original)[layer.index][valid]
        score = reference_scores(layer, x, kind, n_batches)
        keep = reference_keep(score, n_keep)
        keep_experts(layer, keep)
        out.append((score, keep))
    return out


def _tolerance(model, score) -> float:
    # float32 model through up to every decoder layer against float64 (as in test_ream.py)
    return f32_atol(score, model.config.hidden_size, model.config.num_hidden_layers + 1)


def _check_against_reference(model, ids, mask, name, ratio, sequential):
    kind = name.split("_")[0]
    cfg = method_cfg(name, f"method.sequential={str(sequential).lower()}")
    _, plan = planned_copy(model, cfg, ids, mask, ratio=ratio, batch_size=BATCH_SIZE)
    n_keep = len(plan.layers[0].keep)
    reference = reference_plan(model, ids, mask, kind, n_keep, sequential)
    for lp, (score, keep) in zip(plan.layers, reference):
        tol = 0.0 if kind == "freq" else _tolerance(model, score)  # counts are exact
        # the kept set is well defined: the scores at the cut are exactly tied or further apart than rounding
        ranked = sorted(score.tolist(), reverse=True)
        assert ranked[n_keep - 1] == ranked[n_keep] or ranked[n_keep - 1] - ranked[n_keep] > 2 * tol
        torch.testing.assert_close(torch.tensor(lp.saliency, dtype=torch.float64), score, rtol=0, atol=tol)
        assert lp.keep == keep and lp.groups is None
    return plan, reference


@pytest.fixture(scope="module")
def sparse():
    """16 experts, top-2, 10 tokens: several experts are never routed in every layer (exact ties)."""
    return tiny_model("qwen3_moe", num_experts=16, top_k=2, layers=3, seed=3), *tiny_batch(batch=2, seq=5, pad_last=0)


@pytest.fixture(scope="module")
def dense():
    """8 experts, top-2, padded rows; MoE layers 0 and 2 with a dense layer between."""
    return tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3, seed=1), *tiny_batch(batch=4, seq=16, seed=3)


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("name", ["reap_official", "freq_official"])
def test_presets_keep_the_references_experts(dense, name, sequential):
    _check_against_reference(*dense, name, 0.5, sequential)


@pytest.mark.parametrize("name", ["reap_official", "freq_official"])
def test_ties_keep_the_higher_index(sparse, name):
    """Never-routed experts all score the floor: which of them stay is decided by the tie rule alone."""
    model, ids, mask = sparse
    plan, reference = _check_against_reference(model, ids, mask, name, 0.25, sequential=True)
    straddled = 0
    for lp, (score, keep) in zip(plan.layers, reference):
        floor = float(score.min())
        tied = [i for i in range(len(score)) if score[i] == floor]
        kept_tied = [i for i in tied if i in keep]
        if kept_tied and len(kept_tied) < len(tied):  # the cut runs through the tied experts
            straddled += 1
            assert kept_tied == tied[-len(kept_tied):]  # the highest indices among them
            assert keep != top_experts(score, len(keep), ties="lower")
    assert straddled, "test precondition: in some layer the cut falls among tied experts"


def test_official_form_ties_a_routed_expert_with_the_never_routed(sparse):
    """The floor is min(0.5, smallest non-zero S): sigma^2 ||E|| is below 0.5, so the least salient routed
    expert ties with the never-routed ones (as in the official code); a count per batch is not."""
    model, ids, mask = sparse
    reap = reference_plan(model, ids, mask, "reap", 12, sequential=False)
    freq = reference_plan(model, ids, mask, "freq", 12, sequential=False)
    layer = moe_layers(model)[0]
    x = moe_inputs(model, ids, mask)[layer.index][mask.reshape(-1).bool()].double()
    routed = set(torch.topk(x @ layer.router.weight.double().T, layer.top_k).indices.flatten().tolist())
    reap_score, freq_score = reap[0][0], freq[0][0]
    assert any(i in routed for i in range(16) if reap_score[i] == reap_score.min())
    assert not any(i in routed for i in range(16) if freq_score[i] == freq_score.min())


def test_sequential_differs_from_non_sequential_after_the_first_layer(dense):
    model, ids, mask = dense
    cfg = lambda seq: method_cfg("reap_official", f"method.sequential={seq}")
    _, seq = planned_copy(model, cfg("true"), ids, mask, ratio=0.5, batch_size=BATCH_SIZE)
    _, non = planned_copy(model, cfg("false"), ids, mask, ratio=0.5, batch_size=BATCH_SIZE)
    assert seq.layers[0].saliency == non.layers[0].saliency and seq.layers[0].keep == non.layers[0].keep
    last_seq, last_non = (torch.tensor(p.layers[-1].saliency, dtype=torch.float64) for p in (seq, non))
    assert (last_seq - last_non).abs().max() > 100 * _tolerance(model, last_non)


def test_paper_form_layer_by_layer_scores_the_first_layer_as_one_pass(dense):
    """sequential=true alone keeps REAP's paper form; the first layer sees the same inputs either way."""
    model, ids, mask = dense
    _, one_pass = planned_copy(model, method_cfg("reap"), ids, mask, ratio=0.5, batch_size=BATCH_SIZE)
    _, layerwise = planned_copy(model, method_cfg("reap", "method.sequential=true"), ids, mask, ratio=0.5,
                                batch_size=BATCH_SIZE)
    a, b = (torch.tensor(p.layers[0].saliency, dtype=torch.float64) for p in (one_pass, layerwise))
    torch.testing.assert_close(b, a, rtol=0, atol=_tolerance(model, a))
    assert one_pass.layers[0].keep == layerwise.layers[0].keep
    assert layerwise.info["settings"] == {"saliency_form": "paper", "sequential": True, "protect": "none"}


def test_tie_rules():
    score = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0])
    assert top_experts(score, 3, ties="higher") == [0, 2, 4]
    assert top_experts(score, 3) == top_experts(score, 3, ties="lower") == [0, 1, 2]
    # the official code's ranking, a reversed ascending argsort, where numpy's sort is stable
    assert sorted(np.argsort(score.numpy(), kind="stable")[::-1][:3].tolist()) == [0, 2, 4]
    with pytest.raises(ValueError, match="ties='middle'; valid: lower, higher"):
        top_experts(score, 3, ties="middle")


@pytest.mark.parametrize("base", ["reap", "freq"])
def test_official_presets_are_the_base_method_with_two_switches(base):
    plain, official = method_cfg(base), method_cfg(f"{base}_official")
    assert {k for k in official if official[k] != plain.get(k)} == {"name", "saliency_form", "sequential"}
    assert (official["saliency_form"], official["sequential"]) == ("official", True)
    assert get_method(f"{base}_official") is get_method(base)


@pytest.mark.parametrize("name", ["reap", "freq", "reap_official", "freq_official"])
def test_unknown_or_invalid_settings_are_refused(name):
    method = get_method(name)
    method.check(method_cfg(name), 8, 6)
    with pytest.raises(ConfigError, match=rf"unknown setting method.group_size \(method={name}\); "
                                          r"allowed: name, protect, saliency_form, sequential"):
        method.check(method_cfg(name, "+method.group_size=4"), 8, 6)
    with pytest.raises(ValueError, match="method.saliency_form='renormalised'; valid: paper, official"):
        method.check(method_cfg(name, "method.saliency_form=renormalised"), 8, 6)
    with pytest.raises(ConfigError, match="method.sequential='yes' must be true or false"):
        method.check(method_cfg(name, "method.sequential=yes"), 8, 6)
