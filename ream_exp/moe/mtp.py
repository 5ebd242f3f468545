"""Multi-token-prediction (MTP) layers: where a checkpoint keeps them, and their forward (docs/models.md).

    found = find_mtp(checkpoint_keys, config)     # None: the checkpoint has none
    found.layout                                  # an MTPLayout, or None with found.reason (a layout not known)
    head = MTPHead(embed_norm, hidden_norm, proj, layer)   # y = head(h, next_embeds, layer_args)

The checkpoints of DeepSeek-V3, GLM-4.5 / 4.5-Air / 4.7-Flash, Qwen3-Next and Qwen3.5 carry MTP layers
that transformers does not build (it ignores their tensors on load). They lie on disk in one of two
layouts:

    nextn  (deepseek_v3, glm4_moe, glm4_moe_lite)  decoder layer num_hidden_layers of the decoder layers'
           prefix, `model.layers.{N}.`: enorm, hnorm, eh_proj, shared_head.norm (and copies of the embeddings
           and head, embed_tokens / shared_head.head, where present) beside a decoder layer of the model's own
           kind (self_attn, mlp, norms)
    mtp    (qwen3_next, qwen3_5_moe)  `mtp.`: pre_fc_norm_embedding, pre_fc_norm_hidden, fc, norm, and the
           decoder layer under `mtp.layers.0.`

Both compute the same thing, the architecture of DeepSeek-V3's MTP module as vLLM and SGLang serve
these checkpoints: for the token at position t, with h_t the main model's last hidden state (after its
final norm) and e_{t+1} the embedding of the next token,

    x_t = proj([norm_e(e_{t+1}) ; norm_h(h_t)])     (embedding first: the order the projection was trained in)
    y_t = decoder_layer(x_t)                         causal attention over the MTP positions, the same rotary
                                                     positions as the main model

and the MTP's output norm and the shared head turn y_t into the logits of token t+2 (not needed to
observe its experts). The decoder layer is built as the model's own decoder layer class at the index of
its last MoE layer with full attention (`template_layer`), so its sparse block is a MoE layer like any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MTPLayout:
    """Where one family's checkpoint keeps its MTP layer: the input norms, the projection and the output
    norm, relative to `head_prefix` (nextn: the layer's own prefix; mtp: `mtp.`)."""

    name: str
    embed_norm: str
    hidden_norm: str
    proj: str
    out_norm: str
    extra: tuple[str, ...] = ()  # other tensors of the head (copies of embeddings and output head), kept

    @property
    def head_parts(self) -> tuple[str, ...]:
        return (self.embed_norm, self.hidden_norm, self.proj, self.out_norm) + self.extra


NEXTN = MTPLayout("nextn", "enorm", "hnorm", "eh_proj", "shared_head.norm", ("shared_head.head", "embed_tokens"))
QWEN_MTP = MTPLayout("mtp", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm")
LAYOUTS: dict[str, MTPLayout] = {
    "deepseek_v3": NEXTN, "glm4_moe": NEXTN, "glm4_moe_lite": NEXTN,
    "qwen3_next": QWEN_MTP, "qwen3_5_moe": QWEN_MTP, "qwen3_5_moe_text": QWEN_MTP,
}


@dataclass
class FoundMTP:
    """The MTP tensors of a checkpoint: all their keys and, for a known layout, where each part lies."""

    keys: list[str]  # every MTP tensor of the checkpoint
    layout: MTPLayout | None = None  # None: a layout ream-exp cannot compress (`reason` says why)
    reason: str = ""
    head: dict[str, str] = field(default_factory=dict)  # embed_norm, hidden_norm, proj, out_norm -> key
    layer_prefix: str = ""  # the MTP decoder layer's key prefix, e.g. "model.layers.61." or "mtp.layers.0."
    layer_keys: list[str] = field(default_factory=list)  # the decoder layer's tensors
    decoder_prefix: str = ""  # the main decoder layers' key prefix on disk, e.g. "model.layers."


def _decoder_prefix(keys: list[str], num_layers: int) -> str | None:
    """The key prefix of the main decoder layers on disk ("model.layers.", "model.language_model.layers.", ...):
    of the prefixes that number a layer num_layers - 1, the one with the most expert tensors, then the most
    tensors (a vision tower's layers have no experts)."""
    counts: dict[str, list[int]] = {}
    last = set()
    for k in keys:
        m = _LAYER_KEY.search(k)
        if m is None or k.startswith("mtp."):
            continue
        prefix = k[:m.start(1)]
        count = counts.setdefault(prefix, [0, 0])
        count[0] += ".experts." in k
        count[1] += 1
        if int(m.group(1)) == num_layers - 1:
            last.add(prefix)
    return max(last, key=lambda p: counts[p]) if last else None


def _mtp_like(key: str) -> bool:
    return any(part in ("mtp", "nextn", "mtp_layers") for part in key.split("."))


def find_mtp(keys, config) -> FoundMTP | None:
    """The MTP tensors among a checkpoint's `keys` (None without any) and their layout for `config`'s model
    type: decoder layers numbered num_hidden_layers and above, and tensors under `mtp` (or `nextn`)."""
    text = config.get_text_config()
    num_layers = int(text.num_hidden_layers)
    keys = list(keys)
    prefix = _decoder_prefix(keys, num_layers)
    extra = sorted(k for k in keys if _mtp_like(k)
                   or (prefix is not None and k.startswith(prefix) and _layer_index(k, prefix) >= num_layers))
    if not extra:
        return None
    found = FoundMTP(extra, decoder_prefix=prefix or "")
    layout = LAYOUTS.get(config.model_type) or LAYOUTS.get(text.model_type)
    if getattr(config, "quantization_config", None):
        found.reason = "its weights are quantised"
    elif layout is None:
        found.reason = f"model_type {config.model_type!r} has no known MTP layout"
    elif prefix is None:
        found.reason = "the decoder layers' key prefix could not be read"
    else:
        _locate(found, layout, prefix, num_layers)
    if found.layout is not None and template_layer(config) is None:
        found.layout, found.reason = None, "no MoE decoder layer with full attention to build its decoder layer on"
    return found


def _layer_index(key: str, prefix: str) -> int:
    rest = key[len(prefix):]
    head = rest.split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def _locate(found: FoundMTP, layout: MTPLayout, prefix: str, num_layers: int) -> None:
    """Fill `found`'s head keys and decoder-layer keys for `layout`, or its reason when they do not fit it."""
    if layout is NEXTN:
        layers = sorted({_layer_index(k, prefix) for k in found.keys if k.startswith(prefix)} - {-1})
        head_prefix = layer_prefix = f"{prefix}{num_layers}."
    else:  # numbered from 0 after `mtp.layers.`: the same count from num_layers
        layers = sorted({num_layers + _layer_index(k, "mtp.layers.") for k in found.keys
                         if k.startswith("mtp.layers.")} - {num_layers - 1})
        head_prefix, layer_prefix = "mtp.", "mtp.layers.0."
    if layers != [num_layers]:
        found.reason = f"{len(layers)} MTP decoder layers (ream-exp compresses exactly one)"
        return
    head = {}
    for role in ("embed_norm", "hidden_norm", "proj", "out_norm"):
        key = f"{head_prefix}{getattr(layout, role)}.weight"
        if key not in found.keys:
            found.reason = f"no tensor {key} ({layout.name} layout)"
            return
        head[role] = key
    in_head = tuple(f"{head_prefix}{p}." for p in layout.head_parts)
    layer_keys = [k for k in found.keys if k.startswith(layer_prefix) and not k.startswith(in_head)]
    stray = [k for k in found.keys if not k.startswith(layer_prefix) and not k.startswith(in_head)]
    if stray:
        found.reason = f"tensor {stray[0]} belongs to no part of the {layout.name} layout"
        return
    found.layout, found.head, found.layer_prefix, found.layer_keys = layout, head, layer_prefix, layer_keys


def template_layer(config) -> int | None:
    """The decoder layer whose kind the MTP decoder layer is: the last MoE layer with full attention (a model
    without per-layer types: the last MoE layer); None when there is none."""
    from .families import family_for

    types = getattr(config.get_text_config(), "layer_types", None)
    full = [i for i in family_for(config).moe_layers if types is None or types[i] == "full_attention"]
    return full[-1] if full else None


def next_token_embeddings(embeds: torch.Tensor) -> torch.Tensor:
    """e_{t+1} at every position t [B, S, H]: the embeddings shifted left, zeros at the last position (which
    has no next token and is never observed, `mtp_token_mask`)."""
    return torch.cat([embeds[:, 1:], torch.zeros_like(embeds[:, :1])], dim=1)


def mtp_token_mask(valid: torch.Tensor) -> torch.Tensor:
    """The MTP positions to observe [B, S] (bool): t and t+1 both real tokens (valid [B, S])."""
    valid = valid.bool()
    pair = valid[:, :-1] & valid[:, 1:]
    return torch.cat([pair, torch.zeros_like(valid[:, :1])], dim=1)


class MTPHead(nn.Module):
    """One MTP layer: input norms, the projection and the decoder layer (see the module doc)."""

    def __init__(self, embed_norm: nn.Module, hidden_norm: nn.Module, proj: nn.Linear, layer: nn.Module):
        super().__init__()
        self.embed_norm, self.hidden_norm, self.proj, self.layer = embed_norm, hidden_norm, proj, layer

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, layer_args) -> torch.Tensor:
        """y [B, S, H] from the main model's final-normed hidden states h and e_{t+1} (`next_token_embeddings`);
        `layer_args` = (args, kwargs) the model passes its template decoder layer (masks, rotary tables)."""
        x = self.proj(torch.cat([self.embed_norm(next_embeds), self.hidden_norm(hidden)], dim=-1))
        out = self.layer(x, *layer_args[0], **layer_args[1])
        return out[0] if isinstance(out, tuple) else out
