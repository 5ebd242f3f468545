"""Names shared by the analysis modules: calibration-mix labels (ream_exp.mix_labels, where the runs
write them too), method display labels and the quantisation a point carries ("reap+w4a16": REAP's experts,
then W4A16 weights; docs/bytes.md). Library module; no command.
"""

from ream_exp.mix_labels import MIX_PARTS, format_mix, format_ratio, mix_weights, other_sources, parse_mix

__all__ = ["MIX_PARTS", "METHOD_LABELS", "NO_QUANT", "format_mix", "format_ratio", "method_label", "mix_weights",
           "other_sources", "parse_mix", "quant_name", "with_quant"]

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
}


NO_QUANT = "none"  # quant.name of a run that keeps the compressed model's own dtype (and of runs before quant)
QUANT_SEP = "+"


def quant_name(value) -> str:
    """A run's quant.name as a label: NO_QUANT where missing (runs from before the quant stage)."""
    if value is None or (isinstance(value, float) and value != value) or str(value) in ("", "None", "null"):
        return NO_QUANT
    return str(value)


def with_quant(method, quant) -> str:
    """The method a point is drawn and compared as: 'reap' unquantised, 'reap+w4a16' quantised."""
    quant = quant_name(quant)
    return str(method) if quant == NO_QUANT else f"{method}{QUANT_SEP}{quant}"


def method_label(name) -> str:
    """'reap' -> 'REAP'; 'reap+w4a16' -> 'REAP + W4A16'; unknown names as they are."""
    method, _, quant = str(name).partition(QUANT_SEP)
    label = METHOD_LABELS.get(method, method)
    return f"{label} + {quant.upper()}" if quant else label
