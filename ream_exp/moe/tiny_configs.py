"""Tiny configs of any MoE model type of the installed transformers, shrunk from its config class's defaults.

    from ream_exp.moe.tiny_configs import tiny_config
    config = tiny_config("minimax_m2", num_experts=8, top_k=2)   # hidden 32, 3 decoder layers, 8 experts

Every size in the defaults is replaced by a tiny one, chosen by the key's name (hidden_size, *_head_dim,
*_intermediate_size, the expert-count and top-k keys, mamba / linear-attention / indexer sizes, ...). The
decoder layers kept are picked from the default stack so that every kind of layer it has appears (dense
and MoE, linear and full attention, ...): per-layer lists keep those layers' entries, and keys that name
layers (first_k_dense_replace, mlp_only_layers, moe_layer_start_index, ...) are renumbered to match.
A nested text_config is shrunk the same way; vision and audio configs get small sizes too. What a key's
name cannot say is in `TINY_EXTRA`, per model type.
"""

from __future__ import annotations

import re

VOCAB = 112

# expert-count and top-k keys of the config classes (the count keys surgery updates are read from the
# model, moe/discover.py; these only size the tiny configs)
COUNT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
TOP_K_KEYS = {"num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts"}
GROUP_KEYS = {"n_group", "num_expert_group"}  # router groups: 2 of the tiny experts' (topk_group 1)
SHARED_KEYS = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}

# keys whose value says how many of the first layers are dense, and keys that list layer indices
PREFIX_KEYS = {"first_k_dense_replace", "num_dense_layers", "num_dense_blocks", "moe_layer_start_index",
               "loop_layer_index_start"}
END_KEYS = {"moe_layer_end_index", "loop_layer_index_end"}
INDEX_LIST_KEYS = {"mlp_only_layers", "index_layers", "ple_layer_ids", "local_layer_ids"}

_FIXED = {
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16, "o_groups": 2, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "qk_head_dim": 16, "v_head_dim": 8, "rotary_dim": 8,
    "index_topk": 8, "index_n_heads": 2, "index_head_dim": 8, "index_num_heads": 2, "index_pool_size": 16,
    "index_block_size": 4, "index_topk_blocks": 2, "index_num_local_tokens": 4, "index_num_sink_tokens": 2,
    "mamba_d_state": 8, "ssm_state_size": 8, "mamba_n_heads": 4, "mamba_num_heads": 4, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_dt_rank": 8, "mamba_chunk_size": 16, "chunk_size": 16, "mamba_n_groups": 1,
    "n_groups": 1, "mamba_expand": 2, "expand": 2,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_head_dim": 8, "linear_num_heads": 4,
    "router_hidden_size": 16, "hc_lowrank": 8, "loop_gate_rank": 8, "gated_norm_rank": 8, "d_rel": 4,
    "rel_extent": 16, "block_size": 4, "hidden_size_per_layer_input": 8, "ple_embed_dim": 16,
    "ngram_vocab_size_base": 64, "split_ngram_parts": 2, "make_ngram_vocab_size_divisible_by": 8,
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
    "moe_latent_size": None, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
_SMALL_WINDOWS = re.compile(r"(.*_)?sliding_window(_size)?$")
_HEADS = re.compile(r"(.*_)?num_(.*_)?attention_heads$")
_KV_HEADS = re.compile(r"(.*_)?num_(.*_)?key_value_heads$")
_HEAD_DIM = re.compile(r"(.*_)?head_dim$")
_WIDTH = re.compile(r"(.*_)?(intermediate_size|ffn_hidden_size|ffn_dim)$")
_EXPERT_WIDTH = re.compile(r"(moe|expert)_(.*_)?(intermediate_size|ffn_hidden_size)$")
_POSITIONS = {"max_position_embeddings", "model_max_length", "max_window_layers"}

# What a key's name does not say, per model type (the defaults of a few config classes build no MoE)
TINY_EXTRA: dict[str, dict] = {
    "gemma4_text": {"enable_moe_block": True, "moe_intermediate_size": 16},
    "hunyuan_v1_moe": {"head_dim": 8},
    "zaya": {"num_experts_per_tok": 1},
    "dots1": {"n_shared_experts": 1},
    "kolibri1_1": {"head_dim": 16},  # NVFP4 rounding of keys and values: a multiple of 16
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention", "linear_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
    "inkling2_loop_text": {"n_layers_per_attn_res_block": 1},
    "dots3_note_text": {"head_dim": 16},  # sliding layers: qk_nope_head_dim + qk_rope_head_dim
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse", "sparse"]},  # the default builds no MoE
    "diffusion_gemma_text": {"moe_intermediate_size": 16},
    "mistral4": {"head_dim": 16},  # qk_nope_head_dim + qk_rope_head_dim: the rotary part is half of it
    "mistral_large4_text": {"head_dim": 16},
    "step3p5": {"sliding_window": 16},  # its sliding-attention layers have no default window
    # the thinker's multimodal rotary index reads it; its config class has no such field (the talker's has)
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 151652},
    # Qwen3-Omni's towers: 32 audio layers of width 1280 (235M parameters at tiny text size) down to one of 32
    "qwen3_omni_moe_audio_encoder": {"encoder_layers": 1, "d_model": 32, "encoder_attention_heads": 4,
                                     "downsample_hidden_size": 8, "output_dim": 32},
    "qwen3_omni_moe_vision_encoder": {"depth": 1, "deepstack_visual_indexes": [0], "out_hidden_size": 32,
                                      "num_heads": 4},
    "glm5_next_text": {"index_kpool": 4, "qk_rope_head_dim": 0},  # index_topk a multiple of it; NoPE attention
    # the modeling code's default sections (22, 22, 20) and (8, 12, 12) at the tiny rotary half-width 4 (GLM-4V:
    # half of a head rotates, so 2 heads of 16)
    "ernie4_5_vl_moe_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                                 "mrope_section": [2, 1, 1]}},
    "glm4v_moe_text": {"num_attention_heads": 2, "num_key_value_heads": 1,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                           "mrope_section": [1, 2, 1]}},
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _size(key: str, value, hidden: int, width: int, num_experts: int, top_k: int, heads: int, full_heads: int,
          old_hidden: set):
    """The tiny value of one scalar key (the value itself when the name says nothing)."""
    if key in _FIXED:
        return _FIXED[key] if value is not None or key in ("pad_token_id", "bos_token_id", "eos_token_id") else None
    if key in COUNT_KEYS:  # set even where the default is None (no MoE by default)
        return num_experts
    if key in TOP_K_KEYS:
        return top_k
    if value is None or not _is_int(value):
        return value
    if key == "hidden_size":
        return hidden
    if key in GROUP_KEYS:
        return min(value, 2)
    if key == "topk_group":
        return 1
    if key in SHARED_KEYS or key == "zero_expert_num":
        return min(value, 1)
    if key in _POSITIONS:
        return min(value, 256)
    if _SMALL_WINDOWS.match(key):
        return min(value, 16)
    if _KV_HEADS.match(key):  # grouped-query attention stays grouped, multi-head (MLA) stays multi-head
        return heads if value >= full_heads else heads // 2
    if _HEADS.match(key):
        return heads
    if _HEAD_DIM.match(key):
        return hidden // heads
    if _EXPERT_WIDTH.match(key):
        return width
    if _WIDTH.match(key):
        return 2 * width if value else value
    if value in old_hidden:  # a tower's projection into the text model's width (adapter_out_dim, ...)
        return hidden
    return value


