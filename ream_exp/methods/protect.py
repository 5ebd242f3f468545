"""`method.protect`: experts kept out of every removal and merge (docs/algorithms.md, "Protected experts").

    none   (default) nothing is protected
    super  REAP's super experts: with m_{l,i} = max(0, the largest entry of E_i(x) over the tokens routed
           to expert i of MoE layer l) on the uncompressed model, and tau = max(99.5th percentile of every
           m_{l,i} of the model, max m / 10), expert i of layer l is super when m_{l,i} > tau and l is among
           the first floor(0.75 L) of the L MoE layers

A protected expert is never removed by a pruning method (it is kept whatever its score) and never merged
by a merging method (it is its own group of one, and no other expert joins it); the other experts share
the N' - |protected| remaining places or groups. The maxima come from the one-pass observation of the
uncompressed model (Context.stats, as REAP observes it), also for methods that observe layer by layer.
"""

from __future__ import annotations

import torch

from ..config import ConfigError

PROTECT = ("none", "super")
QUANTILE = 0.995  # REAP's percentile of the maxima
PEAK_FRACTION = 10  # ... or the largest maximum over this, whichever is higher
LAYER_SHARE = 0.75  # super experts are looked for in the first floor(0.75 L) MoE layers
STREAMED = ("method.protect=super needs every MoE layer's statistics at once; model.stream=true observes one "
            "layer at a time: set model.stream=false or method.protect=none")


def super_experts(peaks: dict[int, torch.Tensor]) -> dict[int, list[int]]:
    """{layer index: its super experts} from every MoE layer's maxima m_{l,i} (all layers have N experts)."""
    layers = sorted(peaks)
    m = torch.stack([peaks[i].double().cpu() for i in layers])  # [L, N]
    tau = max(float(torch.quantile(m.flatten(), QUANTILE)), float(m.max()) / PEAK_FRACTION)
    eligible = layers[: int(len(layers) * LAYER_SHARE)]
    return {i: torch.nonzero(m[layers.index(i)] > tau).flatten().tolist() for i in eligible}


def protected_experts(ctx, mode: str) -> dict[int, set[int]]:
    """{layer index: protected experts} of a Context under method.protect = mode (empty for none)."""
    if mode == "none":
        return {}
    if ctx.stream is not None:
        raise ConfigError(STREAMED)
    return {i: set(e) for i, e in super_experts({i: s.peak for i, s in ctx.stats().items()}).items()}


def protected_info(protected: dict[int, set[int]]) -> dict:
    """What plan.json's info records of the protected experts: {"protected": {layer: experts}}, nothing when
    method.protect is none (plans without it stay as they were)."""
    return {"protected": {str(i): sorted(e) for i, e in sorted(protected.items())}} if protected else {}


def check_protect(values: dict) -> None:
    """Before any load (ream_exp.settings, with every group's values): method.protect=super with
    model.stream=true is refused (see protected_experts)."""
    method, model = values.get("method"), values.get("model")
    if isinstance(method, dict) and isinstance(model, dict) and method.get("protect", "none") != "none" \
            and model.get("stream") is True:
        raise ConfigError(STREAMED)


def keep_apart(form, protected: set[int], layer_index: int):
    """A grouping `form(members, k)` (merging.groups_per_router_group's) in which each protected member is a
    group of one and the other members make the k - (protected members) other groups."""
    if not protected:
        return form

    def grouped(members: list[int], k: int) -> list[list[int]]:
        own = [p for p, e in enumerate(members) if e in protected]
        rest = [p for p, e in enumerate(members) if e not in protected]
        if len(own) > k or (rest and len(own) == k):
            raise ValueError(f"layer {layer_index}: method.protect keeps {len(own)} experts of {len(members)} "
                             f"apart, but only {k} groups are kept; lower the ratio or set method.protect=none")
        local = form([members[p] for p in rest], k - len(own)) if rest else []
        return [[p] for p in own] + [[rest[i] for i in group] for group in local]

    return grouped
