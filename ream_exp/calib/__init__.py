"""Calibration tokens: sources mixed by ratio, tokenised to [n, seq_len] with an attention mask.

    calib = build_calibration(cfg.calib, tokenizer)     # {"input_ids", "attention_mask"} LongTensors
    for batch in calibration_batches(calib, 8): ...

A mix maps source names to weights, `{general: 0.2, math: 0.3, code: 0.4, tool: 0.1}`: each source declared
under calib.sources gives int(n * weight) sequences (weights are fractions of n, summing to at most 1,
not necessarily to 1).
The list [a, b, c] is shorthand for {general: a, math: b, code: c} (docs/algorithms.md), with the same tokens and cache
key. Rows come source by source: general, math, code, then the others in calib.sources' order.
Each source's rows come in a seeded order; each text is truncated or right-padded to seq_len
and rows with less than `min_fill` real tokens are skipped (or, with `pack: true`, texts are joined with
EOS and cut into full sequences). Pads are marked 0 in the attention mask and never count in statistics.
A source is raw text (`field`) or, with `format: chat`, rows rendered by the tokenizer's chat template
(REAP's evol-codealpaca); `min_chars_per_seq_len: 0.9` keeps texts of at least 0.9 * seq_len characters.
`calib=pretokenized calib.path=FILE` instead loads a stored [n, seq_len] token file exactly as given.
Runs build through `cache.cached_calibration`, which stores each tokenised set on disk once.
"""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from ..config import ConfigError, require_number, require_positive_int, require_writable_dir, shown
from .pretokenized import check_token_ids, load_pretokenized
from .sources import check_local_source, hub_dataset, iter_texts, load_source, source_columns

log = logging.getLogger(__name__)

DOMAINS = ("general", "math", "code")  # the three-number shorthand's sources, in its order
MIX_FORMS = (f"a mapping {{source: weight}}, e.g. {{general: 0.2, math: 0.3, code: 0.4, tool: 0.1}}, or "
             f"{len(DOMAINS)} ratios ({' : '.join(DOMAINS)}), e.g. [0.3,0.3,0.3]")


def _declared(sources) -> list[str]:
    return [str(name) for name in (sources or {})]


def validate_mix(mix, sources=None) -> dict[str, float]:
    """The mix as {source: weight}: the shorthand [a, b, c] means {general: a, math: b, code: c}.

    Weights are fractions of calib.n (int(n * weight) sequences each), summing to at most 1 (validate_calib
    checks that), not necessarily to 1. The
    order is the one rows are built in: general, math, code first, then the other sources in the order
    calib.sources declares them (`sources`, when given; else as written). With `sources`, every name of
    a mapping must be declared there.
    """
    if isinstance(mix, (dict, DictConfig)):
        return _validate_mapping(mix, sources)
    if isinstance(mix, str) or not isinstance(mix, (list, tuple, ListConfig)):
        raise ConfigError(f"calib.mix={shown(mix)} is neither a mapping nor a list: calib.mix is {MIX_FORMS}")
    meaning = f"{len(DOMAINS)} ratios ({' : '.join(DOMAINS)}), e.g. [0.3,0.3,0.3]"
    ratios = [require_number(f"calib.mix[{i}]", x, f"one of the {meaning}") for i, x in enumerate(mix)]
    if len(ratios) != len(DOMAINS):
        raise ConfigError(f"calib.mix must have {meaning} (or be {MIX_FORMS.split(', or ')[0]}), got {ratios}")
    if any(x < 0 for x in ratios):
        raise ConfigError(f"calib.mix ratios must be >= 0, got {ratios}")
    if sum(ratios) == 0:
        raise ConfigError(f"calib.mix is all zero ({ratios}): at least one source needs a positive ratio")
    return dict(zip(DOMAINS, ratios))


