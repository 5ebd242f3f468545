"""Read a MoE architecture from the model itself: what ream-exp needs to know, or why it cannot compress it.

`read_architecture(config)` builds the model on the meta device (no weights, no memory) and reads:

- where the sparse blocks are: the decoder layers (`model.get_decoder().layers`) whose submodules include
  a fused experts module (transformers' `use_experts_implementation` marks it with is_transposed /
  is_concatenated / has_bias / has_gate); the block is the experts' parent, the same path in every layer;
- the router: the block's child holding a 2-D tensor with one row per expert (or more rows: zero-compute
  or shared experts after the routed ones); every tensor indexed by expert in the router and on the
  block (router rows and biases, correction biases kept on the block, a [1, E] bias) with its dim;
- the expert counts: the experts module's first dim; the text config's keys that hold it (top level or a
  nested text_config, ints or per-layer lists), and the module attributes that cache it;
- how the router turns logits into sigma(x): one block is materialised with random weights (the routed
  experts replaced by a recorder, large shared experts by zeros) and run on random tokens (the router
  alone when the block is the decoder layer itself); the weights handed to the experts must be
  proportional, token by token, to softmax or sigmoid of the router's first output at the chosen
  experts, and the chosen experts must be the top-k of those scores (or of the scores or logits plus a
  correction bias, within the router's groups). The one scoring that explains them is the family's;
  none or two: refused;
- group-limited routers: n_group / topk_group from the router; the group score (best expert or best two)
  is the hypothesis that reproduces the router's choices.

Refused besides: a block whose routing needs more than the hidden states (token ids for hash-routed
layers, routing state carried from layer to layer) and experts that transform each expert's output
after down_proj (a per-expert norm). What cannot be read is in families.FAMILIES (by model type). A model
that cannot be handled raises `Unsupported` with one line naming what is missing, before any weights load.
"""

from __future__ import annotations

import copy
import inspect
import re

import torch
from torch import nn

PROBE_TOKENS = 64
_REL_TOL = 1e-4
# config key names that hold an expert count, and the ones that hold other expert numbers
_COUNT_NAME = re.compile(r"expert")
_NOT_COUNT = re.compile(r"per_tok|per_token|shared|top|group|intermediate|size|dim|factor|coef|capacity|bias|"
                        r"active|zero|ffn|start|end|interval|offset|period|rank|weight|scal|noise|jitter|layer|"
                        r"norm|loss|parallel|implementation|hidden")


class Unsupported(ValueError):
    """The model cannot be compressed by ream-exp; the message says what is missing."""


class TopKOutOfRange(Unsupported):
    """The config's top-k is not between 1 and its expert count (a broken config, not an architecture)."""

    def __init__(self, top_k: int, num_experts: int, top_k_key: str, count_key: str):
        self.top_k, self.num_experts, self.top_k_key, self.count_key = top_k, num_experts, top_k_key, count_key
        super().__init__(f"{top_k_key} (top_k)={top_k} with {count_key}={num_experts}; top_k must be between 1 and "
                         "the number of experts")


TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "moe_top_k")


