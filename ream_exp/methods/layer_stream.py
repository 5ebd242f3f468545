"""The streamed layer source of the layer-wise driver: a model larger than memory, one decoder layer at a time.

    model.stream=true

`LayerStream.open` builds the model on the meta device and materialises only what the current step
needs: the embeddings (and the rotary tables, computed as `from_pretrained` computes them) to capture
decoder layer 0's inputs, then each decoder layer in turn, read from the source safetensors shards (that
layer's keys only, stream_source.py) and converted to the model's parameter names by transformers' own
conversion mapping (per-expert checkpoint tensors fused into `gate_up_proj`, Mixtral's renamed blocks,
...). When the layer-wise driver is done with a layer (observed, compressed, propagated), `finished`
writes it to checkpoint.partial/ as a shard of its own, in the format `save_pretrained` writes (the
reverse conversion; partial_checkpoint.py), and puts the layer back on the meta device. Embeddings,
final norm and head are copied last; `save` writes the index, config.json with its provenance, the
tokenizer and the plan, then renames checkpoint.partial/ to checkpoint/. While a merging method's alignment
PCA holds a layer's neuron features (as large as its experts in float32), `spilled` keeps that layer's
experts out of memory and reads them back after (docs/models.md, "The scale rehearsal").

Resume: the layers an earlier attempt of the same config wrote are kept (partial_checkpoint.py). The
driver reads the calibration hidden states at the boundary from a kept calib.states_dir when its
manifest names this run and this boundary (methods/states.py), else recomputes them by running the
finished layers, the compressed ones read back from their shards (sequential), the original ones with
the observing forward (non-sequential, whose propagation used it), and continues with the first layer
not written. A model held in memory whole is the driver's other layer source (layerwise.InMemory).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import write_provenance
from ..moe import apply_layer_plan, decoder_layers, family_for, keep_experts, moe_layers
from ..partial_checkpoint import PARTIAL, PartialCheckpoint
from ..plan import LayerPlan
from ..stream_source import (Stacked, checkpoint_layers, decoder_layer_of, key_files, loading_dtypes, meta_model,
                             read_stacked, source_dir, stacked_experts)
from ..weight_files import ShardReader

# The experts read back at a time while a spilled layer's alignment features are built (LayerStream.spilled).
SPILL_BLOCK = 1 << 27


def _is_meta(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type == "meta"


class LayerStream:
    """The model of a streamed run: meta skeleton plus the one decoder layer in memory; see the module doc."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, source: Path, out: Path, device: str, digest: str):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model, self.dtype, self.source, self.device = model, dtype, source, device
        # an `mtp.` layer (Qwen3-Next, Qwen3.5) is no decoder layer's, nor the rest's: mtp_layers.py reads it
        self.keys = {k: f for k, f in key_files(source).items() if not k.startswith("mtp.")}
        self.mapping = get_model_conversion_mapping(model)  # the same list from_pretrained would use
        self.layer_of = decoder_layer_of(model)  # model entry -> its decoder layer (a tower's layers: None)
        self.towers = family_for(model.config).towers  # vision / audio towers: copied, never run
        self.key_layer = checkpoint_layers(model, self.mapping, self.keys)  # the same for checkpoint keys
        self.layers = decoder_layers(model)
        self.moe = {l.index: l for l in moe_layers(model)}
        self.names = {id(m): n for n, m in model.named_modules()}
        self.partial = PartialCheckpoint(out, digest, source, set(self.moe))  # resumes an earlier attempt
        self.compressed_shape: set[int] = set()  # meta layers already given their compressed shape
        self.load_rest()

    @classmethod
    def open(cls, model_cfg, device: str, run_dir: Path, digest: str) -> "LayerStream":
        source = source_dir(model_cfg)
        model, dtype = meta_model(model_cfg, source)
        return cls(model, dtype, source, Path(run_dir) / PARTIAL, device, digest)

    # ---- what is written (this attempt or an earlier one) -----------------------------------------------
    def done(self, index: int) -> bool:
        """Whether decoder layer `index` is written (in this attempt or an earlier one)."""
        return self.partial.done(index)

    def plan_of(self, index: int) -> LayerPlan:
        return self.partial.plan_of(index)

    def boundary(self) -> int:
        """The first decoder layer not written (the written ones are always 0..boundary-1)."""
        return self.partial.boundary()

    def states_owner(self, boundary: int) -> dict:
        """Whose calibration hidden states a kept states_dir holds at `boundary` (see methods/states.py)."""
        return self.partial.states_owner(boundary)

    # ---- reading ----------------------------------------------------------------------------------------
    def _load(self, keys: list[str], files: dict[str, Path]) -> None:
        """Read `keys` from their shards into the model (converted as from_pretrained converts them)."""
        read_into(self.model, self.mapping, keys, files, self.device, self.dtype)
        self._own_storage()

    def _own_storage(self) -> None:
        """Give every loaded tensor that still lies in a memory-mapped shard (the ones loading did not
        convert or move: attention, norms, router on CPU) a copy of its own. Such a tensor's storage is
        the mapping's memory (not torch's, so not resizable) and keeps the whole mapping alive, with the
        shard's pages read so far (the experts' too, though fusing copied them): resident memory that
        would stay until the layer is freed. `read_into` maps no shard (plain reads), so this is a guard."""
        for t in self.model.state_dict(keep_vars=True).values():
            if t is not None and not _is_meta(t) and not t.untyped_storage().resizable():
                t.data = t.data.clone()

    def _check_loaded(self, selected) -> None:
        """Every tensor of the model entries `selected(name)` is real after loading: non-persistent buffers
        (rotary tables) are computed as from_pretrained computes them (a tower's are left unset: never run);
        a tensor missing from the checkpoint is an error."""
        for name, t in self.model.state_dict(keep_vars=True).items():
            if selected(name) and _is_meta(t):
                raise ValueError(f"model.stream=true: {self.source} has no tensor for {name}; streaming needs "
                                 "every weight in the checkpoint (from_pretrained would initialise it)")
        for path, owner in self.model.named_modules():
            meta = [n for n, b in owner._buffers.items() if _is_meta(b) and selected(f"{path}.{n}")]
            if not meta or any(path.startswith(f"{t}.") for t in self.towers):
                continue  # a tower's non-persistent buffers: neither saved nor used by text-only calibration
            if "RotaryEmbedding" not in type(owner).__name__:
                raise ValueError(f"model.stream=true cannot compute buffer(s) {meta} of {type(owner).__name__}")
            for n in meta:
                owner._buffers[n] = torch.empty_like(owner._buffers[n], device=self.device)
            self.model._init_weights(owner)

    def load_rest(self) -> None:
        """Embeddings, final norm, head and rotary tables: everything outside the decoder layers."""
        rest = [k for k in self.keys if self.key_layer[k] is None]
        self._load(rest, self.keys)
        self.model.tie_weights()
        self._check_loaded(lambda name: self.layer_of(name) is None)

    def free_rest(self) -> None:
        """Back to meta: what only capturing layer 0's inputs needed (buffers stay: they are tiny)."""
        for name, p in _rest_parameters(self.model, self.layers):
            _to_meta(self.model, name, p)

    def load(self, index: int) -> None:
        """Decoder layer `index` from the source checkpoint (no-op when it is in memory)."""
        layer = self.layers[index]
        if not any(_is_meta(p) for p in layer.parameters()):
            return
        keys = [k for k in self.keys if self.key_layer[k] == index]
        self._load(keys, self.keys)
        self._check_loaded(lambda name: self.layer_of(name) == index)

    def load_written(self, index: int) -> None:
        """Decoder layer `index` as written (compressed) by an earlier attempt, read back from its shard."""
        self._compressed_skeleton(index)
        shard = self.partial.path / self.partial.written[index]
        from safetensors import safe_open

        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
        self._load(keys, {k: shard for k in keys})
        self._check_loaded(lambda name: self.layer_of(name) == index)

    def _compressed_skeleton(self, index: int) -> None:
        """Give a finished MoE layer's meta skeleton its compressed shape (slicing meta tensors: the shape
        is all a meta tensor has, merges change values only)."""
        if index in self.partial.plans and index not in self.compressed_shape:
            keep_experts(self.moe[index], self.partial.plans[index].keep)
            self.compressed_shape.add(index)

    def release(self, index: int) -> None:
        """Decoder layer `index` back to meta (its compressed shape kept for the final parameter count)."""
        layer = self.layers[index]
        prefix = self.names[id(layer)]
        for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
            _to_meta(self.model, f"{prefix}.{name}", p)
        self._compressed_skeleton(index)
        _return_freed_memory()

    @contextlib.contextmanager
    def spilled(self, layer):
        """The alignment PCA's spill (merging.pca_weight_features): MoE layer `layer`'s routed experts freed while
        its neuron features are built and reduced, read back from the source a block of SPILL_BLOCK bytes at a
        time to build them (the iteration yields range(a, b) while the experts module holds experts a..b-1), and
        read back whole once the features are freed, bit for bit as `load` read them. A layer that is not this
        stream's (an MTP layer) or whose experts are not stacked from per-expert checkpoint tensors keeps its
        experts: one block of all of them."""
        own = self.moe.get(layer.index)
        targets = self._expert_targets(layer) if own is not None and own.experts is layer.experts else None
        if not targets:
            yield [range(layer.num_experts)]
            return
        n = layer.num_experts
        shapes = {t.name: self.model.get_parameter(t.name) for t in targets}
        per_expert = sum(p[0].numel() * p.element_size() for p in shapes.values())
        per_block = max(1, SPILL_BLOCK // per_expert)
        for name in list(shapes):
            _to_meta(self.model, name, shapes.pop(name))
            shapes[name] = self.model.get_parameter(name)  # the meta one: nothing of the expert tensors held
        _return_freed_memory()

        def blocks():
            for a in range(0, n, per_block):
                b = min(n, a + per_block)
                for t in targets:
                    like = torch.empty((b - a, *shapes[t.name].shape[1:]), dtype=shapes[t.name].dtype, device="meta")
                    part = Stacked(t.name, t.dim, [keys[a:b] for keys in t.parts])
                    _set_parameter(self.model, t.name, read_stacked(part, self.keys, like, self.device))
                yield range(a, b)
            for name, meta in shapes.items():  # the last block freed
                _to_meta(self.model, name, meta)

        try:
            yield blocks()
        finally:
            for name, meta in shapes.items():
                _to_meta(self.model, name, meta)
            self._load([k for t in targets for keys in t.parts for k in keys], self.keys)  # as `load` reads them

    def _expert_targets(self, layer) -> list[Stacked] | None:
        """The fused tensors of `layer`'s experts module, each stacked from per-expert checkpoint tensors (all its
        parameters), else None."""
        prefix = self.names[id(layer.experts)] + "."
        keys = [k for k in self.keys if self.key_layer[k] == layer.index]
        targets = [t for t in stacked_experts(self.model, self.mapping, keys)[0] if t.name.startswith(prefix)]
        params = {prefix + name for name, _ in layer.experts.named_parameters()}
        return targets if targets and {t.name for t in targets} == params else None

    @contextlib.contextmanager
    def capturing(self):
        """Embeddings in memory while the driver captures decoder layer 0's inputs, then back to meta."""
        if any(_is_meta(p) for _, p in _rest_parameters(self.model, self.layers)):
            self.load_rest()
        try:
            yield
        finally:
            self.free_rest()

    # ---- writing ----------------------------------------------------------------------------------------
    def _state_dict(self, keep) -> dict[str, torch.Tensor]:
        """The tensors save_pretrained would write for the model's entries selected by `keep(name)`."""
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = {k: v for k, v in self.model.state_dict().items() if keep(k)}
        for ignored in self.model._keys_to_ignore_on_save or ():
            state.pop(ignored, None)
        state = remove_tied_weights_from_state_dict(state, self.model)
        # as after from_pretrained, but splitting fused tensors into views (_chunking_views)
        self.model._weight_conversions = _chunking_views([c for c in self.mapping if c.was_used()])
        return {k: v.contiguous() for k, v in revert_weight_conversion(self.model, state).items()}

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{len(self.layers) + 1:05d}.safetensors"

    def finished(self, index: int, plan: LayerPlan | None = None) -> None:
        """Write decoder layer `index` (compressed as planned) as its own shard, record it, free it."""
        prefix = self.names[id(self.layers[index])] + "."
        name = self.shard_name(index)
        self.partial.write_shard(name, self._state_dict(lambda k: k.startswith(prefix)))
        self.partial.record(index, name, plan)
        if plan is not None:
            self.compressed_shape.add(index)
        self.release(index)

    def complete(self, plans: list[LayerPlan]) -> None:
        """Every decoder layer not written yet: loaded, compressed by its (unapplied) plan, written."""
        by_layer = {lp.layer: lp for lp in plans}
        for i in range(len(self.layers)):
            if self.done(i):
                self._compressed_skeleton(i)
                continue
            self.load(i)
            lp = by_layer.get(i)
            if lp is not None:
                apply_layer_plan(self.moe[i], lp)
            self.finished(i, lp)

    def save(self, tokenizer, directory: Path, cfg, plan, experts_before: int, calibrated: bool = True) -> None:
        """The rest (embeddings, norm, head), index, config.json, tokenizer, plan and provenance; then the
        partial folder becomes `directory` (refused if it exists: nothing already written is replaced)."""
        directory = Path(directory)
        if directory.exists():
            raise FileExistsError(f"{directory} exists; the streamed checkpoint is not written over it")
        self.load_rest()
        rest = self.shard_name(len(self.layers))
        self.partial.write_shard(rest, self._state_dict(lambda k: self.layer_of(k) is None))
        self.free_rest()
        shards = [*(self.partial.written[i] for i in range(len(self.layers))), rest]
        self.partial.write_index(shards, self.model.num_parameters())
        model, out = self.model, self.partial.path
        model.config.dtype = str(self.dtype).split(".")[1]  # what save_pretrained records
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out)
        if model.can_generate():
            model.generation_config.save_pretrained(out)
        write_provenance(model, tokenizer, out, cfg, plan, experts_before, calibrated)
        self.partial.finish(directory)


