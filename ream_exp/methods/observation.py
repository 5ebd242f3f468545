"""What the layer-wise driver observes of one MoE layer: `LayerObservation` and the sink that fills it.

    with observing_layer(layer, needs) as (obs, current):
        current["batch"] = batch   # its token masks (non-pad, similarity and alignment samples)
        ...                        # forwards of the layer's sparse block fill obs
    obs.reap_score, obs.mean_outputs, obs.align_x

The routing sums are kept always (LayerObservation extends observe.LayerStats, the one accumulator of
them; docs/algorithms.md, REAM 1); `Needs` says what a method needs beyond them: the mean expert outputs
on a seeded token sample (dense statistics) and the MoE inputs of the alignment token sample
(`token_sample`). Pads never count. When every alignment token is a similarity token, the dense pass has
computed the alignment tokens' activations already: it keeps them (`KeptActivations`, within
`Needs.align_cache_mb`; their products before the activation, the alignment's own bits) so that the
alignment does not compute them again. OBSERVATION_VERSION versions this code in every per-layer
observation cache entry (observation_cache.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..moe import MoELayer, activated, activated_into, canonical_weights, experts_products, router_probs
from ..moe.layers import fused_up
from ..moe.offload import execution_device, materialised
from ..observe import LayerStats, Routed, observing_experts, zero_compute
from .scratch import scratch, spent

# Elements of one [experts, tokens, 2I] block of the dense statistics on a CPU (~256 MB in float32); on a GPU
# the memory free when a layer's observation starts bounds it (`work_block`).
DENSE_BLOCK = 1 << 26
# Bytes per element of a dense block alive at once: the products in the model's dtype and the activations in
# float32 (2 + 4 in bf16, 4 + 2 in float32), rounded up.
DENSE_BYTES = 8
# The share of the free GPU memory one block of work may take.
GPU_BLOCK_SHARE = 8
# The version of the code that fills a LayerObservation (its sink, token samples and `finish`), recorded
# with observe.STATS_VERSION in every per-layer observation cache entry: bump it when a change here changes
# what is observed (docs/caches.md).
OBSERVATION_VERSION = 1
# The kept alignment activations' budget on a CPU when method.align_cache_mb is null (MiB); on a GPU a quarter
# of the device memory free when the layer's observation starts.
ALIGN_CACHE_CPU_MB = 1024
# What a LayerObservation holds only while its layer is planned: never saved in the observation cache.
NOT_SAVED = ("align_chunks", "device", "align_keep", "align_hidden", "dense_block")

log = logging.getLogger("ream_exp")


@dataclass
class Needs:
    """What a method needs observed beyond the exact routing sums (which are always kept)."""

    dense: str | None = None  # mean expert outputs on the similarity sample: "gated" | "plain" | None
    align: bool = False  # keep the MoE inputs of the alignment token sample
    sim_tokens: int | None = None  # similarity sample size (None/0: every non-pad token, exact)
    align_tokens: int = 32768
    # MiB of the alignment sample's activations kept from the dense pass (None: ALIGN_CACHE_CPU_MB on a CPU, a
    # quarter of the free memory on a GPU; 0: none kept). Where and how it computes, never what.
    align_cache_mb: int | None = None


def work_block(device, cpu_elements: int, bytes_per_element: int) -> int:
    """Elements of one block of work alive at once: `cpu_elements` on a CPU (the constant whose blocks give the CPU
    results their bits), on a GPU 1/GPU_BLOCK_SHARE of the memory free now, at least `cpu_elements`."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_elements
    free = torch.cuda.mem_get_info(device)[0]
    return max(cpu_elements, free // GPU_BLOCK_SHARE // bytes_per_element)


def kept_activation_bytes(align_cache_mb: int | None, device) -> int:
    """The bytes of alignment activations the observing pass may keep (Needs.align_cache_mb)."""
    if align_cache_mb is not None:
        return int(align_cache_mb) << 20
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return ALIGN_CACHE_CPU_MB << 20


def kept_experts(num_experts: int, rows: int, row_bytes: int, budget: int) -> int:
    """How many experts' alignment products `budget` bytes hold: experts 0..k-1, each `rows` rows of `row_bytes`
    (gate and up together)."""
    return min(num_experts, budget // max(1, rows * row_bytes))


@dataclass
class KeptProducts:
    """The alignment products the observing pass kept, handed to the alignment: gate and up (moe.experts_products, in
    the model's dtype) of experts 0..count-1 on the T_a alignment tokens, in blocks of rows in the sample's order:
    `blocks[b][p]` is part p of block b, [count, r_b, .] (one block of all T_a rows when fewer than all experts are
    kept)."""

    blocks: list[tuple[torch.Tensor, ...]]

    @property
    def count(self) -> int:
        return self.blocks[0][0].shape[0]

    @property
    def parts(self) -> int:
        return len(self.blocks[0])

    def shape(self, p: int) -> tuple[int, int]:
        """(T_a, width) of part p of one expert."""
        return sum(b[p].shape[1] for b in self.blocks), self.blocks[0][p].shape[2]

    def expert(self, p: int, j: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Part p of expert j's products on the alignment tokens [T_a, width] (into `out` when given)."""
        if len(self.blocks) == 1:
            held = self.blocks[0][p][j]
            return held if out is None else out.copy_(held)
        rows = [b[p][j] for b in self.blocks]
        return torch.cat(rows) if out is None else torch.cat(rows, out=out)


@dataclass
class KeptActivations:
    """Collects, while the dense pass runs, the products of a_e(x) before the activation (moe.experts_products: gate
    and up, [T_a, I] each per expert, in the model's dtype) of experts 0..k-1 on the alignment sample: the rows of
    the observing pass's dense products (the alignment tokens are similarity tokens), in the order of the sample;
    k = as many experts as `budget` bytes hold. The alignment applies the activation to them in the shapes it
    computes in (moe.activated), so it gets its own bits wherever the products are.

    When every expert fits, each block of the dense pass whose tokens are all alignment tokens writes its products
    straight into a kept block (`direct`, no copy; the dense pass then activates them out of place); the aligned
    rows of any other block are copied into a block of their own. Otherwise one block of k experts and all T_a rows
    is filled by copies. The buffers come from the run's scratch pool (scratch.py), names "kept.*"."""

    rows: int  # T_a
    budget: int
    blocks: list = field(default_factory=list)
    filled: int = 0
    k: int | None = None  # experts kept (0: none fits the budget), set on the first block

    def _count(self, num_experts: int, row_bytes: int) -> int:
        if self.k is None:
            self.k = kept_experts(num_experts, self.rows, row_bytes, self.budget)
        return self.k

    @staticmethod
    def span(where: tuple[torch.Tensor, torch.Tensor], start: int, t: int) -> tuple[int, int]:
        """The alignment tokens among similarity tokens start..start+t-1, as a range of `where`'s positions."""
        lo, hi = torch.searchsorted(where[0], torch.tensor([start, start + t])).tolist()
        return lo, hi

    def direct(self, num_experts: int, row_bytes: int, span: tuple[int, int], t: int, x: torch.Tensor):
        """Where the dense pass writes the products of a block of t similarity tokens (`span`: its alignment
        tokens, `span()`) when they are a kept block as they are (an `out` of moe.experts_products): every expert
        kept and every token an alignment token; else None."""
        if self._count(num_experts, row_bytes) < num_experts or span[1] - span[0] != t:
            return None
        b = len(self.blocks)
        return lambda p, shape: scratch(f"kept.{b}.{p}", shape, x.dtype, x.device)

    def add(self, products: tuple[torch.Tensor, ...], where: tuple[torch.Tensor, torch.Tensor], start: int,
            span: tuple[int, int], direct: bool = False) -> None:
        """Keep the alignment tokens' rows of `products` ([N, t', .] each) of similarity tokens start..start+t'-1
        (`where`: the batch's alignment tokens as positions among its similarity tokens, host and device; `span`:
        this block's, `span()`); `direct`: the products were written where `direct` said, and are the block
        itself."""
        n, t = products[0].shape[0], products[0].shape[1]
        if direct:
            self.blocks.append(products)
            self.filled += t
            return
        lo, hi = span
        k = self._count(n, sum(p.shape[2] * p.element_size() for p in products))
        if hi == lo or k == 0:
            return
        host, dev = where
        first = int(host[lo]) - start
        consecutive = int(host[hi - 1]) - start == first + hi - lo - 1  # every token aligned: one copy
        if k == n:  # a block of its own: the aligned rows
            b = len(self.blocks)
            block = tuple(scratch(f"kept.{b}.{i}", (n, hi - lo, p.shape[2]), p.dtype, p.device)
                          for i, p in enumerate(products))
        else:  # one block of the first k experts and every alignment row, filled block by block
            if not self.blocks:
                self.blocks.append(tuple(scratch(f"kept.flat.{i}", (k, self.rows, p.shape[2]), p.dtype, p.device)
                                         for i, p in enumerate(products)))
            block = tuple(kept[:, self.filled:self.filled + hi - lo] for kept in self.blocks[0])
        for kept, p in zip(block, products):
            if consecutive:
                kept.copy_(p[:k, first:first + hi - lo])
            else:
                kept.copy_(p[:k].index_select(1, dev[lo:hi] - start))
        if k == n:
            self.blocks.append(block)
        self.filled += hi - lo

    def result(self, experts: nn.Module, x: torch.Tensor) -> KeptProducts | None:
        """The kept products when they are the bits the alignment computes on x, else None. Checked on expert 0:
        each expert's product is its own call of the same shapes, and where a library rounds a row differently
        in products of different row counts it does so by the shapes, never by the values."""
        if not self.blocks or self.filled != self.rows:
            return None
        kept = KeptProducts(self.blocks)
        again = experts_products(experts, x, slice(0, 1))
        if not all(torch.equal(a[0], kept.expert(p, 0)) for p, a in enumerate(again)):
            log.info("alignment activations are recomputed: the dense pass's products round differently from "
                     "the alignment's on this device")
            return None
        return kept


@dataclass
class LayerObservation(LayerStats):
    """One MoE layer's statistics over the non-pad calibration tokens X (float64 sums): the routing sums
    of `LayerStats` (tokens, count, soft, ean, reap: the pruning statistics, layer by layer) and what REAM
    and the merging baselines need beyond them."""

    sigma_reap: torch.Tensor = field(init=False)  # sum_{X_i} sigma_i ||E_i||   (sigma = full softmax/sigmoid)
    sigma2_reap: torch.Tensor = field(init=False)  # sum_{X_i} sigma_i^2 ||E_i||
    logit_gram: torch.Tensor = field(init=False)  # G^T G of the router logits G [|X|, N]
    dense_tokens: int = 0
    dense_block: int = DENSE_BLOCK  # elements of one [N, t', 2I] block of the dense pass (`work_block`)
    dense_hidden: torch.Tensor | None = None  # sum_t w_ti a_i(x_t) [N, I] (w = sigma or 1)
    dense_weight: torch.Tensor | None = None  # sum_t w_ti [N]
    mean_outputs: torch.Tensor | None = None  # mean_t w_ti E_i(x_t) [N, H], set by `finish`
    align_chunks: list = field(default_factory=list, repr=False)
    align_x: torch.Tensor | None = None  # MoE inputs of the alignment sample [T_a, H], set by `finish`
    align_keep: KeptActivations | None = field(default=None, repr=False)  # filled while observing
    align_hidden: tuple | None = field(default=None, repr=False)  # its kept products (`finish`)

    def __post_init__(self):
        super().__post_init__()
        n, f64 = self.num_experts, dict(dtype=torch.float64, device=self.device)
        self.sigma_reap, self.sigma2_reap = torch.zeros(n, **f64), torch.zeros(n, **f64)
        self.logit_gram = torch.zeros(n, n, **f64)

    # ---- docs/algorithms.md: pruning methods, REAM 1 (freq and reap_score: LayerStats') -------------------------
    def sigma_score(self, power: int) -> torch.Tensor:
        """Official-code form: mean over X_i of sigma_i(x)^power ||E_i(x)||, sigma not renormalised."""
        return self._mean_routed(self.sigma2_reap if power == 2 else self.sigma_reap)

    def take_align_hidden(self) -> tuple | None:
        """The kept alignment products, handed over: the observation no longer holds them (so the alignment can
        free them once spent)."""
        kept, self.align_hidden = self.align_hidden, None
        return kept

    # ---- accumulation ------------------------------------------------------------------------
    def add_routed(self, routed: Routed, sigma: torch.Tensor) -> None:
        """One forward's routed pairs (pads and "no expert" slots add 0), with sigma_e(x) of each pair [P]:
        the routing sums and token count (LayerStats.add), then the sigma-weighted ones."""
        self.add(routed)
        e, norms, s = routed.expert, routed.norms, routed.kept(sigma)
        self.sigma_reap.index_add_(0, e, s * norms)
        self.sigma2_reap.index_add_(0, e, s * s * norms)

    def add_dense(self, experts: nn.Module, x: torch.Tensor, weight: torch.Tensor | None, align=None) -> None:
        """Accumulate sum_t w_ti a_i(x_t) for every expert on tokens x [t, H] (w [t, N], or 1); `align`: the
        alignment tokens among x (BatchState.align_in_sim), whose activations `align_keep` keeps."""
        n, t = self.num_experts, x.shape[0]
        if t == 0:
            return
        width = fused_up(experts)[0].numel() // x.shape[1]  # 2I (I ungated), whatever the layout
        step = max(1, self.dense_block // (n * width))
        row_bytes = width * x.element_size()
        for s in range(0, t, step):
            t_block = min(step, t - s)
            direct = None
            if align is not None:
                span = self.align_keep.span(align, s, t_block)
                direct = self.align_keep.direct(n, row_bytes, span, t_block, x)
            products = experts_products(experts, x[s:s + step], out=direct or _dense_buffer(x))
            if align is not None:
                self.align_keep.add(products, align, s, span, direct=direct is not None)
            if direct is None:
                a = activated(experts, products).float()  # [N, t', I]
            else:  # the products are kept: activated out of place, the same bits
                a = activated_into(experts, products, lambda shape: scratch("dense.act", shape, x.dtype, x.device))
                a = a.float()
            if weight is None:
                part, wsum = a.sum(1), torch.full((n,), float(a.shape[1]), device=a.device)
            else:
                w = weight[s:s + step].float().T  # [N, t']
                part, wsum = torch.bmm(w[:, None, :], a).squeeze(1), w.sum(1)
            if self.dense_hidden is None:
                self.dense_hidden = torch.zeros(part.shape, dtype=torch.float64, device=part.device)
                self.dense_weight = torch.zeros(n, dtype=torch.float64, device=part.device)
            self.dense_hidden += part.double()
            self.dense_weight += wsum.double()
        self.dense_tokens += t

    @torch.no_grad()
    def finish(self, experts: nn.Module, chunk: int = 8) -> None:
        """mean_t w_ti E_i(x_t) = (down_i (sum_t w_ti a_i(x_t)) + b_i sum_t w_ti) / T, in float64."""
        super().finish()  # the one host sync of the token count
        spent("dense.")  # the dense pass is over (a lean pool frees its buffers)
        if self.dense_hidden is not None:
            means = []
            for s in range(0, self.num_experts, chunk):
                idx = list(range(s, min(s + chunk, self.num_experts)))
                w = canonical_weights(experts, idx)
                m = torch.bmm(w["down"].double(), self.dense_hidden[idx, :, None]).squeeze(-1)
                if w["down_bias"] is not None:
                    m = m + w["down_bias"].double() * self.dense_weight[idx, None]
                means.append(m)
            self.mean_outputs = torch.cat(means) / max(self.dense_tokens, 1)
            self.dense_hidden = None
        if self.align_chunks:
            self.align_x = torch.cat(self.align_chunks)
            self.align_chunks = []
        if self.align_keep is not None and self.align_x is not None:
            self.align_hidden = self.align_keep.result(experts, self.align_x)
        self.align_keep = None


def _dense_buffer(x: torch.Tensor):
    """Where the dense pass writes its gate and up products: buffers reused batch after batch (scratch.py)."""
    return lambda p, shape: scratch(f"dense.{p}", shape, x.dtype, x.device)


# ---- token samples -------------------------------------------------------------------------------

def token_sample(mask: torch.Tensor, k: int | None, seed: int) -> torch.Tensor:
    """A seeded sample of k non-pad positions of `mask` [n, S] as a bool mask (all of them if k is None/0).

    One seeded permutation serves every sample size, so a smaller sample is a subset of a larger one.
    """
    valid = mask.reshape(-1).bool()
    pos = valid.nonzero().squeeze(1)
    if not k or k >= pos.numel():
        return valid.reshape(mask.shape)
    gen = torch.Generator().manual_seed(int(seed))
    pick = pos[torch.randperm(pos.numel(), generator=gen)[: int(k)]]
    out = torch.zeros_like(valid)
    out[pick] = True
    return out.reshape(mask.shape)


# ---- observing one MoE layer -------------------------------------------------------------------------

def _observation_sink(layer: MoELayer, obs: LayerObservation, needs: Needs, current: dict):
    """Statistics of one experts forward (see `ream_exp.observe.observing_experts`) for the batch in
    `current`, whose router logits a forward hook put in `current["logits"]`."""
    def sink(routed: Routed) -> None:
        batch, logits = current["batch"], current["logits"]
        sigma = router_probs(layer, logits)
        obs.add_routed(routed, sigma[routed.row, routed.expert])
        # rows by index: no host sync per batch; zero-compute rows after the experts are not ours
        g = logits.index_select(0, batch.rows("valid"))[:, :layer.num_experts].double()
        obs.logit_gram += g.T @ g
        if needs.dense:
            sim = batch.rows("sim")
            weight = sigma.index_select(0, sim) if needs.dense == "gated" else None
            align = batch.align_in_sim() if obs.align_keep is not None else None
            obs.add_dense(layer.experts, routed.x.index_select(0, sim), weight, align)
        if needs.align:
            obs.align_chunks.append(routed.x.index_select(0, batch.rows("align")))

    return sink


@contextlib.contextmanager
def observing_layer(layer: MoELayer, needs: Needs, align_rows: int | None = None):
    """Within the block, forwards of the layer's sparse block fill the yielded LayerObservation; set
    `current["batch"]` (a BatchState, for its token masks) before each forward. `finish` runs on exit.
    `align_rows`: the alignment tokens of all batches when each is a similarity token (capture.kept_align_rows);
    their activations are then kept for the alignment within `needs.align_cache_mb`.

    Offloaded experts and router weights are loaded once for the whole block (`materialised`)."""
    with materialised([layer.experts, layer.router]):
        obs = LayerObservation(layer.num_experts, execution_device(layer.router))
        if needs.dense:
            obs.dense_block = work_block(obs.device, DENSE_BLOCK, DENSE_BYTES)
        budget = kept_activation_bytes(needs.align_cache_mb, obs.device) if align_rows else 0
        if budget > 0:
            obs.align_keep = KeptActivations(align_rows, budget)
        current: dict = {}

        def grab_logits(_module, _inputs, output):
            current["logits"] = output[0] if isinstance(output, tuple) else output

        hook = layer.router.register_forward_hook(grab_logits)
        try:
            with observing_experts(layer.experts, layer.num_experts, _observation_sink(layer, obs, needs, current),
                                   lambda: current["batch"].valid, zero_compute(layer)):
                yield obs, current
        finally:
            hook.remove()
        obs.finish(layer.experts)
