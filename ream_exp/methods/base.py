"""What every method receives, and the shared step of pruning methods: keep the top-N' by score.

Pruning by a saliency (reap, freq) has two switches, `method.saliency_form` and `method.sequential`:

    paper, sequential=false (default)  one pass over the uncompressed model (`prune_plan`), ties: lower index
    official                           the official REAM code's score, floored like REAM's saliency (S = 0 ->
                                       min(0.5, smallest non-zero S)), ties: higher index first
    sequential=true                    each layer scored on the model whose earlier layers are already
                                       pruned, through the layer-wise driver (`layerwise_prune_plan`)

and every pruning method has `method.protect` (methods/protect.py): none, or super (REAP's super experts are
never removed). Scores from the weights alone (aimer, router_norm) prune through `weights_prune_plan`,
which reads no calibration token unless method.protect needs the observation; `weights_method` makes
such a method's functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..calib import calibration_batches
from ..moe import MoELayer, moe_layers, within_router_groups
from ..moe.offload import execution_device
from ..observe import LayerStats, load_cache_entry, load_stats, observe, save_stats
from ..plan import LayerPlan, Plan, experts_to_keep
from ..setting_types import settings_group
from .layerwise import run_layerwise
from .observation import Needs
from .merging import floor_zero_saliency
from .protect import PROTECT, protected_experts, protected_info
from .scores import layers_weight_scores
from .states import StatesConfig

# The switches of pruning by a saliency (reap, freq) and their defaults: the one-pass paper form, and
# method.protect (methods/protect.py): experts never removed.
PRUNE_DEFAULTS = dict(saliency_form="paper", sequential=False, protect="none")
SALIENCY_FORMS = ("paper", "official")
PRUNE_CHOICES = dict(saliency_form=SALIENCY_FORMS, protect=PROTECT)
# The one switch of pruning by a score from the weights alone (aimer, router_norm): method.protect.
WEIGHTS_DEFAULTS = dict(protect="none")
WEIGHTS_CHOICES = dict(protect=PROTECT)
TIE_RULES = ("lower", "higher")


@dataclass
class Context:
    """A compression job: the model, its calibration tokens and the settings of the method."""

    model: nn.Module
    calib: dict[str, torch.Tensor] | None
    ratio: float
    cfg: dict  # the method's config group
    seed: int = 0
    batch_size: int = 8
    progress: bool = True
    # Routing statistics of the uncompressed model depend only on model and tokens, not on the ratio:
    # pruning methods share them across ratios through this file (None = no cache).
    stats_path: Path | None = None
    states: StatesConfig = StatesConfig()  # where the layer-wise methods keep the calibration hidden states
    # model.stream=true: the methods.layer_stream.LayerStream that loads, writes and frees decoder layers
    # (the model is a meta skeleton); None: the model is in memory whole.
    stream: object | None = None
    # The checkpoint's multi-token-prediction layer (mtp_layers.MTPLayers), compressed as the last MoE layer;
    # None: it has none.
    mtp: object | None = None
    # budget=global: N'_l per MoE layer index, fixed before the method plans (methods/budget.py); None: every
    # layer keeps N - round(N * ratio) (budget=uniform)
    keep_counts: dict[int, int] | None = None
    _stats: dict[int, LayerStats] | None = field(default=None, repr=False)

    @property
    def layers(self) -> list[MoELayer]:
        """The MoE layers to compress: the decoder's, then the MTP layer's (`mtp`)."""
        return moe_layers(self.model) + (self.mtp.layers if self.mtp is not None else [])

    def n_keep(self, layer: MoELayer) -> int:
        if self.keep_counts is not None:
            return self.keep_counts[layer.index]
        return experts_to_keep(layer.num_experts, self.ratio)

    @property
    def n_batches(self) -> int:
        """Calibration batches of `batch_size` sequences (the official code averages its scores over them)."""
        return len(self.batches())

    def batches(self):
        if self.calib is None:
            raise ValueError(f"method {self.cfg.get('name')!r} needs calibration data, but none was built")
        return calibration_batches(self.calib, self.batch_size)

    def stats(self) -> dict[int, LayerStats]:
        """Routing statistics of the (uncompressed) model over the calibration tokens, observed once."""
        if self._stats is None and self.stats_path is not None:  # a damaged or stale entry is rebuilt
            device = execution_device(self.model.get_input_embeddings())  # not meta when offloaded
            self._stats = load_cache_entry(self.stats_path, lambda p: load_stats(p, device), "stats cache")
        if self._stats is not None and not {layer.index for layer in self.layers} <= set(self._stats):
            self._stats = None  # made without the MTP layer: observed again, with it
        if self._stats is None:
            if self.mtp is not None:
                self.mtp.load(self.model)
            self._stats = observe(self.model, self.batches(), progress=self.progress, mtp=self.mtp)
            if self.stats_path is not None:
                save_stats(self._stats, self.stats_path)
        return self._stats


def method_settings(cfg: dict, defaults: dict, choices: dict | None = None, label: str = "method",
                    specs: dict | None = None) -> dict:
    """A method's config with `defaults` filled in; unknown keys, choices and types are checked.

    Every key must be one of `defaults`; a key with `choices` must take one of them; a key whose default
    is a bool must be true or false, an int an integer (a None default allows null or an integer), a key in
    `specs` that Spec (a range, say). The rules are ream_exp.setting_types' (`settings_group`), which
    ream_exp.settings checks before anything is loaded.
    """
    method = cfg.get("name", label)
    settings_group(defaults, choices, method, specs).check_value(dict(cfg), "method", None,
                                                                 where=f"method={method}")
    return {**defaults, **{k: v for k, v in cfg.items() if k != "name"}}


def top_experts(score: torch.Tensor, n_keep: int, router_groups: int = 1, ties: str = "lower",
                protected=frozenset()) -> list[int]:
    """Indices of the n_keep highest scores, returned in ascending order; `protected` experts (method.protect,
    methods/protect.py) are kept first, whatever their scores.

    Among equal scores the lower index ranks first (ties="lower"), or the higher one (ties="higher"): the
    official REAM code ranks by np.argsort(S)[::-1], an ascending sort reversed, which puts the higher of
    two equal scores first wherever that sort keeps ties in index order (numpy's default sort does on small
    arrays, N <= 16; on larger ones the order of exact ties is unspecified, and ties="higher" is the
    reading of a stable sort). With a group-limited router (router_groups = n_group > 1) each router group
    keeps its own n_keep / n_group highest, so the same number is pruned from every group (moe/groups.py).
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties={ties!r}; valid: {', '.join(TIE_RULES)}")
    sign = 1 if ties == "lower" else -1

    def best(members: list[int], k: int) -> list[int]:
        if sum(i in protected for i in members) > k:
            raise ValueError(f"method.protect keeps {sum(i in protected for i in members)} of experts {members}, "
                             f"more than the {k} kept there; lower the ratio or set method.protect=none")
        return sorted(members, key=lambda i: (i not in protected, -float(score[i]), sign * i))[:k]

    return within_router_groups(len(score), n_keep, router_groups, best)


