"""Calibration tokens: sources mixed by ratio, tokenised to [n, seq_len] with an attention mask.

    calib = build_calibration(cfg.calib, tokenizer)     # {"input_ids", "attention_mask"} LongTensors
    for batch in calibration_batches(calib, 8): ...

A mix (a : b : c) takes int(n*a), int(n*b), int(n*c) sequences from the general, math and code sources
(SPEC 6). Each source's rows come in a seeded order; each text is truncated or right-padded to seq_len
and rows with less than `min_fill` real tokens are skipped (or, with `pack: true`, texts are joined with
EOS and cut into full sequences). Pads are marked 0 in the attention mask and never count in statistics.
A source is raw text (`field`) or, with `format: chat`, rows rendered by the tokenizer's chat template
(REAP's evol-codealpaca); `min_chars_per_seq_len: 0.9` keeps texts of at least 0.9 * seq_len characters.
`calib=pretokenized calib.path=FILE` instead loads a stored [n, seq_len] token file exactly as given.
Runs build through `cache.cached_calibration`, which stores each tokenised set on disk once.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from ..config import ConfigError, require_number, require_positive_int, require_writable_dir, shown
from .pretokenized import check_token_ids, load_pretokenized
from .sources import check_local_source, hub_dataset, iter_texts, load_source, source_columns

DOMAINS = ("general", "math", "code")


def validate_mix(mix) -> list[float]:
    meaning = f"{len(DOMAINS)} ratios ({' : '.join(DOMAINS)}), e.g. [0.3,0.3,0.3]"
    if isinstance(mix, str) or not isinstance(mix, (list, tuple, ListConfig)):
        raise ConfigError(f"calib.mix={shown(mix)} is not a list: calib.mix is {meaning}")
    mix = [require_number(f"calib.mix[{i}]", x, f"one of the {meaning}") for i, x in enumerate(mix)]
    if len(mix) != len(DOMAINS):
        raise ConfigError(f"calib.mix must have {meaning}, got {mix}")
    if any(x < 0 for x in mix):
        raise ConfigError(f"calib.mix ratios must be >= 0, got {mix}")
    if sum(mix) == 0:
        raise ConfigError(f"calib.mix is all zero ({mix}): at least one source needs a positive ratio")
    return mix


def counts_for_mix(n: int, mix) -> dict[str, int]:
    return {d: int(n * r) for d, r in zip(DOMAINS, validate_mix(mix))}


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


def tokenize_source(src, tokenizer, count: int, seq_len: int, seed: int, min_fill: float, pack: bool):
    src = resolve_source(src, seq_len)
    texts = iter_texts(src, seed, tokenizer)
    rows = _rows_packed(texts, tokenizer, count, seq_len) if pack else _rows_truncated(
        texts, tokenizer, count, seq_len, min_fill)
    rows = list(tqdm(rows, total=count, desc=f"calib {src['path']}", leave=False))
    if len(rows) < count:
        raise ConfigError(
            f"calibration source {src['path']!r} gave only {len(rows)} of {count} sequences of {seq_len} tokens "
            f"(min_fill={min_fill}, pack={pack}); lower calib.n or calib.seq_len, or add data"
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
        return
    mix = validate_mix(cfg.mix)
    n = require_positive_int("calib.n", cfg.get("n"), "the number of calibration sequences")
    require_positive_int("calib.seq_len", cfg.get("seq_len"), "the length of every calibration sequence in tokens")
    require_number("calib.seed", cfg.get("seed", 0), "the integer seed of each source's row order", integer=True)
    min_fill = require_number("calib.min_fill", cfg.get("min_fill", 0.9), "the least share of real tokens per row")
    if not 0 <= min_fill <= 1:
        raise ConfigError(f"calib.min_fill={min_fill} is outside [0, 1]: it is the least share of real tokens per row")
    used = used_sources(cfg)
    if not used:
        raise ConfigError(f"calib.n={n} with calib.mix={mix} takes int(n * ratio) = 0 sequences "
                          "from every source: raise calib.n")
    for _, src in used.values():  # a domain the mix needs is configured, in a known format, its file present
        source_columns(src)
        check_local_source(src)


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
    """{domain: (count, source config)} for every domain the mix takes sequences from."""
    used = {}
    for domain, count in counts_for_mix(int(cfg.n), cfg.mix).items():
        if count == 0:
            continue
        src = (cfg.get("sources") or {}).get(domain)
        if src is None:
            raise ConfigError(f"calib.mix asks for {count} {domain} sequences but calib.sources has no {domain!r}")
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
    for count, src in used_sources(cfg).values():
        rows += tokenize_source(src, tokenizer, count, seq_len, int(cfg.seed), float(cfg.get("min_fill", 0.9)),
                                bool(cfg.get("pack", False)))
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
           "is_pretokenized", "load_pretokenized", "load_source", "resolve_source", "used_sources", "validate_calib", "validate_mix"]
