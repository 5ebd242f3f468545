"""The quantization stage: after experts are removed or merged and before evaluation (docs/quantization.md).

    ream-exp method=ream_official ratio=0.25 quant=w4a16_gptq     # needs `make quant-env` once

`SCHEMES` maps each `quant.name` to llm-compressor's preset scheme and the algorithm that rounds the
weights; `none` (the default) is no stage at all. Everything a quantized run can get wrong is checked
here before any weights load (`check_quant`): the environment that runs llm-compressor, save=true, and a
group size that divides every quantized layer's input width. The stage itself is ream_exp.quant.stage;
llm-compressor runs in its own environment and process (ream_exp.quant.env, ream_exp/quant/oneshot.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class Scheme:
    preset: str              # llm-compressor's preset scheme name (compressed_tensors.quantization presets)
    algorithm: str           # rtn (round to nearest, data-free) | gptq | awq
    grouped: bool = False    # weights in groups of quant.group_size input channels
    bits: int = 16           # bits per quantized weight (the model card's words)
    meaning: str = ""


SCHEMES: dict[str, Scheme] = {
    "fp8": Scheme("FP8_DYNAMIC", "rtn", bits=8,
                  meaning="FP8 weights (per channel), FP8 activations scaled per token at run time"),
    "w8a8": Scheme("W8A8", "gptq", bits=8,
                   meaning="INT8 weights (per channel, GPTQ), INT8 activations scaled per token at run time"),
    "w4a16_gptq": Scheme("W4A16", "gptq", grouped=True, bits=4,
                         meaning="INT4 weights in groups (GPTQ), activations in the model's dtype"),
    "w4a16_awq": Scheme("W4A16", "awq", grouped=True, bits=4,
                        meaning="INT4 weights in groups (AWQ scaling, then rounding), activations in the "
                                "model's dtype"),
}
NAMES = ("none", *SCHEMES)
GROUP_SIZES = (128, 64, 32)  # tried in this order when quant.group_size is null
# Schemes whose compressed-tensors checkpoint of a MoE the transformers ream-exp installs cannot load, so
# the run could not evaluate it; refused before anything runs (docs/quantization.md, measured with 5.25)
NOT_RELOADABLE: dict[str, str] = {
    "w8a8": "transformers {transformers} cannot load the INT8 (int-quantized) experts of a compressed-tensors "
            'MoE checkpoint ("torch.cat(): expected a non-empty list of Tensors"), so the run could not evaluate '
            "it; use quant=fp8 for 8-bit weights",
}


def quant_name(cfg) -> str:
    """The run's quant.name; none where the config has no quant group (runs made before it existed)."""
    quant = cfg.get("quant") if hasattr(cfg, "get") else None
    return str((quant or {}).get("name") or "none")


def scheme_of(cfg) -> Scheme | None:
    return SCHEMES.get(quant_name(cfg))


def needs_calibration(cfg) -> bool:
    """Whether the quant stage reads calibration tokens (GPTQ and AWQ do; round to nearest does not)."""
    scheme = scheme_of(cfg)
    return scheme is not None and scheme.algorithm != "rtn"


def ignored_modules(family) -> list[str]:
    """Modules kept in the model's dtype, as llm-compressor's MoE examples keep them: the output head, every
    router and every shared-expert gate (a Linear of one output). Regular expressions over module names."""
    block = f"{re.escape(family.block_path)}\\." if family.block_path else ""
    keep = [r"re:^lm_head$", f"re:.*\\.{block}{re.escape(family.router_attr)}$"]
    keep += [f"re:.*\\.{block}{re.escape(name)}$" for name in family.shared if "gate" in name]
    return keep


def is_ignored(name: str, ignore: list[str]) -> bool:
    return any(re.match(pattern[3:], name) for pattern in ignore)


def input_widths(model, ignore: list[str]) -> dict[int, str]:
    """{input width: a module with that width} over what the stage quantizes: every Linear not ignored and
    every routed expert's projections (fused in transformers 5; llm-compressor splits them into Linears
    whose input widths are the two last dimensions of down_proj: hidden size and expert width)."""
    import torch.nn as nn

    from ..moe.discover import is_experts_module

    widths: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not is_ignored(name, ignore):
            widths.setdefault(module.in_features, name)
        elif is_experts_module(module):
            for width in module.down_proj.shape[-2:]:
                widths.setdefault(int(width), f"{name}.down_proj")
    return widths


def resolve_group_size(quant, model_config, family) -> int | None:
    """quant.group_size, or with null the largest of GROUP_SIZES that divides every quantized input width;
    a ConfigError where the given one does not (llm-compressor fails mid-run on such a layer)."""
    scheme = scheme_of({"quant": quant})
    if scheme is None or not scheme.grouped:
        return None
    from ..moe.discover import meta_model

    widths = input_widths(meta_model(model_config), ignored_modules(family))
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    size = quant.get("group_size")
    if size is None:
        if not fits:
            raise ConfigError(f"quant={quant_name({'quant': quant})}: none of the group sizes "
                              f"{', '.join(map(str, GROUP_SIZES))} divides every quantized input width "
                              f"({', '.join(map(str, sorted(widths)))}); set quant.group_size")
        return fits[0]
    bad = {w: n for w, n in widths.items() if w % int(size)}
    if bad:
        width, name = sorted(bad.items())[0]
        hint = f"; quant.group_size={fits[0]} divides them all" if fits else ""
        raise ConfigError(f"quant.group_size={size} does not divide the input width {width} of {name}: "
                          f"quant.group_size must divide every quantized layer's input width{hint}")
    return int(size)


def check_quant(cfg, model_config) -> dict:
    """Every check of the quant stage that can fail before a model loads; the stage's resolved settings
    ({} for quant=none): scheme, algorithm, group size, ignored modules, the environment's python."""
    name = quant_name(cfg)
    scheme = SCHEMES.get(name)
    if scheme is None:
        return {}
    if name in NOT_RELOADABLE:
        import transformers

        raise ConfigError(f"quant={name}: " + NOT_RELOADABLE[name].format(transformers=transformers.__version__))
    if not cfg.get("save", True):
        raise ConfigError(f"quant={name} quantizes the saved checkpoint: set save=true (or quant=none)")
    if cfg.get("budget", "uniform") == "global":
        raise ConfigError(f"quant={name}: the quantization environment loads the checkpoint with stock transformers, "
                          "which cannot load per-layer expert counts (budget=global); use budget=uniform or quant=none")
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise ConfigError(f"quant={name}: the quantized checkpoint loads with the compressed-tensors package, "
                          "which is not installed here (pip install -e . installs it)")
    from ..moe import family_for
    from .env import quant_python

    family = family_for(model_config)
    group_size = resolve_group_size(cfg.quant, model_config, family)
    python = quant_python(cfg.get("cache_dir"), name, needs_cuda=scheme.algorithm == "awq")
    return {"name": name, "scheme": scheme.preset, "algorithm": scheme.algorithm, "group_size": group_size,
            "ignore": ignored_modules(family), "python": str(python)}


__all__ = ["GROUP_SIZES", "NAMES", "SCHEMES", "Scheme", "check_quant", "ignored_modules", "input_widths",
           "needs_calibration", "quant_name", "resolve_group_size", "scheme_of"]
