"""The source checkpoint of a streamed run (model.stream=true): checked first, read one layer at a time.

    check_stream(cfg, model_config)         # ConfigError for settings streaming cannot honour, before any load
    model, dtype = meta_model(cfg.model, source_dir(cfg.model))   # the CausalLM on the meta device
    key_files(source)                       # checkpoint tensor name -> the shard that holds it
    stacked, rest = stacked_experts(model, mapping, keys)   # fused expert tensors read expert by expert
    loading_dtypes(model, mapping, rest)    # the dtype transformers gives each renamed-only tensor

methods/layer_stream.py reads each decoder layer's tensors (`checkpoint_layers` says whose a tensor is) from the
shards into the meta skeleton, as `from_pretrained` would convert them. The fused expert tensors that
transformers builds by stacking per-expert checkpoint tensors (and concatenating gate and up) are built
here instead, one expert at a time into the preallocated fused tensor in the run's dtype (`read_stacked`):
the same values (stacking and concatenating copy, converting the dtype is `copy_`'s conversion), without
every expert's converted tensor alive at once. The other tensors are read for transformers by plain reads
too (weight_files.LazyTensor), each converted on reading to the dtype transformers would give it
(`loading_dtypes`), so no shard is memory-mapped and no tensor is held in two dtypes at once.
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .weight_files import INDEX, ShardReader

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---- settings, checked before any weights load ------------------------------------------------------

def check_stream(cfg, model_config) -> bool:
    """Whether this run streams (model.stream); a ConfigError for settings streaming cannot honour."""
    stream = cfg.model.get("stream", False)
    if not isinstance(stream, bool):
        raise ConfigError(f"model.stream={stream!r} must be true or false")
    if not stream:
        return False
    if not cfg.save:
        raise ConfigError("model.stream=true writes the compressed model layer by layer into checkpoint/; "
                          "it needs save=true")
    if cfg.model.get("device_map"):
        raise ConfigError(f"model.stream=true loads one decoder layer at a time itself; set model.device_map=null "
                          f"(got {cfg.model.device_map!r})")
    if getattr(model_config, "quantization_config", None):
        raise ConfigError("model.stream=true reads plain (unquantised) safetensors weights; this checkpoint is "
                          "quantised: set model.stream=false")
    path = Path(str(cfg.model.path)).expanduser()
    if path.is_dir() and not ((path / INDEX).is_file() or (path / "model.safetensors").is_file()):
        raise ConfigError(f"model.stream=true reads safetensors shards; {path} has neither model.safetensors "
                          f"nor {INDEX}")
    return True


# ---- the source checkpoint ---------------------------------------------------------------------------

def source_dir(model_cfg) -> Path:
    """The source checkpoint's folder: model.path, or a hub id's files fetched into the local hub cache."""
    path = Path(str(model_cfg.path)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # a hub id: its files on local disk, read shard by shard

    return Path(snapshot_download(str(model_cfg.path), revision=model_cfg.get("revision"),
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


def key_files(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the shard that holds it."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / v for k, v in weight_map.items()}
    from safetensors import safe_open

    single = directory / "model.safetensors"
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def layer_of(key: str) -> int | None:
    """The decoder layer a tensor or parameter name belongs to (None: embeddings, final norm, head, ...)."""
    m = _LAYER_KEY.search(key)
    return int(m.group(1)) if m else None


def decoder_layer_of(model: nn.Module):
    """name -> the text decoder layer a model entry belongs to (None: embeddings, final norm, head, and a
    vision or audio tower, whose own `layers.N` are not decoder layers)."""
    from .moe.families import family_for

    path = family_for(model.config).decoder_path
    prefix = f"{path}.layers." if path else "layers."

    def of(name: str) -> int | None:
        return int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else None
    return of


def checkpoint_layers(model: nn.Module, mapping: list, keys) -> dict[str, int | None]:
    """Checkpoint tensor name -> the text decoder layer of the model entry it loads into (renamed as
    `convert_and_load_state_dict_in_model` renames it, on a copy of the mapping: the renaming marks
    conversions used); a name that is no model entry: by its own `layers.N`."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = copy.deepcopy(mapping)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta, of = model.state_dict(), decoder_layer_of(model)
    out = {}
    for key in sorted(keys, key=dot_natural_key):  # transformers' order (guarded renamings need it)
        name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        out[key] = of(name) if name in meta else layer_of(key)
    return out


def _model_dtype(model_cfg, config) -> torch.dtype:
    name = model_cfg.get("dtype", "float32")
    if name == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        return saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved))
    return getattr(torch, name)


