"""Every setting of a run, declared once with its type, and checked before anything is loaded.

    from ream_exp.settings import check_settings
    check_settings(cfg)      # the composed config; a ConfigError naming the first bad setting

`SCHEMA` describes the composed config: the top level of conf/config.yaml and one `Group` per config
group (conf/model, conf/calib, conf/eval, conf/logger; a method's settings come from its own module's
DEFAULTS and CHOICES, see `method_group`). A group lists every key any of its options may hold: a key
that is not declared is refused with the allowed ones listed (`unknown setting metod (top level);
allowed: ...`), also where Hydra's `+key=value` added it past struct mode. Declared keys may be absent:
the code reading them has a default. A value is checked for its type, range and choices only;
`???` (not set yet) passes here and is reported by the check that needs it (e.g. model.path).

Checks that need more than one value (the model's expert counts, group sizes, a calibration
mix against calib.n, files and datasets) stay where they are (ream_exp.run.validate and the functions
it calls); the schema runs first. It reads the config and never changes it: no default is filled in,
so the resolved config.yaml (and the sweep identity built on it) is exactly what Hydra composed.
Messages are one line: `<setting>=<value> <what is wrong>: <setting> is <what it means>`, or, for a
setting with a few allowed values, `<setting>=<value>; valid: a, b, c`.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, shown
from .calib import validate_mix
from .methods import METHODS, get_method
from .setting_types import (MISSING, Bool, Choice, Custom, Group, Int, ListOf, Mapping, Number, OneOf, Spec, Str,
                            _did_you_mean, _join, _one_line, settings_group)

# ---------------------------------------------------------------- settings with their own rules
DEVICE_FORMS = "auto, cpu, cuda, cuda:N (GPU index N), mps"


def check_device(value, setting: str, parent) -> None:
    """device: auto | cpu | cuda | cuda:N | mps, and the accelerator named must be visible here (unless
    model.device_map places the weights, which makes `device` unused)."""
    text = value if isinstance(value, str) else None
    match = re.fullmatch(r"cuda(?::(\d+))?", text or "")
    if text not in ("auto", "cpu", "mps") and match is None:
        hint = {"gpu": "cuda", "cuda0": "cuda:0", "gpu:0": "cuda:0", "metal": "mps"}.get(str(value).lower())
        raise ConfigError(f"{setting}={shown(value)}; valid: {DEVICE_FORMS}"
                          + (f" (did you mean {hint}?)" if hint else ""))
    model = (parent or {}).get("model") if isinstance(parent, dict) else None
    if isinstance(model, dict) and model.get("device_map"):
        return
    import torch

    if match is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{setting}={text}: no CUDA device is visible here (torch.cuda.is_available() is "
                              "false); use device=auto or device=cpu")
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise ConfigError(f"{setting}={text}: only {count} CUDA device(s) are visible here "
                              f"(cuda:0 to cuda:{count - 1})")
    if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{setting}=mps: the MPS backend is not available here; use device=auto or device=cpu")


def check_group_size_table(key, setting: str) -> None:
    """model.group_size's keys are ratios ("0.25"), read as floats by the group_size resolver."""
    try:
        ratio = float(key)
    except (TypeError, ValueError):
        ratio = None
    if ratio is None or not 0 <= ratio < 1:
        raise ConfigError(f"{setting} has key {key!r}, which is not a ratio in [0, 1): model.group_size maps a "
                          'ratio to REAM\'s group size C, e.g. {"0.25": 16, "0.5": 32}')


MEMORY_DEVICE = re.compile(r"\d+|cpu|mps|disk|cuda(:\d+)?")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_VALUES = (f"null, one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device (cpu, cuda:N, N) or a mapping "
                     "{module: device} with GPU ordinals, cpu, mps or disk")


