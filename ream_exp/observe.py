"""Per-layer routing statistics from one streaming pass over the calibration tokens (docs/algorithms.md).

During observation each experts module runs a forward that does the model's own work (every routed
token through its top-k experts with the model's kernel, weighted by the routing weights the model
applies) and accumulates, for the non-pad tokens X_i routed to expert i:

    count_i = |X_i|                   soft_i = sum_{X_i} g_i(x)
    ean_i   = sum_{X_i} ||E_i(x)||    reap_i = sum_{X_i} g_i(x) ||E_i(x)||
    sq_i    = sum_{X_i} ||E_i(x)||^2  peak_i = max(0, max_{X_i} max_h E_i(x)_h)   (MSAN; super experts)

No expert runs on a token that was not routed to it, so observing costs about one forward pass.
Memory is one float64 vector per statistic and layer, whatever the number of tokens.

`observing_experts` is the project's one observing experts forward: it hands each forward's routed
pairs (expert, unweighted output, applied weight, token row) to a statistics sink. `LayerStats` is the
one accumulator of the sums above: `observing` fills one per MoE layer in a single pass, and the
layer-wise driver's `LayerObservation` (methods/observation.py) extends it, layer by layer. Norms are
float64 norms of the outputs cast to float64; pads and a kernel's "no expert" slots never count; nothing
syncs with the host per batch. It wraps the module's forward as it was (accelerate's offloading hooks
included) and restores it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_torch_save
from .cache_meta import StaleEntry, made_by, report_stale, require_current
from .moe import MoELayer, moe_layers
from .moe.mtp import mtp_token_mask
from .moe.offload import execution_device

# The version of the code that computes the routing statistics (the observing forward, LayerStats' sums),
# recorded in every stats cache entry: bump it when a change here changes the numbers (docs/caches.md).
# 2: sq and peak (MSAN, super experts) join the sums.
STATS_VERSION = 2
# The sums of LayerStats, one float64 vector [N] each (a state entry holds them and `tokens`).
SUMS = ("count", "soft", "ean", "reap", "sq", "peak")


@dataclass
class LayerStats:
    """The routing sums of one MoE layer over the non-pad calibration tokens X (float64, on the layer's device)."""

    num_experts: int
    device: torch.device | str = "cpu"
    tokens: int = 0  # |X|: non-pad tokens seen (a device tensor while observing, an int after `finish`)
    count: torch.Tensor = field(init=False)  # |X_i|
    soft: torch.Tensor = field(init=False)  # sum_{X_i} g_i          (g = routing weight applied)
    ean: torch.Tensor = field(init=False)  # sum_{X_i} ||E_i||
    reap: torch.Tensor = field(init=False)  # sum_{X_i} g_i ||E_i||
    sq: torch.Tensor = field(init=False)  # sum_{X_i} ||E_i||^2
    peak: torch.Tensor = field(init=False)  # max(0, largest entry of E_i(x) over X_i): REAP's max activation

    def __post_init__(self):
        for name in SUMS:
            setattr(self, name, torch.zeros(self.num_experts, dtype=torch.float64, device=self.device))

    # docs/algorithms.md, one property per score
    @property
    def freq(self) -> torch.Tensor:
        return self.count / max(self.tokens, 1)

    @property
    def soft_freq(self) -> torch.Tensor:
        return self.soft.clone()

    @property
    def ean_score(self) -> torch.Tensor:
        return self.ean.clone()

    def _mean_routed(self, total: torch.Tensor) -> torch.Tensor:
        """total_i / |X_i|: a mean over the tokens routed to expert i; experts never routed get 0."""
        return torch.where(self.count > 0, total / self.count.clamp(min=1), torch.zeros_like(total))

    @property
    def reap_score(self) -> torch.Tensor:
        """Paper/REAP form: mean over X_i of g_i(x) ||E_i(x)||, g the weight the model applies."""
        return self._mean_routed(self.reap)

    @property
    def man_score(self) -> torch.Tensor:
        """MAN: mean over X_i of ||E_i(x)|| (no routing weight); experts never routed get 0."""
        return self._mean_routed(self.ean)

    @property
    def msan_score(self) -> torch.Tensor:
        """MSAN: mean over X_i of ||E_i(x)||^2 (no routing weight); experts never routed get 0."""
        return self._mean_routed(self.sq)

    def score(self, name: str) -> torch.Tensor:
        scores = {"freq": lambda: self.freq, "soft_freq": lambda: self.soft_freq, "ean": lambda: self.ean_score,
                  "reap": lambda: self.reap_score, "man": lambda: self.man_score, "msan": lambda: self.msan_score}
        return scores[name]()

    def state(self) -> dict:
        return {"tokens": self.tokens, **{k: getattr(self, k).cpu() for k in SUMS}}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "LayerStats":
        stats = cls(len(state["count"]), device, int(state["tokens"]))
        for k in SUMS:
            setattr(stats, k, state[k].to(device=device, dtype=torch.float64))
        return stats

    def to_dict(self) -> dict[str, list[float]]:
        return {k: self.score(k).tolist() for k in ("freq", "soft_freq", "ean", "reap")}

    def add(self, routed: "Routed") -> None:
        """Accumulate one forward's routed pairs; the token count stays a device tensor until `finish`."""
        e, norms, w = routed.expert, routed.norms, routed.kept(routed.weight)
        self.count.index_add_(0, e, routed.keep.double())
        self.soft.index_add_(0, e, w)
        self.ean.index_add_(0, e, norms)
        self.reap.index_add_(0, e, w * norms)
        self.sq.index_add_(0, e, norms * norms)
        self.peak.scatter_reduce_(0, e, routed.kept(routed.y.amax(dim=-1)), "amax")  # 0 where not kept
        self.tokens = self.tokens + routed.valid.sum()

    def finish(self) -> None:
        self.tokens = int(self.tokens)  # one host sync per layer, after every batch


class _TokenMask:
    """The flattened attention mask of the batch in flight, shared by every observed layer."""

    value: torch.Tensor | None = None


# ---- the one observing experts forward --------------------------------------------------------------

@dataclass
class Routed:
    """One forward's routed (token, top-k slot) pairs at an experts module, flattened to P = T*k pairs."""

    x: torch.Tensor  # [T, H] tokens entering the experts module
    valid: torch.Tensor  # [T] bool: non-pad tokens
    row: torch.Tensor  # [P] token row of each pair
    expert: torch.Tensor  # [P] expert index, clamped into range (a "no expert" slot is not kept)
    y: torch.Tensor  # [P, H] unweighted expert output E_e(x), in the kernel's dtype
    weight: torch.Tensor  # [P] routing weight the model applies to y
    keep: torch.Tensor  # [P] bool: a non-pad token routed to a real expert

    @functools.cached_property
    def norms(self) -> torch.Tensor:
        """||E_e(x)|| in float64, computed from y in float64 (not in the model dtype), 0 where not kept;
        computed once per forward, however many sums read it."""
        return torch.where(self.keep, self.y.double().norm(dim=-1), 0.0)

    def kept(self, values: torch.Tensor) -> torch.Tensor:
        """`values` [P] in float64, 0 for pairs not kept: sums over pairs never see pads (no host sync)."""
        return torch.where(self.keep, values.double(), 0.0)


def _observing_forward(inner, num_experts: int, sink, token_mask, zero_compute: bool = False):
    """An experts forward that runs `inner` (the module's forward as it was, hooks included) once per
    (token, top-k slot) with weight 1, hands the unweighted outputs to `sink` and returns the model's output.

    The model's own kernel (eager, grouped_mm, ...) thus yields every routed E_e(x) at the cost of the
    model's expert compute. The output is the model's up to the order of float32 sums: the weighted
    outputs are added per token in slot order (eager kernels add them in expert order; the last bit may
    differ). Kernels mark a slot that routes nowhere with an index >= num_experts and give it output 0;
    it is never counted. With `zero_compute` (a block whose zero-compute experts, LongCat-Flash's, hand their
    slots to real experts with weight 0) a slot of weight 0 routes nowhere either.
    """
    def forward(hidden_states, top_k_index, top_k_weights):
        t, k = top_k_index.shape
        rows = torch.arange(t, device=hidden_states.device).repeat_interleave(k)
        idx = top_k_index.reshape(-1)
        repeated = hidden_states[:, None].expand(t, k, hidden_states.shape[-1]).reshape(t * k, -1)  # = [rows]
        y = inner(repeated, idx[:, None], torch.ones_like(top_k_weights.reshape(-1, 1)))
        w = top_k_weights.reshape(-1).to(y.device)
        out = torch.zeros_like(hidden_states).index_add_(0, rows, (y * w[:, None].to(y.dtype)).to(hidden_states.dtype))
        valid = token_mask()
        valid = torch.ones(t, dtype=torch.bool, device=y.device) if valid is None else valid.to(y.device)
        real = idx < num_experts
        if zero_compute:
            real = real & (w != 0)
        sink(Routed(hidden_states, valid, rows, torch.where(real, idx, 0), y, w, valid[rows] & real))
        return out

    return forward


@contextlib.contextmanager
def replaced_forward(modules, make_forward):
    """Within the block, each module's `forward` is make_forward(i, module), made while module.forward is
    still the one it had; on exit each module gets back its instance forward (e.g. accelerate's hook, which
    loads offloaded weights) or, without one, its class's."""
    saved = [m.__dict__.get("forward") for m in modules]
    for i, m in enumerate(modules):
        m.forward = make_forward(i, m)
    try:
        yield
    finally:
        for m, old in zip(modules, saved):
            if old is None:
                del m.forward
            else:
                m.forward = old


def zero_compute(layer: MoELayer) -> bool:
    """Whether the layer's router has rows past its routed experts whose slots reach the experts with weight 0."""
    return layer.family.router_rows > layer.num_experts


@contextlib.contextmanager
def observing_experts(experts: nn.Module, num_experts: int, sink, token_mask, zero_compute: bool = False):
    """Within the block, every forward of `experts` also calls sink(Routed) for the batch in flight;
    `token_mask()` gives that batch's flattened non-pad mask (None: every token counts); `zero_compute`:
    see `_observing_forward` (`zero_compute(layer)`).

    The observing forward wraps whatever forward the module has (an accelerate hook's instance wrapper,
    which loads offloaded weights, or the class's), and that very forward is restored on exit.
    """
    with replaced_forward([experts], lambda _i, m: _observing_forward(m.forward, num_experts, sink, token_mask,
                                                                      zero_compute)):
        yield


@contextlib.contextmanager
def observing(model: nn.Module, layers: list[MoELayer] | None = None):
    """Within the block, forwards of `model` fill and the context yields {layer index: LayerStats}."""
    layers = layers if layers is not None else moe_layers(model)
    mask = _TokenMask()
    stats = {layer.index: LayerStats(layer.num_experts, execution_device(layer.router)) for layer in layers}
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(observing_experts(layer.experts, layer.num_experts, stats[layer.index].add,
                                                  lambda: mask.value, zero_compute(layer)))
        yield stats, mask
    for s in stats.values():
        s.finish()


def stats_made_by() -> dict:
    """What makes a stats cache entry now (cache_meta.made_by): this module's STATS_VERSION."""
    return made_by({"observe": STATS_VERSION})


def save_stats(stats: dict[int, LayerStats], path) -> None:
    """Write atomically, so a killed run never leaves a half-written cache entry behind; the entry records
    what made it ({"made_by": stats_made_by(), "layers": {layer: state}})."""
    atomic_torch_save({"made_by": stats_made_by(), "layers": {i: s.state() for i, s in stats.items()}}, path)


STATE_KEYS = ("tokens", *SUMS)


def load_stats(path, device="cpu") -> dict[int, LayerStats]:
    """The saved statistics; raises StaleEntry when other code made them (or the entry does not say),
    another exception when the file is unreadable or an entry lacks a statistic."""
    saved = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(saved, dict):
        require_current(saved.get("made_by"), stats_made_by())
    layers = saved.get("layers") if isinstance(saved, dict) else None
    if not isinstance(layers, dict) or not all(isinstance(s, dict) and set(STATE_KEYS) <= set(s)
                                               for s in layers.values()):
        raise ValueError(f"missing entries (expected {{layers: {{layer: {{{', '.join(STATE_KEYS)}}}}}}})")
    return {int(i): LayerStats.from_state(s, device) for i, s in layers.items()}


def load_cache_entry(path, load, cache: str = "statistics cache"):
    """`load(path)`, or None when there is no entry, it is damaged (torch.load fails, keys are missing) or
    other code made it (`load` raises cache_meta.StaleEntry).

    A damaged entry (e.g. truncated by a full disk) is reported, deleted and so recomputed by the caller,
    like every cache of the project: it is never trusted and never makes later runs fail. A stale one is
    reported in one log line naming `cache`, the file and what differed, and recomputed (then overwritten).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except StaleEntry as exc:
        report_stale(cache, path, exc)
        return None
    except Exception as exc:
        warnings.warn(f"ignoring unreadable statistics cache {path}: {type(exc).__name__}: {exc}; "
                      "deleting it, it is recomputed")
        path.unlink(missing_ok=True)
        return None


def decoder_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the model without its output head: statistics need the decoder layers' work, never the
    [B, S, vocab] logits (1-2.5 GB per batch of 8 x 512 tokens at a 152k vocabulary).

    The decoder is `model.model`, the module holding the decoder layer list (see `moe.decoder_layers`);
    the CausalLM forward calls it with these same arguments, so the hidden states are the same bits.
    """
    decoder = getattr(model, "model", model)
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


@torch.no_grad()
def observe(model: nn.Module, batches, progress: bool = True, mtp=None) -> dict[int, LayerStats]:
    """Stream calibration `batches` (dicts with input_ids, attention_mask) through the model once.

    With `mtp` (mtp_layers.MTPLayers) its MTP layer is observed too, after each forward, on the decoder's
    output (the last hidden states after the final norm) and the next tokens' embeddings; its positions
    count where a token and the next one are both real (moe.mtp.mtp_token_mask)."""
    device = execution_device(model.get_input_embeddings())  # not meta when offloaded
    extra = mtp.layers if mtp is not None else []
    with observing(model, moe_layers(model) + extra) as (stats, mask), \
            (mtp.template_args(model) if extra else contextlib.nullcontext()) as template:
        for batch in tqdm(batches, desc="observe", disable=not progress, leave=False):
            ids = batch["input_ids"].to(device)
            attn = batch["attention_mask"].to(device)
            mask.value = attn.reshape(-1).bool()
            out = decoder_forward(model, ids, attn)
            if extra:
                mask.value = mtp_token_mask(attn).reshape(-1)
                mtp.forward(model, out.last_hidden_state, ids, template["args"])
    return stats
