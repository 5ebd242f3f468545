"""The settings reference page (docs/reference/settings.md), written from the settings schema and conf/.

    python -m ream_exp.settings_reference > docs/reference/settings.md

Every key of every group of `ream_exp.settings.SCHEMA` with what it accepts (type, range, choices) and what
it means, the value the default job (`ream-exp` with no arguments) gives it as conf/ writes it, and each
method's own settings with the values of every preset in conf/method/. tests/test_docs.py checks that the
committed page is what this module writes, so the page cannot drift from the schema.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from omegaconf import OmegaConf

from . import CONF_DIR
from .methods import METHODS
from .setting_types import Bool, Choice, Custom, Group, ListOf, Mapping, Number, OneOf, Spec, Str
from .setting_schema import CALIB, EVAL, LOGGER, MODEL, QUANT, SCHEMA, SOURCE, method_group

GROUPS = {"model": MODEL, "calib": CALIB, "eval": EVAL, "quant": QUANT, "logger": LOGGER}
NOT_SET = "-"

HEADER = """\
# Settings reference

<!-- Written by `python -m ream_exp.settings_reference > docs/reference/settings.md` from the settings schema
     and conf/; do not edit by hand: tests/test_docs.py checks that this page is what the generator writes. -->

Every setting a run accepts, as the schema that checks them before anything loads declares it. Set one on the
command line as `key=value` (`ratio=0.5`, `model.dtype=bfloat16`) and choose a group's option as `group=name`
(`model=qwen3_30b_a3b`); a key the schema does not declare, `+key=value` included, is refused with the allowed
ones listed, and a value of the wrong type, range or choice is refused with one line naming the setting
([Running and configs](../running.md#errors-before-anything-loads)).

*Default job* is the value in `ream-exp` with no arguments (`model=toy`, `calib=toy`, `method=ream_official`,
`eval=toy`, `logger=wandb`), as conf/ writes it (`${...}` interpolations are resolved when the run starts);
`-` where that job's config does not set the key, so the code's default applies. A declared key may be absent
from an option's file: add it with `++key=value`.
"""


# ---------------------------------------------------------------- what a spec accepts, in words
def _range(spec: Number) -> str:
    if spec.lo is not None and spec.hi is not None:
        return f" in [{spec.lo:g}, {spec.hi:g}{')' if spec.hi_open else ']'}"
    if spec.lo is not None:
        return f" >= {spec.lo:g}"
    if spec.hi is not None:
        return f" <{'' if spec.hi_open else '='} {spec.hi:g}"
    return ""


def accepts(spec: Spec) -> str:
    """What values `spec` takes, e.g. 'an integer >= 1, or null', 'one of `hf`, `vllm`'."""
    if isinstance(spec, Choice):
        text = "one of " + ", ".join(f"`{c}`" for c in spec.choices)
    elif isinstance(spec, Bool):
        text = "`true` or `false`"
    elif isinstance(spec, Number):
        text = spec.kind + _range(spec)
    elif isinstance(spec, Str):
        text = "text"
    elif isinstance(spec, ListOf):
        text = "a list"
    elif isinstance(spec, Mapping):
        text = "a mapping"
    elif isinstance(spec, (OneOf, Group)):
        text = spec.kind
    elif isinstance(spec, Custom):
        text = ""
    else:
        raise TypeError(f"no wording for {type(spec).__name__}")
    return f"{text}, or `null`" if spec.nullable and text else text


def describe(spec: Spec) -> str:
    """The cell saying what a setting takes and means."""
    meaning = _escaped(spec.meaning)
    kind = accepts(spec)
    return f"{kind}: {meaning}" if kind and meaning else kind or meaning


def _escaped(text: str) -> str:
    """Prose safe in a markdown table cell: no HTML tags, pipes or emphasis marks read as markup."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")
            .replace("*", "\\*").replace("_", "\\_"))


def shown(value) -> str:
    """A config value as conf/ writes it, in code."""
    return f"`{_flow(value)}`"


