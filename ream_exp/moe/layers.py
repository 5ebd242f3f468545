"""Find the routed-expert layers of a transformers MoE model and read/write single experts.

Every supported family stores the experts of a layer as fused tensors; the experts module says how
(`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`, set by transformers'
`use_experts_implementation`). This file turns that into one canonical view per expert, whatever the family:

    gate [I, H], up [I, H], down [H, I]   (+ gate_bias [I], up_bias [I], down_bias [H] when present)

(gate and gate_bias None for ungated experts, `up_proj` alone) and gives the expert's forward pass E_e(x)
and its intermediate activation a_e(x) = act(gate x) * up x (gate and up as separate contiguous products),
or act(up x) when ungated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations import moe as _moe_integration

from .discover import expert_count
from .families import Family, family_for
from .groups import router_groups


@dataclass
class MoELayer:
    """One decoder layer's routed experts: the sparse block, its router and its experts module."""

    index: int  # position of the decoder layer in the model
    name: str  # module path of the sparse block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    family: Family

    @property
    def num_experts(self) -> int:
        return expert_count(self.experts)

    @property
    def router_groups(self) -> int:
        """n_group of a group-limited router (experts in n_group contiguous blocks), else 1."""
        return router_groups(self.router, self.family)

    @property
    def top_k(self) -> int:
        return int(getattr(self.router, "top_k", None) or self.family.top_k)

    @property
    def intermediate_size(self) -> int:
        return canonical_weights(self.experts, [0])["up"].shape[1]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of the model's text decoder (where its family says: model.layers, ...)."""
    layers = getattr(model.get_submodule(family_for(model.config).decoder_path), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layer list")
    return layers


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The layers with routed experts, in order; dense layers (mlp_only_layers, first_k_dense) are skipped."""
    family = family_for(model.config)
    layers = decoder_layers(model)
    prefix = f"{family.decoder_path}.layers" if family.decoder_path else "layers"
    found = []
    for i in family.moe_layers:
        block = layers[i].get_submodule(family.block_path) if family.block_path else layers[i]
        name = f"{prefix}.{i}.{family.block_path}" if family.block_path else f"{prefix}.{i}"
        found.append(MoELayer(i, name, block, getattr(block, family.router_attr),
                              getattr(block, family.experts_attr), family))
    return found


def fused_up(experts: nn.Module) -> torch.Tensor:
    """The fused up projection [E, ...]: gate_up_proj, or up_proj for ungated experts."""
    return experts.gate_up_proj if experts.has_gate else experts.up_proj


def _fused_up_bias(experts: nn.Module) -> torch.Tensor:
    return experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias


def _activate(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


# ---- one expert's forward pass --------------------------------------------------------------

def _plain_gate(experts: nn.Module) -> bool:
    """Whether a_e = act(gate x) * up x on the concatenated halves of gate_up_proj (transformers' default
    gate): true for every family but GPT-OSS, whose interleaved, clamped gate keeps its own `_apply_gate`."""
    default = getattr(_moe_integration, "_default_apply_gate", None)
    return (bool(getattr(experts, "has_gate", True)) and bool(experts.is_concatenated) and default is not None
            and type(experts)._apply_gate is default)


def _activate_(experts: nn.Module, gate: torch.Tensor) -> torch.Tensor:
    """act(gate), in place where the activation is SiLU."""
    if isinstance(experts.act_fn, (SiLUActivation, nn.SiLU)):
        return F.silu(gate, inplace=True)
    return experts.act_fn(gate)


def _gate_up_halves(experts: nn.Module, which) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up weights of experts `which` as views of gate_up_proj, [k, H, I] each (h = x @ w)."""
    w = experts.gate_up_proj[which]
    if experts.is_transposed:
        return w.chunk(2, dim=2)
    gate, up = w.chunk(2, dim=1)
    return gate.transpose(1, 2), up.transpose(1, 2)


def _gate_up_bias(experts: nn.Module, which) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    if not experts.has_bias:
        return None, None
    return experts.gate_up_proj_bias[which].chunk(2, dim=1)  # [k, I] each


@torch.no_grad()
def experts_products(experts: nn.Module, x: torch.Tensor, which=slice(None), out=None) -> tuple[torch.Tensor, ...]:
    """The products of a_e(x) before its activation, for experts `which` (a slice, all by default, or a list of
    indices) on the same tokens x [T, H], [k, T, ...] each: gate and up as separate contiguous products, or
    (GPT-OSS's own gate, ungated experts) the one fused product; biases added. `out(p, shape)`, when given, is
    where gate (p=0) and up (p=1) are written (a reused buffer of that shape); the values never depend on it.

    A slice reads the weights as views; `which` bounds the memory. Statistics only: no autograd."""
    if not _plain_gate(experts):  # GPT-OSS's own gate, or ungated experts (act(up x))
        w = fused_up(experts)[which]
        h = torch.matmul(x, w) if experts.is_transposed else torch.matmul(x, w.transpose(1, 2))
        if experts.has_bias:
            h = h + _fused_up_bias(experts)[which][:, None, :]
        return (h,)
    gate_w, up_w = _gate_up_halves(experts, which)
    shape = (gate_w.shape[0], x.shape[0], gate_w.shape[2])
    gate, up = (x.new_empty(shape), x.new_empty(shape)) if out is None else (out(0, shape), out(1, shape))
    for e in range(gate_w.shape[0]):  # one plain product per expert: no copy of x for each
        torch.mm(x, gate_w[e], out=gate[e])
        torch.mm(x, up_w[e], out=up[e])
    gate_b, up_b = _gate_up_bias(experts, which)
    if gate_b is not None:
        gate += gate_b[:, None, :]
        up += up_b[:, None, :]
    return gate, up


@torch.no_grad()
def activated(experts: nn.Module, products: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """a_e(x) [k, T, I] from `experts_products` (the gate's activation applied in place on it).

    An elementwise activation can round a value differently by where it sits in the tensor (vectorised body or
    scalar tail, per thread), so the same products in a tensor of the same shape give the same bits."""
    if len(products) == 1:
        return _activate(experts, products[0])
    gate, up = products
    return _activate_(experts, gate).mul_(up)


@torch.no_grad()
def activated_into(experts: nn.Module, products: tuple[torch.Tensor, ...], out) -> torch.Tensor:
    """`activated`'s values, bit for bit, with `products` left as they are: the activation written into out(shape)
    (a buffer of the gate's shape) and multiplied by up there. The same elementwise kernel on tensors of the same
    shape and layout, so the same bits."""
    if len(products) == 1:
        return _activate(experts, products[0])  # the fused forms' activations allocate their result
    gate, up = products
    act = out(gate.shape)
    if isinstance(experts.act_fn, (SiLUActivation, nn.SiLU)):
        torch.ops.aten.silu.out(gate, out=act)
    else:
        act.copy_(experts.act_fn(gate))
    return act.mul_(up)


def experts_hidden(experts: nn.Module, x: torch.Tensor, which=slice(None)) -> torch.Tensor:
    """a_e(x) for experts `which` (a slice, all by default, or a list of indices) on the same tokens x [T, H]:
    [k, T, I], gate and up as separate contiguous products (the activation applied in place)."""
    return activated(experts, experts_products(experts, x, which))


def expert_hidden(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """a_e(x) = act(gate_e x) * up_e x (act(up_e x) ungated), the expert's intermediate activation [T, I]."""
    return experts_hidden(experts, x, slice(e, e + 1))[0]


def expert_output(experts: nn.Module, e: int, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """E_e(x), the unweighted output of expert e on tokens x [T, H] (pass `hidden` to reuse a_e(x))."""
    h = expert_hidden(experts, e, x) if hidden is None else hidden
    w = experts.down_proj[e]
    out = h @ w if experts.is_transposed else F.linear(h, w)
    if experts.has_bias:
        out = out + experts.down_proj_bias[e]
    return out


# ---- canonical weights -----------------------------------------------------------------------

def _split_gate_up(t: torch.Tensor, concatenated: bool, gated: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Split the fused [.., 2I, ..] axis (dim 1) into gate and up (no gate: all of it is up)."""
    if not gated:
        return None, t
    if concatenated:
        return t.chunk(2, dim=1)
    return t[:, 0::2], t[:, 1::2]


def _join_gate_up(gate: torch.Tensor | None, up: torch.Tensor, concatenated: bool) -> torch.Tensor:
    if gate is None:
        return up
    if concatenated:
        return torch.cat([gate, up], dim=1)
    return torch.stack([gate, up], dim=2).flatten(1, 2)  # g0 u0 g1 u1 ...


def canonical_weights(experts: nn.Module, idx) -> dict[str, torch.Tensor | None]:
    """Weights of experts `idx` as gate/up [k, I, H], down [k, H, I] and biases (None when absent).

    A list of indices gives copies; a slice gives views of the parameters (no memory; not to be written)."""
    if not isinstance(idx, slice):
        idx = torch.as_tensor(idx, dtype=torch.long, device=experts.down_proj.device)
    gate_up = fused_up(experts)[idx]
    down = experts.down_proj[idx]
    if experts.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate, up = _split_gate_up(gate_up, experts.is_concatenated, experts.has_gate)
    out = {"gate": gate, "up": up, "down": down, "gate_bias": None, "up_bias": None, "down_bias": None}
    if experts.has_bias:
        out["gate_bias"], out["up_bias"] = _split_gate_up(_fused_up_bias(experts)[idx], experts.is_concatenated,
                                                          experts.has_gate)
        out["down_bias"] = experts.down_proj_bias[idx]
    return out


@torch.no_grad()
def write_canonical_weights(experts: nn.Module, idx, w: dict[str, torch.Tensor | None]) -> None:
    """Inverse of `canonical_weights`: write gate/up/down (+biases) of experts `idx` in place."""
    idx = torch.as_tensor(idx, dtype=torch.long, device=experts.down_proj.device)
    gate_up = _join_gate_up(w["gate"], w["up"], experts.is_concatenated)
    down = w["down"]
    if experts.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    up = fused_up(experts)
    up.data[idx] = gate_up.to(up.dtype)
    experts.down_proj.data[idx] = down.to(experts.down_proj.dtype)
    if experts.has_bias:
        bias = _join_gate_up(w["gate_bias"], w["up_bias"], experts.is_concatenated)
        up_bias = _fused_up_bias(experts)
        up_bias.data[idx] = bias.to(up_bias.dtype)
        experts.down_proj_bias.data[idx] = w["down_bias"].to(experts.down_proj_bias.dtype)


def router_probs(layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
    """sigma(x) over all routed experts: softmax of the router logits, or the sigmoid scores of sigmoid
    routers (a softmax over every router row; rows past the routed experts, zero-compute ones, dropped)."""
    logits = logits.float()
    sigma = logits.sigmoid() if layer.family.scoring == "sigmoid" else logits.softmax(dim=-1)
    return sigma[..., :layer.num_experts] if sigma.shape[-1] > layer.num_experts else sigma