def is_experts_module(module: nn.Module) -> bool:
    """A fused experts module of transformers 5 (`use_experts_implementation` sets these attributes)."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "down_proj")


def expert_count(experts: nn.Module) -> int:
    return (experts.gate_up_proj if experts.has_gate else experts.up_proj).shape[0]


# ---- the meta model -------------------------------------------------------------------------------

def meta_model(config) -> nn.Module:
    """The model of `config` on the meta device, built by the Auto class that loads it (registry.py)."""
    from .registry import auto_model_class

    auto = auto_model_class(config)
    if type(config) not in auto._model_mapping:
        raise Unsupported(f"neither AutoModelForCausalLM nor AutoModelForImageTextToText builds "
                          f"{type(config).__name__}")
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a config its own model class cannot build
        raise Unsupported(f"{auto.__name__} cannot build the model from this config "
                          f"({type(exc).__name__}: {exc})") from None


def decoder_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the text decoder that holds the decoder layer list `layers`."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise Unsupported(f"{type(model).__name__}: no text decoder with a layer list (get_decoder().layers)")
    for name, module in model.named_modules():
        if module is decoder:
            return name, decoder
    raise Unsupported(f"{type(model).__name__}: its decoder is not one of its modules")


def towers_beside(model: nn.Module, decoder_path: str) -> tuple[str, ...]:
    """The modules with weights beside a nested text decoder (vision and audio towers, projectors): the
    siblings of `model.language_model`; none for a causal LM, whose decoder is `model`."""
    parent, _, name = decoder_path.rpartition(".")
    if not parent:
        return ()
    return tuple(f"{parent}.{n}" for n, child in model.get_submodule(parent).named_children()
                 if n != name and any(True for _ in child.parameters()))


# ---- where the sparse blocks are ------------------------------------------------------------------

def sparse_blocks(layers: nn.ModuleList) -> tuple[str, list[int]]:
    """The block path inside a decoder layer ("mlp", "block_sparse_moe", "" for the layer itself) and the
    indices of the layers that have routed experts."""
    paths, indices = set(), []
    for i, layer in enumerate(layers):
        found = [n for n, m in layer.named_modules() if is_experts_module(m)]
        if len(found) > 1:
            raise Unsupported(f"decoder layer {i} has {len(found)} fused experts modules ({', '.join(found)}); "
                              "one per decoder layer is compressed")
        if found:
            paths.add(found[0].rpartition(".")[0])
            indices.append(i)
    if not indices:
        raise Unsupported("no decoder layer has fused routed experts")
    if len(paths) > 1:
        raise Unsupported(f"the experts sit at different places in different layers: {sorted(paths)}")
    return paths.pop(), indices


def expert_tensors(module: nn.Module, sizes: tuple[int, ...], recurse: bool) -> list[tuple[str, int, int]]:
    """(name, dim, size) of the tensors of `module` indexed by expert: dim 0 of one of `sizes` (the routed
    experts, or the router's rows when zero-compute / shared experts follow them), or dim 1 of a [1, E]."""
    found = []
    tensors = list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))
    for name, t in tensors:
        if t is None or t.dim() == 0:
            continue
        if t.shape[0] in sizes:
            found.append((name, 0, t.shape[0]))
        elif t.dim() == 2 and t.shape[0] == 1 and t.shape[1] in sizes:  # a [1, E] bias (ERNIE's moe_statics)
            found.append((name, 1, t.shape[1]))
    return found


def find_router(block: nn.Module, num_experts: int) -> tuple[str, int]:
    """(attribute, rows) of the block's router: the child (not the experts) with a 2-D tensor of one row per
    expert; with none, one whose rows also cover zero-compute experts (more rows than experts)."""
    def rows_of(child):
        return {p.shape[0] for p in child.parameters() if p.dim() == 2 and p.shape[0] > 1}

    children = [(n, c) for n, c in block.named_children() if not is_experts_module(c)]
    exact = [n for n, c in children if num_experts in rows_of(c)]
    if len(exact) > 1:
        named = [n for n in exact if n in ("gate", "router")]
        exact = named if len(named) == 1 else exact
    if len(exact) == 1:
        return exact[0], num_experts
    if exact:
        raise Unsupported(f"{type(block).__name__}: several children could be the router ({', '.join(exact)})")
    wider = [(n, r) for n, c in children if n in ("gate", "router") for r in rows_of(c) if r > num_experts]
    if len(wider) == 1:
        return wider[0]
    raise Unsupported(f"{type(block).__name__}: no router with one row per expert ({num_experts})")


# ---- config keys and cached attributes ------------------------------------------------------------

def _config_items(config, prefix: str = ""):
    """(dotted key, value) of the config and its nested configs (text_config, ...)."""
    from transformers import PretrainedConfig

    for key, value in vars(config).items():
        if key.startswith("_"):
            continue
        if isinstance(value, PretrainedConfig):
            yield from _config_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _text_config(config) -> tuple[str, object]:
    """(dotted prefix, config) of the text model's config: the config itself, or a nested one."""
    text = config.get_text_config()
    for key, value in vars(config).items():
        if value is text and text is not config:
            return f"{key}.", text
    return "", config


def count_keys(config, num_experts: int) -> tuple[str, ...]:
    """Dotted config keys of the text model holding the routed-expert count (an int, or a per-layer list
    holding it; a vision tower's own experts are not ours); a key the config class also knows under an
    alias (attribute_map) is named by the alias, as configs write it."""
    prefix, text = _text_config(config)
    aliases = {target: alias for alias, target in type(text).attribute_map.items()}
    keys = []
    for key, value in _config_items(text, prefix):
        name = key.rpartition(".")[2]
        if not _COUNT_NAME.search(name) or _NOT_COUNT.search(name.replace("num_experts", "").replace(
                "n_routed_experts", "").replace("num_local_experts", "")):
            continue
        if (isinstance(value, int) and not isinstance(value, bool) and value == num_experts) or (
                isinstance(value, (list, tuple)) and num_experts in value):
            keys.append(prefix + aliases.get(key[len(prefix):], key[len(prefix):]))
    return tuple(keys)