def _flow(value) -> str:
    """YAML's flow style: [a, b], {k: v}, null, true."""
    if isinstance(value, dict):  # a key that YAML would read as a number is text here: quoted
        return "{" + ", ".join(f"{_key(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _key(key) -> str:
    try:
        float(key)
    except (TypeError, ValueError):
        return str(key)
    return f'"{key}"' if isinstance(key, str) else str(key)


# ---------------------------------------------------------------- the configs conf/ composes
def composed(overrides: list[str] | None = None) -> dict:
    """The config Hydra composes from conf/ with these overrides, interpolations left as written."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides or [])
    return OmegaConf.to_container(cfg, resolve=False)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# ---------------------------------------------------------------- the page
def table(rows: list[list[str]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def group_rows(group: Group, prefix: str, default: dict | None) -> list[list[str]]:
    rows = []
    for key, spec in group.fields.items():
        value = NOT_SET if default is None or key not in default else shown(default[key])
        if isinstance(spec, Mapping) and isinstance(spec.value, Group):
            value = f"{len(default[key])} entries, below" if default and default.get(key) else value
        rows.append([f"`{prefix}{key}`", describe(spec), value])
    return rows


def top_level(default: dict) -> list[str]:
    rows = []
    for key, spec in SCHEMA.fields.items():
        if key in GROUPS or key == "method":
            rows.append([f"`{key}`", f"a group: [{key}](#{key})", f"`{key}={default[key]['name']}`"])
        else:
            rows.append([f"`{key}`", describe(spec), shown(default[key]) if key in default else NOT_SET])
    return ["## Top level", "", "The keys of conf/config.yaml.", "",
            *table(rows, ["setting", "takes", "default job"]), ""]


def config_group(name: str, group: Group, default: dict) -> list[str]:
    lines = [f"## {name}", "", f"Options (`{name}=<option>`, conf/{name}/): "
             + ", ".join(f"`{o}`" for o in options(name)) + ".", ""]
    header = ["setting", "takes", f"default job ({name}={default['name']})"]
    lines += table(group_rows(group, f"{name}.", default), header)
    return lines + [""]


def sources(default: dict) -> list[str]:
    names = list(default.get("sources") or {})
    rows = []
    for key, spec in SOURCE.fields.items():
        cells = [shown(default["sources"][s][key]) if key in default["sources"][s] else NOT_SET for s in names]
        rows.append([f"`calib.sources.NAME.{key}`", describe(spec), *cells])
    return ["### calib.sources.NAME", "",
            "Each calibration source is a key under `calib.sources`, read as a local file or a hub dataset "
            "(a new one: `+calib.sources.NAME.path=...`); the default job's are the toy's.", "",
            *table(rows, ["setting", "takes", *(f"`{s}`" for s in names)]), ""]


def method_section() -> list[str]:
    lines = ["## method", "",
             "A method's settings are its implementation's: the keys of its module's defaults, typed by them, and "
             "a preset (conf/method/) sets some of them. An unknown key is refused with the method's keys listed. "
             "What each switch does: [Algorithms: Presets](../algorithms.md#presets).", "",
             "Options (`method=<option>`, conf/method/): " + ", ".join(f"`{o}`" for o in options("method")) + ".",
             ""]
    by_module = defaultdict(list)
    for name in options("method"):
        by_module[METHODS[name].__name__].append(name)
    for presets in sorted(by_module.values(), key=lambda ps: min(ps, key=len)):
        base = min(presets, key=len)  # the preset named as its module: freq, reap, ream, ...
        lines += method_presets([base, *sorted(p for p in presets if p != base)])
    return lines


def method_presets(presets: list[str]) -> list[str]:
    """One implementation's settings with its base preset's values, then what each other preset changes."""
    base = presets[0]
    module = METHODS[base]
    defaults = getattr(module, "DEFAULTS", {})
    values = {p: composed([f"method={p}"])["method"] for p in presets}
    group = method_group(module, base)
    rows = [[f"`method.{key}`", accepts(spec) or _escaped(spec.meaning),  # meaning: docs/algorithms.md, Presets
             shown(defaults[key]) if key in defaults else NOT_SET,
             shown(values[base][key]) if key in values[base] else NOT_SET]
            for key, spec in group.fields.items() if key != "name"]
    title = ", ".join(f"`{p}`" for p in presets)
    lines = [f"### {title}", ""]
    if rows:
        lines += table(rows, ["setting", "takes", "code default", f"`method={base}`"])
    else:
        lines.append("No settings besides `name`.")
    for preset in presets[1:]:
        changed = {k: v for k, v in values[preset].items() if k != "name" and values[base].get(k, NOT_SET) != v}
        lines += ["", f"`method={preset}`: `{base}` with "
                  + ", ".join(f"`{k}: {shown(v).strip('`')}`" for k, v in changed.items()) + "."]
    return lines + [""]


def render() -> str:
    default = composed()
    lines = [HEADER, *top_level(default)]
    for name, group in GROUPS.items():
        lines += config_group(name, group, default[name])
        if name == "calib":
            lines += sources(default["calib"])
    lines += method_section()
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