def prune_plan(ctx: Context, score_name: str, protect: str = "none") -> Plan:
    """Per layer, drop the N - N' experts with the lowest `score_name` saliency (docs/algorithms.md), the same number
    from each router group of a group-limited router, never one `protect` protects (methods/protect.py).

    A streamed model (ctx.stream) is observed layer by layer on the original layers' outputs, which sums
    exactly what the one-pass observation of the whole model sums."""
    protected = protected_experts(ctx, protect)
    if ctx.stream is not None:
        def plan_layer(layer, obs, n_keep, _timings):  # a LayerObservation is a LayerStats
            return _prune_layer(layer, obs, n_keep, score_name, protected.get(layer.index, set()))

        return Plan(ctx.cfg.get("name", score_name), ctx.ratio, run_layerwise(ctx, plan_layer, Needs(), False),
                    info=protected_info(protected))
    stats = ctx.stats()
    layers = [_prune_layer(layer, stats[layer.index], ctx.n_keep(layer), score_name, protected.get(layer.index, set()))
              for layer in ctx.layers]
    return Plan(ctx.cfg.get("name", score_name), ctx.ratio, layers, info=protected_info(protected))


def prune_settings(cfg: dict) -> dict:
    """The switches of a saliency-pruning method (reap, freq) with defaults filled in, every value checked."""
    return method_settings(cfg, PRUNE_DEFAULTS, PRUNE_CHOICES, str(cfg.get("name", "pruning")))