def _validate_mapping(mix, sources) -> dict[str, float]:
    mix = OmegaConf.to_container(mix, resolve=True) if isinstance(mix, DictConfig) else dict(mix)
    declared = _declared(sources)
    known = f"calib.sources declares {', '.join(declared)}" if declared else "calib.sources declares none"
    if not mix:
        raise ConfigError(f"calib.mix={{}} names no source: calib.mix is {MIX_FORMS.split(', or ')[0]} ({known})")
    weights = {}
    for name, value in mix.items():
        name = str(name)
        if sources is not None and name not in declared:
            raise ConfigError(f"calib.mix names source {name!r}, which calib.sources does not declare: {known} "
                              f"(declare it as calib.sources.{name}: path, field, ...)")
        weights[name] = require_number(f"calib.mix.{name}", value,
                                       f"the weight of source {name!r} (int(calib.n * weight) sequences)")
        if weights[name] < 0:
            raise ConfigError(f"calib.mix.{name}={weights[name]} is negative: weights must be >= 0")
    if sum(weights.values()) == 0:
        raise ConfigError(f"calib.mix is all zero ({weights}): at least one source needs a positive weight")
    order = list(DOMAINS) + [d for d in declared if d not in DOMAINS]
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(weights.items(), key=lambda kv: rank.get(kv[0], len(order))))


def is_shorthand(weights: dict[str, float]) -> bool:
    """Whether a mix reads only the three shorthand sources (then it is the same as its [a, b, c] list)."""
    return set(weights) <= set(DOMAINS)


def without_unread_sources(calib: dict) -> dict:
    """A resolved calib config without the sources its mix gives no weight, which cannot change a run
    (so declaring a new source, as the toy's `tool`, leaves earlier runs' configs the same). A mix that
    does not validate is left for validate_calib to report, and the config is returned as it is."""
    sources, mix = calib.get("sources"), calib.get("mix")
    if not isinstance(sources, dict) or mix is None:
        return calib
    try:
        read = {name for name, weight in validate_mix(mix).items() if weight > 0}
    except ConfigError:
        return calib
    return {**calib, "sources": {name: src for name, src in sources.items() if name in read}}


def counts_for_mix(n: int, mix, sources=None) -> dict[str, int]:
    """{source: int(n * weight)}; the three shorthand sources are always listed (0 when not in the mix)."""
    weights = validate_mix(mix, sources)
    counts = {d: int(n * weights.get(d, 0.0)) for d in DOMAINS}
    counts.update({d: int(n * w) for d, w in weights.items() if d not in DOMAINS})
    return counts


def recorded_mix(cfg) -> dict[str, float] | None:
    """The mix as metrics.json records it, {source: weight} (None for pre-tokenised calibration)."""
    if is_pretokenized(cfg) or cfg.get("mix") is None:
        return None
    return validate_mix(cfg.mix, cfg.get("sources"))


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("tokenizer has neither a pad nor an eos token to pad calibration sequences with")
    return pad


def _rows_truncated(texts, tokenizer, count, seq_len, min_fill):
    need = max(1, int(min_fill * seq_len + 0.999999))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
        if len(ids) >= need:
            yield ids
            count -= 1
            if count == 0:
                return


def _rows_packed(texts, tokenizer, count, seq_len):
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    for text in texts:
        buf += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
            count -= 1
            if count == 0:
                return


def resolve_source(src, seq_len: int) -> dict:
    """The source as read: `min_chars_per_seq_len` (a fraction of seq_len) becomes a `min_chars` floor."""
    src = dict(OmegaConf.to_container(src, resolve=True) if isinstance(src, DictConfig) else src)
    frac = src.pop("min_chars_per_seq_len", None)
    if frac is not None:
        src["min_chars"] = max(int(src.get("min_chars") or 0), math.ceil(float(frac) * seq_len))
    return src


