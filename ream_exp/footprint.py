"""What a model weighs: its weight bytes, its routed experts' bytes, its total and active parameters
(docs/bytes.md).

    weights = checkpoint_footprint(run_dir / "checkpoint", model)   # bytes measured from the files' headers
    weights = model_footprint(model)                                 # bytes computed from the tensors
    {"bytes", "expert_bytes", "params", "expert_params", "active_params", "measured": "disk" | "memory"}

Measured ("disk"): the sum of the tensor byte ranges every safetensors file of the checkpoint stores (the
`data_offsets` of its header: what the file holds, whatever the dtype, packing or quantisation), the
header and its metadata not counted. The experts' bytes are the stored tensors under a routed-experts
module: in the checkpoint's own naming, which transformers' conversion mapping gives back on save
(`model.layers.3.block_sparse_moe.experts.0.w1.weight` for Mixtral), or, for a stored name the conversion
does not give (a quantised checkpoint's scales), in a module holding expert tensors or under the experts
module's name in the model (`model.layers.3.mlp.experts.`) (StoredExperts).

Computed ("memory", a run with save=false, or an uncompressed model not on this machine): the tensors
save_pretrained would write (the state dict without tied copies), numel x element size of their dtype, or
of `dtype` for floating tensors where given (a hub model's stored dtype).

Parameters are counted on the model (a quantised checkpoint packs them, so its files do not count them):
params is every parameter once (tied weights once), expert_params those of the routed experts' modules,
and active_params = params - sum over MoE layers of expert_params_l * (1 - top_k_l / N_l): everything but
the routed experts (embeddings, attention, norms, routers, shared experts, dense layers) and top_k of the
N routed experts of each MoE layer, the parameters one token's forward pass reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .moe import moe_layers
from .weight_files import _raw_header, _shards

log = logging.getLogger("ream_exp")

DISK, MEMORY = "disk", "memory"


# ---- parameters -------------------------------------------------------------------------------------

def without_tied_copies(model: nn.Module, tensors: dict) -> dict:
    """`tensors` ({name: tensor}) without the weights the model declares tied to another one there
    (lm_head.weight with tie_word_embeddings): stored and counted once, under the other's name, even where
    they are two tensors (a streamed run's meta skeleton)."""
    tied = getattr(model, "get_expanded_tied_weights_keys", None)
    tied = tied(all_submodels=True) if tied is not None else {}
    return {name: t for name, t in tensors.items() if tied.get(name) not in tensors}


def parameter_counts(model: nn.Module) -> dict:
    """params, expert_params and active_params of the model (see the module doc)."""
    params = sum(p.numel() for p in without_tied_copies(model, dict(model.named_parameters())).values())
    expert, inactive = 0, 0
    for layer in moe_layers(model):
        n, k = layer.num_experts, min(layer.top_k, layer.num_experts)
        count = sum(p.numel() for p in layer.experts.parameters())
        expert += count
        inactive += count // n * (n - k)  # each fused tensor holds N experts along its first dim
    return {"params": params, "expert_params": expert, "active_params": params - inactive}


# ---- which stored tensors are experts' --------------------------------------------------------------

def expert_prefixes(model: nn.Module) -> list[str]:
    """Per MoE layer, the name prefix of its routed experts' tensors in the model (model.layers.3.mlp.experts.)."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(layer.experts)] + "." for layer in moe_layers(model)]


def _prefix_layer(name: str, prefixes: list[str]) -> int | None:
    return next((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), None)


class StoredExperts:
    """Which stored tensor is which MoE layer's routed experts', in the checkpoint's naming: each tensor of
    the model is renamed (and split) as transformers' reverse conversion writes it, on meta tensors (no
    memory); a stored name it does not give (a quantised checkpoint's weight_packed, weight_scale, ...) is
    an expert's when its module holds expert tensors, or when it lies under the experts module's name in
    the model."""

    def __init__(self, model: nn.Module):
        self.prefixes = expert_prefixes(model)
        self.exact: dict[str, int | None] = {}  # stored name -> MoE layer (position), None: not an expert's
        self.modules: dict[str, int] = {}  # module path of a stored expert tensor -> MoE layer
        for key, tensor in model.state_dict().items():
            layer = _prefix_layer(key, self.prefixes)
            for stored in _stored_names(model, key, tensor):
                self.exact.setdefault(stored, layer)
                if layer is not None:
                    self.modules[stored.rpartition(".")[0]] = layer

    def layer_of(self, name: str) -> int | None:
        """The MoE layer (position in moe_layers) whose experts hold stored tensor `name`, else None."""
        if name in self.exact:
            return self.exact[name]
        module = name.rpartition(".")[0]
        return self.modules[module] if module in self.modules else _prefix_layer(name, self.prefixes)


def _stored_names(model: nn.Module, key: str, tensor: torch.Tensor) -> list[str]:
    """The names model tensor `key` is saved under (save_pretrained's reverse conversion); [key] where the
    conversion cannot run on it alone."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        return list(revert_weight_conversion(model, {key: torch.empty(tensor.shape, dtype=tensor.dtype,
                                                                       device="meta")}))
    except Exception:  # noqa: BLE001 - a conversion that needs other tensors with it, or real values
        return [key]


