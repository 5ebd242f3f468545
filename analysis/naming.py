"""Names shared by the analysis modules: calibration-mix labels (ream_exp.mix_labels, where the runs
write them too), the name a run's method is compared under, method display labels and the quantisation a point
carries ("reap@w4a16": REAP's experts, then W4A16 weights; docs/bytes.md). Library module; no command.
"""

from functools import lru_cache

from omegaconf import OmegaConf

from ream_exp.mix_labels import MIX_PARTS, format_mix, format_ratio, mix_weights, other_sources, parse_mix

__all__ = ["MIX_PARTS", "METHOD_LABELS", "NO_QUANT", "SWITCHES", "format_mix", "format_ratio", "method_label",
           "method_name", "mix_weights", "other_sources", "parse_mix", "quant_name", "with_quant"]

# Registry names -> the labels the paper prints. Unknown names are shown as they are.
METHOD_LABELS = {
    "none": "Original",
    "random": "Random",
    "freq": "Freq",
    "soft_freq": "Soft-Freq",
    "ean": "EAN",
    "reap": "REAP",
    "hc_smoe": "HC-SMoE",
    "m_smoe": "M-SMoE",
    "ream": "REAM",
    "ream_official": "REAM (official)",
    "aimer": "AIMER",
    "router_norm": "Router norm",
    "man": "MAN",
    "msan": "MSAN",
}
OPERATOR_LABELS = {"ties": "TIES", "multislerp": "multislerp", "karcher": "Karcher", "sub_moe": "Sub-MoE"}
METHOD_LABELS.update({f"{base}_{op}": f"{METHOD_LABELS[base]} + {label}" for base in ("ream", "hc_smoe", "m_smoe")
                      for op, label in OPERATOR_LABELS.items()})

# A merging method's composition switches (docs/algorithms.md, "Merging as a composition").
SWITCHES = ("grouping", "align", "merge")
# What a `+setting` part of a method name (method_name) shows in a label.
SETTING_LABELS = {**METHOD_LABELS, "super": "super experts kept"}
# method.saliency of a method when the config does not change it (ream_exp.methods: REAM's reap, M-SMoE's freq).
DEFAULT_SALIENCY = {"m_smoe": "freq"}


def method_name(name, method: dict | None = None) -> str:
    """The name a run's method is compared under, from its settings, so that frontiers keep variants apart: its
    preset, then `+switch=value` for each composition switch the run sets otherwise than the preset
    (`ream+merge=ties`), `+<score>` when method.saliency is not the preset's default and the name does not
    already say it (`ream+aimer`), `+super` with method.protect=super (`reap+super`). Runs without these
    settings recorded keep their name."""
    if not isinstance(method, dict) or name is None:
        return name
    name = str(name)
    parts = [name]
    preset = preset_switches(name)
    if preset is not None:
        parts += [f"{key}={method[key]}" for key in SWITCHES if key in method and method[key] != preset.get(key)]
    base = str(method.get("name", name))
    saliency = method.get("saliency")
    if saliency is not None and saliency != DEFAULT_SALIENCY.get(base, "reap") and saliency not in name:
        parts.append(str(saliency))
    if method.get("protect") not in (None, "none"):
        parts.append(str(method["protect"]))
    return "+".join(parts)


@lru_cache(maxsize=None)
def preset_switches(name: str) -> dict | None:
    """The switches conf/method/<name>.yaml sets (its defaults list followed), over its module's DEFAULTS;
    None for a method without them."""
    from ream_exp import CONF_DIR
    from ream_exp.methods import METHODS

    module = METHODS.get(name)
    defaults = getattr(module, "DEFAULTS", {})
    if not any(key in defaults for key in SWITCHES):
        return None
    values = {key: defaults[key] for key in SWITCHES if key in defaults}
    values.update(_preset_file(CONF_DIR / "method", name))
    return values


def _preset_file(folder, name: str, depth: int = 0) -> dict:
    path = folder / f"{name}.yaml"
    if depth > 8 or not path.exists():
        return {}
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values = {}
    for parent in node.get("defaults") or []:
        if isinstance(parent, str) and parent != "_self_":
            values.update(_preset_file(folder, parent, depth + 1))
    values.update({key: node[key] for key in SWITCHES if key in node})
    return values


NO_QUANT = "none"  # quant.name of a run that keeps the compressed model's own dtype (and of runs before quant)
QUANT_SEP = "@"  # not "+", which joins a method's settings (method_name)


def quant_name(value) -> str:
    """A run's quant.name as a label: NO_QUANT where missing (runs from before the quant stage)."""
    if value is None or (isinstance(value, float) and value != value) or str(value) in ("", "None", "null"):
        return NO_QUANT
    return str(value)


def with_quant(method, quant) -> str:
    """The method a point is drawn and compared as: 'reap' unquantised, 'reap@w4a16' quantised."""
    quant = quant_name(quant)
    return str(method) if quant == NO_QUANT else f"{method}{QUANT_SEP}{quant}"


def method_label(name) -> str:
    """A display label: the paper's for its methods, `REAM + TIES` for a composition preset, a changed switch in
    brackets (`REAM [merge=ties]`), a score or protection in parentheses (`REAM (AIMER)`), the quantisation
    after ' + ' (`REAP + W4A16`); unknown names as they are."""
    method, _, quant = str(name).partition(QUANT_SEP)
    base, *parts = method.split("+")
    label = METHOD_LABELS.get(base, base)
    switches = [p for p in parts if "=" in p]
    settings = [SETTING_LABELS.get(p, p) for p in parts if "=" not in p]
    if switches:
        label = f"{label} [{', '.join(switches)}]"
    if settings:
        label = f"{label} ({', '.join(settings)})"
    return f"{label} + {quant.upper()}" if quant else label
