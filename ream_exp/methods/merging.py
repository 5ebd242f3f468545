"""The pieces merging methods share: saliency floor, expert similarity, grouping, neuron alignment.

Each function is one formula of docs/algorithms.md (REAM, HC-SMoE, M-SMoE) and works on one MoE layer:

    floor_zero_saliency(S)                          S_i = 0 -> min(0.5, smallest non-zero S)      (4.1)
    output_similarity(means), logit_distance(gram)  delta_E, d(i, j) of the router-logit columns   (4.2)
    ream_distance(means, gram, gate_output)         1 - (delta_E + delta_g) / 2                    (4.2)
    group_by_pseudo_pruning(S, dist, N', C)         centroids = top-N', greedy groups of size C    (4.3)
    average_linkage(features, N')                   HC-SMoE's clustering                           (5)
    centred_clusters(features, N')                  its clusters, each led by the member nearest the mean
    groups_per_router_group(layer, N', form)        any grouping above, within each router group
    align_groups(layer, groups, x, mode)            neuron permutations by linear_sum_assignment   (4.4)
    merge_layer_plan(...)                           the LayerPlan: groups, weights, perms          (4.5)
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..config import ConfigError
from ..moe import MoELayer, activated, canonical_weights, experts_products
from ..moe.groups import group_members, per_group
from ..plan import LayerPlan
from ..timing import Timings
from .observation import work_block
from .scratch import scratch, spent

ALIGN_MODES = ("both", "activations", "weights", "none")
# Elements of the aligned members' activations alive at once on a CPU, gate and up ([k, T, I] each; ~256 MB in
# float32): a group's members are computed in one call when they fit, else block by block. On a GPU the free
# memory bounds it (observation.work_block): there an activation rounds each element alike whatever the block.
ALIGN_BLOCK = 1 << 26
# torch.cdist computes |a|^2 + |b|^2 - 2 a.b by one matrix product when a side has more rows than this.
CDIST_MM_ROWS = 25


# ---- saliency (4.1) ------------------------------------------------------------------------------

def floor_zero_saliency(s: torch.Tensor) -> torch.Tensor:
    """Experts with S_i = 0 get min(0.5, smallest non-zero S), so they can still be merged."""
    s = s.double().clone()
    nonzero = s[s > 0]
    floor = min(0.5, float(nonzero.min())) if nonzero.numel() else 0.5
    s[s <= 0] = floor
    return s


def normalized_weights(score: torch.Tensor, group: list[int]) -> list[float]:
    """w_j = score_j / sum score over the group (uniform when the group's scores are all zero)."""
    s = score.double()[group]
    total = float(s.sum())
    return (s / total).tolist() if total > 0 else [1.0 / len(group)] * len(group)


# ---- similarity (4.2) ----------------------------------------------------------------------------

def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    r = F.normalize(rows.double(), dim=1)
    return r @ r.T


def output_similarity(mean_outputs: torch.Tensor) -> torch.Tensor:
    """delta_E(i, j) = (cos(mean o_i, mean o_j) + 1) / 2."""
    return (cosine_matrix(mean_outputs) + 1) / 2


def logit_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine between the router-logit columns, from their Gram matrix G^T G."""
    norm = gram.diagonal().clamp(min=0).sqrt().clamp(min=1e-300)
    return gram / norm[:, None] / norm[None, :]


def logit_distance(gram: torch.Tensor) -> torch.Tensor:
    """d(i, j) = || g_i/|g_i| - g_j/|g_j| ||, the Euclidean distance of the L2-normalised logit columns."""
    d = (2 - 2 * logit_cosine(gram)).clamp(min=0).sqrt()
    d.fill_diagonal_(0)
    return d


def ream_distance(mean_outputs: torch.Tensor, gram: torch.Tensor, gate_output: bool = True) -> torch.Tensor:
    """distance = 1 - (delta_E + delta_g) / 2, delta_g = 1 - d / max d; 1 - delta_E when delta_g is off."""
    delta_e = output_similarity(mean_outputs)
    if not gate_output:
        return 1 - delta_e
    d = logit_distance(gram)
    dmax = float(d.max())
    delta_g = 1 - d / dmax if dmax > 0 else torch.ones_like(d)
    return 1 - (delta_e + delta_g) / 2


# ---- grouping (4.3) --------------------------------------------------------------------------------

def ranked(score: torch.Tensor) -> list[int]:
    """Experts by descending score (ties: lower index first)."""
    values = score.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def check_group_size(num_experts: int, n_keep: int, group_size: int) -> None:
    """N' groups of at most C members must hold all N experts (C = 0: no limit)."""
    if group_size < 0:
        raise ConfigError(f"method.group_size must be >= 0 (0 = each expert joins its nearest centroid), "
                          f"got {group_size}")
    if group_size and n_keep * group_size < num_experts:
        raise ConfigError(f"group_size={group_size}: {n_keep} groups of at most {group_size} experts cannot hold "
                          f"{num_experts} experts; use method.group_size >= {-(-num_experts // n_keep)} or 0")


def group_by_pseudo_pruning(saliency: torch.Tensor, distance: torch.Tensor, n_keep: int,
                            group_size: int) -> list[list[int]]:
    """Groups (centroid first), in descending centroid saliency.

    Centroids are the n_keep most salient experts. C > 0: in descending saliency each centroid takes its
    nearest not-yet-assigned non-centroid experts until its group has C members, until none is left.
    C = 0: each non-centroid joins its single nearest centroid (MC-SMoE grouping).
    """
    n = len(saliency)
    check_group_size(n, n_keep, group_size)
    order = ranked(saliency.cpu())
    centroids, others = order[:n_keep], order[n_keep:]
    dist = distance.double().cpu().tolist()
    groups = {c: [c] for c in centroids}
    if group_size == 0:
        for j in others:
            best = min(range(n_keep), key=lambda r: (dist[centroids[r]][j], r))
            groups[centroids[best]].append(j)
        return [groups[c] for c in centroids]
    left = set(others)
    for c in centroids:
        if not left:
            break
        take = sorted(left, key=lambda j: (dist[c][j], j))[: group_size - 1]
        groups[c] += take
        left -= set(take)
    return [groups[c] for c in centroids]


def groups_per_router_group(layer: MoELayer, n_keep: int, form) -> list[list[int]]:
    """Merge groups that never leave a router group: `form(members, k)` groups one router group's experts
    (members: their indices, to index the layer's statistics with) into k = N'/n_group groups, given as
    positions in members. A layer without a group-limited router is one group of all its experts."""
    groups = []
    for members in group_members(layer.num_experts, layer.router_groups):
        local = form(members, per_group(n_keep, layer.router_groups))
        groups += [[members[i] for i in group] for group in local]
    return groups


# ---- HC-SMoE clustering (5) --------------------------------------------------------------------------

def average_linkage(features: torch.Tensor, n_clusters: int) -> list[list[int]]:
    """Agglomerative clustering with average linkage on Euclidean distances, stopped at n_clusters.

    Repeatedly joins the two closest clusters (ties: lowest pair of cluster ids); the distance of a new
    cluster follows Lance-Williams: d(k, a+b) = (n_a d(k, a) + n_b d(k, b)) / (n_a + n_b).
    """
    x = features.double().cpu()
    d = torch.cdist(x, x).numpy()
    n = len(d)
    np.fill_diagonal(d, np.inf)
    members = {i: [i] for i in range(n)}
    while len(members) > n_clusters:
        a, b = np.unravel_index(np.argmin(d), d.shape)
        a, b = min(a, b), max(a, b)
        na, nb = len(members[a]), len(members[b])
        merged = (na * d[a] + nb * d[b]) / (na + nb)
        d[a, :], d[:, a] = merged, merged
        d[a, a] = np.inf
        d[b, :], d[:, b] = np.inf, np.inf
        members[a] += members.pop(b)
    return [sorted(m) for m in members.values()]


def closest_to_mean(features: torch.Tensor, cluster: list[int]) -> int:
    """The member whose features are closest (Euclidean) to the cluster's mean (ties: lower index)."""
    f = features.double()[cluster]
    dist = (f - f.mean(0)).norm(dim=1)
    return cluster[int(torch.argmin(dist))]


def centred_clusters(features, n_clusters: int) -> list[list[int]]:
    """Average-linkage clusters of the experts' features, each led by its member closest to the mean."""
    groups = []
    for cluster in average_linkage(features, n_clusters):
        rep = closest_to_mean(features, cluster)
        groups.append([rep] + [j for j in cluster if j != rep])
    return groups


# ---- neuron alignment (4.4) --------------------------------------------------------------------------

def weight_features(layer: MoELayer, experts: list[int] | None = None, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Per neuron p: [gate row p | up row p | down column p], [k, I, 3H] in float32 (all experts by default);
    [up row p | down column p], [k, I, 2H], for ungated experts. `out`: written there (its shape)."""
    # every expert: views of the parameters, so the float32 features are the stage's only copy of the layer
    w = canonical_weights(layer.experts, slice(None) if experts is None else experts)
    parts = [p for p in (w["gate"], w["up"], w["down"].transpose(1, 2)) if p is not None]  # no gate: ungated
    up = w["up"]
    feats = out if out is not None else torch.empty(*up.shape[:2], len(parts) * up.shape[2], dtype=torch.float32,
                                                    device=up.device)
    for k, part in enumerate(parts):
        feats[..., k * part.shape[2]:(k + 1) * part.shape[2]] = part  # one float32 copy, no cat
    return feats


def feature_shape(layer: MoELayer) -> tuple[tuple[int, int, int], torch.device]:
    """The shape of weight_features(layer), [N, I, 3H] (ungated: 2H), and the device of the layer's experts."""
    w = canonical_weights(layer.experts, slice(None))  # views: no memory
    up = w["up"]
    return (*up.shape[:2], sum(p is not None for p in (w["gate"], w["up"], w["down"])) * up.shape[2]), up.device


@contextlib.contextmanager
def in_memory(layer: MoELayer):
    """The default `spill` of pca_weight_features: the layer keeps its experts; one block of all of them."""
    yield [range(layer.num_experts)]


def layer_features(layer: MoELayer, blocks, shape, device) -> torch.Tensor:
    """weight_features(layer) for every expert (`shape` and `device`: feature_shape(layer)), filled block by block:
    while `blocks` yields range(a, b), the layer's experts module holds experts a..b-1 (all of them, or only those:
    a spill, see pca_weight_features). The features live in the scratch buffer "pca.features" (scratch.py): a run's
    layers reuse it, and a lean pool frees it once the PCA is done (`pca_weight_features`)."""
    feats = scratch("pca.features", shape, torch.float32, device)
    for block in blocks:
        weight_features(layer, out=feats[block.start:block.stop])
    return feats


def reduce_features(feats: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Neuron features [N, I, W] (normalised and centred in place) reduced by the seeded PCA: [N, I, q]."""
    n, i, width = feats.shape
    x = feats.reshape(n * i, width)
    x.div_(x.norm(dim=1, keepdim=True).clamp(min=1e-12))  # in place: this matrix is the stage's peak memory
    x.sub_(x.mean(0, keepdim=True))
    q = min(dim, *x.shape)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        _, s, v = torch.pca_lowrank(x, q=q, center=False)
    z = F.normalize((x @ v[:, :q]) * s[:q], dim=1)
    return z.reshape(n, i, q)


def pca_weight_features(layer: MoELayer, dim: int, seed: int, spill=None) -> torch.Tensor:
    """Row-normalised neuron features, centred over the layer's neurons, reduced by a seeded randomised
    PCA (torch.pca_lowrank, q = dim), projected as X V diag(s) and L2-normalised again: [N, I, q].

    The random projection comes from the device's generator, so CPU and CUDA runs can differ slightly.
    `spill(layer)`: a context manager yielding the expert blocks the features are built from (layer_features);
    a streamed run's (layer_stream.LayerStream.spilled) frees the layer's experts while the features are alive,
    builds them from the experts read back a block at a time and reads the experts back whole once the features
    are freed: the features and the experts are never in memory together. The same values, so the same z.
    """
    shape, device = feature_shape(layer)
    with (spill or in_memory)(layer) as blocks:
        feats = layer_features(layer, blocks, shape, device)
        z = reduce_features(feats, dim, seed)
        del feats
        spent("pca.")  # before the spill reads the experts back
    return z


def pca_seed(settings: dict, run_seed: int) -> int:
    """The seed of the alignment PCA: method.pca_seed when set, else the run seed.

    The official REAM code seeds this PCA with 0 whatever its --seed (ream_official sets pca_seed: 0), so
    a seed sweep of that preset varies only what the official code varies: the sampled tokens.
    """
    seed = settings.get("pca_seed")
    return int(run_seed if seed is None else seed)


def unit_neuron_rows(a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each neuron's activations over the tokens (a [T, I] -> [I, T], a view of [T, I] memory), L2-normalised as
    F.normalize does (a / max(||a||, 1e-12)), the norm the square root of a float32 sum of squares over the tokens
    (a contiguous reduction: torch's norm kernel reduces an outer dimension elementwise, ~9x slower). Written into
    `out` ([T, I] float32) when given."""
    a = a.float()
    out = torch.empty_like(a) if out is None else out
    norm = torch.mul(a, a, out=out).sum(0).sqrt_().clamp_min_(1e-12)
    return torch.div(a, norm, out=out).T


def _cdist_side(a: torch.Tensor, centroid: bool) -> torch.Tensor:
    """One expert's operand of torch.cdist's matrix-product form, built once per expert in the scratch buffer
    "align.side.centroid" or "align.side.member" (valid until the next of its kind): its unit neuron rows u as
    [T+2, I] rows [-2 u; |u|^2; 1] (centroid) or [u; 1; |u|^2] (member), so that side_c^T side_j =
    |u_c|^2 + |u_j|^2 - 2 u_c.u_j in cdist's own arithmetic (its |u|^2, from the same rows, too)."""
    t, i = a.shape
    side = scratch(f"align.side.{'centroid' if centroid else 'member'}", (t + 2, i), torch.float32, a.device)
    u = unit_neuron_rows(a, out=side[:t])
    sq = u.pow(2).sum(-1)
    if centroid:
        side[:t].mul_(-2)
    sq_row, one_row = (t, t + 1) if centroid else (t + 1, t)
    side[sq_row] = sq
    side[one_row] = 1
    return side


def _kept_count(kept) -> int:
    return 0 if kept is None else kept.count


def _block_hidden(experts, block: list[int], x: torch.Tensor, kept, name: str = "members") -> torch.Tensor:
    """experts_hidden(experts, x, block)'s bits [len(block), T, I]: the products of the experts the observing pass
    kept (below _kept_count(kept); observation.KeptProducts) taken from `kept`, the others' computed, the activation
    applied to the block. The result lives in the scratch buffers `name` (scratch.py): valid until the next call
    with that name."""
    n = _kept_count(kept)
    todo = [j for j in block if j >= n]
    if len(todo) == len(block):
        return activated(experts, experts_products(experts, x, block, out=_align_buffer(name, x)))
    computed = experts_products(experts, x, todo, out=_align_buffer(f"{name}.computed", x)) if todo else None
    products = []
    for p in range(kept.parts):
        held = kept.blocks[0][p]
        out = scratch(f"align.{name}.{p}", (len(block), *kept.shape(p)), held.dtype, held.device)
        for i, j in enumerate(block):
            if j < n:
                kept.expert(p, j, out=out[i])
            else:
                out[i] = computed[p][todo.index(j)]
        products.append(out)
    return activated(experts, tuple(products))


def _align_buffer(name: str, x: torch.Tensor):
    """Where the alignment writes the gate and up products of `name` (scratch.py)."""
    return lambda p, shape: scratch(f"align.{name}.{p}", shape, x.dtype, x.device)


def _hidden(experts, e: int, x: torch.Tensor, kept) -> torch.Tensor:
    """expert_hidden(experts, e, x)'s bits [T, I], from the kept products when expert e's were kept (in the scratch
    buffers "centroid": valid until the next centroid's)."""
    if e < _kept_count(kept):
        return _block_hidden(experts, [e], x, kept, "centroid")[0]
    return activated(experts, experts_products(experts, x, slice(e, e + 1), out=_align_buffer("centroid", x)))[0]


def activation_costs(experts, c: int, members: list[int], x: torch.Tensor, kept=None):
    """(member, cost [I, I]) for each member: cdist between the centroid's and the member's neuron activations
    on the tokens x, each neuron's row L2-normalised over the tokens (docs/algorithms.md, REAM 4).

    Each expert's activations are computed (from the products the observing pass kept where it did, `kept`,
    observation.KeptActivations), normalised and laid out once (the centroid's for all its members, the
    members' in blocks of ALIGN_BLOCK elements); each cost is one product of cdist's own shape, so the costs
    are the bits torch.cdist gives (bit-equal costs keep near-tied assignments as they were; one product for all
    members can round otherwise under a multi-threaded BLAS).
    """
    a_c = _hidden(experts, c, x, kept)
    width = a_c.shape[1]
    if width <= CDIST_MM_ROWS:  # cdist's exact form, for a tiny width
        u_c = unit_neuron_rows(a_c)
        for j in members:
            yield j, torch.cdist(u_c, unit_neuron_rows(_hidden(experts, j, x, kept)))
        return
    side_c = _cdist_side(a_c, centroid=True).T
    per_block = max(1, work_block(x.device, ALIGN_BLOCK, 4) // (2 * a_c.numel()))  # gate and up alive at once
    for s in range(0, len(members), per_block):
        block = members[s:s + per_block]
        for j, a_j in zip(block, _block_hidden(experts, block, x, kept)):
            yield j, (side_c @ _cdist_side(a_j, centroid=False)).clamp_min_(0).sqrt_()


def match_neurons(cost: torch.Tensor) -> list[int]:
    """perm[p] = the member neuron matched to centroid neuron p (minimum total cost)."""
    rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm.tolist()


@torch.no_grad()
def align_groups(layer: MoELayer, groups: list[list[int]], x: torch.Tensor | None, mode: str,
                 pca_dim: int = 64, seed: int = 0, timings: Timings | None = None,
                 take_kept=None, spill=None) -> dict[int, list[int]]:
    """Permutation of every non-centroid member's neurons onto its centroid's (docs/algorithms.md REAM 4).

    cost = cdist(normalised activations on tokens x) ("activations") + cdist(PCA weight features)
    ("weights"); "both" sums them, "none" aligns nothing. `timings` gets the PCA's time as "pca" and the
    assignments' (scipy's linear_sum_assignment, on the CPU) as "hungarian". `take_kept()` hands over the
    products before the activation on x of the first experts, as observing computed them
    (LayerObservation.take_align_hidden); with the PCA, every activation cost ([I, I] per member) is computed
    first and those products freed before the PCA's float32 copy of the layer, so the two are never alive together;
    `spill`: how the PCA holds the layer's experts meanwhile (pca_weight_features; None: in memory).
    """
    if mode not in ALIGN_MODES:
        raise ConfigError(f"method.align={mode!r}; valid: {', '.join(ALIGN_MODES)}")
    if mode == "none" or all(len(g) == 1 for g in groups):
        return {}
    use_act, use_w = mode in ("both", "activations"), mode in ("both", "weights")
    if use_act and (x is None or x.shape[0] == 0):
        raise ValueError("activation alignment needs the MoE inputs of the alignment tokens")
    timings = timings if timings is not None else Timings()
    kept = take_kept() if take_kept is not None else None  # the only reference: freed when spent
    z, act = None, {}
    if use_w:
        if use_act:
            for group in groups:
                if len(group) > 1:
                    act.update(activation_costs(layer.experts, group[0], group[1:], x, kept))
            kept = None  # spent: not alive with the PCA's features (in a lean pool, their buffers too)
            spent("kept.")
            spent("align.")
        with timings("pca"):
            z = pca_weight_features(layer, pca_dim, seed, spill)
    perms = {}
    for group in groups:
        if len(group) == 1:
            continue
        c, members = group[0], group[1:]
        if act or not use_act:
            costs = ((j, act.pop(j, 0)) for j in members)
        else:
            costs = activation_costs(layer.experts, c, members, x, kept)
        for j, cost in costs:
            if use_w:
                cost = cost + torch.cdist(z[c], z[j])
            with timings("hungarian"):
                perms[j] = match_neurons(cost)
    return perms


@torch.no_grad()
def weight_matching(layer: MoELayer, groups: list[list[int]]) -> dict[int, list[int]]:
    """M-SMoE's alignment: Hungarian on the weight rows, maximising sum_p <w_c[p], w_j[perm p]> over
    [gate row | up row | down column] of each neuron (weight matching, no normalisation, no PCA)."""
    perms = {}
    for group in groups:
        if len(group) == 1:
            continue
        feats = weight_features(layer, group).double()
        for k, j in enumerate(group[1:], start=1):
            perms[j] = match_neurons(-(feats[0] @ feats[k].T))
    return perms


# ---- the plan (4.5) --------------------------------------------------------------------------------

def merge_layer_plan(layer: MoELayer, groups: list[list[int]], weight_score: torch.Tensor,
                     perms: dict[int, list[int]], saliency: torch.Tensor, scores: dict,
                     merge: dict | None = None) -> LayerPlan:
    """Groups ordered by centroid index; keep[i] = centroid of groups[i]; w = score / group sum; `merge`: the
    operator that merges them (None: the weighted average; methods/compose.py)."""
    groups = sorted(groups, key=lambda g: g[0])
    keep = [g[0] for g in groups]
    return LayerPlan(
        layer.index, layer.num_experts, keep, groups=[list(map(int, g)) for g in groups],
        merge_weights=[normalized_weights(weight_score, g) for g in groups], centroids=list(keep),
        saliency=saliency.double().tolist(), scores=scores, perms=perms or None, merge=merge,
    )
