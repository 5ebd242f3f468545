"""Names shared by the analysis modules: calibration-mix labels (ream_exp.mix_labels, where the runs
write them too), method display labels and the quantisation a point carries ("reap@w4a16": REAP's experts,
then W4A16 weights; docs/bytes.md). Library module; no command.
"""

from ream_exp.mix_labels import MIX_PARTS, format_mix, format_ratio, mix_weights, other_sources, parse_mix

__all__ = ["MIX_PARTS", "METHOD_LABELS", "NO_QUANT", "format_mix", "format_ratio", "method_label", "method_name",
           "mix_weights", "other_sources", "parse_mix", "quant_name", "with_quant"]

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
# What a `+setting` part of a method name (method_name) shows in a label.
SETTING_LABELS = {**METHOD_LABELS, "super": "super experts kept"}
# method.saliency of a method when the config does not change it (ream_exp.methods: REAM's reap, M-SMoE's freq).
DEFAULT_SALIENCY = {"m_smoe": "freq"}


def method_name(name, settings=None) -> str:
    """The method a run stands for, from its settings, so that frontiers keep variants apart: the preset's name,
    then `+<score>` when method.saliency is not the preset's default (and the name does not already say it),
    then `+super` with method.protect=super. `ream` with saliency=aimer is `ream+aimer`, `reap` with
    protect=super `reap+super`; runs without these settings keep their name."""
    name = str(name)
    if not isinstance(settings, dict):
        return name
    parts = [name]
    base = str(settings.get("name", name))
    saliency = settings.get("saliency")
    if saliency is not None and saliency != DEFAULT_SALIENCY.get(base, "reap") and saliency not in name:
        parts.append(str(saliency))
    if settings.get("protect") not in (None, "none"):
        parts.append(str(settings["protect"]))
    return "+".join(parts)


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
    """The display label of a method name: `+` parts of method_name in parentheses, the quantisation after
    ' + ': 'reap' -> 'REAP'; 'ream+aimer' -> 'REAM (AIMER)'; 'reap@w4a16' -> 'REAP + W4A16'; unknown names as
    they are."""
    method, _, quant = str(name).partition(QUANT_SEP)
    base, *parts = method.split("+")
    label = METHOD_LABELS.get(base, base)
    if parts:
        label = f"{label} ({', '.join(SETTING_LABELS.get(p, p) for p in parts)})"
    return f"{label} + {quant.upper()}" if quant else label
