"""Tiny checkpoints with a multi-token-prediction layer, as the real ones carry it (tests/test_mtp.py), and
`read_all`, every tensor of a checkpoint directory (tests/test_stream.py too)."""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ream_exp.moe.tiny import TINY_FAMILIES, tiny_model, tiny_model_of, tiny_tokenizer


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's *.safetensors files, by name."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


QWEN_MTP = ("qwen3_next", "qwen3_5_moe_text")  # the families whose MTP layer lies under `mtp.`


def _tiny(family: str, layers: int, seed: int, **extra):
    if family in TINY_FAMILIES:
        return tiny_model(family, num_experts=8, top_k=2, layers=layers, seed=seed, **extra)
    return tiny_model_of(family, num_experts=8, top_k=2, layers=layers, seed=seed, **extra)


def mtp_source(root: Path, family: str = "deepseek_v3", layers: int = 3, with_mtp: bool = True) -> Path:
    """A saved tiny model of `family` whose model.safetensors also holds an MTP layer in the family's layout:
    nextn (`model.layers.{layers}.`: enorm, hnorm, eh_proj, shared_head, embed_tokens and a decoder layer)
    or, for Qwen3-Next and Qwen3.5, mtp (`mtp.`: pre_fc norms, fc, norm and `mtp.layers.0.`). The MTP decoder layer is
    the last decoder layer of a model of the same family one layer deeper (other random weights), so its
    tensors lie on disk as the family saves a decoder layer. with_mtp=False: the same model without them."""
    path = root / f"src-{family}-{'mtp' if with_mtp else 'plain'}"
    if path.exists():
        return path
    main_extra = extra = {}
    if family in QWEN_MTP:  # every layer MoE; the MTP layer (the donor's last) has full attention
        types = ["linear_attention", "full_attention"] * (layers // 2 + 1)
        if types[layers] != "full_attention":
            types = types[1:]
        dense = dict(mlp_only_layers=[]) if family == "qwen3_next" else {}
        extra, main_extra = (dict(layer_types=t, **dense) for t in (types[:layers + 1], types[:layers]))
    main = _tiny(family, layers, 0, **main_extra)
    with torch.no_grad():  # a final norm that is not all ones: normalising twice is not normalising once
        norm = main.model.norm.weight
        norm.add_(torch.randn(norm.shape, generator=torch.Generator().manual_seed(3)))
    main.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if not with_mtp:
        return path
    donor_dir = root / f"donor-{family}"
    _tiny(family, layers + 1, 1, **extra).save_pretrained(donor_dir)
    donor = read_all(donor_dir)
    hidden = main.config.hidden_size
    gen = torch.Generator().manual_seed(7)
    rand = lambda *shape, s=0.2: torch.randn(*shape, generator=gen) * s  # noqa: E731
    layer = f"model.layers.{layers}."
    if family not in QWEN_MTP:
        mtp = {k: v for k, v in donor.items() if k.startswith(layer)}
        mtp |= {layer + "enorm.weight": 1 + rand(hidden), layer + "hnorm.weight": 1 + rand(hidden),
                layer + "eh_proj.weight": rand(hidden, 2 * hidden), layer + "shared_head.norm.weight": 1 + rand(hidden),
                # DeepSeek-V3 keeps copies of the model's embeddings and output head with its MTP layer
                layer + "shared_head.head.weight": main.lm_head.weight.detach().clone(),
                layer + "embed_tokens.weight": main.get_input_embeddings().weight.detach().clone()}
    else:
        mtp = {"mtp.layers.0." + k[len(layer):]: v for k, v in donor.items() if k.startswith(layer)}
        mtp |= {"mtp.pre_fc_norm_embedding.weight": rand(hidden), "mtp.pre_fc_norm_hidden.weight": rand(hidden),
                "mtp.fc.weight": rand(hidden, 2 * hidden), "mtp.norm.weight": rand(hidden)}
    weights = read_all(path) | mtp
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