# ---- helpers -----------------------------------------------------------------------------------------

def read_into(model: nn.Module, mapping: list, keys: list[str], files: dict[str, Path], device, dtype) -> None:
    """Read checkpoint tensors `keys` (in `files`) into `model`, converted as from_pretrained converts them: the
    fused expert tensors expert by expert (stream_source.read_stacked), the rest by transformers (also used
    by ream_exp.compressed.load_compressed), from plain reads of the shards (weight_files.LazyTensor), each
    tensor only renamed already in the dtype transformers gives it (stream_source.loading_dtypes)."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    stacked, keys = stacked_experts(model, mapping, keys)
    for target in stacked:
        _set_parameter(model, target.name, read_stacked(target, files, model.get_parameter(target.name), device))
    if not keys:
        return
    dtypes = loading_dtypes(model, mapping, keys)
    with contextlib.ExitStack() as stack:
        if hf_logging.is_progress_bar_enabled():  # one "Loading weights" bar per layer says nothing
            hf_logging.disable_progress_bar()
            stack.callback(hf_logging.enable_progress_bar)
        readers = {f: stack.enter_context(ShardReader(f)) for f in sorted({files[k] for k in keys})}
        tensors = {k: readers[files[k]].lazy(k, dtypes[k]) for k in keys}
        config = LoadStateDictConfig(device_map={"": device}, dtype=dtype, weight_mapping=mapping)
        convert_and_load_state_dict_in_model(model, tensors, config)


def _chunking_views(conversions: list) -> list:
    """`conversions`, each converter's Concatenate replaced by one whose reverse (the split on saving) chunks
    into views: transformers' Chunk copies every chunk (`.contiguous()`), a second copy of a fused gate_up_proj
    while its layer is written. The per-expert views of a fused tensor split along a later dimension than
    the experts' are contiguous (any other is made contiguous on writing, as before): the same values."""
    from transformers.core_model_loading import Concatenate, WeightConverter

    out = []
    for c in conversions:
        if isinstance(c, WeightConverter) and any(type(op) is Concatenate for op in c.operations):
            c = copy.copy(c)
            c.operations = [_view_ops()[0](op.dim, op.num_shards_attribute) if type(op) is Concatenate else op
                            for op in c.operations]
        out.append(c)
    return out


