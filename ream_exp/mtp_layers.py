"""The multi-token-prediction (MTP) layer of a run: read from the source checkpoint, compressed as one more
MoE layer with its own statistics, written into the checkpoint in the source's key layout (docs/models.md).

    check_mtp(cfg.model, model_config, num_experts, n_keep)   # ConfigError before any load (see below)
    mtp = MTPLayers.open(cfg.model, model, device)             # None: the checkpoint has no MTP tensors
    mtp.layers        # [its MoELayer] (index num_hidden_layers, after every decoder layer), [] when kept as is
    mtp.load(); mtp.forward(model, hidden, input_ids, layer_args); mtp.write(run_dir / "checkpoint")

transformers builds no MTP layer, so a saved model would lose it, and with it MTP speculative decoding.
Where the family's MTP layout is known (moe/mtp.py) the layer is built beside the model: its norms and
projection read from the shards, its decoder layer built as the model's own decoder layer class and
loaded by transformers' own conversion (per-expert tensors fused, as for every decoder layer) while it
briefly stands in the model's decoder layer list at index num_hidden_layers. Methods see it as the last
MoE layer (methods.Context.layers): the layer-wise driver observes it after every decoder layer (on the
compressed model's hidden states when sequential), the one-pass observation after each forward, and the
plan compresses it to the same expert count as every other layer. `write` adds one shard to the
checkpoint: the decoder layer as transformers saves a decoder layer (reverse conversion), renamed back
to the source's prefix, and the MTP's other tensors as read, in the run's dtype.

A checkpoint whose MTP tensors have no known layout keeps them byte for byte when the expert count does
not change; a run that would change it is refused before any load (`check_mtp`), never dropped silently.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .config import ConfigError
from .moe import MoELayer, decoder_layers, family_for
from .moe.mtp import FoundMTP, MTPHead, find_mtp, next_token_embeddings, template_layer
from .stream_source import key_files, source_dir
from .weight_files import BITS, INDEX, SINGLE, ShardReader


# ---- before any load ------------------------------------------------------------------------------

def _checkpoint_keys(model_cfg) -> list[str] | None:
    """The tensor names of a local safetensors checkpoint (None: a hub id, or no safetensors)."""
    path = Path(str(model_cfg.path)).expanduser()
    if not path.is_dir() or not ((path / INDEX).is_file() or (path / SINGLE).is_file()):
        return None
    return list(key_files(path))


def _refusal(model_cfg, found: FoundMTP, num_experts: int, n_keep: int) -> str:
    return (f"model.path={str(model_cfg.path)!r}: the checkpoint has multi-token-prediction tensors "
            f"({found.keys[0]}, {len(found.keys)} in all) that ream-exp cannot compress ({found.reason}); they "
            f"are kept unchanged only while every layer keeps its {num_experts} experts, not at {n_keep}: "
            f"use ratio=0 or a checkpoint without them")


def check_mtp(model_cfg, config, num_experts: int, n_keep: int, found: FoundMTP | None = None,
              budget: str = "uniform", quant: str = "none") -> None:
    """Refuse, before any weights load, a run that changes the expert count of a checkpoint whose MTP
    tensors ream-exp cannot compress (they would no longer fit the written config), and a per-layer budget or a
    quant stage beside MTP tensors (the MTP layer's keys share the config's one expert count; llm-compressor
    reloads the model without them). `found`: what
    MTPLayers.open found (a hub checkpoint is read only once loaded), else read from model.path."""
    if found is None:
        keys = _checkpoint_keys(model_cfg)
        found = find_mtp(keys, config) if keys else None
    if found is not None and found.layout is None and n_keep != num_experts:
        raise ConfigError(_refusal(model_cfg, found, num_experts, n_keep))
    if found is not None and budget == "global":
        raise ConfigError(f"budget=global: {model_cfg.get('path') or model_cfg.get('name')} has "
                          "multi-token-prediction layers, whose experts share the config's one count; use "
                          "budget=uniform")
    if found is not None and quant != "none":
        raise ConfigError(f"quant={quant}: {model_cfg.get('path') or model_cfg.get('name')} has "
                          "multi-token-prediction layers, which the quantization stage would not carry over; use "
                          "quant=none")


# ---- the MTP layer beside the model -----------------------------------------------------------------

def _is_meta(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type == "meta"


class MTPLayers:
    """The source checkpoint's MTP layer for one run (see the module doc)."""

    def __init__(self, model: nn.Module, source: Path, found: FoundMTP, files: dict[str, Path], device,
                 dtype: torch.dtype):
        self.source, self.found, self.files, self.device, self.dtype = source, found, files, device, dtype
        self.head: MTPHead | None = None
        self.loaded = False
        self.mapping = None
        if found.layout is None:
            return
        self.family = family_for(model.config)
        decoder = model.get_submodule(self.family.decoder_path)
        layers = decoder_layers(model)
        self.index = len(layers)  # after every decoder layer, as nextn checkpoints number it
        self.template = template_layer(model.config)
        if not isinstance(getattr(decoder, "norm", None), nn.Module):
            found.layout, found.reason = None, f"{type(decoder).__name__} has no final norm `norm`"
            return
        hidden = int(model.config.get_text_config().hidden_size)
        with torch.device("meta"):
            layer = type(layers[self.template])(decoder.config, self.template).to(dtype)
            proj = nn.Linear(2 * hidden, hidden, bias=False, dtype=dtype)
        norms = [copy.deepcopy(decoder.norm).to(device="meta", dtype=dtype) for _ in range(2)]
        self.head = MTPHead(norms[0], norms[1], proj, layer).eval()

    @classmethod
    def open(cls, model_cfg, model: nn.Module, device, dtype: torch.dtype) -> "MTPLayers | None":
        """The MTP layer of model.path's checkpoint (None without one); weights are read by `load`. A layout
        ream-exp cannot compress gives an instance whose tensors `write` copies as they are."""
        path = Path(str(model_cfg.path)).expanduser()
        source = path if path.is_dir() else source_dir(model_cfg)
        if not ((source / INDEX).is_file() or (source / SINGLE).is_file()):
            return None
        files = key_files(source)
        found = find_mtp(files, model.config)
        return None if found is None else cls(model, source, found, files, device, dtype)

    @property
    def layers(self) -> list[MoELayer]:
        """The MTP layer's MoE layer, as methods see it after the decoder's (none when kept as is)."""
        if self.head is None:
            return []
        block_path = self.family.block_path
        block = self.head.layer.get_submodule(block_path) if block_path else self.head.layer
        name = self.found.layer_prefix + block_path if block_path else self.found.layer_prefix.rstrip(".")
        return [MoELayer(self.index, name, block, getattr(block, self.family.router_attr),
                         getattr(block, self.family.experts_attr), self.family)]

    # ---- reading ------------------------------------------------------------------------------------
    def _read(self, key: str, device, dtype) -> torch.Tensor:
        with ShardReader(self.files[key]) as shard:
            out = torch.empty(shard.shape(key), dtype=dtype, device=device)
            shard.read_into(key, out)
        return out

    @contextlib.contextmanager
    def _hosted(self, model: nn.Module):
        """The MTP decoder layer standing in the model's decoder layer list at index num_hidden_layers, so
        transformers' conversion maps its tensors as any decoder layer's; removed on exit."""
        layers = decoder_layers(model)
        if len(layers) != self.index:
            raise ValueError(f"the model has {len(layers)} decoder layers, the MTP layer follows {self.index}")
        layers.append(self.head.layer)
        try:
            yield f"{self.family.decoder_path}.layers.{self.index}." if self.family.decoder_path else \
                f"layers.{self.index}."
        finally:
            del layers[self.index]

    def load(self, model: nn.Module) -> None:
        """Read the MTP layer's weights from the shards into the head (once; a no-op when kept as is)."""
        if self.head is None or self.loaded:
            return
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        for role, module in (("embed_norm", self.head.embed_norm), ("hidden_norm", self.head.hidden_norm),
                             ("proj", self.head.proj)):
            weight = self._read(self.found.head[role], self.device, self.dtype)
            module.weight = nn.Parameter(weight, requires_grad=False)
        self.mapping = get_model_conversion_mapping(model)
        rel = len(self.found.layer_prefix)
        disk = f"{self.found.decoder_prefix}{self.index}."  # where the main layers' conversion expects it
        with self._hosted(model), contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(f, "pt"))
                       for f in sorted({self.files[k] for k in self.found.layer_keys})}
            tensors = {disk + k[rel:]: handles[self.files[k]].get_slice(k) for k in self.found.layer_keys}
            config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, weight_mapping=self.mapping)
            convert_and_load_state_dict_in_model(model, tensors, config)
        for name, t in list(self.head.layer.named_parameters()) + list(self.head.layer.named_buffers()):
            if _is_meta(t):
                raise ValueError(f"{self.source}: the MTP layer has no tensor for {self.found.layer_prefix}{name}")
            if not t.untyped_storage().resizable():  # still in the memory-mapped shard: a copy of its own
                t.data = t.data.clone()
        self.head.requires_grad_(False)
        self.loaded = True

    # ---- the forward ----------------------------------------------------------------------------------
    def forward(self, model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, layer_args,
                normed: bool = True) -> torch.Tensor:
        """The MTP decoder layer's output [B, S, H] at every position t (the last one has no next token):
        `hidden` the main model's last hidden states (after its final norm unless normed=False), `layer_args`
        what the model passes its decoder layer `self.template`."""
        if not normed:
            hidden = model.get_submodule(self.family.decoder_path).norm(hidden)
        embeds = model.get_input_embeddings()(input_ids.to(hidden.device))
        return self.head(hidden, next_token_embeddings(embeds), layer_args)

    @contextlib.contextmanager
    def template_args(self, model: nn.Module):
        """Within the block, each forward of the model records in the yielded dict's "args" what it passes
        its decoder layer `self.template` besides the hidden states: (args, kwargs)."""
        record: dict = {}

        def hook(_module, args, kwargs):
            kw = dict(kwargs)
            record["args"] = (tuple(args[1:]), kw) if args else ((), {k: v for k, v in kw.items()
                                                                     if k != "hidden_states"})

        handle = decoder_layers(model)[self.template].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield record
        finally:
            handle.remove()

    # ---- writing ----------------------------------------------------------------------------------------
    def _layer_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The MTP decoder layer as save_pretrained writes a decoder layer, under the source's prefix."""
        from transformers.core_model_loading import revert_weight_conversion

        with self._hosted(model) as prefix:
            state = {prefix + k: v for k, v in self.head.layer.state_dict().items()}
            had = "_weight_conversions" in vars(model)
            saved = getattr(model, "_weight_conversions", None)
            model._weight_conversions = [c for c in self.mapping if c.was_used()]
            try:
                reverted = revert_weight_conversion(model, state)
            finally:
                if had:
                    model._weight_conversions = saved
                else:
                    del model._weight_conversions
        marker = re.compile(rf"(?:^|\.)layers\.{self.index}\.")
        return {self.found.layer_prefix + k[marker.search(k).end():]: v.detach().to("cpu").contiguous()
                for k, v in reverted.items()}

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every MTP tensor to write: as read (a layout kept as is: in its own dtype), the decoder layer
        as compressed."""
        if self.head is None:
            return _as_stored(self.found.keys, self.files)
        self.load(model)
        layer_keys = set(self.found.layer_keys)
        out = {k: self._read(k, "cpu", self.dtype) for k in self.found.keys if k not in layer_keys}
        out.update(self._layer_state(model))
        return out

    def write(self, model: nn.Module, directory: Path) -> None:
        """Add the MTP tensors to the checkpoint in `directory` as one more shard (index rewritten)."""
        append_shard(Path(directory), self.tensors(model))


def _as_stored(keys: list[str], files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Tensors `keys` as the shards store them (any dtype, FP8 and scales included)."""
    from safetensors import safe_open

    out = {}
    for path in sorted({files[k] for k in keys}):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in keys if files[k] == path})
    return out


