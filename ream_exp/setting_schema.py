"""The run's settings, each declared once with its type, range or choices: the schema ream_exp.settings
walks (`SCHEMA`, one `Group` per config group), and the checks of settings with rules of their own.

`SCHEMA` describes the composed config: the top level of conf/config.yaml and one `Group` per config
group (conf/model, conf/calib, conf/eval, conf/quant, conf/logger; a method's settings come from its own module's
DEFAULTS and CHOICES, see `method_group`). A group lists every key any of its options may hold. Declared
keys may be absent: the code reading them has a default.
"""

from __future__ import annotations

import re

from .calib import DOMAINS, MIX_FORMS
from .calib.sources import CHAT_ROLES, FORMATS
from .config import ConfigError, shown
from .methods import get_method
from .quant import NAMES as QUANT_NAMES
from .setting_types import Bool, Choice, Custom, Group, Int, ListOf, Mapping, Number, OneOf, Spec, Str, _did_you_mean, \
    settings_group

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


MEMORY_DEVICES = "GPU ordinals (0, 1, ...), cpu, mps or disk"


def check_memory_device(device, setting: str) -> None:
    """model.max_memory's keys: the devices accelerate places weights on."""
    if not (str(device).isdigit() or device in ("cpu", "mps", "disk")):
        raise ConfigError(f"{setting} names device {device!r}: devices are {MEMORY_DEVICES}")


def check_memory_size(size, setting: str, parent) -> None:
    """model.max_memory's values: bytes, or a size with a unit accelerate reads (70GiB)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        convert_file_size_to_int(size)
    except (ValueError, AttributeError):
        raise ConfigError(f"{setting}={shown(size)} is not a size: give bytes or a size with a unit, "
                          "e.g. 70GiB") from None


def check_chat_role(role, setting: str) -> None:
    """calib.sources.*.fields' keys: the chat roles a conversation's turns take."""
    if role not in CHAT_ROLES:
        raise ConfigError(f"{setting} has key {role!r}, which is not a chat role: {setting} maps roles "
                          f"({', '.join(CHAT_ROLES)}) to columns, e.g. {{user: instruction, assistant: output}}")


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
    bool is true or false, an int an integer, None null or an integer), CHOICES (one of them) and SPECS
    (a setting's own Spec, e.g. a range)."""
    return settings_group(getattr(module, "DEFAULTS", {}), getattr(module, "CHOICES", {}), name,
                          getattr(module, "SPECS", None))


# ---------------------------------------------------------------- the schema
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HINTS = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

MODEL = Group({
    "name": Str("the model config's name"),
    "path": Str("a checkpoint directory or hub id"),
    "revision": Str("the hub revision of model.path", nullable=True),
    "dtype": Choice(*DTYPES, hints=DTYPE_HINTS, meaning="the dtype the weights load in (auto: the checkpoint's)"),
    "device_map": Custom(check_device_map, nullable=True, meaning=DEVICE_MAP_VALUES),
    "max_memory": Mapping(Custom(check_memory_size), "{device: size} with model.device_map, e.g. {0: 70GiB, "
                          "cpu: 200GiB}", nullable=True, key=check_memory_device),
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
    "format": Choice(*FORMATS, meaning="a text column as is, or chat roles (`fields`) rendered with the "
                                       "tokenizer's chat template"),
    "field": Str("the text column (format: text)"),
    "fields": Mapping(Str("a column name"), "the columns of the chat roles, e.g. {user: instruction, assistant: "
                                            "output} (format: chat)", nullable=True, key=check_chat_role),
    "min_chars": Int("the least characters per text", nullable=True, lo=0),
    "min_chars_per_seq_len": Number("the least characters per text as a fraction of calib.seq_len", nullable=True,
                                    lo=0),
    "where": Mapping(ListOf(Spec(nullable=True)), "a mapping {column: [values kept]}", nullable=True),
})

CALIB = Group({
    "name": Str("the calibration config's name"),
    "path": Str("a pre-tokenised .pt file (calib=pretokenized)", nullable=True),
    "sources": Mapping(SOURCE, "a mapping {source: its settings}", nullable=True),
    "mix": OneOf(ListOf(Number(f"one of the {len(DOMAINS)} ratios ({' : '.join(DOMAINS)}), each a fraction of "
                               "calib.n", lo=0), MIX_FORMS, length=len(DOMAINS)),
                 Mapping(Number("the weight of its source, a fraction of calib.n (int(calib.n * weight) sequences)",
                                lo=0)),
                 kind="a mapping or a list", meaning=MIX_FORMS, nullable=True),  # with sources, n: calib.check_mix*
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

QUANT = Group({
    "name": Choice(*QUANT_NAMES, meaning="how the compressed model is quantized before evaluation (none: not)"),
    "group_size": Int("the input channels sharing one scale in W4A16 (null: the largest of 128, 64, 32 dividing "
                      "every quantized layer's input width)", nullable=True, lo=1),
    "n": Int("the calibration sequences GPTQ or AWQ reads, the run's first n (null: all)", nullable=True, lo=1),
    "keep_unquantized": Bool("whether checkpoint_unquantized/ is kept beside the quantized checkpoint/"),
})

for _group in (MODEL, CALIB, EVAL, LOGGER, QUANT):  # conf/<group>/*.yaml: messages name the option, e.g. (model=toy)
    _group.named = True

# conf/config.yaml, in the order checked: ratio and seed first, as the groups' interpolations use them.
SCHEMA = Group({
    "ratio": Number("the fraction of experts removed per MoE layer, in [0, 1)", lo=0, hi=1, hi_open=True),
    "seed": Int("the integer seed of every random choice of the run"),
    "budget": Choice("uniform", "global", meaning="how many experts each MoE layer keeps: the same ratio in every "
                                                  "layer, or one ranking of all experts by their normalised score "
                                                  "(as many removed in all, none below top_k; docs/budgets.md)"),
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
    "quant": QUANT,
    "logger": LOGGER,
}, tolerated=("hydra",))  # only in a config composed with return_hydra_config

