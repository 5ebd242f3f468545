"""Tiny random models for tests and benchmarks (no downloads).

    from ream_exp.moe.tiny import tiny_model, tiny_model_of
    model = tiny_model("deepseek_v3", num_experts=8, top_k=2)   # the nine first families, configs by hand
    model = tiny_model_of("minimax_m2", num_experts=8)         # any MoE model type, from its config class
"""

from __future__ import annotations

import torch
import transformers as tf

from .layers import moe_layers
from .registry import auto_model_class
from .tiny_configs import VOCAB, tiny_config
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer():
    """A character-level tokenizer over printable ASCII (ids < VOCAB), with pad/bos/eos/unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for c in map(chr, range(32, 127)):
        vocab[c] = len(vocab)
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _config(family: str, num_experts: int, top_k: int, hidden: int, layers: int, width: int, **extra):
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=top_k,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "qwen3_moe":
        cfg = dict(num_experts=num_experts, moe_intermediate_size=width, intermediate_size=2 * width,
                   norm_topk_prob=True, mlp_only_layers=[1] if layers > 2 else [], head_dim=hidden // 4)
        return tf.Qwen3MoeConfig(**{**common, **cfg, **extra})
    if family == "qwen2_moe":
        cfg = dict(num_experts=num_experts, moe_intermediate_size=width, intermediate_size=2 * width,
                   shared_expert_intermediate_size=2 * width, norm_topk_prob=False,
                   mlp_only_layers=[1] if layers > 2 else [])
        return tf.Qwen2MoeConfig(**{**common, **cfg, **extra})
    if family == "mixtral":
        return tf.MixtralConfig(**{**common, "num_local_experts": num_experts, "intermediate_size": width,
                                   "head_dim": hidden // 4, **extra})
    if family == "olmoe":
        return tf.OlmoeConfig(**{**common, "num_experts": num_experts, "intermediate_size": width, **extra})
    if family == "deepseek_v3":
        cfg = dict(n_routed_experts=num_experts, moe_intermediate_size=width, intermediate_size=2 * width,
                   n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1 if layers > 2 else 0,
                   kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                   norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True, num_key_value_heads=4)
        return tf.DeepseekV3Config(**{**common, **cfg, **extra})
    if family == "gpt_oss":
        cfg = dict(num_local_experts=num_experts, intermediate_size=width, head_dim=hidden // 4,
                   sliding_window=16, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                   + ["sliding_attention"] * (layers % 2))
        return tf.GptOssConfig(**{**common, **cfg, **extra})
    if family == "qwen3_next":  # Qwen2-MoE's block; linear (gated delta net) and full attention alternate
        cfg = dict(num_experts=num_experts, moe_intermediate_size=width, intermediate_size=2 * width,
                   shared_expert_intermediate_size=2 * width, norm_topk_prob=True, head_dim=hidden // 4,
                   linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                   linear_value_head_dim=8, linear_conv_kernel_dim=4, mlp_only_layers=[1] if layers > 2 else [],
                   layer_types=["linear_attention", "full_attention"] * (layers // 2)
                   + ["linear_attention"] * (layers % 2))
        return tf.Qwen3NextConfig(**{**common, **cfg, **extra})
    if family == "glm4_moe":  # DeepSeek-V3's sigmoid router with correction bias; partial rotary embedding
        cfg = dict(n_routed_experts=num_experts, moe_intermediate_size=width, intermediate_size=2 * width,
                   n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1 if layers > 2 else 0,
                   head_dim=hidden // 4, norm_topk_prob=True, routed_scaling_factor=2.5, use_qk_norm=True)
        return tf.Glm4MoeConfig(**{**common, **cfg, **extra})
    if family == "deepseek_v2":
        # softmax probabilities over all experts, not renormalised over the top-k; group-limited routing
        # (DeepSeek-V2's group_limited_greedy: a token's top-k from its topk_group best of n_group groups)
        cfg = dict(n_routed_experts=num_experts, moe_intermediate_size=width, intermediate_size=2 * width,
                   n_shared_experts=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                   first_k_dense_replace=1 if layers > 2 else 0, kv_lora_rank=16, q_lora_rank=None,
                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.0,
                   num_key_value_heads=4)
        return tf.DeepseekV2Config(**{**common, **cfg, **extra})
    raise ValueError(f"no tiny config for family {family!r}")


_CLASSES = {
    "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
}
TINY_FAMILIES = tuple(_CLASSES)


@torch.no_grad()
def tiny_model(family: str = "qwen3_moe", num_experts: int = 8, top_k: int = 2, hidden: int = 32,
               layers: int = 3, width: int = 16, seed: int = 0, std: float = 0.2, **extra):
    """A randomly initialised CausalLM of `family`; weights drawn with a visible spread so routing varies."""
    torch.manual_seed(seed)
    cfg = _config(family, num_experts, top_k, hidden, layers, width, **extra)
    model = getattr(tf, _CLASSES[family])(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2 or name.endswith(("router.bias", "proj_bias")):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model


def tiny_batch(batch: int = 4, seq: int = 16, seed: int = 0, pad_last: int = 3):
    """input_ids and attention_mask with right padding on every other row (pads must never count)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1::2, seq - pad_last:] = 0
    ids[mask == 0] = 0
    return ids, mask


@torch.no_grad()
def tiny_model_of(model_type: str, num_experts: int = 8, top_k: int = 2, hidden: int = 32, layers: int = 3,
                  width: int = 16, seed: int = 0, std: float = 0.2, **extra):
    """A randomly initialised model of any MoE model type of the installed transformers, built from its
    config class at tiny size (moe/tiny_configs.py) by the Auto class that loads it (towers kept, registry.py);
    routers and experts drawn with a visible spread so routing varies (the rest keeps the model's own init)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, num_experts=num_experts, top_k=top_k, hidden=hidden, layers=layers,
                         width=width, **extra)
    model = auto_model_class(config).from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    for layer in moe_layers(model):
        family = layer.family
        for module, tensors in ((layer.router, family.router_tensors), (layer.block, family.block_tensors)):
            state = dict(module.named_parameters()) | dict(module.named_buffers())
            for name, _, _ in tensors:  # router rows and correction biases
                state[name].copy_(torch.randn(state[name].shape, generator=gen) * (std if "weight" in name else 0.1))
        for t in layer.experts.parameters():
            t.copy_(torch.randn(t.shape, generator=gen) * std)
    return model