# ---- one more shard in a saved checkpoint -------------------------------------------------------------

def _shard_bytes(path: Path) -> int:
    with ShardReader(path) as shard:
        return sum(_numel(shape) * BITS[dtype] // 8 for dtype, shape, _ in shard.header.values())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def append_shard(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`tensors` as the last shard of the checkpoint in `directory`: shards renamed model-i-of-n (n one more
    than before; a single model.safetensors becomes the first), the new one written, then the index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = directory / INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        weight_map = dict(index["weight_map"])
    else:
        with safe_open(directory / SINGLE, "pt") as f:
            weight_map = {k: SINGLE for k in f.keys()}
        index = {"metadata": {}}
    clash = sorted(set(tensors) & set(weight_map))
    if clash:
        raise ValueError(f"{directory}: the checkpoint already holds {clash[0]}")
    shards = sorted(set(weight_map.values()))
    n = len(shards) + 1
    renamed = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(shards)}
    last = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(tensors, str(directory / last), metadata={"format": "pt"})
    for old, new in renamed.items():
        os.replace(directory / old, directory / new)
    weight_map = {k: renamed[v] for k, v in weight_map.items()} | {k: last for k in tensors}
    total = sum(_shard_bytes(directory / name) for name in [*renamed.values(), last])
    index = {"metadata": {**index.get("metadata", {}), "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(index_path, lambda f: f.write(text))
