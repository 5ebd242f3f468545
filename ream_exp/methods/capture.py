"""The calibration batches of the layer-wise driver between decoder layers: captured, then run layer by layer.

    states = capture_inputs(model, batches, store)      # the input of decoder layer 0, per batch
    advance(states, model, start, stop)                 # decoder layers start..stop-1 on every batch
    obs = observe_layer(model, layer, states, needs, keep_outputs)   # one MoE layer, observed

The hidden states are captured at the input of the first decoder layer: every decoder layer is briefly
replaced by a stub that records the arguments the model passes it (attention masks, which differ per
layer type in GPT-OSS, rotary embeddings, position ids) and returns its input, so one cheap call per
batch yields everything needed to run the decoder layers ourselves, one at a time. Each batch's hidden
states (and the layer arguments that are its own) wait in a StateStore (states.py) between layers.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ..moe import MoELayer, decoder_layers
from ..moe.mtp import mtp_token_mask
from ..moe.offload import execution_device
from ..observe import decoder_forward, replaced_forward
from .observation import LayerObservation, Needs, observing_layer
from .states import StateStore


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
    row_index: dict = field(default_factory=dict, repr=False)  # mask name -> its rows, as an index tensor

    def rows(self, name: str) -> torch.Tensor:
        """The positions of mask `name` ("valid", "sim", "align") as an index on the masks' device, in
        order: what boolean indexing selects, without its host sync (capture computes them on the host;
        a batch built without them computes each once)."""
        if name not in self.row_index:
            self.row_index[name] = getattr(self, name).nonzero().squeeze(1)
        return self.row_index[name]

    def align_in_sim(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the alignment-sample tokens sit among the similarity-sample tokens: their positions in
        rows("sim"), in order, on the host and on the masks' device; None when one of them is not in the
        similarity sample (capture computes it on the host; a batch built without it reads its masks once)."""
        if "align_in_sim" not in self.row_index:
            self.row_index["align_in_sim"] = align_in_sim(self.sim.cpu(), self.align.cpu(), self.sim.device)
        return self.row_index["align_in_sim"]

    def load(self) -> tuple[torch.Tensor, list]:
        """The hidden states and every decoder layer's (args, kwargs), on the execution device."""
        hidden = self.store.get(f"{self.key}-hidden", self.device)[0]
        own = self.store.get(f"{self.key}-args", self.device) if self.own_args else []
        return hidden, _map_leaves(self.layer_args, lambda x: own[x.index] if isinstance(x, _Slot) else x)

    def keep(self, hidden: torch.Tensor) -> None:
        self.store.put(f"{self.key}-hidden", [hidden])


def align_in_sim(sim: torch.Tensor, align: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Positions of the `align` tokens among the `sim` tokens (host bool masks [B*S]) on the host and on `device`;
    None when some alignment token is not a similarity token."""
    if bool((align & ~sim).any()):
        return None
    pos = (sim.long().cumsum(0) - 1)[align]
    return pos, pos.to(device)


def state_keys(states: list[BatchState]) -> list[str]:
    """The store keys of the batches' files: hidden states, and own layer arguments where there are any."""
    return sorted([f"{s.key}-hidden" for s in states] + [f"{s.key}-args" for s in states if s.own_args])


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

    with replaced_forward(layers, make_stub):
        for n, b in enumerate(batches):
            record.clear()
            record["args"] = []
            try:
                decoder_forward(model, b["input_ids"].to(device), b["attention_mask"].to(device))
            except _Stop:
                pass
            layer_args, own = shared.split(record["args"])
            masks = [b[k].reshape(-1).bool() for k in ("attention_mask", "sim", "align")]
            rows = {k: m.nonzero().squeeze(1).to(device) for k, m in zip(("valid", "sim", "align"), masks)}
            rows["align_in_sim"] = align_in_sim(masks[1], masks[2], device)
            state = BatchState(store, f"batch{n}", device, layer_args, bool(own), *(m.to(device) for m in masks), rows)
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


def kept_align_rows(states: list[BatchState], needs: Needs) -> int | None:
    """The alignment tokens of all batches, when the observing pass can keep their activations for the alignment
    (it computes every similarity token's, and each alignment token is one); else None."""
    if not (needs.align and needs.dense):
        return None
    where = [s.align_in_sim() for s in states]
    return None if any(w is None for w in where) else sum(len(w[0]) for w in where)


@torch.no_grad()
def observe_layer(model: nn.Module, layer: MoELayer, states: list[BatchState], needs: Needs,
                  keep_outputs: bool) -> LayerObservation:
    """Run decoder layer `layer.index` on every batch, observing its experts; optionally keep its outputs."""
    dec = decoder_layers(model)[layer.index]
    with observing_layer(layer, needs, kept_align_rows(states, needs)) as (obs, current):
        for s in states:
            current["batch"] = s
            hidden, layer_args = s.load()
            out = run_decoder_layer(dec, hidden, layer_args[layer.index])
            if keep_outputs:
                s.keep(out)
    return obs


def _mtp_positions(s: BatchState, shape) -> BatchState:
    """The batch with its token masks at the MTP positions: t and t+1 both real tokens (moe/mtp.py)."""
    valid = mtp_token_mask(s.valid.reshape(shape)).reshape(-1)
    return dataclasses.replace(s, valid=valid, sim=s.sim & valid, align=s.align & valid, row_index={})


@torch.no_grad()
def observe_mtp_layer(model: nn.Module, mtp, layer: MoELayer, states: list[BatchState], input_ids: list[torch.Tensor],
                      needs: Needs) -> LayerObservation:
    """Run the MTP layer (mtp_layers.MTPLayers) on every batch, observing its experts: its input is the
    hidden states after the last decoder layer (final norm applied here) and the batch's next tokens
    (`input_ids`, one tensor per batch); the masks the model passes its template decoder layer serve it."""
    with observing_layer(layer, needs) as (obs, current):
        for s, ids in zip(states, input_ids, strict=True):
            hidden, layer_args = s.load()
            current["batch"] = _mtp_positions(s, hidden.shape[:2])
            mtp.forward(model, hidden, ids, layer_args[mtp.template], normed=False)
    return obs
