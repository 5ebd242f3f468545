"""Every setting of a run checked before anything is loaded: each value against the one schema
(ream_exp.setting_schema), then the checks that need several settings.

    from ream_exp.settings import check_settings
    check_settings(cfg)      # the composed config; a ConfigError naming the first bad setting

A key the schema does not declare is refused with the allowed ones listed (`unknown setting metod (top
level); allowed: ...`), also where Hydra's `+key=value` added it past struct mode. A value is checked for
its type, range and choices; `???` (not set yet) passes here and is reported by the check that needs it
(e.g. model.path). Then `GROUP_CHECKS`, the named checks of one group's settings together (they live in
the module that owns the settings: model.max_memory needs model.device_map, calib.mix names declared
sources), for a method that reads calibration, `CALIBRATION_CHECKS` (the mix against calib.n), and
`CROSS_CHECKS`, of settings of several groups (method.protect against model.stream).

What needs more than the settings (the model's expert counts, group sizes, files, datasets) is checked
by ream_exp.run.validate and the functions it calls, after this. It reads the config and never changes
it: no default is filled in, so the resolved config.yaml (and the sweep identity built on it) is exactly
what Hydra composed. Messages are one line: `<setting>=<value> <what is wrong>: <setting> is <what it
means>`, or, for a setting with a few allowed values, `<setting>=<value>; valid: a, b, c`.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .calib import check_mix, check_mix_reads, check_states_dir
from .config import ConfigError, check_placement_keys
from .methods import METHODS, reads_calibration
from .methods.protect import check_protect
from .quant import needs_calibration as quant_needs_calibration
from .setting_schema import CALIB, EVAL, LOGGER, MODEL, QUANT, SCHEMA, SOURCE, method_group
from .setting_types import MISSING, Group, _join, _one_line

# checks of several settings of one group, run once every value has its type (each takes the group's values)
GROUP_CHECKS = {"model": (check_placement_keys,), "calib": (check_mix,)}
# calib's checks that matter only where a calibration is built: for a method that reads one
CALIBRATION_CHECKS = (check_states_dir, check_mix_reads)
# checks of settings of several groups together (each takes every group's values)
CROSS_CHECKS = (check_protect,)  # method.protect=super with model.stream=true


# ---------------------------------------------------------------- walking a composed config
def _plain(node, setting: str):
    """The value at `node` with interpolations resolved, as plain dicts and lists; `???` stays `???`.

    A value that cannot be resolved is a ConfigError naming the setting that holds it."""
    if isinstance(node, DictConfig):
        if node._is_missing():
            return MISSING
        if node._is_none():
            return None
        return {key: _child(node, key, _join(setting, key)) for key in node.keys()}
    if isinstance(node, ListConfig):
        if node._is_missing():
            return MISSING
        if node._is_none():
            return None
        return [_child(node, i, f"{setting}[{i}]") for i in range(len(node))]
    return node


def _child(node, key, setting: str):
    try:
        if OmegaConf.is_missing(node, key):
            return MISSING
        value = node[key]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{setting} cannot be resolved: {_one_line(exc)}") from None
    return _plain(value, setting)


def check_settings(cfg: DictConfig) -> None:
    """Checks every setting of a composed run config against SCHEMA, then GROUP_CHECKS (and, where the
    method reads calibration, CALIBRATION_CHECKS); raises the first problem as a one-line ConfigError.
    Unknown keys first (a typo must not run the defaults), then each key in SCHEMA's order, each resolved
    just before it is checked."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    SCHEMA.check_keys({key: None for key in cfg.keys()}, "", "top level")
    values = {}
    for key, spec in SCHEMA.fields.items():
        if key in cfg:
            values[key] = _child(cfg, key, key)
            parent = {"model": _plain_or_none(cfg, "model")} if key == "device" else None
            spec.check(values[key], key, parent)
    for group, checks in GROUP_CHECKS.items():
        if isinstance(values.get(group), dict):
            for check in checks:
                check(values[group])
    if isinstance(values.get("calib"), dict) and (_reads_calibration(values.get("method"))
                                                  or quant_needs_calibration(values)):
        for check in CALIBRATION_CHECKS:
            check(values["calib"])
    for check in CROSS_CHECKS:
        check(values)


def check_group(group: str, node) -> None:
    """One group's settings on their own (a calib config, say), as check_settings checks them in a run
    whose method reads calibration: the schema's Group, then the group's named checks."""
    value = _plain(node if isinstance(node, (DictConfig, ListConfig)) else OmegaConf.create(node), group)
    SCHEMA.fields[group].check(value, group)
    for check in GROUP_CHECKS.get(group, ()) + (CALIBRATION_CHECKS if group == "calib" else ()):
        check(value)


def _reads_calibration(method) -> bool:
    """Whether the method builds a calibration set (methods.reads_calibration; an unknown one does)."""
    name = method.get("name") if isinstance(method, dict) else None
    return reads_calibration(METHODS[name], method) if name in METHODS else True


def _plain_or_none(cfg: DictConfig, key: str):
    try:
        return _child(cfg, key, key) if key in cfg else None
    except ConfigError:
        return None  # reported when its own turn comes


def composition_refusal(exc) -> str | None:
    """One line for Hydra's refusal of `a.b=value` where the composed config has no key a.b, if a.b is
    not a setting at all (`metod=reap`, `method.group_sise=4`): Hydra's own message suggests `+a.b=value`,
    which would only add the typo (check_settings refuses it later). None for any other error, and for a
    declared setting this option's file lacks (then Hydra's suggestion, `+model.max_memory=...`, is right)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = getattr(exc, "__cause__", None)
    parent = getattr(cause, "parent_node", None)
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not isinstance(parent, DictConfig):
        return None
    full_key = str(getattr(cause, "full_key", "") or "")
    path, _, key = full_key.rpartition(".")
    group = _group_at(path, parent)
    if not key or group is None or key in group.fields or key in group.tolerated:
        return None
    name = parent.get("name") if group.named or path == "method" else None
    return group.unknown([key], path, f"{path}={name}" if name else ("top level" if not path else None))


def _group_at(path: str, node: DictConfig) -> Group | None:
    """The schema's Group for the config node at `path` (`node`), if the schema declares one there."""
    if path == "method":
        name = node.get("name")
        return method_group(METHODS[name], name) if name in METHODS else None
    groups = {"": SCHEMA, "model": MODEL, "calib": CALIB, "eval": EVAL, "logger": LOGGER, "quant": QUANT,
              "eval.apply_chat_template": EVAL.fields["apply_chat_template"].specs[1]}
    if path.startswith("calib.sources.") and path.count(".") == 2:
        return SOURCE
    return groups.get(path)


__all__ = ["CALIBRATION_CHECKS", "CROSS_CHECKS", "GROUP_CHECKS", "check_group", "check_settings", "composition_refusal"]
