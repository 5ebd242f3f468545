"""How many experts each MoE layer keeps: the same ratio everywhere (`budget=uniform`) or one ranking of
every expert of the model (`budget=global`), docs/budgets.md.

    budget=uniform   N'_l = N_l - round(N_l * ratio) in every layer (today's rule, docs/algorithms.md)
    budget=global    s~_{l,i} = s_{l,i} / mean_j |s_{l,j}|      (the layer's score over its mean magnitude;
                                                                  a layer whose scores are all 0 scores 0)
                     remove R = sum_l (N_l - N'_l) experts, lowest s~ first, skipping an expert whose layer
                     would fall below top_k experts; ties: the lower layer first, in a layer the higher index

The scores s are the method's own (`BUDGET_SCORES`), read from one observation of the uncompressed model
(the statistics non-sequential pruning ranks by; a stats cache entry serves both). The counts are fixed
before the method plans; a sequential method then picks each layer's experts on the compressed earlier
layers with them. Greedy removal is optimal here: the removed set minimises sum s~ over sets of R experts
that leave every layer at least top_k (the floors make a partition matroid, where greedy is exact), which
tests/test_budget.py checks by brute force.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..plan import experts_to_keep
from .scores import WEIGHT_SCORES, layers_weight_scores

BUDGETS = ("uniform", "global")

# method name -> the LayerStats score (observe.py) its experts are ranked by under budget=global. A method
# not listed refuses budget=global before anything loads.
BUDGET_SCORES = {
    "freq": "freq", "freq_official": "freq",  # the official form's |X_i| per batch is freq times a constant
    "reap": "reap", "reap_official": "reap",  # paper form only: see budget_score
    "ean": "ean",
    "hc_smoe": "freq", "m_smoe": "freq",  # the frequencies their centroids and merge weights come from
    "man": "man", "msan": "msan",
    # weights-only: ranked as the method ranks them (AIMER's 1 / A_i), read from the weights, no calibration
    "aimer": "aimer", "router_norm": "router_norm",
}
REFUSED = {
    "none": "compresses nothing",
    "random": "has no score to rank experts by",
}
REAM_REFUSAL = "sets its group size C for one N' per ratio (model.group_size), not per layer"


def budget_score(method_cfg: dict) -> str:
    """The score `method_cfg`'s method ranks experts across layers by; a one-line ConfigError where
    budget=global cannot serve it."""
    name = method_cfg.get("name")
    supported = ", ".join(sorted(BUDGET_SCORES))
    if name in REFUSED:
        raise ConfigError(f"budget=global: method={name} {REFUSED[name]}; budget=global supports {supported}")
    if name not in BUDGET_SCORES:
        why = REAM_REFUSAL if str(name).startswith("ream") else "has no score to rank experts across layers by"
        raise ConfigError(f"budget=global: method={name} {why}; budget=global supports {supported}")
    if name.startswith("reap") and method_cfg.get("saliency_form", "paper") == "official":
        raise ConfigError(f"budget=global: method={name} with method.saliency_form=official ranks by a saliency "
                          "observed layer by layer only; use method.saliency_form=paper")
    return BUDGET_SCORES[name]


def normalised(score: torch.Tensor) -> torch.Tensor:
    """s / mean |s| over the layer's experts (float64): a scale-free score, comparable across layers."""
    s = score.double()
    scale = s.abs().mean()
    return s / scale if scale > 0 else torch.zeros_like(s)


def uniform_counts(num_experts: dict[int, int], ratio: float) -> dict[int, int]:
    """N'_l of every layer at `ratio`, the same rule in each (budget=uniform)."""
    return {layer: experts_to_keep(n, ratio) for layer, n in num_experts.items()}


def global_counts(scores: dict[int, torch.Tensor], ratio: float, top_k: int) -> dict[int, int]:
    """N'_l per layer under budget=global: as many experts removed in all as `uniform_counts` removes,
    the lowest normalised scores first, no layer below top_k (see the module doc)."""
    num = {layer: len(s) for layer, s in scores.items()}
    total = sum(n - k for n, k in zip(num.values(), uniform_counts(num, ratio).values()))
    order = sorted(((float(v), layer, -i) for layer, s in scores.items() for i, v in enumerate(normalised(s))))
    keep = dict(num)
    removed = 0
    for _value, layer, _neg_index in order:
        if removed == total:
            break
        if keep[layer] > top_k:
            keep[layer] -= 1
            removed += 1
    if removed != total:  # only if uniform itself broke the floor, which check_expert_counts refuses
        raise ValueError(f"budget=global: cannot remove {total} experts keeping top_k={top_k} in every layer")
    return keep


def global_removed(scores: dict[int, torch.Tensor], ratio: float, top_k: int) -> dict[int, list[int]]:
    """The experts budget=global's ranking removes, per layer (for tests and the docs: the methods choose
    their own experts with the counts)."""
    num = {layer: len(s) for layer, s in scores.items()}
    counts = global_counts(scores, ratio, top_k)
    order = sorted(((float(v), layer, -i) for layer, s in scores.items() for i, v in enumerate(normalised(s))))
    out: dict[int, list[int]] = {layer: [] for layer in scores}
    for _value, layer, neg_index in order:
        if len(out[layer]) < num[layer] - counts[layer]:
            out[layer].append(-neg_index)
    return {layer: sorted(v) for layer, v in out.items()}


def allot(ctx) -> dict[int, int]:
    """budget=global's N'_l for the job `ctx` (a methods.Context): its method's score on the uncompressed
    model's one-pass statistics (ctx.stats(), shared with non-sequential pruning and its cache), or, for a
    weights-only score, on the layers' weights (no calibration token read)."""
    name = budget_score(ctx.cfg)
    if name in WEIGHT_SCORES:
        scores = {layer.index: score.cpu() for layer, score, _ in layers_weight_scores(ctx.layers, name)}
    else:
        stats = ctx.stats()
        scores = {layer.index: stats[layer.index].score(name).cpu() for layer in ctx.layers}
    return global_counts(scores, ctx.ratio, ctx.layers[0].top_k)


def budget_info(ctx, counts: dict[int, int]) -> dict:
    """What plan.json records of a global budget: the rule, the score and N'_l per layer."""
    return {"budget": "global", "score": budget_score(ctx.cfg), "layer_experts": {str(k): v for k, v in counts.items()}}


def check_budget(cfg, model_config=None) -> str:
    """The run's budget; for budget=global a one-line ConfigError, before any weights load, where the
    method or the settings (and, given its config, the model) cannot serve it."""
    budget = cfg.get("budget", "uniform")
    if budget == "uniform":
        return budget
    from omegaconf import OmegaConf

    from ..moe import family_for

    budget_score(OmegaConf.to_container(cfg.method, resolve=True))
    if cfg.model.get("stream"):
        raise ConfigError("budget=global needs every layer's score before any layer is compressed, and the "
                          "streamed run writes each layer as it goes: set model.stream=false")
    if cfg.eval.get("backend") == "vllm":
        raise ConfigError("budget=global: vLLM does not load per-layer expert counts; set eval.backend=hf")
    family = family_for(model_config) if model_config is not None else None
    if family is not None and family.group_score_experts and family.n_group > 1:
        raise ConfigError(f"budget=global: the group-limited router (n_group={family.n_group}) keeps the same number "
                          "of experts in each of its groups; use budget=uniform")
    return budget
