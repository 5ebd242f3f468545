"""Expert scores beyond REAP's and frequency: from the weights alone, and gate-free activation norms.

docs/algorithms.md, "Scores without calibration data" and "Gate-free activation norms":

    aimer        A_i = mean|w| / sqrt(mean w^2) over every entry w of expert i's gate, up and down weight
                 matrices (AIMER, arXiv 2603.18492); a high A_i marks an expert as removable, so the
                 importance ranked here is 1 / A_i (>= 1): keeping the highest 1 / A_i keeps the lowest A_i
    router_norm  ||W_router[i, :]||_2, the L2 norm of expert i's router row
    man          mean_{X_i} ||E_i(x)||     (MAN, arXiv 2606.15716: gate-free, averaged over routed tokens)
    msan         mean_{X_i} ||E_i(x)||^2   (MSAN, same paper)

`aimer` and `router_norm` read the weights only, no calibration token; `man` and `msan` are sums the
observation keeps (observe.LayerStats). `saliency(name, layer, obs)` is the one dispatch of a score name
to the values a method ranks by (higher is kept), for pruning and for REAM's and M-SMoE's groupings.
"""

from __future__ import annotations

import torch

from ..moe import MoELayer, canonical_weights
from ..moe.offload import materialised

# Scores a method can rank experts by (method.saliency), and which of them need no calibration data.
ACTIVATION_SCORES = ("reap", "freq", "man", "msan")
WEIGHT_SCORES = ("aimer", "router_norm")
SALIENCIES = ACTIVATION_SCORES + WEIGHT_SCORES
# Experts' weights read at once in float64 by `aimer_ratio` (a bound on its memory, not on its result).
AIMER_CHUNK = 8


@torch.no_grad()
def aimer_ratio(layer: MoELayer) -> torch.Tensor:
    """A_i = (sum|w| / n) / sqrt(sum w^2 / n) over the n entries of expert i's gate, up and down matrices
    (up and down for ungated experts; biases are not weights of the criterion), in float64 [N].
    An expert whose weights are all zero gets A_i = 0, as the AIMER code scores it."""
    ratios = []
    for s in range(0, layer.num_experts, AIMER_CHUNK):
        idx = list(range(s, min(s + AIMER_CHUNK, layer.num_experts)))
        w = canonical_weights(layer.experts, idx)
        mats = [w[k].double().flatten(1) for k in ("gate", "up", "down") if w[k] is not None]
        n = sum(m.shape[1] for m in mats)
        mean_abs = sum(m.abs().sum(1) for m in mats) / n
        rms = (sum(m.square().sum(1) for m in mats) / n).sqrt()
        ratios.append(torch.where(rms > 0, mean_abs / rms.clamp(min=torch.finfo(torch.float64).tiny), 0.0))
    return torch.cat(ratios).cpu()


def aimer_importance(layer: MoELayer, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """1 / A_i (from `ratio`, A_i, when given): ranks as AIMER's ascending A_i (the experts AIMER keeps score
    highest); an all-zero expert (A_i = 0) ranks last."""
    a = aimer_ratio(layer) if ratio is None else ratio
    return torch.where(a > 0, 1 / a.clamp(min=torch.finfo(torch.float64).tiny), 0.0)


def router_weight(layer: MoELayer) -> torch.Tensor:
    """The router's weight matrix with one row per routed expert [N, H] (rows past them dropped)."""
    tensors = dict(layer.router.named_parameters()) | dict(layer.router.named_buffers())
    for name, dim, _size in layer.family.router_tensors:
        if dim == 0 and tensors[name].dim() == 2:  # not a [1, E] bias (dim 1)
            return tensors[name][: layer.num_experts]
    raise ValueError(f"layer {layer.index}: no 2-D router weight among {layer.family.router_tensors}")


@torch.no_grad()
def router_norm(layer: MoELayer) -> torch.Tensor:
    """||W_router[i, :]||_2 in float64 [N]."""
    return router_weight(layer).double().norm(dim=1).cpu()


def weight_score(name: str, layer: MoELayer) -> torch.Tensor:
    """A score of WEIGHT_SCORES as ranked (higher is kept)."""
    return {"aimer": aimer_importance, "router_norm": router_norm}[name](layer)


def saliency(name: str, layer: MoELayer, stats) -> torch.Tensor:
    """The values `name` ranks layer's experts by (higher is kept): a weights-only score from the layer, an
    activation score from its observed statistics (observe.LayerStats); reap is REAP's paper form."""
    if name in WEIGHT_SCORES:
        return weight_score(name, layer).to(stats.count.device) if stats is not None else weight_score(name, layer)
    return stats.score(name)


def ranked_and_recorded(name: str, layer: MoELayer) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """A weights-only score as ranked, and what plan.json records of it (AIMER: its own A_i, not 1 / A_i)."""
    if name == "aimer":
        ratio = aimer_ratio(layer)
        return aimer_importance(layer, ratio), {"aimer": ratio.tolist()}
    score = weight_score(name, layer)
    return score, {name: score.tolist()}


def layers_weight_scores(layers: list[MoELayer], name: str, stream=None, skip=frozenset()):
    """(layer, score as ranked, what plan.json records) for each layer not in `skip` (indices), in order: the
    weights-only score `name` of its weights, materialised where offloaded; with a `stream`
    (methods.layer_stream), each layer is loaded to be scored and released after."""
    for layer in layers:
        if layer.index in skip:
            continue
        if stream is not None:
            stream.load(layer.index)
        with materialised([layer.experts, layer.router]):
            score, recorded = ranked_and_recorded(name, layer)
        if stream is not None:
            stream.release(layer.index)
        yield layer, score, recorded
