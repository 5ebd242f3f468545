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

from ..config import ConfigError, require_writable_dir, shown
from ..setting_types import MISSING
from .pretokenized import check_token_ids, load_pretokenized
from .sources import check_chat_fields, check_local_source, hub_dataset, iter_texts, load_source

log = logging.getLogger(__name__)

DOMAINS = ("general", "math", "code")  # the three-number shorthand's sources, in its order
MIX_FORMS = (f"a mapping {{source: weight}}, e.g. {{general: 0.2, math: 0.3, code: 0.4, tool: 0.1}}, or "
             f"{len(DOMAINS)} ratios ({' : '.join(DOMAINS)}), e.g. [0.3,0.3,0.3]")


def _declared(sources) -> list[str]:
    return [str(name) for name in (sources or {})]


def mix_as_weights(mix, sources=None) -> dict[str, float]:
    """The mix as {source: weight}: the shorthand [a, b, c] means {general: a, math: b, code: c}.

    Weights are fractions of calib.n (int(n * weight) sequences each), summing to at most 1, not
    necessarily to 1 (`check_mix`, `check_mix_reads`). The order is the one rows are built in: general,
    math, code first, then the other sources in the order calib.sources declares them (`sources`, when
    given; else as written). A TypeError or ValueError for a mix of neither form.
    """
    if isinstance(mix, (ListConfig, DictConfig)):
        mix = OmegaConf.to_container(mix, resolve=True)
    if not isinstance(mix, dict):
        if isinstance(mix, str) or len(mix) != len(DOMAINS):
            raise ValueError(f"calib.mix={shown(mix)} is neither a mapping nor {len(DOMAINS)} ratios")
        return dict(zip(DOMAINS, map(float, mix)))
    order = list(DOMAINS) + [d for d in _declared(sources) if d not in DOMAINS]
    rank = {name: i for i, name in enumerate(order)}
    weights = {str(name): float(value) for name, value in mix.items()}
    return dict(sorted(weights.items(), key=lambda kv: rank.get(kv[0], len(order))))


def check_mix(calib: dict) -> None:
    """calib.mix against calib.sources (its form and weights checked by ream_exp.setting_schema):
    a mapping names at least one source and only declared ones; some weight is positive."""
    mix, sources = calib.get("mix"), calib.get("sources")
    if mix is None or mix == MISSING:
        return
    if isinstance(mix, dict):
        declared = _declared(sources)
        known = f"calib.sources declares {', '.join(declared)}" if declared else "calib.sources declares none"
        if not mix:
            raise ConfigError(f"calib.mix={{}} names no source: calib.mix is {MIX_FORMS.split(', or ')[0]} ({known})")
        for name in map(str, mix):
            if name not in declared:
                raise ConfigError(f"calib.mix names source {name!r}, which calib.sources does not declare: {known} "
                                  f"(declare it as calib.sources.{name}: path, field, ...)")
    weights = mix_as_weights(mix, sources)
    if not any(weights.values()):
        shown_weights = weights if isinstance(mix, dict) else list(weights.values())
        kind = "weight" if isinstance(mix, dict) else "ratio"
        raise ConfigError(f"calib.mix is all zero ({shown_weights}): at least one source needs a positive {kind}")


def is_shorthand(weights: dict[str, float]) -> bool:
    """Whether a mix reads only the three shorthand sources (then it is the same as its [a, b, c] list)."""
    return set(weights) <= set(DOMAINS)


def without_unread_sources(calib: dict) -> dict:
    """A resolved calib config without the sources its mix gives no weight, which cannot change a run
    (so declaring a new source, as the toy's `tool`, leaves earlier runs' configs the same). A mix that
    of neither form is left for the settings check to report, and the config is returned as it is."""
    sources, mix = calib.get("sources"), calib.get("mix")
    if not isinstance(sources, dict) or mix is None:
        return calib
    try:
        read = {name for name, weight in mix_as_weights(mix).items() if weight > 0}
    except (TypeError, ValueError):
        return calib
    return {**calib, "sources": {name: src for name, src in sources.items() if name in read}}


def counts_for_mix(n: int, mix, sources=None) -> dict[str, int]:
    """{source: int(n * weight)}; the three shorthand sources are always listed (0 when not in the mix)."""
    weights = mix_as_weights(mix, sources)
    counts = {d: int(n * weights.get(d, 0.0)) for d in DOMAINS}
    counts.update({d: int(n * w) for d, w in weights.items() if d not in DOMAINS})
    return counts