def declared_top_k(config, router: nn.Module, block: nn.Module) -> tuple[int | None, str]:
    """The top-k the router (or block, or config) declares, and the config key naming it."""
    key = next((k for k in TOP_K_KEYS if getattr(config.get_text_config(), k, None) is not None), "top_k")
    for module in (router, block):
        value = getattr(module, "top_k", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, key
    value = getattr(config.get_text_config(), key, None)
    return (value if isinstance(value, int) else None), key


def cached_count_attributes(module: nn.Module, counts: set[int], recurse: bool) -> list[str]:
    """Attributes (dotted under `module`) caching an expert count: ints named like one, equal to one of `counts`."""
    found = []
    modules = module.named_modules() if recurse else [("", module)]
    for path, m in modules:
        for name, value in vars(m).items():
            if (isinstance(value, int) and not isinstance(value, bool) and value in counts and "expert" in name
                    and not re.search(r"per_tok|top|shared|group", name)):
                found.append(f"{path}.{name}" if path else name)
    return found


# ---- the router probe -----------------------------------------------------------------------------

class _Stop(Exception):
    pass


@torch.no_grad()
def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights with a visible spread: matrices scaled by fan-in, vectors around 1 (norms, biases)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if not t.is_floating_point():
            t.zero_()
        elif t.dim() >= 2:
            t.copy_(torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5)
        else:
            t.copy_(1 + 0.3 * torch.randn(t.shape, generator=gen))


def _materialised_probe(block: nn.Module, router_attr: str, limit: int = 4_000_000) -> nn.Module:
    """A CPU copy of the meta `block` with random weights; the routed experts record their inputs and stop
    the forward; other large children (shared experts) return zeros."""
    probe = copy.deepcopy(block)
    for name, child in list(probe.named_children()):
        if is_experts_module(child):
            for pname, _ in list(child.named_parameters(recurse=False)):
                setattr(child, pname, nn.Parameter(torch.empty(0, device="meta")))
        elif name != router_attr and sum(p.numel() for p in child.parameters()) > limit:
            setattr(probe, name, _Zeros())
    probe = probe.to_empty(device="cpu").float()  # the routing in float32, whatever the checkpoint's dtype
    _randomise(probe, torch.Generator().manual_seed(0))
    return probe


class _Zeros(nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def _extra_inputs(module: nn.Module) -> list[str]:
    """What the module's forward takes besides the hidden states."""
    return [p for p in list(inspect.signature(type(module).forward).parameters)[2:] if p not in ("args", "kwargs")]


def check_block_inputs(block: nn.Module) -> None:
    extra = _extra_inputs(block)
    if extra:
        raise Unsupported(f"{type(block).__name__} routes with more than the hidden states ({', '.join(extra)}): "
                          "experts chosen by token id, or routing state carried from layer to layer")


def probe_router(router: nn.Module, hidden_size: int) -> dict:
    """The router alone (the sparse block is the whole decoder layer): its own top-k weights and indices
    (outputs 1 and 2) stand for what the experts receive."""
    if _extra_inputs(router):
        raise Unsupported(f"{type(router).__name__} routes with more than the hidden states "
                          f"({', '.join(_extra_inputs(router))})")
    probe = copy.deepcopy(router).to_empty(device="cpu").float()
    _randomise(probe, torch.Generator().manual_seed(0))
    x = torch.randn(PROBE_TOKENS, hidden_size, generator=torch.Generator().manual_seed(1))
    out = probe.eval()(x)
    if not isinstance(out, (tuple, list)) or len(out) < 3:
        raise Unsupported(f"{type(router).__name__} does not return (logits, top-k weights, top-k indices)")
    seen = {"logits": out[0].detach().float().reshape(-1, out[0].shape[-1]),
            "weights": out[1].detach().float().reshape(PROBE_TOKENS, -1), "index": out[2].reshape(PROBE_TOKENS, -1)}
    seen["biases"] = _choice_biases(probe, probe, seen["logits"].shape[-1])
    return seen


def probe_routing(block: nn.Module, router_attr: str, hidden_size: int) -> dict:
    """Run one randomly initialised copy of `block` on random tokens: the router's first output ("logits"
    [T, R]) and what the experts receive (top_k_index, top_k_weights), with the router's direct tensors."""
    check_block_inputs(block)
    probe = _materialised_probe(block, router_attr)
    seen = {}
    experts = next(m for m in probe.children() if is_experts_module(m))

    def record(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        seen["index"], seen["weights"] = top_k_index.detach().clone(), top_k_weights.detach().float().clone()
        raise _Stop

    experts.forward = record
    router = getattr(probe, router_attr)
    hook = router.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    x = torch.randn(1, PROBE_TOKENS, hidden_size, generator=torch.Generator().manual_seed(1))
    try:
        probe.eval()(x)
    except _Stop:
        pass
    except Exception as exc:  # noqa: BLE001 - every failure of the probe is a refusal with its reason
        raise Unsupported(f"{type(block).__name__}: the routing probe failed ({type(exc).__name__}: {exc})") from None
    finally:
        hook.remove()
    if "index" not in seen or "out" not in seen:
        raise Unsupported(f"{type(block).__name__}: the routed experts never ran in the routing probe")
    out = seen["out"]
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(logits):
        raise Unsupported(f"{type(router).__name__}: its first output is not a tensor of router logits")
    seen["logits"] = logits.detach().float().reshape(-1, logits.shape[-1])
    seen["biases"] = _choice_biases(probe, router, logits.shape[-1])
    return seen


def _choice_biases(block: nn.Module, router: nn.Module, rows: int) -> list[torch.Tensor]:
    """Candidate correction biases: the [R] / [1, R] tensors of the router (recursive) and of the block."""
    found = []
    for module, recurse in ((router, True), (block, False)):
        for t in list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse)):
            if t.is_floating_point() and t.numel() == rows and t.dim() <= 2 and t.shape[-1] == rows:
                found.append(t.detach().float().reshape(rows))
    return found


SCORINGS = {"softmax": lambda l: l.softmax(dim=-1), "sigmoid": torch.sigmoid}


def _proportional(weights: torch.Tensor, chosen: torch.Tensor) -> tuple[bool, bool]:
    """(weights proportional to `chosen` token by token, with one ratio for every token)."""
    used = weights != 0  # zero-compute slots hand their experts weight 0
    ratio = torch.where(used, weights / chosen.clamp(min=1e-30), torch.nan)
    hi, lo = ratio.nan_to_num(-torch.inf).amax(1), ratio.nan_to_num(torch.inf).amin(1)
    rows = used.any(1)
    if not rows.any():
        return False, False
    spread = ((hi - lo) / hi.abs().clamp(min=1e-30))[rows]
    per_token = bool((spread < _REL_TOL).all())
    values = hi[rows]
    constant = per_token and bool(((values - values[0]).abs() <= _REL_TOL * values[0].abs()).all())
    return per_token, constant


def _group_choice(scores: torch.Tensor, k: int, n_group: int, topk_group: int, best: int) -> torch.Tensor:
    """The experts a group-limited router picks: top-k within the topk_group groups scored by their `best`
    highest scores (best = 0: no groups)."""
    if best == 0 or n_group <= 1:
        return scores.topk(k, dim=-1).indices
    t, n = scores.shape
    grouped = scores.view(t, n_group, n // n_group)
    group_scores = grouped.topk(best, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1).indices, 1.0)
    masked = scores.masked_fill(~keep.bool().repeat_interleave(n // n_group, dim=1), -torch.inf)
    return masked.topk(k, dim=-1).indices


def read_scoring(seen: dict, num_experts: int, n_group: int, topk_group: int) -> dict:
    """Which scoring explains the probe (see the module docstring), whether the top-k weights are one
    constant times sigma (not renormalised) and the group score of a group-limited router."""
    logits, index, weights = seen["logits"], seen["index"], seen["weights"]
    k = index.shape[-1]
    explained = {}
    for name, fn in SCORINGS.items():
        sigma = fn(logits)
        chosen = sigma.gather(1, index.clamp(max=sigma.shape[1] - 1))
        per_token, constant = _proportional(weights, chosen)
        if per_token:
            explained[name] = (sigma, constant)
    if len(explained) != 1:
        what = "none" if not explained else "both"
        raise Unsupported(f"{what} of softmax / sigmoid of the router's first output explains the weights its "
                          f"experts receive (tried on {PROBE_TOKENS} random tokens)")
    (scoring, (sigma, constant)), = explained.items()
    real = weights != 0
    wanted = [set(r[m].tolist()) for r, m in zip(index, real)]
    candidates = [sigma] + [s + b for b in seen["biases"] for s in (sigma, logits)]
    explaining = [best for best in ((0,) if n_group <= 1 else (1, 2))
                  if any(all(w <= set(p.tolist()) for w, p in zip(wanted, _group_choice(scores, k, n_group,
                                                                                        topk_group, best)))
                         for scores in candidates)]
    if explaining:  # both group scores explaining the probe: the stricter one (each group keeps two)
        return {"scoring": scoring, "renormalised": not constant, "group_score_experts": max(explaining)}
    raise Unsupported(f"the router's choice of experts is not the top-{k} of its {scoring} scores (or of its "
                      f"scores or logits plus a correction bias{', within its router groups' if n_group > 1 else ''})")


# ---- everything together --------------------------------------------------------------------------

def _int_attr(module: nn.Module, *names: str, default: int = 1) -> int:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def read_architecture(config, known: dict | None = None) -> dict:
    """Everything `Family` holds for this config, read from the meta model (see the module docstring);
    `known`: what families.FAMILIES says instead (a scoring the probe cannot explain)."""
    known = known or {}
    model = meta_model(config)
    decoder_path, decoder = decoder_of(model)
    block_path, indices = sparse_blocks(decoder.layers)
    first = decoder.layers[indices[0]]
    block = first.get_submodule(block_path) if block_path else first
    experts_attr = next(name for name, m in block.named_children() if is_experts_module(m))
    experts = getattr(block, experts_attr)
    inner = [name for name, child in experts.named_children() if any(True for _ in child.parameters())]
    if getattr(experts, "has_post_expert_norm", False) or inner:
        raise Unsupported(f"{type(experts).__name__} transforms each expert's output after down_proj "
                          f"({', '.join(inner) or 'post_expert_norm'}): merging assumes E_i(x) = D_i a_i(x)")
    n = expert_count(experts)
    if block_path:
        check_block_inputs(block)
    router_attr, rows = find_router(block, n)
    router = getattr(block, router_attr)
    n_group = _int_attr(router, "num_group", "n_group", "num_expert_group")
    if getattr(router, "topk_method", None) == "greedy":  # DeepSeek-V2's default ignores its groups
        n_group = 1
    topk_group = _int_attr(router, "topk_group")
    counts = {n, rows}
    keys = count_keys(config, n)
    if not keys:
        raise Unsupported(f"no config key holds the routed-expert count ({n})")
    top_k, top_k_key = declared_top_k(config, router, block)
    if top_k is not None and not 1 <= top_k <= n:
        raise TopKOutOfRange(top_k, n, top_k_key, keys[0])
    hidden = getattr(decoder.config, "hidden_size", None) or model.config.get_text_config().hidden_size
    seen = probe_routing(block, router_attr, hidden) if block_path else probe_router(router, hidden)
    if "scoring" in known:
        scoring = {"scoring": known["scoring"], "renormalised": known.get("renormalised", True),
                   "group_score_experts": known.get("group_score_experts", 0)}
    else:
        scoring = read_scoring(seen, n, n_group, topk_group)
    return dict(
        decoder_path=decoder_path, block_path=block_path, router_attr=router_attr, experts_attr=experts_attr,
        num_experts=n,
        router_rows=rows, top_k=int(seen["index"].shape[-1]), n_group=n_group, topk_group=topk_group,
        count_keys=keys, moe_layers=tuple(indices),
        router_tensors=tuple(expert_tensors(router, tuple(counts), recurse=True)),
        block_tensors=tuple(expert_tensors(block, tuple(counts), recurse=False)),
        cached=tuple(cached_count_attributes(block, counts, recurse=False)
                     + [f"{router_attr}.{a}" for a in cached_count_attributes(router, counts, recurse=True)]
                     + [f"{experts_attr}.{a}" for a in cached_count_attributes(experts, counts, recurse=False)]),
        has_gate=bool(experts.has_gate), num_layers=len(decoder.layers), towers=towers_beside(model, decoder_path),
        shared=tuple(name for name, child in block.named_children()
                     if "shared" in name and any(True for _ in child.parameters())), **scoring)
