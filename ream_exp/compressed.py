"""Loading a ream-exp checkpoint, also one whose MoE layers keep different numbers of experts (budget=global).

    from ream_exp import load_compressed
    model = load_compressed("outputs/runs/<run>/checkpoint")          # eval mode, on CPU unless device=...

Stock transformers builds every MoE layer with the config's one expert count, so it cannot load a
checkpoint with per-layer counts (it refuses the smaller layers' tensors), and vLLM cannot either
(docs/budgets.md). Such a checkpoint's config.json lists each decoder layer's count in
`ream_exp_layer_experts` (null for a layer without routed experts) and holds the largest in the family's
count keys. `load_compressed` builds the model on the meta device with the largest count, cuts each MoE
layer to its own count (moe/surgery.keep_experts on meta tensors: shapes only), reads the weights from the
safetensors files as from_pretrained converts them (methods/layer_stream.read_into) and computes the rotary
tables. A checkpoint without the list is loaded by from_pretrained itself.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_compressed(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The CausalLM saved at `path` (a ream-exp checkpoint), in eval mode, its weights in `dtype` (None: the
    checkpoint's) on `device`, each MoE layer with the expert count its config.json records."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .moe.surgery import layer_expert_counts

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    counts = layer_expert_counts(config)
    if counts is None:  # one count in every layer: transformers' own loading
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
    dtype = dtype or _saved_dtype(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    _cut_to_counts(model, counts)
    _read_weights(model, path, device, dtype)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _saved_dtype(config) -> torch.dtype:
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved))


def _cut_to_counts(model, counts: list[int | None]) -> None:
    """Each MoE layer of the meta skeleton cut to its recorded count (its first experts: only shapes)."""
    from .moe import keep_experts, moe_layers

    layers = moe_layers(model)
    if len(counts) <= max(layer.index for layer in layers):
        raise ValueError(f"ream_exp_layer_experts has {len(counts)} entries; the model has MoE layer "
                         f"{max(layer.index for layer in layers)}")
    for layer in layers:
        n = counts[layer.index]
        if n is None or not 0 < n <= layer.num_experts:
            raise ValueError(f"ream_exp_layer_experts[{layer.index}]={n}: MoE layer {layer.index} holds at most "
                             f"{layer.num_experts} experts (the config's count)")
        if n < layer.num_experts:
            keep_experts(layer, list(range(n)))


def _read_weights(model, path: Path, device, dtype) -> None:
    """Every tensor of the checkpoint into the skeleton; rotary tables computed; nothing left on meta."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    from .methods.layer_stream import read_into
    from .stream_source import key_files

    files = key_files(path)
    read_into(model, get_model_conversion_mapping(model), list(files), files, device, dtype)
    model.tie_weights()
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t is not None and t.device.type == "meta"]
    for module_path, owner in model.named_modules():
        meta = [n for n, b in owner._buffers.items() if b is not None and b.device.type == "meta"]
        if meta and "RotaryEmbedding" in type(owner).__name__:  # non-persistent: computed as from_pretrained does
            for n in meta:
                owner._buffers[n] = torch.empty_like(owner._buffers[n], device=device)
            model._init_weights(owner)
            missing = [m for m in missing if not m.startswith(f"{module_path}.")]
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
