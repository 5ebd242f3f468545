"""Loading a model from a directory or hub id (after the config was checked): its config.json alone, its
tokenizer, or its weights, placed as placement.py says. A run loads its tokenizer once (ream_exp.run) and
passes it along: calibration, the baseline, the checkpoint and the evaluation all use that one."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from .placement import placement_kwargs


def load_model(model_cfg: DictConfig, device: str, offload_folder: str | Path | None = None):
    """The model from a directory or hub id (after the config was checked); no tokenizer. The Auto class
    comes from config.json's model type (moe.registry.auto_model_class): AutoModelForImageTextToText for
    a model with a vision or audio tower, which is kept and saved untouched, else AutoModelForCausalLM.

    With model.device_map, accelerate places the weights (model.max_memory per device; weights sent to
    "disk" go to model.offload_folder, else to `offload_folder`)."""
    from .moe.registry import auto_model_class

    config = load_model_config(model_cfg)
    dtype = model_cfg.get("dtype", "float32")
    kwargs = dict(dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                  trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
                  **placement_kwargs(model_cfg, offload_folder))
    quant = getattr(config, "quantization_config", None) or {}
    if (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)) == "mxfp4":
        # gpt-oss ships MXFP4 experts; surgery needs the plain fused tensors, so dequantise on load.
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = auto_model_class(config).from_pretrained(str(model_cfg.path), **kwargs).eval()
    if not model_cfg.get("device_map"):
        model.to(device)
    return model


def load_tokenizer(model_cfg: DictConfig):
    """The model's tokenizer (no weights): enough to key the calibration cache before loading."""
    from transformers import AutoTokenizer

    trust = bool(model_cfg.get("trust_remote_code"))
    return AutoTokenizer.from_pretrained(str(model_cfg.path), trust_remote_code=trust)


def load_model_config(model_cfg: DictConfig):
    """Only config.json: enough to reject an unsupported architecture or impossible ratio before download."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_cfg.path), trust_remote_code=bool(model_cfg.get("trust_remote_code")))
