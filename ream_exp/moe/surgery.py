"""The one place that changes a model: apply a plan (merge, then slice) to the MoE layers.

Removing experts slices every tensor indexed by expert (fused expert weights and biases, router rows,
router bias, DeepSeek-V3's e_score_correction_bias) and updates every expert count (config, router,
experts module, the causal-LM wrapper), so `save_pretrained` writes a checkpoint that stock
transformers reloads with N' experts. Group-limited routers keep n_group and topk_group: plans keep
N'/n_group experts of each router group, in group order (moe/groups.py), and surgery refuses any other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..plan import LayerPlan, Plan
from .groups import grouped_keep_problem, router_group_problem
from .layers import MoELayer, canonical_weights, moe_layers, write_canonical_weights
from .offload import materialised


def _slice_expert_dim(module: nn.Module, keep: torch.Tensor, n: int) -> None:
    """Index dim 0 of every direct parameter/buffer of `module` that has one entry per expert.

    Indexing by a tensor copies; each original is dropped as soon as its copy replaces it, smallest first, so
    a layer's largest tensor and its kept rows are the most held at once (a streamed run's peak)."""
    params = [k for k, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == n]
    for name in sorted(params, key=lambda k: getattr(module, k).numel()):
        requires_grad = getattr(module, name).requires_grad
        setattr(module, name, nn.Parameter(getattr(module, name).data[keep], requires_grad=requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() >= 1 and b.shape[0] == n:
            module._buffers[name] = b[keep]


def keep_experts(layer: MoELayer, keep: list[int]) -> None:
    """Keep only experts `keep` (in that order) in this layer's experts module and router.

    A group-limited router keeps n_group and topk_group: `keep` must leave each router group N'/n_group
    of its own experts, in group order (see moe/groups.py), else this raises before changing anything."""
    n = layer.num_experts
    check_router_groups_kept(layer, keep)
    idx = torch.as_tensor(keep, dtype=torch.long, device=layer.router.weight.device)
    for module in (layer.experts, layer.router):
        _slice_expert_dim(module, idx, n)
        if hasattr(module, "num_experts"):
            module.num_experts = len(keep)


def _router_group_problem(layer: MoELayer, keep: list[int], groups: list[list[int]]) -> str | None:
    size = layer.num_experts // layer.router_groups
    for group in groups:
        if len({e // size for e in group}) > 1:
            return f"merge group {group} spans router groups of {size} experts"
    return grouped_keep_problem(keep, layer.num_experts, layer.router_groups) or router_group_problem(
        layer.num_experts, len(keep), layer.router_groups, int(layer.router.topk_group), layer.top_k,
        layer.family.group_score_experts)


def check_router_groups_kept(layer: MoELayer, keep: list[int], groups: list[list[int]] = ()) -> None:
    """Raise when `keep` or a merge group would break the layer's group-limited routing (a plan made
    without the router's groups); a no-op for other routers."""
    if layer.router_groups == 1:
        return
    problem = _router_group_problem(layer, keep, groups)
    if problem is not None:
        raise ValueError(f"layer {layer.index}: the plan keeps experts {keep} of {layer.num_experts}, which breaks "
                         f"group-limited routing (n_group={layer.router_groups}): {problem}")


@torch.no_grad()
def merge_group(layer: MoELayer, group: list[int], weights: list[float], perms: dict[int, list[int]] | None) -> None:
    """W_centroid <- sum_j w_j P_j(W_j) in float32 (docs/algorithms.md REAM 5); group[0] is the centroid."""
    w = canonical_weights(layer.experts, group)
    coef = torch.tensor(weights, dtype=torch.float32, device=w["gate"].device)
    merged = {}
    for name, t in w.items():
        if t is None:
            merged[name] = None
            continue
        t = t.float().clone()
        for j, member in enumerate(group):
            if perms and member in perms and name != "down_bias":
                p = torch.as_tensor(perms[member], device=t.device)
                # neurons are rows of gate/up, columns of down, entries of gate/up biases
                t[j] = t[j][:, p] if name == "down" else t[j][p]
        shape = (-1,) + (1,) * (t.dim() - 1)
        merged[name] = (coef.view(shape) * t).sum(0, keepdim=True)
    write_canonical_weights(layer.experts, [group[0]], merged)


def apply_layer_plan(layer: MoELayer, lp: LayerPlan) -> None:
    """Merge, then slice, in place; offloaded experts/router get the result as their offloaded weights."""
    if lp.applied:
        return
    if layer.num_experts != lp.num_experts:
        raise ValueError(f"layer {lp.layer}: plan expects {lp.num_experts} experts, model has {layer.num_experts}")
    pairs = zip(lp.groups, lp.merge_weights) if lp.groups is not None else []
    merges = [(g, w) for g, w in pairs if len(g) > 1]
    slices = len(lp.keep) != lp.num_experts or lp.keep != sorted(lp.keep)
    if merges or slices:
        check_router_groups_kept(layer, lp.keep, [g for g, _ in merges])  # before any weight changes
        with materialised([layer.experts, layer.router], write_back=True):
            for group, weights in merges:
                merge_group(layer, group, weights, lp.perms)
            if slices:
                keep_experts(layer, lp.keep)
    lp.applied = True


def update_expert_counts(model: nn.Module, n: int) -> None:
    """Write the new expert count into the config and every module attribute that caches it."""
    layers = moe_layers(model)
    cfg = model.config
    setattr(cfg, layers[0].family.count_key, n)
    if hasattr(model, "num_experts"):
        model.num_experts = n


def apply_plan(model: nn.Module, plan: Plan) -> None:
    """Apply every layer of `plan`; all MoE layers end with the same expert count."""
    by_index = {layer.index: layer for layer in moe_layers(model)}
    for lp in plan.layers:
        apply_layer_plan(by_index[lp.layer], lp)
    counts = {layer.num_experts for layer in moe_layers(model)}
    if len(counts) != 1:
        raise ValueError(f"MoE layers ended with different expert counts {sorted(counts)}; plans must be uniform")
    update_expert_counts(model, counts.pop())
