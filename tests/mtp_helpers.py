"""Tiny checkpoints with a multi-token-prediction layer, as the real ones carry it (tests/test_mtp.py)."""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ream_exp.moe.tiny import tiny_model, tiny_tokenizer


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def mtp_source(root: Path, family: str = "deepseek_v3", layers: int = 3, with_mtp: bool = True) -> Path:
    """A saved tiny model of `family` whose model.safetensors also holds an MTP layer in the family's layout:
    nextn (`model.layers.{layers}.`: enorm, hnorm, eh_proj, shared_head, embed_tokens and a decoder layer)
    or mtp (`mtp.`: pre_fc norms, fc, norm and `mtp.layers.0.`). The MTP decoder layer is the last decoder
    layer of a model of the same family one layer deeper (other random weights), so its tensors lie on
    disk as the family saves a decoder layer. with_mtp=False: the same model without them."""
    path = root / f"src-{family}-{'mtp' if with_mtp else 'plain'}"
    if path.exists():
        return path
    extra = {}
    if family == "qwen3_next":  # the MTP layer is a full-attention MoE layer; so is the main model's last
        extra = dict(layer_types=["linear_attention", "full_attention"] * ((layers + 1) // 2), mlp_only_layers=[])
    main = tiny_model(family, num_experts=8, top_k=2, layers=layers,
                      **({k: v[:layers] if k == "layer_types" else v for k, v in extra.items()}))
    main.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if not with_mtp:
        return path
    donor_dir = root / f"donor-{family}"
    tiny_model(family, num_experts=8, top_k=2, layers=layers + 1, seed=1, **extra).save_pretrained(donor_dir)
    donor = read_all(donor_dir)
    hidden, vocab = main.config.hidden_size, main.config.vocab_size
    gen = torch.Generator().manual_seed(7)
    rand = lambda *shape, s=0.2: torch.randn(*shape, generator=gen) * s  # noqa: E731
    layer = f"model.layers.{layers}."
    if family in ("deepseek_v3", "glm4_moe"):
        mtp = {k: v for k, v in donor.items() if k.startswith(layer)}
        mtp |= {layer + "enorm.weight": 1 + rand(hidden), layer + "hnorm.weight": 1 + rand(hidden),
                layer + "eh_proj.weight": rand(hidden, 2 * hidden), layer + "shared_head.norm.weight": 1 + rand(hidden),
                layer + "shared_head.head.weight": rand(vocab, hidden), layer + "embed_tokens.weight": rand(vocab, hidden)}
    else:
        mtp = {"mtp.layers.0." + k[len(layer):]: v for k, v in donor.items() if k.startswith(layer)}
        mtp |= {"mtp.pre_fc_norm_embedding.weight": rand(hidden), "mtp.pre_fc_norm_hidden.weight": rand(hidden),
                "mtp.fc.weight": rand(hidden, 2 * hidden), "mtp.norm.weight": rand(hidden)}
    weights = read_all(path) | mtp
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
