"""Layer-wise driver of the merging methods: observe one MoE layer, plan it, apply it, move on.

    plan_layers = run_layerwise(ctx, plan_layer, needs, sequential=True)

The calibration hidden states are captured at the input of the first decoder layer: every decoder
layer is briefly replaced by a stub that records the arguments the model passes it (attention masks,
which differ per layer type in GPT-OSS, rotary embeddings, position ids) and returns its input, so one
cheap call per batch yields everything needed to run the decoder layers ourselves, one at a time.
For each MoE layer, in order (REAM, docs/algorithms.md):

1. observe: the decoder layer runs on the current hidden states while its experts module does exactly
   the model's routed work and fills a `LayerObservation` (pads never count);
2. plan: `plan_layer(layer, obs, n_keep)` returns the layer's LayerPlan (groups, weights, perms);
3. apply: `apply_layer_plan` merges and slices the layer in place;
4. propagate: sequential=true runs the compressed layer to get the next layer's inputs;
   sequential=false keeps the original layer's outputs, computed while observing.

Memory beyond the weights: the calibration hidden states plus one layer's observation
(O(N*H + N^2) sums and the alignment token sample [T_a, H]), whatever the number of layers.
The hidden states wait on the execution device, in CPU memory or on disk (calib.states_device,
states.py), each batch brought to the device only while its layer runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import types
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_torch_save
from ..cache_meta import made_by, require_current
from ..calib import calibration_batches
from ..moe import MoELayer, apply_layer_plan, canonical_weights, decoder_layers, experts_hidden, router_probs
from ..moe.layers import fused_up
from ..moe.offload import execution_device, materialised
from .. import observe
from ..observe import LayerStats, Routed, decoder_forward, load_cache_entry, observing_experts, zero_compute
from ..plan import LayerPlan
from ..stream import InMemory
from ..timing import Timings
from .states import StateStore, state_store

log = logging.getLogger("ream_exp")

# Elements of one [experts, tokens, 2I] block of the dense statistics (~256 MB in float32).
DENSE_BLOCK = 1 << 26
# The version of the code that fills a LayerObservation (its sink, token samples and `finish`), recorded
# with observe.STATS_VERSION in every per-layer observation cache entry: bump it when a change here changes
# what is observed (README, "Caches").
OBSERVATION_VERSION = 1


@dataclass
class Needs:
    """What a method needs observed beyond the exact routing sums (which are always kept)."""

    dense: str | None = None  # mean expert outputs on the similarity sample: "gated" | "plain" | None
    align: bool = False  # keep the MoE inputs of the alignment token sample
    sim_tokens: int | None = None  # similarity sample size (None/0: every non-pad token, exact)
    align_tokens: int = 32768


@dataclass
class LayerObservation:
    """One MoE layer's statistics over the non-pad calibration tokens X (float64 sums)."""

    num_experts: int
    device: torch.device | str = "cpu"
    tokens: int = 0  # |X| (a device tensor while observing, an int after `finish`)
    count: torch.Tensor = field(init=False)  # |X_i|
    soft: torch.Tensor = field(init=False)  # sum_{X_i} g_i             (the pruning statistics of
    ean: torch.Tensor = field(init=False)  # sum_{X_i} ||E_i||          ream_exp/observe.py, layer by layer)
    reap: torch.Tensor = field(init=False)  # sum_{X_i} g_i ||E_i||     (g = routing weight applied)
    sigma_reap: torch.Tensor = field(init=False)  # sum_{X_i} sigma_i ||E_i||   (sigma = full softmax/sigmoid)
    sigma2_reap: torch.Tensor = field(init=False)  # sum_{X_i} sigma_i^2 ||E_i||
    logit_gram: torch.Tensor = field(init=False)  # G^T G of the router logits G [|X|, N]
    dense_tokens: int = 0
    dense_hidden: torch.Tensor | None = None  # sum_t w_ti a_i(x_t) [N, I] (w = sigma or 1)
    dense_weight: torch.Tensor | None = None  # sum_t w_ti [N]
    mean_outputs: torch.Tensor | None = None  # mean_t w_ti E_i(x_t) [N, H], set by `finish`
    align_chunks: list = field(default_factory=list, repr=False)
    align_x: torch.Tensor | None = None  # MoE inputs of the alignment sample [T_a, H], set by `finish`

    def __post_init__(self):
        n, f64 = self.num_experts, dict(dtype=torch.float64, device=self.device)
        self.count, self.reap = torch.zeros(n, **f64), torch.zeros(n, **f64)
        self.soft, self.ean = torch.zeros(n, **f64), torch.zeros(n, **f64)
        self.sigma_reap, self.sigma2_reap = torch.zeros(n, **f64), torch.zeros(n, **f64)
        self.logit_gram = torch.zeros(n, n, **f64)

    # ---- docs/algorithms.md: pruning methods, REAM 1 ---------------------------------------------------------------
    @property
    def freq(self) -> torch.Tensor:
        return self.count / max(self.tokens, 1)

    def _mean_routed(self, total: torch.Tensor) -> torch.Tensor:
        return torch.where(self.count > 0, total / self.count.clamp(min=1), torch.zeros_like(total))

    @property
    def reap_score(self) -> torch.Tensor:
        """Paper/REAP form: mean over X_i of g_i(x) ||E_i(x)||, g the weight the model applies."""
        return self._mean_routed(self.reap)

    def sigma_score(self, power: int) -> torch.Tensor:
        """Official-code form: mean over X_i of sigma_i(x)^power ||E_i(x)||, sigma not renormalised."""
        return self._mean_routed(self.sigma2_reap if power == 2 else self.sigma_reap)

    def routing_stats(self) -> LayerStats:
        """The pruning methods' statistics of this layer, as the one-pass `observe` sums them."""
        stats = LayerStats(self.num_experts, self.count.device, int(self.tokens))
        stats.count, stats.soft, stats.ean, stats.reap = self.count, self.soft, self.ean, self.reap
        return stats

    # ---- accumulation ------------------------------------------------------------------------
    def add_routed(self, routed: Routed, sigma: torch.Tensor) -> None:
        """One forward's routed pairs (pads and "no expert" slots add 0), with sigma_e(x) of each pair [P]."""
        e, norms, s, w = routed.expert, routed.norms, routed.kept(sigma), routed.kept(routed.weight)
        self.count.index_add_(0, e, routed.keep.double())
        self.soft.index_add_(0, e, w)
        self.ean.index_add_(0, e, norms)
        self.reap.index_add_(0, e, w * norms)
        self.sigma_reap.index_add_(0, e, s * norms)
        self.sigma2_reap.index_add_(0, e, s * s * norms)

    def add_dense(self, experts: nn.Module, x: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Accumulate sum_t w_ti a_i(x_t) for every expert on tokens x [t, H] (w [t, N], or 1)."""
        n, t = self.num_experts, x.shape[0]
        if t == 0:
            return
        width = fused_up(experts)[0].numel() // x.shape[1]  # 2I (I ungated), whatever the layout
        step = max(1, DENSE_BLOCK // (n * width))
        for s in range(0, t, step):
            a = experts_hidden(experts, x[s:s + step]).float()  # [N, t', I]
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
        self.tokens = int(self.tokens)  # the one host sync of the token count
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


# ---- capturing and running decoder layers ---------------------------------------------------------

class _Stop(Exception):
    pass


@dataclass(frozen=True)
class _Slot:
    """Stands in a batch's layer arguments for its `index`-th own tensor, kept in the state store."""

    index: int


@dataclass
class BatchState:
    """One calibration batch between decoder layers.

    Its hidden states (the input of the next decoder layer to run, [B, S, H] in the model's dtype) and
    the layer-argument tensors that are its own wait in `store` under `key`; `load` brings them to the
    execution device for the layers that run now, `keep` stores a layer's output. Layer-argument
    tensors equal to the first batch's (rotary cos/sin, position ids, and masks with the same padding)
    are that batch's very tensors, shared: one copy for every batch and layer.
    """

    store: StateStore
    key: str
    device: torch.device  # where the decoder layers get their inputs (the embeddings' execution device)
    layer_args: list  # per decoder layer: (extra positional args, kwargs), own tensors as _Slot
    own_args: bool  # whether any layer argument is this batch's own (then stored under key-args)
    valid: torch.Tensor  # [B*S] non-pad tokens
    sim: torch.Tensor  # [B*S] tokens of the similarity sample
    align: torch.Tensor  # [B*S] tokens of the alignment sample

    def load(self) -> tuple[torch.Tensor, list]:
        """The hidden states and every decoder layer's (args, kwargs), on the execution device."""
        hidden = self.store.get(f"{self.key}-hidden", self.device)[0]
        own = self.store.get(f"{self.key}-args", self.device) if self.own_args else []
        return hidden, _map_leaves(self.layer_args, lambda x: own[x.index] if isinstance(x, _Slot) else x)

    def keep(self, hidden: torch.Tensor) -> None:
        self.store.put(f"{self.key}-hidden", [hidden])


def _map_leaves(obj, fn):
    """`obj` with fn applied to everything inside its plain tuples, lists and dicts."""
    if type(obj) in (tuple, list):
        return type(obj)(_map_leaves(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_leaves(v, fn) for k, v in obj.items()}
    return fn(obj)


def _shared_with(obj, ref, memo: dict):
    """`obj` with each tensor that equals the tensor at the same place in `ref` replaced by that one."""
    if isinstance(obj, torch.Tensor):
        pair = (id(obj), id(ref))  # the layers of a batch share their masks and rotary tables
        if pair not in memo:
            same = (isinstance(ref, torch.Tensor) and ref.shape == obj.shape and ref.dtype == obj.dtype
                    and ref.device == obj.device and torch.equal(ref, obj))
            memo[pair] = ref if same else obj
        return memo[pair]
    if type(obj) in (tuple, list) and type(ref) is type(obj) and len(ref) == len(obj):
        return type(obj)(_shared_with(o, r, memo) for o, r in zip(obj, ref))
    if isinstance(obj, dict) and isinstance(ref, dict):
        return {k: _shared_with(v, ref.get(k), memo) for k, v in obj.items()}
    return obj


class _SharedArgs:
    """Splits each batch's layer arguments into tensors shared with the first batch (kept where they
    are) and the batch's own, which go to the state store, replaced by _Slot in what is kept."""

    def __init__(self):
        self.first: list | None = None
        self.resident: set[int] = set()  # ids of the first batch's tensors

    def split(self, layer_args: list) -> tuple[list, list[torch.Tensor]]:
        if self.first is None:
            self.first = layer_args
            _map_leaves(layer_args, lambda x: self.resident.add(id(x)) if isinstance(x, torch.Tensor) else None)
        own, slot_of = [], {}

        def slot(x):
            if not isinstance(x, torch.Tensor) or id(x) in self.resident:
                return x
            if id(x) not in slot_of:  # one tensor passed to many layers is stored once
                slot_of[id(x)] = len(own)
                own.append(x)
            return _Slot(slot_of[id(x)])

        return _map_leaves(_shared_with(layer_args, self.first, {}), slot), own


@contextlib.contextmanager
def _replaced_forward(modules, make_forward):
    """Temporarily give each module an instance `forward` (restoring any instance forward it had)."""
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


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: list[dict], store: StateStore | None = None,
                   fill: bool = True) -> list[BatchState]:
    """Per batch: the input of decoder layer 0 and the arguments the model passes every decoder layer,
    put in `store` (default: held where the model made them). No logits: the last layer's stub stops
    the forward. fill=False puts nothing: the store already holds this run's states (a resume reading a
    kept states_dir), only the batches' layer arguments and token masks are rebuilt."""
    store = store if store is not None else StateStore()
    layers = list(decoder_layers(model))
    device = execution_device(model.get_input_embeddings())  # not meta when offloaded
    states = []
    record: dict = {}
    shared = _SharedArgs()

    def make_stub(i, _layer):
        def stub(self, hidden_states, *args, **kwargs):
            if i == 0:
                record["hidden"] = hidden_states
            record["args"].append((args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return hidden_states
        return types.MethodType(stub, _layer)

    with _replaced_forward(layers, make_stub):
        for n, b in enumerate(batches):
            record.clear()
            record["args"] = []
            try:
                decoder_forward(model, b["input_ids"].to(device), b["attention_mask"].to(device))
            except _Stop:
                pass
            layer_args, own = shared.split(record["args"])
            state = BatchState(store, f"batch{n}", device, layer_args, bool(own),
                               *(b[k].reshape(-1).bool().to(device) for k in ("attention_mask", "sim", "align")))
            hidden = record.pop("hidden")
            if fill:
                if own:
                    store.put(f"{state.key}-args", own)
                state.keep(hidden)
            states.append(state)
    return states


def run_decoder_layer(layer: nn.Module, hidden: torch.Tensor, args) -> torch.Tensor:
    out = layer(hidden, *args[0], **args[1])
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def advance(states: list[BatchState], model: nn.Module, start: int, stop: int) -> None:
    """Run decoder layers start..stop-1 on every batch's hidden states (stored back in its place)."""
    if start >= stop:
        return
    layers = decoder_layers(model)
    for s in states:
        hidden, layer_args = s.load()
        for i in range(start, stop):
            hidden = run_decoder_layer(layers[i], hidden, layer_args[i])
        s.keep(hidden)


# ---- observing one MoE layer -------------------------------------------------------------------------

def _observation_sink(layer: MoELayer, obs: LayerObservation, needs: Needs, current: dict):
    """Statistics of one experts forward (see `ream_exp.observe.observing_experts`) for the batch in
    `current`, whose router logits a forward hook put in `current["logits"]`."""
    def sink(routed: Routed) -> None:
        batch, logits = current["batch"], current["logits"]
        sigma = router_probs(layer, logits)
        obs.add_routed(routed, sigma[routed.row, routed.expert])
        g = logits[batch.valid][:, :layer.num_experts].double()  # zero-compute rows after the experts: not ours
        obs.logit_gram += g.T @ g
        obs.tokens = obs.tokens + routed.valid.sum()  # a device tensor until `finish`
        if needs.dense:
            weight = sigma[batch.sim] if needs.dense == "gated" else None
            obs.add_dense(layer.experts, routed.x[batch.sim], weight)
        if needs.align:
            obs.align_chunks.append(routed.x[batch.align])

    return sink


@contextlib.contextmanager
def observing_layer(layer: MoELayer, needs: Needs):
    """Within the block, forwards of the layer's sparse block fill the yielded LayerObservation; set
    `current["batch"]` (a BatchState, for its token masks) before each forward. `finish` runs on exit.

    Offloaded experts and router weights are loaded once for the whole block (`materialised`)."""
    with materialised([layer.experts, layer.router]):
        obs = LayerObservation(layer.num_experts, execution_device(layer.router))
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


@torch.no_grad()
def observe_layer(model: nn.Module, layer: MoELayer, states: list[BatchState], needs: Needs,
                  keep_outputs: bool) -> LayerObservation:
    """Run decoder layer `layer.index` on every batch, observing its experts; optionally keep its outputs."""
    dec = decoder_layers(model)[layer.index]
    with observing_layer(layer, needs) as (obs, current):
        for s in states:
            current["batch"] = s
            hidden, layer_args = s.load()
            out = run_decoder_layer(dec, hidden, layer_args[layer.index])
            if keep_outputs:
                s.keep(out)
    return obs


# ---- the driver ---------------------------------------------------------------------------------------

def calibration_states(ctx, needs: Needs, store: StateStore | None = None, fill: bool = True) -> list[BatchState]:
    """Calibration batches with their token samples, captured at the input of decoder layer 0."""
    if ctx.calib is None:
        raise ValueError(f"method {ctx.cfg.get('name')!r} needs calibration data, but none was built")
    mask = ctx.calib["attention_mask"]
    calib = {"input_ids": ctx.calib["input_ids"], "attention_mask": mask,
             "sim": token_sample(mask, needs.sim_tokens, ctx.seed),
             "align": token_sample(mask, needs.align_tokens, ctx.seed) if needs.align
             else torch.zeros(mask.shape, dtype=torch.bool)}
    return capture_inputs(ctx.model, calibration_batches(calib, ctx.batch_size), store, fill)


def observation_cache(ctx, needs: Needs, layers: list[MoELayer]) -> dict[int, Path] | None:
    """Per-layer cache files of a non-sequential method's observations (None: no cache configured).

    Without propagation through compressed layers the observations depend only on the model, the
    calibration tokens (both in ctx.stats_path's key), what is observed and the sampling seed, not on
    the ratio: a sweep over ratios observes once.
    """
    if ctx.stats_path is None:
        return None
    key = hashlib.sha256(repr((sorted(vars(needs).items()), ctx.seed)).encode()).hexdigest()[:12]
    stem = Path(ctx.stats_path)
    return {l.index: stem.with_name(f"{stem.stem}-layers-{key}-{l.index}.pt") for l in layers}


def observation_made_by() -> dict:
    """What makes a per-layer observation entry now (cache_meta.made_by): the observing forward's
    version (observe.STATS_VERSION) and this module's OBSERVATION_VERSION."""
    return made_by({"observe": observe.STATS_VERSION, "observation": OBSERVATION_VERSION})


def save_observation(obs: LayerObservation, path: Path) -> None:
    state = {k: v for k, v in vars(obs).items() if k not in ("align_chunks", "device")}
    state["made_by"] = observation_made_by()
    atomic_torch_save(state, path)  # a killed run never leaves a half-written entry


OBSERVATION_KEYS = tuple(f.name for f in fields(LayerObservation) if f.name not in ("align_chunks", "device"))


def _observation_state(path: Path, num_experts: int, **load) -> dict:
    """The saved state (without its record), after checking what made it (StaleEntry when other code did),
    its keys and expert count; raises on any damage."""
    state = torch.load(path, weights_only=True, **load)
    if isinstance(state, dict):
        require_current(state.pop("made_by", None), observation_made_by())
    missing = set(OBSERVATION_KEYS) - set(state) if isinstance(state, dict) else set(OBSERVATION_KEYS)
    if missing:
        raise ValueError(f"missing entries {sorted(missing)}")
    if int(state["num_experts"]) != num_experts:
        raise ValueError(f"{state['num_experts']} experts observed, the layer has {num_experts}")
    return state


def cached_observations(cache: dict[int, Path], layers: list[MoELayer]) -> bool:
    """Whether every layer's entry is there, readable and made by this code. Checked before any layer is
    compressed (a memory-mapped read: structure and keys, no tensor data); damaged entries are reported and
    deleted; the first stale one is reported (one log line) and all are observed again and overwritten."""
    return all(load_cache_entry(cache[l.index], lambda p, n=l.num_experts: _observation_state(p, n, mmap=True),
                                "observation cache") is not None for l in layers)


def load_observation(path: Path, device, num_experts: int) -> LayerObservation:
    try:
        state = _observation_state(path, num_experts, map_location=device)
    except Exception as exc:  # damaged past what the up-front check reads: earlier layers are already merged
        path.unlink(missing_ok=True)
        raise RuntimeError(f"observation cache {path} is damaged ({type(exc).__name__}: {exc}); "
                           "deleted it, rerun to recompute it") from exc
    obs = LayerObservation(num_experts, device)
    obs.__dict__.update(state)
    return obs


def _advance_to(ctx, stream, states: list[BatchState] | None, start: int, stop: int, sequential: bool,
                seal=lambda boundary: None) -> None:
    """Run decoder layers start..stop-1 on the hidden states, one layer in memory at a time when streamed
    (states None: observations come from the cache, nothing runs, layers are only copied).

    Layers an earlier attempt of this run finished (resume) are run as that attempt ran them: compressed,
    read back from their shard (sequential), or original with the observing forward whose outputs a
    non-sequential run propagates. Layers without routed experts are written as they are once run."""
    moe = {layer.index: layer for layer in ctx.layers}
    for i in range(start, stop):
        if states is None:
            if not stream.done(i):
                stream.load(i)
                stream.finished(i)
        elif stream.done(i) and i in moe and not sequential:
            stream.load(i)
            observe_layer(ctx.model, moe[i], states, Needs(), keep_outputs=True)
            stream.release(i)
        elif stream.done(i):
            stream.load_written(i)
            advance(states, ctx.model, i, i + 1)
            stream.release(i)
        else:
            stream.load(i)
            advance(states, ctx.model, i, i + 1)
            stream.finished(i)
            seal(i + 1)


def state_keys(states: list[BatchState]) -> list[str]:
    """The store keys of the batches' files: hidden states, and own layer arguments where there are any."""
    return sorted([f"{s.key}-hidden" for s in states] + [f"{s.key}-args" for s in states if s.own_args])


def _boundary_states(ctx, stream, needs: Needs, store: StateStore) -> tuple[list[BatchState], int]:
    """The batches and the decoder layer whose input their hidden states are: read at the resume boundary
    from a kept states_dir whose manifest names this run and boundary, else captured at layer 0."""
    boundary = stream.boundary()
    owner = stream.states_owner(boundary)
    vouched = store.sealed_for(owner) if boundary and owner is not None else None
    if vouched is not None:
        states = calibration_states(ctx, needs, store, fill=False)  # embeddings only: masks, layer args
        if state_keys(states) == vouched:
            log.info("resume: calibration hidden states at decoder layer %d read from %s", boundary, store.directory)
            return states, boundary
    return calibration_states(ctx, needs, store), 0


@torch.no_grad()
def run_layerwise(ctx, plan_layer, needs: Needs, sequential: bool, timings: Timings | None = None
                  ) -> list[LayerPlan]:
    """Observe, plan, apply and propagate MoE layer after MoE layer; returns the (applied) layer plans.

    The calibration hidden states wait where calib.states_device says (ctx.states, see states.py).
    With `ctx.stream` (model.stream=true, ream_exp/stream.py) each decoder layer is loaded before it runs,
    written and freed once done, and layers finished by an earlier attempt are taken from disk."""
    with state_store(ctx.states) as store:
        return _run_layerwise(ctx, plan_layer, needs, sequential, timings, store)


@torch.no_grad()
def _run_layerwise(ctx, plan_layer, needs: Needs, sequential: bool, timings: Timings | None,
                   store: StateStore) -> list[LayerPlan]:
    timings = timings if timings is not None else Timings()
    stream = getattr(ctx, "stream", None) or InMemory()
    layers = ctx.layers
    todo = [layer for layer in layers if not stream.done(layer.index)]
    cache = None if sequential else observation_cache(ctx, needs, layers)
    if cache is not None:
        next(iter(cache.values())).parent.mkdir(parents=True, exist_ok=True)
    cached = cache is not None and cached_observations(cache, todo)
    position = 0  # the decoder layer whose input the states are
    with timings("capture"), stream.capturing():
        states = []
        if not cached and todo:
            states, position = _boundary_states(ctx, stream, needs, store)

    def seal(boundary: int) -> None:  # a kept states_dir records that its files are the input of `boundary`
        if states:
            store.seal(stream.states_owner(boundary), state_keys(states))

    plans = []
    for layer in tqdm(layers, desc=f"{ctx.cfg.get('name', 'merge')} layers", disable=not ctx.progress, leave=False):
        if stream.done(layer.index):  # written by an earlier attempt of this run (model.stream resume)
            plans.append(stream.plan_of(layer.index))
            continue
        with timings("propagate"):
            _advance_to(ctx, stream, None if cached else states, position, layer.index, sequential, seal)
        stream.load(layer.index)
        with timings("observe"):
            if cached:
                obs = load_observation(cache[layer.index], execution_device(layer.router), layer.num_experts)
            else:
                obs = observe_layer(ctx.model, layer, states, needs, keep_outputs=not sequential)
                if cache is not None:
                    save_observation(obs, cache[layer.index])
        with materialised([layer.experts, layer.router]):  # plans may read weights (alignment, features)
            lp = plan_layer(layer, obs, ctx.n_keep(layer), timings)
        del obs
        with timings("merge"):
            apply_layer_plan(layer, lp)
        if sequential and layer is not layers[-1]:
            with timings("propagate"):
                advance(states, ctx.model, layer.index, layer.index + 1)
        stream.finished(layer.index, lp)
        position = layer.index + 1
        if not sequential or layer is not layers[-1]:  # the states are this layer's outputs
            seal(position)
        plans.append(lp)
    stream.complete(plans)
    return plans
