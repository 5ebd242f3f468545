"""What ream-exp knows about a MoE architecture: read from the model itself, and a table for the rest.

transformers 5 stores the routed experts of a layer as one module with fused 3D tensors (`gate_up_proj`
or `up_proj`, `down_proj`, optional biases) beside a router. `family_for(config)` reads everything that
differs between architectures from the model built on the meta device (moe/discover.py):

- where the sparse block lives in a decoder layer, what its router and experts are called;
- the config keys (top level, nested text_config, per-layer lists) that hold the expert count;
- how the router turns logits into the probabilities sigma(x) (softmax or sigmoid), checked against the
  router's own output, and whether the top-k weights are renormalised;
- whether the router is group-limited (n_group) and how it scores a group;
- every tensor indexed by expert (router rows and biases, correction biases on the block) and the
  module attributes that cache the expert count.

`FAMILIES` holds only what cannot be read, by model type. A model that cannot be compressed raises
`Unsupported` (a ValueError) naming what is missing, before any weights load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from .discover import TopKOutOfRange, Unsupported, read_architecture


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    count_key: str                  # config key of the routed-expert count (the first of count_keys)
    router_attr: str = "gate"       # attribute of the sparse block holding the router
    scoring: str = "softmax"        # how sigma(x) comes from the router logits: softmax | sigmoid
    # Group-limited routers (n_group > 1, see moe/groups.py): how many of a router group's best experts
    # make up the group's score, so each group must keep at least that many; 0 = no group-limited router.
    group_score_experts: int = 0
    # read from the model (moe/discover.py)
    decoder_path: str = "model"     # the module holding the decoder layer list `layers`
    block_path: str = "mlp"         # the sparse block inside a decoder layer ("" = the layer itself)
    experts_attr: str = "experts"
    count_keys: tuple[str, ...] = ()  # every config key holding the count (dotted: text_config.num_experts)
    num_experts: int = 0
    router_rows: int = 0            # > num_experts: rows for zero-compute or shared experts after the routed ones
    top_k: int = 0
    n_group: int = 1
    topk_group: int = 1
    renormalised: bool = True       # top-k weights independent of the experts not chosen
    router_tensors: tuple = ()      # (name, dim, size) of the router's tensors indexed by expert
    block_tensors: tuple = ()       # the same on the block itself (a correction bias kept there)
    cached: tuple[str, ...] = ()    # block attributes (dotted) caching an expert count
    has_gate: bool = True           # gate_up_proj (act(gate) * up) or up_proj alone (act(up))
    moe_layers: tuple[int, ...] = ()
    num_layers: int = 0             # decoder layers, MoE or not
    shared: tuple[str, ...] = ()    # the block's shared (always-on) experts and their gates: never touched
    towers: tuple[str, ...] = ()    # vision / audio towers and projectors beside the text decoder: never touched
    notes: tuple[str, ...] = ()     # what is special, in words (README's family table)


# What cannot be read from the model, by model type: fields of Family that replace what was read, and a
# note saying why; or the reason the model type is refused ("refused").
_LAYER_STATE = ("its decoder layers hand {} to the next layer besides the hidden states: the layer-wise "
                "driver and the streamed path run one decoder layer at a time on hidden states alone")
FAMILIES: dict[str, dict] = {
    "glm_moe_dsa": {"refused": _LAYER_STATE.format("the sparse-attention indexer's top-k (prev_topk_indices)")},
    "hy_v4": {"refused": _LAYER_STATE.format("the sparse-attention indexer's top-k (prev_topk_indices)")},
    "hy_v4_vl_text": {"refused": _LAYER_STATE.format("the sparse-attention indexer's top-k (topk_indices)")},
    "glm5_next_text": {"refused": _LAYER_STATE.format("the sparse-attention indexer's top-k (topk_indices)")},
    "mistral_large4_text": {"refused": _LAYER_STATE.format("the sparse-attention indexer's top-k (topk_indices)")},
    "kolibri1_1": {"refused": _LAYER_STATE.format("shared key/value states and an index pool")},
    "inkling2_loop_text": {"refused": "its middle decoder layers run several times per forward (loop passes): "
                                      "the layer-wise driver observes each decoder layer once"},
    # sparsemixer: the top-1 weight is a softmax over the experts within 2 jitter_eps of the best logit, the
    # second one's over the rest: not proportional to one softmax, but sigma(x) is the router's softmax
    "phimoe": {"scoring": "softmax", "renormalised": False,
               "notes": ("sparsemixer weights (softmax within a band of the best logit); sigma = softmax",)},
}


@functools.lru_cache(maxsize=None)
def _moe_model_types() -> tuple[str, ...]:
    from .registry import causal_lm_moe_types, vision_language_moe_types

    return tuple(sorted(set(causal_lm_moe_types()) | set(vision_language_moe_types())))


def supported_model_types() -> list[str]:
    """The MoE model types of the installed transformers (each is compressed or refused by its own check)."""
    return list(_moe_model_types())


def _notes(arch: dict) -> tuple[str, ...]:
    notes = []
    if arch["block_path"] != "mlp":
        notes.append(f"block `{arch['block_path'] or 'the decoder layer'}`")
    if arch["router_attr"] != "gate":
        notes.append(f"router `{arch['router_attr']}`")
    if arch["scoring"] == "sigmoid":
        notes.append("sigmoid router")
    if not arch["renormalised"] and arch["scoring"] == "softmax":
        notes.append("top-k weights not renormalised")
    if len(arch["moe_layers"]) < arch["num_layers"]:
        notes.append(f"MoE in {len(arch['moe_layers'])} of the tiny model's {arch['num_layers']} decoder layers")
    if arch["shared"]:
        notes.append("shared " + ", ".join(f"`{n}`" for n in arch["shared"]) + " untouched")
    if arch["n_group"] > 1:
        notes.append(f"group-limited (n_group {arch['n_group']}, group score: best {arch['group_score_experts']})")
    if arch["router_rows"] > arch["num_experts"]:
        notes.append(f"{arch['router_rows'] - arch['num_experts']} router rows beyond the routed experts kept")
    biases = [n for n, _, _ in arch["router_tensors"] + arch["block_tensors"] if "weight" not in n]
    if biases:
        notes.append("expert-indexed " + ", ".join(sorted(biases)))
    if not arch["has_gate"]:
        notes.append("ungated experts (up_proj only)")
    if arch["towers"]:
        notes.append("towers " + ", ".join(f"`{n}`" for n in arch["towers"]) + " kept as they are")
    if any("." in k for k in arch["count_keys"]):
        notes.append("count in " + ", ".join(arch["count_keys"]))
    return tuple(notes)


_CACHE: dict[tuple, Family | Unsupported] = {}


def _read_family(config) -> Family:
    model_type = config.model_type
    for own in (model_type, config.get_text_config().model_type):  # a tower's model refused as its text model
        if "refused" in FAMILIES.get(own, {}):
            raise Unsupported(FAMILIES[own]["refused"])
    arch = read_architecture(config, FAMILIES.get(model_type))
    family = Family(name=model_type, model_types=(model_type,), count_key=arch["count_keys"][0],
                    notes=_notes(arch), **arch)
    override = dict(FAMILIES.get(model_type, {}))
    if override:
        family = replace(family, notes=family.notes + tuple(override.pop("notes", ())), **override)
    return family


def family_for(model_type_or_config) -> Family:
    """The family of a transformers config (or of a model type, at tiny size), or `Unsupported`.
    Read once per config content (the model built on the meta device, its routing probed)."""
    from transformers import PretrainedConfig

    config = model_type_or_config
    if not isinstance(config, PretrainedConfig):
        model_type = str(config)
        if model_type not in supported_model_types():
            raise Unsupported(f"model_type {model_type!r} is not a supported MoE architecture; "
                              f"supported: {', '.join(supported_model_types())}")
        from .tiny_configs import tiny_config

        config = tiny_config(model_type)  # the architecture at tiny size (some defaults build no MoE)
    if config.model_type not in _moe_model_types():
        raise Unsupported(f"model_type {config.model_type!r} is not a supported MoE architecture; "
                          f"supported: {', '.join(supported_model_types())}")
    key = (type(config), config.to_json_string(use_diff=False))
    if key not in _CACHE:
        try:
            _CACHE[key] = _read_family(config)
        except TopKOutOfRange as exc:  # the config's fault, said as such (config.check_expert_counts)
            _CACHE[key] = exc
        except Unsupported as exc:
            _CACHE[key] = Unsupported(f"model_type {config.model_type!r}: {exc}")
    if isinstance(_CACHE[key], Unsupported):
        raise _CACHE[key]
    return _CACHE[key]


# ---- expert counts in a config ----------------------------------------------------------------------

def config_value(config, key: str):
    for part in key.split(".")[:-1]:
        config = getattr(config, part)
    return getattr(config, key.rpartition(".")[2])


def set_config_value(config, key: str, old: int, new: int) -> None:
    """Set a (dotted) count key: an int becomes `new`, a per-layer list has each `old` replaced."""
    for part in key.split(".")[:-1]:
        config = getattr(config, part)
    name = key.rpartition(".")[2]
    value = getattr(config, name)
    if isinstance(value, (list, tuple)):
        setattr(config, name, type(value)(new if v == old else v for v in value))
    else:
        setattr(config, name, new)


def expert_count_of(config) -> int:
    """The routed-expert count a config says (its family's first count key; a per-layer list's largest)."""
    value = config_value(config, family_for(config).count_key)
    return int(max(value)) if isinstance(value, (list, tuple)) else int(value)
