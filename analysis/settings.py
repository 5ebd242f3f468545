"""Like with like: the settings a frontier's runs must share, and the check that refuses a mixture.

A run's result depends on its identity (ream_exp.identity.run_identity: the resolved config without
placement settings, the model by a fingerprint of its weights, package files by relative path and
content). Each run directory holds it in identity.json; a run directory from before identity.json (only
config.yaml) and a W&B run (its config) get it from run_identity on their config, and when even that
fails, from the config without ream_exp.identity.NOT_IDENTITY's keys.

A run's *settings* (column `settings` of analysis.collect, JSON {dotted key: value}) are that identity
without what a frontier point is allowed to vary over or average (docs/sweeps.md: Analysis):
  - `seed`: the run seed, the one thing averaged (two seeds of the same settings are one point);
  - `ratio`: the expert count is a frontier key already;
  - `quant.name`: the quantisation is a key too (column `quant`): runs of two quantisations are two points,
    never averaged (docs/bytes.md); the other `quant.*` settings are compared between the runs of one quant;
  - `calib.mix` and the calibration sources it reads: what a frontier varies over. A source's own settings
    (`calib.sources.<name>.*`) are still compared between the runs that read it;
  - `calib.name`, `eval.name`: config names (the paper grid's calib=mix_0_3_7 names its mix); their content is
    compared key by key;
  - `eval.tasks`, `eval.limit`, `eval.num_fewshot`: checked by analysis.pareto's eval check from what each
    run's metrics.json records (task sets, limit, few-shot), refused with EvalMismatch;
  - `eval.log_samples`, `save`, `baseline`: what a run writes beside its scores, not the scores.
Everything else is compared, `calib.seed` (which calibration texts are drawn) included: two calibration
draws are two calibration settings, not two seeds.

check_settings refuses (SettingsMismatch, one line) a table whose runs differ in a setting where they share
a comparison: the model (weights and settings), the eval settings left and every other top-level setting
over all scored runs, the uncompressed model's included; the calibration settings over every compressed
run (all methods at all expert counts share the panels, tables and reference points); the quantisation's
settings over the runs of one quant (quant.name); a method's settings over the runs of one frontier (method,
experts). The message names each setting that differs,
as `method.group_size: 16 (3 runs: ...) vs 32 (2 runs: ...)`. allow_mixed_settings=True
(--allow-mixed-settings) compares them anyway: each run gets a label of its values of the differing
settings, points with different labels are never averaged together, and the comparison is flagged.
A table without a `settings` column (the paper CSV, runs.csv written before it) is not checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import pandas as pd

from analysis.naming import NO_QUANT

BASELINE = "none"  # method name of the uncompressed model's rows (as analysis.pareto)
IDENTITY_FILE = "identity.json"  # what ream_exp.run_records writes in each run dir: {"digest", "identity"}
# Dotted keys of the identity that are not compared (see the module docstring).
NOT_COMPARED = frozenset({
    "seed", "ratio", "save", "baseline", "quant.name",
    "calib.mix", "calib.name",
    "eval.name", "eval.tasks", "eval.limit", "eval.num_fewshot", "eval.log_samples",
})
SOURCES = "calib.sources."  # a source's settings: compared only between the runs that read it
ABSENT = "absent"  # a setting one run's config does not have
UNKNOWN = "?"  # every setting of a run whose config is unknown
RUNS_NAMED = 3  # runs named per value in a mismatch message
KEYS_NAMED = 6  # differing settings named in a mismatch message
VALUE_CHARS = 80
OVERRIDE = "pass --allow-mixed-settings (allow_mixed_settings=True) to compare them flagged"


class Mismatch(ValueError):
    """The runs to compare are not like with like (analysis.pareto.EvalMismatch, SettingsMismatch)."""


class SettingsMismatch(Mismatch):
    """The runs to compare differ in a setting other than the seed and the calibration mix."""


# ---------------------------------------------------------------- a run's settings

def recorded_identity(run_dir: Path) -> dict | None:
    """The identity a run directory records (identity.json), None when it has none (or an unreadable one)."""
    try:
        identity = json.loads((Path(run_dir) / IDENTITY_FILE).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return identity if isinstance(identity, dict) else None


def config_identity(config: dict) -> dict | None:
    """run_identity of a resolved config (an old run dir's config.yaml, a W&B run's config); the config
    without NOT_IDENTITY's keys when run_identity cannot take it; None for no config at all."""
    if not isinstance(config, dict) or not config:
        return None
    if isinstance(config.get("identity"), str):  # what the run recorded (ream_exp.run logs it to W&B)
        try:
            return json.loads(config["identity"])
        except ValueError:
            pass
    config = {k: v for k, v in config.items() if k != "identity"}
    from omegaconf import OmegaConf

    from ream_exp.identity import NOT_IDENTITY, run_identity

    for form in (lambda: OmegaConf.create(config), lambda: config):
        try:
            return run_identity(form())
        except Exception:  # an unresolvable interpolation, an unreadable weights folder, a malformed config
            continue
    stripped = {k: v for k, v in config.items() if k not in NOT_IDENTITY[""] and k != "hydra"}
    for group, keys in NOT_IDENTITY.items():
        if group and isinstance(stripped.get(group), dict):
            stripped[group] = {k: v for k, v in stripped[group].items() if k not in keys}
    return stripped