def tokenize_source(src, tokenizer, count: int, seq_len: int, seed: int, min_fill: float, pack: bool,
                    name: str | None = None):
    """`count` rows of `seq_len` tokens from source `name` (calib.sources.<name>); a ConfigError naming
    calib.mix when the source runs out first."""
    src = resolve_source(src, seq_len)
    texts = iter_texts(src, seed, tokenizer)
    rows = _rows_packed(texts, tokenizer, count, seq_len) if pack else _rows_truncated(
        texts, tokenizer, count, seq_len, min_fill)
    rows = list(tqdm(rows, total=count, desc=f"calib {src['path']}", leave=False))
    if len(rows) < count:
        source = f"source {name} " if name else "source "
        how = "packed" if pack else f"truncated, rows with >= {min_fill:g} real tokens"
        raise ConfigError(
            f"calib.mix asks {source}for {count} sequences of {seq_len} tokens, but calibration source "
            f"{src['path']!r} gave only {len(rows)} of {count} ({how}); lower its weight in calib.mix, "
            "calib.n or calib.seq_len, or add data"
        )
    return rows


def is_pretokenized(cfg) -> bool:
    return bool(cfg.get("path")) or cfg.get("name") == "pretokenized"


def validate_calib(cfg, vocab_size: int | None = None) -> None:
    """What can be checked before a model is loaded: the sizes, then the pre-tokenised file or the mix of sources.

    With the model's `vocab_size`, pre-tokenised ids must also lie in [0, vocab_size).
    """
    require_positive_int("calib.batch_size", cfg.get("batch_size", 8), "the number of sequences per forward pass")
    validate_states(cfg)
    if is_pretokenized(cfg):
        calib = load_pretokenized(cfg.get("path"))
        if vocab_size is not None:
            check_token_ids(calib["input_ids"], int(vocab_size), f"calib.path={str(cfg.get('path'))!r}")
        rows, length = calib["input_ids"].shape
        log.info("calibration: %d sequences x %d tokens from calib.path=%s", rows, length, cfg.get("path"))
        return
    mix = validate_mix(cfg.mix, cfg.get("sources"))
    n = require_positive_int("calib.n", cfg.get("n"), "the number of calibration sequences")
    require_positive_int("calib.seq_len", cfg.get("seq_len"), "the length of every calibration sequence in tokens")
    require_number("calib.seed", cfg.get("seed", 0), "the integer seed of each source's row order", integer=True)
    min_fill = require_number("calib.min_fill", cfg.get("min_fill", 0.9), "the least share of real tokens per row")
    if not 0 <= min_fill <= 1:
        raise ConfigError(f"calib.min_fill={min_fill} is outside [0, 1]: it is the least share of real tokens per row")
    check_mix_total(mix, n, cfg.mix)
    used = used_sources(cfg)
    if not used:
        raise ConfigError(f"calib.n={n} with calib.mix={shown(cfg.mix)} takes int(n * ratio) = 0 sequences "
                          "from every source: raise calib.n")
    log.info("%s", calibration_line(used, int(cfg.seq_len), n))
    for _, src in used.values():  # a domain the mix needs is configured, in a known format, its file present
        source_columns(src)
        check_local_source(src)


# Float sums of weights meant to add up to 1 (0.1 + 0.2 + 0.7) may exceed it by rounding.
MIX_TOTAL_TOLERANCE = 1e-6


def check_mix_total(weights: dict[str, float], n: int, mix) -> None:
    """Weights are fractions of calib.n, so together at most 1: [1, 1, 1] would silently take 3 x calib.n
    sequences, which calib.n (the number of calibration sequences) does not say."""
    total = sum(weights.values())
    if total > 1 + MIX_TOTAL_TOLERANCE:
        asked = sum(int(n * w) for w in weights.values())
        raise ConfigError(f"calib.mix={shown(mix)} sums to {total:g}: each weight is a fraction of calib.n={n} "
                          f"(int(calib.n * weight) sequences), so this asks for {asked} sequences, {total:g} x "
                          "calib.n; give weights summing to at most 1 (e.g. [0.4,0.3,0.3]) and the total as calib.n")


