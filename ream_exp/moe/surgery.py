"""The one place that changes a model: apply a plan (merge, then slice) to the MoE layers.

Removing experts slices every tensor indexed by expert (fused expert weights and biases, router rows,
router bias, DeepSeek-V3's e_score_correction_bias, a correction bias kept on the block; the family lists
them, moe/discover.py) and updates every expert count (every config key holding it, the attributes of
block, router and experts module caching it, the causal-LM wrapper), so `save_pretrained` writes a
checkpoint that stock transformers reloads with N' experts. Router rows past the routed experts (zero-
compute or shared experts) are kept, after the kept experts. Group-limited routers keep n_group and
topk_group: plans keep N'/n_group experts of each router group, in group order (moe/groups.py), and
surgery refuses any other.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..plan import LayerPlan, Plan
from .families import config_value, family_for, set_config_value
from .groups import grouped_keep_problem, router_group_problem
from .layers import MoELayer, canonical_weights, moe_layers, write_canonical_weights
from .merge_ops import merge_tensor
from .offload import materialised


# Expert-indexed tensors at least this large are sliced in place where they can be (`_keep_rows_in_place`).
IN_PLACE_MIN_BYTES = 1 << 20
_MADV_DONTNEED = 4  # Linux


def _slice_expert_dim(module: nn.Module, keep: torch.Tensor, n: int) -> None:
    """Index dim 0 of every direct parameter/buffer of `module` that has one entry per expert.

    A large parameter that owns its CPU memory alone keeps its rows in place (`_keep_rows_in_place`): no
    second copy at all. Any other is indexed by a tensor (a copy); each original is dropped as soon as its
    copy replaces it, smallest first, so a layer's largest tensor and its kept rows are the most held at once."""
    params = [k for k, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == n]
    for name in sorted(params, key=lambda k: getattr(module, k).numel()):
        requires_grad = getattr(module, name).requires_grad
        kept = _keep_rows_in_place(module, name, keep)
        if kept is None:
            kept = getattr(module, name).data[keep]
        setattr(module, name, nn.Parameter(kept, requires_grad=requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() >= 1 and b.shape[0] == n:
            module._buffers[name] = b[keep]


def _keep_rows_in_place(module: nn.Module, name: str, keep: torch.Tensor) -> torch.Tensor | None:
    """Rows `keep` (increasing) of parameter `name` moved to its first rows, and the memory of the rows
    after them handed back to the operating system (madvise MADV_DONTNEED on their whole pages): the kept
    rows as a view of the parameter's own memory, the same values as indexing copies. None (nothing
    changed) unless the parameter is a contiguous CPU tensor of at least IN_PLACE_MIN_BYTES on Linux
    that owns its memory alone (torch's allocation, not a mapped file's; no other tensor, view or
    reference shares it: moving rows must change nothing anyone else can see)."""
    import ctypes
    import sys

    p = module._parameters[name]
    k = len(keep)
    storage = p.untyped_storage()
    if (not sys.platform.startswith("linux") or p.device.type != "cpu" or not p.is_contiguous()
            or p.storage_offset() != 0 or storage.nbytes() != p.numel() * p.element_size()
            or storage.nbytes() < IN_PLACE_MIN_BYTES or not storage.resizable() or k == 0
            or torch._C._storage_Use_Count(storage._cdata) != 2  # the parameter and `storage`
            or sys.getrefcount(p) != _lone_refcount() + 1  # module._parameters and `p`, nothing else
            or _madvise() is None):
        return None
    rows = keep.tolist()
    if any(b <= a for a, b in zip(rows, rows[1:])) or rows[0] < 0 or rows[-1] >= p.shape[0]:
        return None
    del storage
    data = p.data
    with torch.no_grad():
        for i, e in enumerate(rows):  # e >= i and increasing: row e is read before any write reaches it
            if e != i:
                data[i].copy_(data[e])
    kept = data[:k]
    page = _page_size()
    start = -(-(data.data_ptr() + kept.numel() * data.element_size()) // page) * page
    end = (data.data_ptr() + data.numel() * data.element_size()) // page * page
    if end > start:
        _madvise()(ctypes.c_void_p(start), end - start, _MADV_DONTNEED)  # on failure the pages merely stay
    return kept


def _lone_refcount() -> int:
    """What sys.getrefcount says of an object held by one local variable alone (interpreters differ)."""
    import sys

    lone = object()
    return sys.getrefcount(lone)


@functools.cache
def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice), or None where it cannot be had."""
    import ctypes
    import ctypes.util

    try:
        f = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    f.restype = ctypes.c_int
    return f


def _slice_named(module: nn.Module, name: str, dim: int, keep: list[int]) -> None:
    """Index `dim` of the (dotted) tensor `name` of `module` by `keep`."""
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    t = getattr(owner, leaf)
    idx = torch.as_tensor(keep, dtype=torch.long, device=t.device)
    if isinstance(t, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(t.data.index_select(dim, idx).clone(), requires_grad=t.requires_grad))
    else:
        owner._buffers[leaf] = t.index_select(dim, idx).clone()


def keep_experts(layer: MoELayer, keep: list[int]) -> None:
    """Keep only experts `keep` (in that order) in this layer's experts module, router and block.

    A group-limited router keeps n_group and topk_group: `keep` must leave each router group N'/n_group
    of its own experts, in group order (see moe/groups.py), else this raises before changing anything."""
    n = layer.num_experts
    check_router_groups_kept(layer, keep)
    family = layer.family
    _slice_expert_dim(layer.experts, torch.as_tensor(keep, dtype=torch.long, device=layer.experts.down_proj.device), n)
    tail = list(range(n, n + family.router_rows - family.num_experts))  # rows past the routed experts
    for module, tensors in ((layer.router, family.router_tensors), (layer.block, family.block_tensors)):
        for name, dim, size in tensors:
            _slice_named(module, name, dim, list(keep) + (tail if size != family.num_experts else []))
    for name in family.cached:  # counts the block, router and experts module cache: n -> N', n + Z -> N' + Z
        path, _, leaf = name.rpartition(".")
        owner = layer.block.get_submodule(path) if path else layer.block
        setattr(owner, leaf, getattr(owner, leaf) - (n - len(keep)))


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
def merge_group(layer: MoELayer, group: list[int], weights: list[float], perms: dict[int, list[int]] | None,
                merge: dict | None = None) -> None:
    """W_centroid <- sum_j w_j P_j(W_j) in float32 (docs/algorithms.md REAM 5); group[0] is the centroid.

    `merge` (a plan's {"op": name, **settings}; None: the weighted average above) merges the aligned members
    by another operator of docs/algorithms.md, "Merge operators" (moe/merge_ops.py)."""
    w = canonical_weights(layer.experts, group)
    coef = torch.tensor(weights, dtype=torch.float32, device=w["up"].device)
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
        if merge is not None:
            merged[name] = merge_tensor(t, weights, merge)
            continue
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
                merge_group(layer, group, weights, lp.perms, lp.merge)
            if slices:
                keep_experts(layer, lp.keep)
    lp.applied = True


def update_expert_counts(model: nn.Module, n: int) -> None:
    """Write the new expert count into every config key holding it and the causal-LM wrapper's cache."""
    cfg = model.config
    keys = family_for(cfg).count_keys
    old = config_value(cfg, keys[0])
    old = max(old) if isinstance(old, (list, tuple)) else old
    for key in keys:
        set_config_value(cfg, key, old, n)
    if hasattr(model, "num_experts"):
        model.num_experts = n


# config.json key of per-layer expert counts (budget=global, docs/budgets.md): one entry per decoder layer, null
# for a layer without routed experts. The family's count keys hold the largest count.
LAYER_EXPERTS_KEY = "ream_exp_layer_experts"


def layer_expert_counts(config) -> list[int | None] | None:
    """The per-layer routed-expert counts a per-layer-budget checkpoint's config records, else None."""
    return getattr(config.get_text_config(), LAYER_EXPERTS_KEY, None)


def record_layer_experts(model: nn.Module) -> None:
    """Where the MoE layers keep different numbers of experts: the largest count in the family's count keys
    and every layer's in LAYER_EXPERTS_KEY (stock transformers builds every layer with the config's one count,
    so it cannot load such a checkpoint; ream_exp.load_compressed can)."""
    layers = moe_layers(model)
    counts = {layer.index: layer.num_experts for layer in layers}
    update_expert_counts(model, max(counts.values()))
    if len(set(counts.values())) > 1:
        n_layers = layers[0].family.num_layers or max(counts) + 1
        setattr(model.config.get_text_config(), LAYER_EXPERTS_KEY, [counts.get(i) for i in range(n_layers)])


def apply_plan(model: nn.Module, plan: Plan, extra: list[MoELayer] = ()) -> None:
    """Apply every layer of `plan`. The model's MoE layers may end with different expert counts (a per-layer
    budget), which the config records (`record_layer_experts`); `extra` (a multi-token-prediction layer's, held
    beside the model) must end with the count of every other layer, as its checkpoint keys share the config's."""
    by_index = {layer.index: layer for layer in moe_layers(model) + list(extra)}
    for lp in plan.layers:
        apply_layer_plan(by_index[lp.layer], lp)
    counts = {layer.num_experts for layer in moe_layers(model) + list(extra)}
    if extra and len(counts) != 1:
        raise ValueError(f"MoE layers ended with different expert counts {sorted(counts)} beside a "
                         "multi-token-prediction layer; its plans must be uniform")
    record_layer_experts(model)
