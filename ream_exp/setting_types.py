"""The types a setting can have, each with its one-line refusal: what ream_exp.settings declares the
run's settings with, and what a method's own settings are checked by (`settings_group`, used by
ream_exp.methods.base.method_settings)."""

from __future__ import annotations

import difflib

from .config import ConfigError, require_number, shown

MISSING = "???"  # OmegaConf's mark of a mandatory value not set yet


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _did_you_mean(value, options) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# ---------------------------------------------------------------- value types
class Spec:
    """One setting's type: `check(value, setting)` raises a one-line ConfigError, or returns."""

    kind = "a value"  # what a value must be, as a message says it

    def __init__(self, meaning: str = "", nullable: bool = False):
        self.meaning = meaning
        self.nullable = nullable

    def accepts(self, value) -> bool:
        """Whether the value has this spec's type (ranges and choices aside)."""
        return True

    def check(self, value, setting: str, parent=None) -> None:
        if isinstance(value, str) and value == MISSING:
            return
        if value is None and self.nullable:
            return
        if value is None or not self.accepts(value):
            self.fail(value, setting, f"is not {self.kind}")
        self.check_value(value, setting, parent)

    def check_value(self, value, setting: str, parent) -> None:
        pass

    def fail(self, value, setting: str, problem: str):
        meaning = f": {setting} is {self.meaning}" if self.meaning else ""
        raise ConfigError(f"{setting}={shown(value)} {problem}{meaning}")


class Bool(Spec):
    kind = "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)

    def check(self, value, setting: str, parent=None) -> None:
        if not (value is None and self.nullable) and not (isinstance(value, str) and value == MISSING) \
                and not isinstance(value, bool):
            self.fail(value, setting, "must be true or false")


class Number(Spec):
    """A number (an integer with integer=True) in [lo, hi] (hi excluded with hi_open)."""

    kind = "a number"

    def __init__(self, meaning: str, nullable: bool = False, integer: bool = False, lo=None, hi=None,
                 hi_open: bool = False):
        super().__init__(meaning, nullable)
        self.integer, self.lo, self.hi, self.hi_open = integer, lo, hi, hi_open
        self.kind = "an integer" if integer else "a number"

    def accepts(self, value) -> bool:
        kinds = (int,) if self.integer else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)

    def check(self, value, setting: str, parent=None) -> None:
        if (value is None and self.nullable) or (isinstance(value, str) and value == MISSING):
            return
        number = require_number(setting, value, self.meaning, integer=self.integer)  # its message, list hint too
        if self.integer and self.hi is None and self.lo in (0, 1) and number < self.lo:
            self.fail(number, setting, "must be a positive integer" if self.lo == 1 else "must be 0 or more")
        if self.hi is None and self.lo is not None and number < self.lo:
            self.fail(number, setting, f"must be >= {self.lo}")
        below = self.lo is not None and number < self.lo
        above = self.hi is not None and (number >= self.hi if self.hi_open else number > self.hi)
        if below or above:
            lo = "-inf" if self.lo is None else self.lo
            hi = "inf" if self.hi is None else self.hi
            self.fail(number, setting, f"is outside [{lo}, {hi}{')' if self.hi_open else ']'}")


def Int(meaning: str, nullable: bool = False, lo=None) -> Number:  # noqa: N802 - reads as a type
    return Number(meaning, nullable, integer=True, lo=lo)


class Str(Spec):
    """Text (a number Hydra parsed from the command line counts: model.revision=1234)."""

    kind = "a string"

    def accepts(self, value) -> bool:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)


class Choice(Spec):
    """One of a few values; `hints` maps a common misspelling to the value meant (named, never taken)."""

    def __init__(self, *choices, meaning: str = "", nullable: bool = False, hints: dict | None = None):
        super().__init__(meaning, nullable)
        self.choices, self.hints = choices, hints or {}

    def check(self, value, setting: str, parent=None) -> None:
        if (value is None and self.nullable) or (isinstance(value, str) and value == MISSING):
            return
        if isinstance(value, bool) or value not in self.choices:
            valid = ", ".join((["null"] if self.nullable else []) + [str(c) for c in self.choices])
            hint = self.hints.get(str(value).lower())
            hint = f" (did you mean {hint}?)" if hint else _did_you_mean(value, self.choices)
            raise ConfigError(f"{setting}={shown(value)}; valid: {valid}{hint}")


