"""Per-layer routing statistics from one streaming pass over the calibration tokens (SPEC 2).

During observation each experts module runs a forward that does the model's own work (every routed
token through its top-k experts with the model's kernel, weighted by the routing weights the model
applies) and accumulates, for the non-pad tokens X_i routed to expert i:

    count_i = |X_i|                   soft_i = sum_{X_i} g_i(x)
    ean_i   = sum_{X_i} ||E_i(x)||    reap_i = sum_{X_i} g_i(x) ||E_i(x)||

No expert runs on a token that was not routed to it, so observing costs about one forward pass.
Memory is one float64 vector per statistic and layer, whatever the number of tokens.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_torch_save
from .moe import MoELayer, moe_layers


@dataclass
class LayerStats:
    """Running sums for one MoE layer (float64, on the layer's device)."""

    num_experts: int
    device: torch.device | str = "cpu"
    tokens: int = 0  # |X|: non-pad tokens seen
    count: torch.Tensor = field(init=False)
    soft: torch.Tensor = field(init=False)
    ean: torch.Tensor = field(init=False)
    reap: torch.Tensor = field(init=False)

    def __post_init__(self):
        for name in ("count", "soft", "ean", "reap"):
            setattr(self, name, torch.zeros(self.num_experts, dtype=torch.float64, device=self.device))

    # SPEC 2, one property per score
    @property
    def freq(self) -> torch.Tensor:
        return self.count / max(self.tokens, 1)

    @property
    def soft_freq(self) -> torch.Tensor:
        return self.soft.clone()

    @property
    def ean_score(self) -> torch.Tensor:
        return self.ean.clone()

    @property
    def reap_score(self) -> torch.Tensor:
        """Mean over routed tokens of g_i(x) ||E_i(x)||; experts never routed score 0."""
        return torch.where(self.count > 0, self.reap / self.count.clamp(min=1), torch.zeros_like(self.reap))

    def score(self, name: str) -> torch.Tensor:
        return {"freq": self.freq, "soft_freq": self.soft_freq, "ean": self.ean_score, "reap": self.reap_score}[name]

    def state(self) -> dict:
        return {"tokens": self.tokens, **{k: getattr(self, k).cpu() for k in ("count", "soft", "ean", "reap")}}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "LayerStats":
        stats = cls(len(state["count"]), device, int(state["tokens"]))
        for k in ("count", "soft", "ean", "reap"):
            setattr(stats, k, state[k].to(device=device, dtype=torch.float64))
        return stats

    def to_dict(self) -> dict[str, list[float]]:
        return {k: self.score(k).tolist() for k in ("freq", "soft_freq", "ean", "reap")}


class _TokenMask:
    """The flattened attention mask of the batch in flight, shared by every observed layer."""

    value: torch.Tensor | None = None


def _observing_forward(layer: MoELayer, stats: LayerStats, mask: _TokenMask):
    """The layer's own experts kernel, run once per (token, top-k slot) with weight 1.

    That yields every routed E_i(x) unweighted, from whatever kernel the model uses (eager, grouped_mm,
    ...), at the cost of the model's own expert compute; we then weight and sum them as the model does.
    """
    experts = layer.experts
    kernel = type(experts).forward

    def forward(self, hidden_states, top_k_index, top_k_weights):
        t, k = top_k_index.shape
        rows = torch.arange(t, device=hidden_states.device).repeat_interleave(k)
        slot_index = top_k_index.reshape(-1, 1)
        ones = torch.ones_like(top_k_weights.reshape(-1, 1))
        y = kernel(self, hidden_states[rows], slot_index, ones)  # [t*k, H] = E_{i(t,k)}(x_t)
        out = (y.view(t, k, -1) * top_k_weights[..., None].to(y.dtype)).sum(1).to(hidden_states.dtype)
        # statistics without boolean indexing (no host sync): pads enter with weight 0
        valid = mask.value[rows].double() if mask.value is not None else torch.ones(t * k, device=y.device,
                                                                                       dtype=torch.float64)
        e = slot_index.reshape(-1)
        norms = torch.linalg.vector_norm(y, dim=-1).double() * valid
        w = top_k_weights.reshape(-1).double() * valid
        stats.count.index_add_(0, e, valid)
        stats.soft.index_add_(0, e, w)
        stats.ean.index_add_(0, e, norms)
        stats.reap.index_add_(0, e, w * norms)
        stats.tokens += int(mask.value.sum()) if mask.value is not None else t
        return out

    return types.MethodType(forward, experts)


@contextlib.contextmanager
def observing(model: nn.Module, layers: list[MoELayer] | None = None):
    """Within the block, forwards of `model` fill and the context yields {layer index: LayerStats}."""
    layers = layers if layers is not None else moe_layers(model)
    mask = _TokenMask()
    stats = {layer.index: LayerStats(layer.num_experts, layer.router.weight.device) for layer in layers}
    for layer in layers:
        layer.experts.forward = _observing_forward(layer, stats[layer.index], mask)
    try:
        yield stats, mask
    finally:
        for layer in layers:
            del layer.experts.forward  # back to the class's forward


def save_stats(stats: dict[int, LayerStats], path) -> None:
    """Write atomically, so a killed run never leaves a half-written cache entry behind."""
    atomic_torch_save({i: s.state() for i, s in stats.items()}, path)


def load_stats(path, device="cpu") -> dict[int, LayerStats]:
    return {int(i): LayerStats.from_state(s, device) for i, s in torch.load(path, weights_only=True).items()}


@torch.no_grad()
def observe(model: nn.Module, batches, progress: bool = True) -> dict[int, LayerStats]:
    """Stream calibration `batches` (dicts with input_ids, attention_mask) through the model once."""
    device = next(model.parameters()).device
    with observing(model) as (stats, mask):
        for batch in tqdm(batches, desc="observe", disable=not progress, leave=False):
            ids = batch["input_ids"].to(device)
            attn = batch["attention_mask"].to(device)
            mask.value = attn.reshape(-1).bool()
            model(input_ids=ids, attention_mask=attn, use_cache=False)
    return stats
