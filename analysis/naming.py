"""Names shared by the analysis modules: calibration-mix labels (ream_exp.mix_labels, where the runs
write them too), the name a run's method is compared under, and method display labels. Library module; no command.
"""

from functools import lru_cache

from omegaconf import OmegaConf

from ream_exp.mix_labels import MIX_PARTS, format_mix, format_ratio, mix_weights, other_sources, parse_mix

__all__ = ["MIX_PARTS", "METHOD_LABELS", "SWITCHES", "format_mix", "format_ratio", "method_label", "method_name",
           "mix_weights", "other_sources", "parse_mix"]

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
OPERATOR_LABELS = {"ties": "TIES", "multislerp": "multislerp", "karcher": "Karcher", "sub_moe": "Sub-MoE"}
METHOD_LABELS.update({f"{base}_{op}": f"{METHOD_LABELS[base]} + {label}" for base in ("ream", "hc_smoe", "m_smoe")
                      for op, label in OPERATOR_LABELS.items()})

# A merging method's composition switches (docs/algorithms.md, "Merging as a composition").
SWITCHES = ("grouping", "align", "merge")


def method_name(name, method: dict | None) -> str:
    """The name a run's method is compared under: its preset, plus `+switch=value` for each composition switch
    the run sets otherwise than the preset (`ream+merge=ties`), so that frontiers keep compositions apart. Runs
    of other methods, of unknown presets or without the switches recorded keep their name."""
    if not isinstance(method, dict) or name is None:
        return name
    preset = preset_switches(str(name))
    if preset is None:
        return name
    changed = [f"{key}={method[key]}" for key in SWITCHES if key in method and method[key] != preset.get(key)]
    return "+".join([str(name), *changed])


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


def method_label(name) -> str:
    """A display label: the paper's for its methods, `REAM + TIES` for a composition preset, and a changed
    switch in brackets (`REAM [merge=ties]`)."""
    base, *changed = str(name).split("+")
    label = METHOD_LABELS.get(base, base)
    return f"{label} [{', '.join(changed)}]" if changed else label
