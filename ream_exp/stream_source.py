"""The source checkpoint of a streamed run (model.stream=true): checked first, read one layer at a time.

    check_stream(cfg, model_config)         # ConfigError for settings streaming cannot honour, before any load
    model, dtype = meta_model(cfg.model, source_dir(cfg.model))   # the CausalLM on the meta device
    key_files(source)                       # checkpoint tensor name -> the shard that holds it

methods/layer_stream.py reads each decoder layer's tensors (`layer_of` says whose a tensor is) from the
shards into the meta skeleton, as `from_pretrained` would convert them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import ConfigError
from .weight_files import INDEX

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


def _model_dtype(model_cfg, config) -> torch.dtype:
    name = model_cfg.get("dtype", "float32")
    if name == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        return saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved))
    return getattr(torch, name)


def meta_model(model_cfg, source: Path):
    """The CausalLM of `source` on the meta device, in the run's dtype, with its generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    trust = bool(model_cfg.get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    dtype = _model_dtype(model_cfg, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust).eval()
    if (source / "generation_config.json").is_file():  # as from_pretrained reads it
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model, dtype
