"""Layer-wise driver of the merging methods: observe one MoE layer, plan it, apply it, move on.

    plan_layers = run_layerwise(ctx, plan_layer, needs, sequential=True)

The calibration hidden states are captured at the input of the first decoder layer and carried through
the decoder layers one at a time (capture.py). For each MoE layer, in order (REAM, docs/algorithms.md):

1. observe: the decoder layer runs on the current hidden states while its experts module does exactly
   the model's routed work and fills a `LayerObservation` (observation.py; pads never count), or a
   non-sequential method reads it from the per-layer cache (observation_cache.py);
2. plan: `plan_layer(layer, obs, n_keep)` returns the layer's LayerPlan (groups, weights, perms);
3. apply: `apply_layer_plan` merges and slices the layer in place;
4. propagate: sequential=true runs the compressed layer to get the next layer's inputs;
   sequential=false keeps the original layer's outputs, computed while observing.

Memory beyond the weights: the calibration hidden states plus one layer's observation
(O(N*H + N^2) sums and the alignment token sample [T_a, H]), whatever the number of layers.
The hidden states wait on the execution device, in CPU memory or on disk (calib.states_device,
states.py), each batch brought to the device only while its layer runs. The decoder layers come from a
layer source: the model in memory (`InMemory`) or, with model.stream=true, read, written and freed one at
a time (layer_stream.LayerStream), which also resumes an interrupted run.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from tqdm.auto import tqdm

from ..calib import calibration_batches
from ..moe import apply_layer_plan, decoder_layers
from ..moe.offload import execution_device, materialised
from ..plan import LayerPlan
from ..timing import Timings
from .capture import BatchState, advance, capture_inputs, observe_layer, observe_mtp_layer, state_keys
from .observation import Needs, token_sample
from .observation_cache import cached_observations, load_observation, observation_cache, save_observation
from .scratch import scratch_buffers
from .states import StateStore, state_store

log = logging.getLogger("ream_exp")


class InMemory:
    """The layer source of a model held in memory whole: nothing to load, write or resume (the streamed one is
    layer_stream.LayerStream)."""

    def done(self, index: int) -> bool:
        return False

    def boundary(self) -> int:
        return 0

    def states_owner(self, boundary: int) -> None:
        return None  # nothing to resume: kept states are never read back

    def load(self, index: int) -> None:
        pass

    def finished(self, index: int, plan: LayerPlan | None = None) -> None:
        pass

    load_written = release = load

    def complete(self, plans) -> None:
        pass

    @contextlib.contextmanager
    def capturing(self):
        yield


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


def _mtp_layer_plan(ctx, stream, layer, plan_layer, needs: Needs, states: list[BatchState] | None, cache,
                    timings: Timings) -> LayerPlan:
    """The MTP layer (ctx.mtp) observed on the hidden states at the decoder's end (the compressed layers'
    outputs when sequential, the original's otherwise; `states` None: from the observation cache), planned
    and applied."""
    ctx.mtp.load(ctx.model)
    with timings("observe"):
        if states is None:
            obs = load_observation(cache[layer.index], execution_device(layer.router), layer.num_experts)
        else:
            ids = [b["input_ids"] for b in calibration_batches(ctx.calib, ctx.batch_size)]
            with stream.capturing():  # embeddings and final norm in memory while the MTP layer runs
                obs = observe_mtp_layer(ctx.model, ctx.mtp, layer, states, ids, needs)
            if cache is not None:
                save_observation(obs, cache[layer.index])
    with materialised([layer.experts, layer.router]):
        lp = plan_layer(layer, obs, ctx.n_keep(layer), timings)
    del obs
    with timings("merge"):
        apply_layer_plan(layer, lp)
    return lp


@torch.no_grad()
def run_layerwise(ctx, plan_layer, needs: Needs, sequential: bool, timings: Timings | None = None
                  ) -> list[LayerPlan]:
    """Observe, plan, apply and propagate MoE layer after MoE layer; returns the (applied) layer plans.

    The calibration hidden states wait where calib.states_device says (ctx.states, see states.py).
    With `ctx.stream` (model.stream=true, layer_stream.py) each decoder layer is loaded before it runs,
    written and freed once done, and layers finished by an earlier attempt are taken from disk."""
    with state_store(ctx.states) as store, scratch_buffers(lean=getattr(ctx, "stream", None) is not None):
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

    mtp = getattr(ctx, "mtp", None)
    mtp_layers = {layer.index for layer in mtp.layers} if mtp is not None else set()
    plans = []
    for layer in tqdm(layers, desc=f"{ctx.cfg.get('name', 'merge')} layers", disable=not ctx.progress, leave=False):
        if stream.done(layer.index):  # written by an earlier attempt of this run (model.stream resume)
            plans.append(stream.plan_of(layer.index))
            continue
        if layer.index in mtp_layers:  # the MTP layer: after every decoder layer
            with timings("propagate"):
                _advance_to(ctx, stream, None if cached else states, position, len(decoder_layers(ctx.model)),
                            sequential, seal)
            plans.append(_mtp_layer_plan(ctx, stream, layer, plan_layer, needs, None if cached else states,
                                         cache, timings))
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