def run_settings(identity: dict | None) -> dict | None:
    """{dotted key: value} of what is compared (see the module docstring); None when unknown."""
    if not isinstance(identity, dict):
        return None
    flat = {}
    if identity:
        _flatten(_foreign_package_files(identity), "", flat)
    return {k: v for k, v in sorted(flat.items()) if k not in NOT_COMPARED and not _under(k, "calib.mix")}


def settings_json(identity: dict | None) -> str | None:
    """run_settings as the JSON text of the `settings` column (None when unknown)."""
    settings = run_settings(identity)
    return None if settings is None else json.dumps(settings, sort_keys=True, default=str)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _flatten(node, prefix: str, out: dict) -> None:
    """Nested dicts -> dotted keys; a package file, the model's weights, lists and empty dicts are one value."""
    if prefix == "model.weights" and isinstance(node, dict):
        out[prefix] = _weights_label(node)
    elif isinstance(node, dict) and set(node) == {"package_file", "sha256"}:
        out[prefix] = f"{node['package_file']} (sha256 {str(node['sha256'])[:12]})"
    elif isinstance(node, dict) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def _weights_label(weights: dict) -> str:
    """'files <digest>' for a local model (its files' names, sizes and contents), 'hub <id>[@revision]'."""
    if "files" in weights:
        text = json.dumps(weights["files"], sort_keys=True)
        return f"files {hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if weights.get("hub"):
        revision = weights.get("revision")
        return f"hub {weights['hub']}" + (f"@{revision}" if revision else "")
    if "hub" in weights:
        return "unknown (no model.path)"
    return json.dumps(weights, sort_keys=True, default=str)