@functools.cache
def _view_ops():
    """(Concatenate whose reverse is ViewChunk, ViewChunk: transformers' Chunk without its copies)."""
    from transformers.core_model_loading import Chunk, Concatenate

    class ViewChunk(Chunk):
        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            if len(input_dict) > 1:
                raise ValueError("Undefined Operation encountered")
            tensors = next(iter(input_dict.values()))
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            targets = self.get_target_patterns(target_patterns, **kwargs)
            return dict(zip(targets, torch.chunk(tensor, len(targets), dim=self.dim)))

    class ViewConcatenate(Concatenate):
        @property
        def reverse_op(self):
            return ViewChunk(self.dim, self.num_shards_attribute)

    return ViewConcatenate, ViewChunk


def _rest_parameters(model: nn.Module, layers: nn.ModuleList):
    inside = {id(p) for p in layers.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in inside]


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hand the heap memory freed with a layer back to the operating system (glibc's malloc_trim; a no-op
    without glibc). glibc keeps freed chunks of the sizes a layer allocates for reuse, so without it the
    resident set of a streamed run grows by a fraction of a layer per layer. Values are untouched."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Parameter `name` of `model` becomes `value`, as transformers' loading sets a loaded parameter."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    param = nn.Parameter(value, requires_grad=value.is_floating_point())
    param._is_hf_initialized = True
    setattr(module, attr, param)


def _to_meta(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter/buffer `name` of `model` by a meta tensor of the same shape (frees its memory)."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    meta = torch.empty_like(tensor, device="meta")
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(meta, requires_grad=tensor.requires_grad)
    else:
        module._buffers[attr] = meta