def check_device_map(value, setting: str, parent) -> None:
    """model.device_map: null, one of accelerate's strategies (auto, ...), a device, or {module: device}."""
    what = f"{setting} is {DEVICE_MAP_VALUES}"
    if isinstance(value, dict):
        for module, device in value.items():
            if isinstance(device, bool) or not MEMORY_DEVICE.fullmatch(str(device)):
                raise ConfigError(f"{setting}.{module}={shown(device)} is not a device: {what}")
        return
    if isinstance(value, bool) or not (isinstance(value, int) or value in DEVICE_MAP_STRATEGIES
                                       or MEMORY_DEVICE.fullmatch(str(value)) and value != "disk"):
        raise ConfigError(f"{setting}={shown(value)} is not a device map: {what}"
                          + _did_you_mean(value, DEVICE_MAP_STRATEGIES))


MIX_VALUES = ("a list [general, math, code] or a mapping {source: weight} over calib.sources: weights >= 0, "
              "fractions of calib.n summing to at most 1")


def check_mix(value, setting: str, parent) -> None:
    """calib.mix: a list [general, math, code] or a mapping {source: weight} over calib.sources."""
    sources = parent.get("sources") if isinstance(parent, dict) else None
    validate_mix(value, sources if isinstance(value, dict) else None)


LIMIT_VALUES = ("null (every example), a positive integer (examples per task) or a fraction in (0, 1) of each "
                "task's examples")
LIMIT_MEANING = f"eval.limit is {LIMIT_VALUES}"


def check_limit(value, setting: str, parent) -> None:
    """lm-eval reads a limit below 1 as a fraction of each task's examples (ceil), any other as int(limit)
    examples: so 1.0 would mean one example and 1.5 one too. Only unambiguous values are taken."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{setting}={shown(value)} is not a number: {LIMIT_MEANING}")
    if value <= 0:
        raise ConfigError(f"{setting}={shown(value)} must be positive: {LIMIT_MEANING}")
    if isinstance(value, float) and value >= 1:
        whole = f" (for {int(value)} examples write {int(value)})" if value == int(value) else ""
        raise ConfigError(f"{setting}={shown(value)} is neither a whole number of examples nor a fraction below 1"
                          f"{whole}: {LIMIT_MEANING}")


BATCH_VALUES = ("a positive integer, auto or auto:N (lm-eval finds the largest batch that fits, again N times over "
                "the run), or null (1; auto with backend=vllm)")
BATCH_MEANING = f"eval.batch_size is {BATCH_VALUES}"


def check_eval_batch_size(value, setting: str, parent) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{setting}={value} must be a positive integer: {BATCH_MEANING}")
        return
    match = re.fullmatch(r"auto(?::(\d+(?:\.\d+)?))?", value) if isinstance(value, str) else None
    if match is None or (match.group(1) is not None and float(match.group(1)) <= 0):
        raise ConfigError(f"{setting}={shown(value)} is not a batch size: {BATCH_MEANING}")


def check_method(value, setting: str, parent) -> None:
    """method: its `name` one of the registered methods, its other keys that method's settings."""
    if not isinstance(value, dict):
        raise ConfigError(f"{setting}={shown(value)} is not a mapping of settings: choose a method with method=NAME")
    name = value.get("name")
    module = get_method(name)  # unknown method 'x'; valid: ...
    method_group(module, name).check_value(value, setting, None, where=f"method={name}")


def method_group(module, name: str) -> Group:
    """Method `name`'s settings as a Group: `name` plus its module's DEFAULTS, typed by their defaults (a
    bool is true or false, an int an integer, None null or an integer) and CHOICES (one of them)."""
    return settings_group(getattr(module, "DEFAULTS", {}), getattr(module, "CHOICES", {}), name)


# ---------------------------------------------------------------- the schema
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HINTS = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