def check_prune_settings(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The `check` of a saliency-pruning method (reap, freq): unknown or invalid settings fail before any
    weights are loaded."""
    prune_settings(cfg)


def saliency_prune_plan(ctx: Context, score_name: str, layer_score) -> Plan:
    """reap / freq with their two switches: the one-pass `prune_plan` unless a switch is changed, else
    layer by layer with `layer_score(obs, saliency_form, ctx)` on each observed layer."""
    s = prune_settings(ctx.cfg)
    if s["saliency_form"] == "paper" and not s["sequential"]:
        return prune_plan(ctx, score_name, s["protect"])
    return layerwise_prune_plan(ctx, s, layer_score)


def layerwise_prune_plan(ctx: Context, s: dict, layer_score) -> Plan:
    """Per MoE layer, in order: observe it (on the pruned earlier layers when sequential), keep the top N'."""
    official = s["saliency_form"] == "official"
    protected = protected_experts(ctx, s.get("protect", "none"))

    def plan_layer(layer, obs, n_keep, _timings):
        score = layer_score(obs, s["saliency_form"], ctx)
        if official:  # the official code floors the saliency before it ranks, pruning or merging
            score = floor_zero_saliency(score)
        keep = top_experts(score, n_keep, layer.router_groups, ties="higher" if official else "lower",
                           protected=protected.get(layer.index, set()))
        scores = {"freq": obs.freq.tolist(), "reap": obs.reap_score.tolist(),
                  "reap_official": obs.sigma_score(2).tolist()}
        return LayerPlan(layer.index, layer.num_experts, keep, saliency=score.tolist(), scores=scores)

    layers = run_layerwise(ctx, plan_layer, Needs(), s["sequential"])
    return Plan(ctx.cfg.get("name", "prune"), ctx.ratio, layers, info={"settings": s, **protected_info(protected)})


def weights_prune_plan(ctx: Context, score_name: str, protect: str = "none") -> Plan:
    """Per layer, keep the N' experts with the highest weights-only score (methods/scores.py), never removing
    one `protect` protects. A streamed model's decoder layers are loaded one at a time to be scored."""
    protected = protected_experts(ctx, protect)
    stream = ctx.stream
    done = {layer.index for layer in ctx.layers if stream is not None and stream.done(layer.index)}
    plans = {i: stream.plan_of(i) for i in done}  # written by an earlier attempt of this run
    for layer, score, recorded in layers_weight_scores(ctx.layers, score_name, stream, skip=done):
        keep = top_experts(score, ctx.n_keep(layer), layer.router_groups, protected=protected.get(layer.index, set()))
        plans[layer.index] = LayerPlan(layer.index, layer.num_experts, keep, saliency=score.tolist(), scores=recorded)
    layers = [plans[layer.index] for layer in ctx.layers]
    return Plan(ctx.cfg.get("name", score_name), ctx.ratio, layers, info=protected_info(protected))


def weights_method(score_name: str, label: str):
    """`settings`, `check`, `needs_calibration` and `plan` of the method that prunes by the weights-only score
    `score_name` (methods/scores.py) with method.protect as its one switch; `label` names it where the config
    has no `name`. Its module takes WEIGHTS_DEFAULTS and WEIGHTS_CHOICES, and NEEDS_CALIBRATION = False."""

    def settings(cfg: dict) -> dict:
        return method_settings(cfg, WEIGHTS_DEFAULTS, WEIGHTS_CHOICES, label)

    def check(cfg: dict, num_experts: int, n_keep: int) -> None:
        """The settings, checked before any weights are loaded."""
        settings(cfg)

    def needs_calibration(cfg: dict) -> bool:
        """Calibration tokens only to find the experts method.protect protects."""
        return settings(cfg)["protect"] != "none"

    def plan(ctx: Context) -> Plan:
        return weights_prune_plan(ctx, score_name, settings(ctx.cfg)["protect"])

    return settings, check, needs_calibration, plan


def _prune_layer(layer: MoELayer, s: LayerStats, n_keep: int, score_name: str, protected=frozenset()) -> LayerPlan:
    score = s.score(score_name)
    keep = top_experts(score, n_keep, layer.router_groups, protected=protected)
    scores = {**s.to_dict(), score_name: score.tolist()}  # man, msan beside the routing scores
    return LayerPlan(layer.index, layer.num_experts, keep, saliency=score.tolist(), scores=scores)