def _shrink_mrope(rope: dict, d: dict) -> dict:
    """A multimodal rotary embedding's sections (time, height, width) summing to the tiny rotary half-width,
    in the defaults' proportions (largest remainders first)."""
    if not isinstance(rope.get("mrope_section"), list):
        return {k: _shrink_mrope(v, d) if isinstance(v, dict) else v for k, v in rope.items()}  # per layer type
    width = d["qk_rope_head_dim"] if _is_int(d.get("qk_rope_head_dim")) else d.get("head_dim")
    width = width if _is_int(width) else d["hidden_size"] // d["num_attention_heads"]
    factor = rope.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0
    half, old = int(width * factor) // 2, rope["mrope_section"]
    exact = [s * half / sum(old) for s in old]
    new = [int(x) for x in exact]
    for i in sorted(range(len(old)), key=lambda i: int(exact[i]) - exact[i])[:half - sum(new)]:
        new[i] += 1
    return {**rope, "mrope_section": new}


def _layer_count_key(d: dict) -> str | None:
    for key in ("num_hidden_layers", "num_layers", "n_layers"):
        if _is_int(d.get(key)):
            return key
    return None


def _shorten_periods(d: dict, layers: int) -> None:
    """Layer periods (Jamba's attn_layer_period / _offset, ...) at most 2, so the tiny stack has every kind."""
    for k, v in list(d.items()):
        if k.endswith("_layer_period") and _is_int(v) and v > 2:
            d[k] = 2
            offset = k.replace("_period", "_offset")
            if _is_int(d.get(offset)):
                d[offset] = d[offset] % 2


def _per_layer_lists(d: dict, n: int) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, list) and len(v) == n and n > 1 and k not in INDEX_LIST_KEYS]


def _signature(d: dict, lists: list[str], i: int) -> tuple:
    """What kind of layer i is: its entries in the per-layer lists, dense prefix and listed-layer membership."""
    sig = [repr(d[k][i]) for k in lists]
    sig += [i < d[k] for k in PREFIX_KEYS if _is_int(d.get(k))]
    sig += [i in d[k] for k in INDEX_LIST_KEYS if isinstance(d.get(k), list)]
    return tuple(sig)