def meta_model(model_cfg, source: Path):
    """The model of `source` on the meta device (built by the Auto class that loads it, towers kept:
    moe.registry.auto_model_class), in the run's dtype, with its generation config."""
    from transformers import AutoConfig, GenerationConfig

    from .moe.registry import auto_model_class

    trust = bool(model_cfg.get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    dtype = _model_dtype(model_cfg, config)
    with torch.device("meta"):
        model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust).eval()
    if (source / "generation_config.json").is_file():  # as from_pretrained reads it
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model, dtype


# ---- fused expert tensors, read expert by expert --------------------------------------------------

@dataclass
class Stacked:
    """A model tensor that transformers' conversion builds as cat([stack(experts of pattern) for pattern],
    dim): `parts` holds, per source pattern in order, the checkpoint keys of experts 0..E-1."""

    name: str
    dim: int  # the concatenation dimension of the fused tensor (0: one pattern, stacked only)
    parts: list[list[str]]


def _stacking_dim(converter) -> int | None:
    """The concatenation dim of a conversion that stacks per-expert tensors (MergeModulelist(0), then
    Concatenate(d >= 1) when there are several patterns); None for any other conversion."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    if len(ops) == 1:
        return 0 if len(converter.source_patterns) == 1 else None
    if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim >= 1:
        return ops[1].dim
    return None


def stacked_experts(model: nn.Module, mapping: list, keys: list[str]) -> tuple[list[Stacked], list[str]]:
    """The model tensors among `keys`' targets built by stacking per-expert tensors, and the keys left for
    transformers' own conversion. Keys are renamed as `convert_and_load_state_dict_in_model` renames them
    (which also marks the conversions used, for the reverse conversion on save)."""
    from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                 rename_source_key)

    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    found: dict[str, dict[str, list[str]]] = {}
    converter_of, rest = {}, []
    for key in sorted(keys, key=dot_natural_key):  # transformers' order: experts 0, 1, ..., 10, ...
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None or name not in meta or _stacking_dim(by_pattern[pattern]) is None:
            rest.append(key)
            continue
        converter_of[name] = by_pattern[pattern]
        found.setdefault(name, {}).setdefault(pattern, []).append(key)
    stacked = []
    for name, patterns in found.items():
        converter = converter_of[name]
        parts = [patterns.get(p, []) for p in converter.source_patterns]
        if any(len(keys_) != meta[name].shape[0] for keys_ in parts):  # not one key per expert: transformers'
            rest.extend(k for keys_ in parts for k in keys_)
            continue
        stacked.append(Stacked(name, _stacking_dim(converter), parts))
    return stacked, rest


def loading_dtypes(model: nn.Module, mapping: list, keys: list[str]) -> dict[str, torch.dtype | None]:
    """Checkpoint tensor name -> the dtype `convert_and_load_state_dict_in_model` gives it, where the tensor is
    only renamed into a model entry (that entry's dtype: no dtype plan, no quantizer); None where a
    conversion takes it (it converts its result itself). Renamed as transformers renames (stacked_experts)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta, prefix = model.state_dict(), model.base_model_prefix
    out = {}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:  # transformers' second try: the key itself, prefixed if need be
            name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        out[key] = meta[name].dtype if pattern is None and name in meta else None
    return out


@torch.no_grad()
def read_stacked(target: Stacked, files: dict[str, Path], like: torch.Tensor, device) -> torch.Tensor:
    """The fused tensor `target` (shape and dtype of `like`, on `device`), each expert's checkpoint tensor
    read from its shard into its slice (ShardReader: converted there, no other copy alive)."""
    out = torch.empty(like.shape, dtype=like.dtype, device=device)
    with ExitStack() as stack:
        readers: dict[Path, ShardReader] = {}

        def reader(key: str) -> ShardReader:
            f = files[key]
            if f not in readers:
                readers[f] = stack.enter_context(ShardReader(f))
            return readers[f]

        offset = 0
        for keys in target.parts:
            size = reader(keys[0]).shape(keys[0])[target.dim - 1] if target.dim else None
            for e, key in enumerate(keys):
                dst = out[e] if size is None else out[e].narrow(target.dim - 1, offset, size)
                reader(key).read_into(key, dst)
            offset += size or 0
    if target.dim and offset != out.shape[target.dim]:
        raise ValueError(f"{target.name}: its experts' checkpoint tensors fill {offset} of {out.shape[target.dim]} "
                         f"along dimension {target.dim}")
    return out