MODEL = Group({
    "name": Str("the model config's name"),
    "path": Str("a checkpoint directory or hub id"),
    "revision": Str("the hub revision of model.path", nullable=True),
    "dtype": Choice(*DTYPES, hints=DTYPE_HINTS, meaning="the dtype the weights load in (auto: the checkpoint's)"),
    "device_map": Custom(check_device_map, nullable=True, meaning=DEVICE_MAP_VALUES),
    "max_memory": Mapping(meaning="{device: size} with model.device_map, e.g. {0: 70GiB, cpu: 200GiB}",
                          nullable=True),
    "offload_folder": Str("where accelerate writes weights the device map sends to disk", nullable=True),
    "stream": Bool("whether the model is read, compressed and written one decoder layer at a time"),
    "trust_remote_code": Bool("whether transformers may run the checkpoint's own modelling code"),
    "group_size": Mapping(Int("REAM's group size C for that ratio", lo=0), nullable=True,
                          meaning='a mapping {ratio: C}, e.g. {"0.25": 16, "0.5": 32}', key=check_group_size_table),
})

SOURCE = Group({
    "path": Str("a local file or directory, or a hub dataset id"),
    "name": Str("the hub dataset's config name", nullable=True),
    "split": Str("the dataset split read"),
    "revision": Str("the hub dataset's git revision", nullable=True),
    "streaming": Bool("whether the hub dataset is streamed rather than downloaded whole"),
    "shuffle_buffer": Int("the seeded shuffle buffer of a streamed source, in rows", lo=1),
    "format": Choice("text", "chat", meaning="a text column as is, or chat roles (`fields`) rendered with the "
                                               "tokenizer's chat template"),
    "field": Str("the text column (format: text)"),
    "fields": Mapping(Str("a column name"), "the columns of the chat roles, e.g. {user: instruction, assistant: "
                                            "output} (format: chat)", nullable=True),
    "min_chars": Int("the least characters per text", nullable=True, lo=0),
    "min_chars_per_seq_len": Number("the least characters per text as a fraction of calib.seq_len", nullable=True,
                                    lo=0),
    "where": Mapping(ListOf(Spec(nullable=True)), "a mapping {column: [values kept]}", nullable=True),
})

CALIB = Group({
    "name": Str("the calibration config's name"),
    "path": Str("a pre-tokenised .pt file (calib=pretokenized)", nullable=True),
    "sources": Mapping(SOURCE, "a mapping {source: its settings}", nullable=True),
    "mix": Custom(check_mix, nullable=True, meaning=MIX_VALUES),
    "n": Int("the number of calibration sequences", lo=1),
    "seq_len": Int("the length of every calibration sequence in tokens", lo=1),
    "seed": Int("the integer seed of each source's row order"),
    "min_fill": Number("the least share of real tokens per row", lo=0, hi=1),
    "pack": Bool("whether texts are joined into full rows rather than truncated and padded one per row"),
    "batch_size": Int("the number of sequences per forward pass", lo=1),
    "states_device": Choice("cpu", "disk", nullable=True,
                            meaning="where the layer-wise methods keep the calibration hidden states (null: the "
                                    "model's device)"),
    "states_dir": Str("the directory of the calibration hidden states (calib.states_device=disk)", nullable=True),
})

FEWSHOT = "the few-shot count, one for all tasks or per task (null: each task's own)"
PER_TASK_INT = Mapping(Int("the few-shot count of that task", lo=0))
EVAL = Group({
    "name": Str("the eval config's name"),
    "tasks": ListOf(Str("an lm-eval task, group or tag name"), "a list of lm-eval task names, e.g. [gsm8k]",
                    nullable=True),
    "include_path": Str("a directory of extra lm-eval task YAMLs", nullable=True),
    "limit": Custom(check_limit, nullable=True, meaning=LIMIT_VALUES),
    "batch_size": Custom(check_eval_batch_size, nullable=True, meaning=BATCH_VALUES),
    "num_fewshot": OneOf(Int(FEWSHOT, lo=0), PER_TASK_INT, kind="an integer >= 0 or a mapping {task: shots}",
                         meaning=FEWSHOT, nullable=True),
    "max_gen_toks": Int("the most tokens a generation may produce (null: each task's own cap)", nullable=True,
                        lo=1),
    "allow_code_eval": Bool("whether tasks that run model-written code may run"),
    "apply_chat_template": OneOf(Bool(), Group({"mc": Bool(), "gen": Bool()}),
                                 kind="true, false or a mapping {mc: bool, gen: bool}",
                                 meaning="whether prompts go through the tokenizer's chat template"),
    "backend": Choice("hf", "vllm", meaning="what runs the GEN tasks: the model in memory, or vLLM loading the saved "
                                            "checkpoint (MC tasks always run on the model in memory)"),
    "tensor_parallel_size": Int("the number of GPUs vLLM splits the model over (eval.backend=vllm)",
                                nullable=True, lo=1),
    "vllm_args": Mapping(meaning="extra keyword arguments of lm-eval's vLLM backend", nullable=True),
    "metrics": Mapping(Str('a "metric,filter" key lm-eval reports'), 'a mapping {task: "metric,filter"}',
                       nullable=True),
    "bootstrap_iters": Int("the bootstrap resamples behind non-mean metrics' stderrs (0 turns every stderr off)",
                           nullable=True, lo=0),
    "log_samples": Bool("whether every item's prompt, response and score is written to <run dir>/lm_eval/"),
})