def pick_layers(d: dict, n_old: int, n_new: int) -> list[int]:
    """n_new (or more, up to 4, when the stack has more kinds) layer indices, every kind of layer first."""
    lists = _per_layer_lists(d, n_old)
    seen, picked = set(), []
    for i in range(n_old):
        sig = _signature(d, lists, i)
        if sig not in seen:
            seen.add(sig)
            picked.append(i)
    rest = [i for i in reversed(range(n_old)) if i not in picked]  # the last layers: past any dense prefix
    picked = picked[:max(n_new, 4)] if len(picked) > n_new else picked + rest[:n_new - len(picked)]
    return sorted(picked)


def _renumber(d: dict, picked: list[int], n_old: int) -> None:
    """Per-layer lists and the keys naming layers, for the picked layers only."""
    for k in _per_layer_lists(d, n_old):
        d[k] = [d[k][p] for p in picked]
    for k in PREFIX_KEYS:
        if _is_int(d.get(k)):
            d[k] = sum(p < d[k] for p in picked)
    for k in END_KEYS:
        if _is_int(d.get(k)):
            d[k] = sum(p <= d[k] for p in picked) - 1
    for k in INDEX_LIST_KEYS:
        if isinstance(d.get(k), list):
            d[k] = [j for j, p in enumerate(picked) if p in set(d[k])]
    overrides = d.get("per_layer_config")
    if isinstance(overrides, dict):  # {layer: {key: value}}, layer as int or zero-padded text
        by_index = {int(k): (k, v) for k, v in overrides.items()}
        d["per_layer_config"] = {(str(j).zfill(len(by_index[p][0])) if isinstance(by_index[p][0], str) else j):
                                 by_index[p][1] for j, p in enumerate(picked) if p in by_index}


def _shrink_override(over: dict, hidden, width, num_experts, top_k, heads, full_heads, old_hidden) -> dict:
    """One layer's overrides (per_layer_config), its own head count the reference for its kv heads."""
    full_heads = over.get("num_attention_heads", full_heads)
    return {k: _size(k, v, hidden, width, num_experts, top_k, heads, full_heads, old_hidden) for k, v in over.items()}


def shrink(d: dict, hidden: int = 32, width: int = 16, num_experts: int = 8, top_k: int = 2,
           layers: int = 3, heads: int = 4, old_hidden: frozenset = frozenset()) -> dict:
    """A tiny copy of the config dict `d` (see the module docstring); `old_hidden`: the hidden sizes of the
    configs around it (a tower's projection into the text model)."""
    d = dict(d)
    old_hidden = old_hidden | {v for k, v in d.items() if k == "hidden_size" and _is_int(v)}
    for v in d.values():
        if isinstance(v, dict) and _is_int(v.get("hidden_size")):
            old_hidden |= {v["hidden_size"]}
    for drop in ("transformers_version", "architectures", "_name_or_path", "dtype",
                 "torch_dtype", "id2label", "label2id"):
        d.pop(drop, None)
    full_heads = d.get("num_attention_heads") if _is_int(d.get("num_attention_heads")) else 1
    _shorten_periods(d, layers)
    count_key = _layer_count_key(d)
    if count_key is not None:
        n_old = d[count_key]
        picked = pick_layers(d, n_old, layers)
        _renumber(d, picked, n_old)
        d[count_key] = len(picked)
    for k, v in list(d.items()):
        if k == "per_layer_config" and isinstance(v, dict):
            d[k] = {layer: _shrink_override(over, hidden, width, num_experts, top_k, heads, full_heads, old_hidden)
                    for layer, over in v.items()}
        elif isinstance(v, dict) and k.endswith("_config"):
            sub = dict(hidden=hidden, width=width, num_experts=num_experts, top_k=top_k, heads=heads,
                       old_hidden=old_hidden)
            d[k] = shrink(v, layers=layers if k == "text_config" else 1, **sub)
        elif not isinstance(v, (list, dict)):
            d[k] = _size(k, v, hidden, width, num_experts, top_k, heads, full_heads, old_hidden)
    for k in ("rope_parameters", "rope_scaling"):
        if isinstance(d.get(k), dict) and _is_int(d.get("hidden_size")):
            d[k] = _shrink_mrope(d[k], d)
    return d


def tiny_config(model_type: str, num_experts: int = 8, top_k: int = 2, hidden: int = 32, layers: int = 3,
                width: int = 16, **extra):
    """The config class of `model_type` at tiny size (defaults shrunk, then TINY_EXTRA, then `extra`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    d = shrink(cls().to_dict(), hidden=hidden, width=width, num_experts=num_experts, top_k=top_k, layers=layers)
    d.pop("model_type", None)
    own = {**TINY_EXTRA.get(model_type, {}), **extra}
    for key, sub in d.items():  # a nested config's extras (text model, towers) go to its own config
        if isinstance(sub, dict) and key.endswith("_config"):
            sub.update(TINY_EXTRA.get(sub.get("model_type"), {}))
    if isinstance(d.get("text_config"), dict):
        d["text_config"].pop("model_type", None)
    d.update(own)
    return cls(**d)