class ListOf(Spec):
    """A list of `item`s (exactly `length` of them, when given)."""

    kind = "a list"

    def __init__(self, item: Spec, meaning: str = "", nullable: bool = False, length: int | None = None):
        super().__init__(meaning, nullable)
        self.item, self.length = item, length

    def accepts(self, value) -> bool:
        return isinstance(value, list)

    def check_value(self, value, setting: str, parent) -> None:
        if self.length is not None and len(value) != self.length:
            self.fail(value, setting, f"has {len(value)} item{'s' if len(value) != 1 else ''}, not {self.length}")
        for i, item in enumerate(value):
            self.item.check(item, f"{setting}[{i}]", value)


class Mapping(Spec):
    """An open mapping {key: value}: keys checked by `key` (a function raising ConfigError), values by `value`."""

    kind = "a mapping"

    def __init__(self, value: Spec | None = None, meaning: str = "", nullable: bool = False, key=None):
        super().__init__(meaning, nullable)
        self.value, self.key = value, key

    def accepts(self, value) -> bool:
        return isinstance(value, dict)

    def check_value(self, value, setting: str, parent) -> None:
        for key, item in value.items():
            if self.key is not None:
                self.key(key, setting)
            if self.value is not None:
                self.value.check(item, f"{setting}.{key}", value)


class OneOf(Spec):
    """The first of `specs` whose type the value has checks it; `kind` says them all."""

    def __init__(self, *specs: Spec, kind: str, meaning: str = "", nullable: bool = False):
        super().__init__(meaning, nullable)
        self.specs, self.kind = specs, kind

    def accepts(self, value) -> bool:
        return any(spec.accepts(value) for spec in self.specs)

    def check_value(self, value, setting: str, parent) -> None:
        next(spec for spec in self.specs if spec.accepts(value)).check(value, setting, parent)


class Custom(Spec):
    """A value checked by `check(value, setting, parent)`, a function raising ConfigError."""

    def __init__(self, check, nullable: bool = False, meaning: str = ""):
        super().__init__(meaning, nullable)  # the meaning is for the reference; `check` writes its own messages
        self._check = check

    def check(self, value, setting: str, parent=None) -> None:
        if (value is None and self.nullable) or (isinstance(value, str) and value == MISSING):
            return
        self._check(value, setting, parent)


class Group(Spec):
    """A closed mapping: every key must be declared in `fields` (checked in their order)."""

    kind = "a mapping of settings"

    def __init__(self, fields: dict[str, Spec], meaning: str = "", nullable: bool = False, tolerated=(),
                 named: bool = False):
        super().__init__(meaning, nullable)
        self.fields = fields
        self.named = named  # a config group: messages say which option, e.g. (model=toy)
        self.tolerated = tuple(tolerated)  # present in some configs, checked elsewhere, not listed

    def accepts(self, value) -> bool:
        return isinstance(value, dict)

    def check_value(self, value, setting: str, parent, where: str | None = None) -> None:
        self.check_keys(value, setting, where)
        for key, spec in self.fields.items():
            if key in value:
                spec.check(value[key], _join(setting, key), value)

    def check_keys(self, value, setting: str, where: str | None = None) -> None:
        unknown = [str(k) for k in value if k not in self.fields and k not in self.tolerated]
        if unknown:
            if where is None and self.named:
                where = f"{setting}={value.get('name')}"
            raise ConfigError(self.unknown(unknown, setting, where))

    def unknown(self, keys: list[str], setting: str, where: str | None) -> str:
        """`unknown setting a.b (where); allowed: ...`, with the closest allowed key when one is close."""
        names = ", ".join(_join(setting, k) for k in keys)
        return (f"unknown setting{'s' if len(keys) > 1 else ''} {names}{f' ({where})' if where else ''}; "
                f"allowed: {', '.join(sorted(self.fields))}{_did_you_mean(keys[0], self.fields)}")


def _join(setting: str, key) -> str:
    return f"{setting}.{key}" if setting else str(key)


def settings_group(defaults: dict, choices: dict | None = None, method: str = "method",
                   specs: dict | None = None) -> Group:
    fields: dict[str, Spec] = {"name": Str("the method's name")}
    for key, default in defaults.items():
        meaning = f"an integer setting of method={method}"
        if key in (specs or {}):  # a setting with a range or rule of its own
            fields[key] = specs[key]
        elif key in (choices or {}):
            fields[key] = Choice(*choices[key])
        elif isinstance(default, bool):
            fields[key] = Bool()
        elif default is None or type(default) is int:
            fields[key] = Int(meaning, nullable=True)
        elif isinstance(default, float):
            fields[key] = Number(f"a number setting of method={method}")
        else:
            fields[key] = Str(f"a setting of method={method}")
    return Group(fields)