# ---- measured: the files -----------------------------------------------------------------------------

def stored_bytes(directory: str | Path) -> dict[str, int]:
    """{tensor name: bytes it occupies} over every safetensors file of the checkpoint in `directory`."""
    directory = Path(directory)
    shards = _shards(directory)
    if not shards:
        raise FileNotFoundError(f"{directory} holds no safetensors weights")
    sizes = {}
    for shard in shards:
        read = _raw_header(shard, shard.stat().st_size)
        if read is None:
            raise ValueError(f"{shard}: not a readable safetensors header")
        sizes.update({name: end - begin for name, (_, _, (begin, end)) in read[1].items()})
    return sizes


def checkpoint_footprint(directory: str | Path, model: nn.Module) -> dict:
    """The checkpoint's bytes measured from its files' headers; parameters counted on `model` (the model
    it holds, whose names say which tensors are experts'). expert_bytes is None (and a warning said) when
    some MoE layer has no expert tensor in the files."""
    sizes = stored_bytes(directory)
    experts = StoredExperts(model)
    per_layer = [0] * len(experts.prefixes)
    for name, size in sizes.items():
        layer = experts.layer_of(name)
        if layer is not None:
            per_layer[layer] += size
    missing = [moe_layers(model)[i].index for i, b in enumerate(per_layer) if b == 0]
    if missing:
        log.warning("no expert tensors of decoder layer(s) %s found in %s: expert_bytes not recorded",
                    missing, directory)
    return {"bytes": sum(sizes.values()), "expert_bytes": None if missing else sum(per_layer),
            **parameter_counts(model), "measured": DISK}


# ---- computed: the tensors ---------------------------------------------------------------------------

def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained writes: the state dict without the ignored keys and tied copies."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = dict(model.state_dict())
    for ignored in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(ignored, None)
    return without_tied_copies(model, remove_tied_weights_from_state_dict(state, model))


def model_footprint(model: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The bytes the model's checkpoint would hold, computed from its tensors (see the module doc)."""
    def size(t: torch.Tensor) -> int:
        item = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        return t.numel() * item

    prefixes = expert_prefixes(model)  # the model's own names
    total, expert = 0, 0
    for name, tensor in saved_state(model).items():
        total += size(tensor)
        if _prefix_layer(name, prefixes) is not None:
            expert += size(tensor)
    return {"bytes": total, "expert_bytes": expert, **parameter_counts(model), "measured": MEMORY}


def stored_dtype(config) -> torch.dtype | None:
    """The dtype config.json says the weights are stored in, None where it says none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value), None) if value and value != "auto" else None
    return found if isinstance(found, torch.dtype) else None


def original_footprint(model: nn.Module, model_cfg) -> dict:
    """The uncompressed model's weights: measured on its files when model.path is a local checkpoint
    with safetensors weights, else computed from the loaded model in its stored dtype."""
    path = Path(str(model_cfg.path)).expanduser()
    if path.is_dir() and _shards(path):
        return checkpoint_footprint(path, model)
    return model_footprint(model, stored_dtype(model.config))


# ---- the evaluation's peak memory --------------------------------------------------------------------

def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)


def peak_memory() -> int | None:
    """torch.cuda.max_memory_allocated since reset_peak_memory, summed over the GPUs; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.max_memory_allocated(device) for device in range(torch.cuda.device_count()))