def recorded_mix(cfg) -> dict[str, float] | None:
    """The mix as metrics.json records it, {source: weight} (None for pre-tokenised calibration)."""
    if is_pretokenized(cfg) or cfg.get("mix") is None:
        return None
    return mix_as_weights(cfg.mix, cfg.get("sources"))


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
    """What the calibration needs beyond its settings (ream_exp.settings checks those first): a writable
    states directory, then the pre-tokenised file (with the model's `vocab_size`, its ids in [0,
    vocab_size)), or each source the mix reads given a path and, where local, present."""
    if cfg.get("states_dir") not in (None, "") and cfg.get("states_device") == "disk":
        require_writable_dir("calib.states_dir", cfg.states_dir, "the directory of the calibration hidden states")
    if is_pretokenized(cfg):
        calib = load_pretokenized(cfg.get("path"))
        if vocab_size is not None:
            check_token_ids(calib["input_ids"], int(vocab_size), f"calib.path={str(cfg.get('path'))!r}")
        rows, length = calib["input_ids"].shape
        log.info("calibration: %d sequences x %d tokens from calib.path=%s", rows, length, cfg.get("path"))
        return
    used = used_sources(cfg)
    log.info("%s", calibration_line(used, int(cfg.seq_len), int(cfg.n)))
    for _, src in used.values():  # a local file the mix reads is present
        check_local_source(src)


# Float sums of weights meant to add up to 1 (0.1 + 0.2 + 0.7) may exceed it by rounding.
MIX_TOTAL_TOLERANCE = 1e-6


def check_mix_reads(calib: dict) -> None:
    """calib.mix against calib.n, where a calibration is built from sources (the settings check runs this
    for a method that reads calibration): the weights sum to at most 1, every source the mix takes
    sequences from is declared (a chat source with its fields), and some source gets a sequence."""
    mix, sources = calib.get("mix"), calib.get("sources") or {}
    if is_pretokenized(calib) or mix is None or mix == MISSING:
        return
    for key in ("n", "seq_len"):
        if calib.get(key) is None:
            raise ConfigError(f"calib.{key} is not set: a calibration mixed from sources needs calib.n sequences "
                              "of calib.seq_len tokens")
    n = calib["n"]
    if n == MISSING:
        return
    check_mix_total(mix_as_weights(mix, sources), n, mix)
    counts = counts_for_mix(n, mix, sources if isinstance(mix, dict) else None)
    for name, count in counts.items():
        if count and name not in sources:
            raise ConfigError(f"calib.mix asks for {count} {name} sequences but calib.sources has no {name!r} "
                              f"(it declares {', '.join(_declared(sources)) or 'none'})")
        if count:
            check_chat_fields(sources[name] or {}, f"calib.sources.{name}")
    if not any(counts.values()):
        raise ConfigError(f"calib.n={n} with calib.mix={shown(mix)} takes int(n * ratio) = 0 sequences "
                          "from every source: raise calib.n")


def check_mix_total(weights: dict[str, float], n: int, mix) -> None:
    """Weights are fractions of calib.n, so together at most 1: [1, 1, 1] would silently take 3 x calib.n
    sequences, which calib.n (the number of calibration sequences) does not say."""
    total = sum(weights.values())
    if total > 1 + MIX_TOTAL_TOLERANCE:
        asked = sum(int(n * w) for w in weights.values())
        raise ConfigError(f"calib.mix={shown(mix)} sums to {total:g}: each weight is a fraction of calib.n={n} "
                          f"(int(calib.n * weight) sequences), so this asks for {asked} sequences, {total:g} x "
                          "calib.n; give weights summing to at most 1 (e.g. [0.4,0.3,0.3]) and the total as calib.n")


def check_states_dir(calib: dict) -> None:
    """calib.states_dir only with calib.states_device=disk: where the layer-wise hidden states wait
    (methods/states.py)."""
    place, directory = calib.get("states_device"), calib.get("states_dir")
    if directory not in (None, "") and place != "disk":
        raise ConfigError(f"calib.states_dir={shown(directory)} is set but calib.states_device={shown(place)}: "
                          "states_dir is used only with calib.states_device=disk")


def calibration_line(used: dict[str, tuple[int, dict]], seq_len: int, n: int) -> str:
    """`calibration: 127 sequences x 128 tokens: general 51, math 38, code 38 (int(calib.n * weight) of
    calib.n=128)`, said before anything loads (the note only where the counts do not add up to calib.n)."""
    total = sum(count for count, _ in used.values())
    counts = ", ".join(f"{name} {count}" for name, (count, _) in used.items())
    note = "" if total == n else f" (int(calib.n * weight) of calib.n={n})"
    return f"calibration: {total} sequences x {seq_len} tokens: {counts}{note}"


def used_sources(cfg) -> dict[str, tuple[int, dict]]:
    """{source: (count, source config)} for every source the mix takes sequences from, in build order (the
    sources themselves checked by check_mix_reads); a ConfigError for one whose path is not set yet."""
    used, sources = {}, cfg.get("sources") or {}
    mapping = isinstance(cfg.mix, (dict, DictConfig))
    for domain, count in counts_for_mix(int(cfg.n), cfg.mix, sources if mapping else None).items():
        if count == 0:
            continue
        src = sources[domain]
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


__all__ = ["DOMAINS", "MIX_FORMS", "build_calibration", "calibration_batches", "calibration_datasets", "check_mix",
           "check_mix_reads", "check_states_dir", "counts_for_mix", "is_pretokenized", "is_shorthand",
           "load_pretokenized", "load_source", "mix_as_weights", "recorded_mix", "resolve_source", "used_sources",
           "validate_calib", "without_unread_sources"]