def calibration_line(used: dict[str, tuple[int, dict]], seq_len: int, n: int) -> str:
    """`calibration: 127 sequences x 128 tokens: general 51, math 38, code 38 (int(calib.n * weight) of
    calib.n=128)`, said before anything loads (the note only where the counts do not add up to calib.n)."""
    total = sum(count for count, _ in used.values())
    counts = ", ".join(f"{name} {count}" for name, (count, _) in used.items())
    note = "" if total == n else f" (int(calib.n * weight) of calib.n={n})"
    return f"calibration: {total} sequences x {seq_len} tokens: {counts}{note}"


STATES_PLACES = ("null (the model's execution device)", "cpu", "disk")


def validate_states(cfg) -> None:
    """calib.states_device and calib.states_dir: where the layer-wise hidden states wait (methods/states.py)."""
    place, directory = cfg.get("states_device"), cfg.get("states_dir")
    if place not in (None, "cpu", "disk"):
        raise ConfigError(f"calib.states_device={shown(place)}: choose one of {', '.join(STATES_PLACES)}")
    if directory in (None, ""):
        return
    if place != "disk":
        raise ConfigError(f"calib.states_dir={shown(directory)} is set but calib.states_device={shown(place)}: "
                          "states_dir is used only with calib.states_device=disk")
    require_writable_dir("calib.states_dir", directory, "the directory of the calibration hidden states")


def used_sources(cfg) -> dict[str, tuple[int, dict]]:
    """{source: (count, source config)} for every source the mix takes sequences from, in build order."""
    used, sources = {}, cfg.get("sources") or {}
    mapping = isinstance(cfg.mix, (dict, DictConfig))
    for domain, count in counts_for_mix(int(cfg.n), cfg.mix, sources if mapping else None).items():
        if count == 0:
            continue
        src = sources.get(domain)
        if src is None:
            raise ConfigError(f"calib.mix asks for {count} {domain} sequences but calib.sources has no {domain!r} "
                              f"(it declares {', '.join(_declared(sources)) or 'none'})")
        if OmegaConf.is_config(src) and OmegaConf.is_missing(src, "path"):
            raise ConfigError(f"calib.mix asks for {count} {domain} sequences but calib.sources.{domain}.path is not "
                              f"set: give calib.sources.{domain}.path=FILE (or a hub dataset id), or weight {domain} 0")
        used[domain] = (count, src)
    return used


def calibration_datasets(cfg) -> dict[str, tuple[str, str | None, str | None]]:
    """{setting: (hub id, config name, revision)} of every hub dataset the calibration reads (none for a file)."""
    if is_pretokenized(cfg):
        return {}
    hubs = {f"calib.sources.{domain}": hub_dataset(src) for domain, (_, src) in used_sources(cfg).items()}
    return {setting: hub for setting, hub in hubs.items() if hub is not None}


def build_calibration(cfg, tokenizer) -> dict[str, torch.Tensor]:
    if is_pretokenized(cfg):  # calib=pretokenized calib.path=FILE: the tokens exactly as stored
        return load_pretokenized(cfg.get("path"))
    seq_len, pad = int(cfg.seq_len), _pad_id(tokenizer)
    rows: list[list[int]] = []
    for name, (count, src) in used_sources(cfg).items():
        rows += tokenize_source(src, tokenizer, count, seq_len, int(cfg.seed), float(cfg.get("min_fill", 0.9)),
                                bool(cfg.get("pack", False)), name=name)
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def calibration_batches(calib: dict[str, torch.Tensor], batch_size: int):
    n = calib["input_ids"].shape[0]
    return [{k: v[i:i + batch_size] for k, v in calib.items()} for i in range(0, n, batch_size)]


__all__ = ["DOMAINS", "build_calibration", "calibration_batches", "calibration_datasets", "counts_for_mix",
           "is_pretokenized", "is_shorthand", "load_pretokenized", "load_source", "recorded_mix", "resolve_source",
           "used_sources", "validate_calib", "validate_mix", "without_unread_sources"]