def _foreign_package_files(node):
    """Absolute paths into another copy of the package (a run made from another clone: config.yaml keeps the
    path it ran with, which run_identity leaves as it is) as ream_exp.identity writes package files: relative
    path and content digest, when the path exists and names an entry this package has (toy/, code_tasks/).
    A path that is not there stays as it is (then it can only match itself)."""
    if isinstance(node, dict):
        return {k: _foreign_package_files(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_foreign_package_files(v) for v in node]
    if isinstance(node, str) and node.startswith("/") and "/ream_exp/" in node:
        from ream_exp import PACKAGE_DIR
        from ream_exp.identity import content_digest

        relative = node.rpartition("/ream_exp/")[2]
        if relative and (PACKAGE_DIR / relative.split("/")[0]).exists() and Path(node).exists():
            return {"package_file": relative, "sha256": content_digest(Path(node))}
    return node


# ---------------------------------------------------------------- the check

def check_settings(scored: pd.DataFrame, allow_mixed: bool = False):
    """(mixed, labels): whether the scored rows differ in a compared setting where they share a comparison
    (see the module docstring), and per row the label of its values of the settings that differ ('' for
    none). Raises SettingsMismatch (one line naming each differing setting, its values and their runs,
    and the override) if they do and mixing is not allowed, else warns."""
    labels = pd.Series("", index=scored.index, dtype=object)
    if "settings" not in scored or scored.empty:
        return False, labels
    rows = scored.reset_index(drop=True)  # positions: the caller's index need not be unique
    parsed = [_parse(text) for text in rows["settings"]]
    differing = []  # (scope, key, {value: [row position]})
    for scope, members, wanted in _scopes(rows):
        for key in sorted({k for r in members for k in (parsed[r] or {}) if wanted(k)}):
            values: dict[str, list] = {}
            for r in members:
                value = _value(parsed[r], key)
                if value is not None:
                    values.setdefault(value, []).append(r)
            if len(values) > 1:  # the value most runs have first (ties: the first seen)
                differing.append((scope, key, dict(sorted(values.items(), key=lambda kv: -len(kv[1])))))
    if not differing:
        return False, labels
    parts = [[] for _ in range(len(rows))]
    for _, key, values in differing:
        for value, members in values.items():
            for r in members:
                parts[r].append(f"{key}={value}")
    labels = pd.Series(["; ".join(p) for p in parts], index=scored.index, dtype=object)
    described = "; ".join(_describe(rows, scope, key, values) for scope, key, values in differing[:KEYS_NAMED])
    if len(differing) > KEYS_NAMED:
        described += f"; and {len(differing) - KEYS_NAMED} more setting(s)"
    what = ", ".join(dict.fromkeys(key for _, key, _ in differing))
    if not allow_mixed:
        raise SettingsMismatch(
            f"these runs differ in settings other than the seed and the calibration mix ({what}), so they are "
            f"not like with like: {described}. Rerun them with one setting, compare each on its own, or {OVERRIDE}")
    warnings.warn(f"comparing runs with different settings ({what}; kept apart, flagged): {described}",
                  stacklevel=3)
    return True, labels


def _parse(text):
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    try:
        parsed = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _value(settings: dict | None, key: str) -> str | None:
    """A row's value of `key` as text; None when the row does not take part (a source it does not read)."""
    if settings is None:
        return UNKNOWN
    if key not in settings:
        return None if key.startswith(SOURCES) else ABSENT
    value = settings[key]
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = text if "\n" not in text and "\r" not in text else json.dumps(text)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 3] + "..."


def _scopes(rows: pd.DataFrame):
    """(scope label, row positions, which keys) for each set of runs that must share settings (rows has a
    RangeIndex)."""
    yield "", list(rows.index), lambda k: not (_under(k, "method") or _under(k, "calib") or _under(k, "quant"))
    if "quant" in rows:
        for quant, group in rows.groupby("quant", sort=False, dropna=False):
            if quant != NO_QUANT:  # nothing quantised: its other quant settings say nothing
                yield f"quant {quant}", list(group.index), lambda k: _under(k, "quant")
    else:
        yield "", list(rows.index), lambda k: _under(k, "quant")
    methods = rows["method"] if "method" in rows else pd.Series(None, index=rows.index, dtype=object)
    compressed = rows[methods != BASELINE]
    yield "", list(compressed.index), lambda k: _under(k, "calib")
    if {"method", "experts"} <= set(compressed.columns):
        for (method, experts), group in compressed.groupby(["method", "experts"], sort=False, dropna=False):
            yield f"{method}, {_count(experts)} experts", list(group.index), lambda k: _under(k, "method")


def _count(experts) -> str:
    try:
        return str(int(experts))
    except (TypeError, ValueError):
        return "?"


def _describe(rows: pd.DataFrame, scope: str, key: str, values: dict) -> str:
    where = f" [{scope}]" if scope else ""
    sides = []
    for value, members in values.items():
        names = [run_name(rows.iloc[r]) for r in members[:RUNS_NAMED]]
        more = f" and {len(members) - RUNS_NAMED} more" if len(members) > RUNS_NAMED else ""
        sides.append(f"{value} ({len(members)} run{'s' if len(members) != 1 else ''}: {', '.join(names)}{more})")
    return f"{key}{where}: " + " vs ".join(sides)


def run_name(row) -> str:
    """How a message names a run: its run_dir, else method/experts/mix."""
    run_dir = row.get("run_dir")
    if isinstance(run_dir, str) and run_dir:
        return run_dir
    return f"{row.get('method')}/{row.get('experts')}/{row.get('mix')}"