LOGGER = Group({
    "name": Choice("wandb", "none", meaning="the tracker"),
    "project": Str("the W&B project", nullable=True),
    "entity": Str("the W&B team or user", nullable=True),
    "mode": Choice("offline", "online", "disabled", nullable=True, meaning="the W&B mode"),
    "group": Str("the W&B group (null: the sweep's name)", nullable=True),
    "tags": ListOf(Str("a W&B tag"), "a list of W&B tags", nullable=True),
    "run_name": Str("the W&B run's name (null: method_r<ratio>_<mix>)", nullable=True),
    "init_timeout": Number("the seconds an online start may wait for the server", nullable=True, lo=0),
})

for _group in (MODEL, CALIB, EVAL, LOGGER):  # conf/<group>/*.yaml: messages name the option, e.g. (model=toy)
    _group.named = True

# conf/config.yaml, in the order checked: ratio and seed first, as the groups' interpolations use them.
SCHEMA = Group({
    "ratio": Number("the fraction of experts removed per MoE layer, in [0, 1)", lo=0, hi=1, hi_open=True),
    "seed": Int("the integer seed of every random choice of the run"),
    "save": Bool("whether the compressed checkpoint is written to <run dir>/checkpoint/"),
    "device": Custom(check_device, meaning=f"{DEVICE_FORMS}; unused when model.device_map is set"),
    "progress": Bool("whether long steps show progress bars"),
    "baseline": Bool("whether the uncompressed model's scores are reported too (evaluated once, cached)"),
    "cache_dir": Str("where the caches go (set cache_dir=DIR or REAM_EXP_CACHE)", nullable=True),
    "run_dir": Str("the run directory when run() is given none", nullable=True),
    "model": MODEL,
    "calib": CALIB,
    "method": Custom(check_method, meaning="the method chosen with method=NAME and its own settings"),
    "eval": EVAL,
    "logger": LOGGER,
}, tolerated=("hydra",))  # only in a config composed with return_hydra_config


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
    """Checks every setting of a composed run config against SCHEMA; raises the first problem as a
    one-line ConfigError. Unknown keys first (a typo must not run the defaults), then each key in
    SCHEMA's order, each resolved just before it is checked."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    SCHEMA.check_keys({key: None for key in cfg.keys()}, "", "top level")
    for key, spec in SCHEMA.fields.items():
        if key in cfg:
            value = _child(cfg, key, key)
            parent = {"model": _plain_or_none(cfg, "model")} if key == "device" else None
            spec.check(value, key, parent)


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
    groups = {"": SCHEMA, "model": MODEL, "calib": CALIB, "eval": EVAL, "logger": LOGGER,
              "eval.apply_chat_template": EVAL.fields["apply_chat_template"].specs[1]}
    if path.startswith("calib.sources.") and path.count(".") == 2:
        return SOURCE
    return groups.get(path)


__all__ = ["SCHEMA", "Bool", "Choice", "ConfigError", "Custom", "Group", "Int", "ListOf", "Mapping", "Number",
           "OneOf", "Spec", "Str", "check_settings", "composition_refusal", "method_group", "settings_group"]
