"""A disk cache of tokenised calibration sets, so a sweep tokenises each (tokenizer, data) set once.

    calib = cached_calibration(cfg.calib, tokenizer, cfg.cache_dir)   # same result as build_calibration

Everything that decides the tokens is in `calibration_key_material`: the tokenizer (name_or_path + a hash
of its vocabulary, merges, normalisation, special tokens and chat template), the sources the mix reads
(their resolved configs, plus size and mtime of local files), the mix and per-source counts, n, seq_len,
seed, min_fill, pack and FORMAT_VERSION. The key hashes all of it but the two parts that say what made
the tokens, FORMAT_VERSION and the tokenizer's hash: those are the entry's record (cache_meta.made_by,
with the cache format and ream-exp's version), so a set made by other code or another tokenizer under the
same name is found, reported in one log line naming what differs, and rebuilt over (docs/caches.md).
A set is stored at `<cache_dir>/calib/<key>.pt` with its key, record and a sha256 of its tensors;
it is written to a temporary file and renamed, so a crash never leaves a half-written set under the
final name. A file that cannot be read, has the wrong key, keys, dtypes or shapes, or fails its checksum
is reported, deleted and rebuilt; it is never used. Pre-tokenised calibration (`calib=pretokenized`)
bypasses the cache: it is a file already.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..atomic import atomic_torch_save
from ..cache_meta import StaleEntry, made_by, report_stale, require_current
from . import (DOMAINS, build_calibration, counts_for_mix, is_pretokenized, is_shorthand, mix_as_weights,
               resolve_source, used_sources)

log = logging.getLogger("ream_exp")

# The version of the code that builds calibration tokens, recorded in every cached set: bump it when the
# way calibration tokens are built changes (docs/caches.md).
FORMAT_VERSION = 1
TENSORS = ("input_ids", "attention_mask")


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides how the tokenizer turns text into ids, hashed (the name alone can change meaning)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: vocab, merges, normaliser...
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extras = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.pad_token_id,
                         tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)],
                        sort_keys=True, default=str)
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "hash": _sha256(body + extras)}


def _file_stamp(path: str) -> list | None:
    """Size and mtime of a local source file (editing it must miss the cache); None for hub ids."""
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return None


def calibration_key_material(cfg, tokenizer) -> dict:
    """Everything the calibration tokens depend on, as plain JSON-able data."""
    seq_len = int(cfg.seq_len)
    sources = {}
    for domain, (count, src) in used_sources(cfg).items():
        src = resolve_source(src, seq_len)
        sources[domain] = {"count": count, "source": src, "files": _file_stamp(str(src["path"]))}
    return {
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": sources,
        "mix": mix_key(cfg),
        "counts": counts_for_mix(int(cfg.n), cfg.mix, cfg.get("sources")),
        "n": int(cfg.n),
        "seq_len": seq_len,
        "seed": int(cfg.seed),
        "min_fill": float(cfg.get("min_fill", 0.9)),
        "pack": bool(cfg.get("pack", False)),
    }


def mix_key(cfg) -> list[float] | dict[str, float]:
    """The mix in the key: [general, math, code] when it reads only those (so a mapping over them and its
    three-number list share one cached set, and keys from before mappings stay valid), else {source: weight}."""
    weights = mix_as_weights(cfg.mix, cfg.get("sources"))
    return [weights.get(d, 0.0) for d in DOMAINS] if is_shorthand(weights) else weights


def key_of(material: dict) -> str:
    """The cache key: the material without what made the tokens (FORMAT_VERSION, the tokenizer's hash),
    which the entry records instead (`calibration_made_by`)."""
    kept = {k: v for k, v in material.items() if k != "version"}
    kept["tokenizer"] = {k: v for k, v in material["tokenizer"].items() if k != "hash"}
    return _sha256(json.dumps(kept, sort_keys=True, default=str))[:24]


def calibration_made_by(material: dict) -> dict:
    """The record of what made a set with this key material (cache_meta.made_by): the calibration code's
    FORMAT_VERSION and the tokenizer's digest."""
    return made_by({"calibration": material["version"]}, tokenizer=material["tokenizer"]["hash"])


def calibration_key(cfg, tokenizer) -> str:
    return key_of(calibration_key_material(cfg, tokenizer))


def tensor_checksum(calib: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in TENSORS:
        t = calib[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "calib" / f"{key}.pt"


def save_cached(path: Path, key: str, material: dict, calib: dict[str, torch.Tensor]) -> None:
    """Write atomically: a temporary file in the same directory, then os.replace onto the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {name: calib[name].cpu() for name in TENSORS}
    blob.update(key=key, meta=json.dumps(material, sort_keys=True, default=str), checksum=tensor_checksum(calib),
                made_by=calibration_made_by(material))
    atomic_torch_save(blob, path)


def load_cached(path: Path, key: str, rows: int, seq_len: int, current: dict | None = None
                ) -> dict[str, torch.Tensor]:
    """The stored set, after every check; raises ValueError saying what is wrong with the file, and
    StaleEntry when it is sound but its record is not `current` (when given) or it has none."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or not a torch file at all
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or not all(k in blob for k in (*TENSORS, "key", "checksum")):
        raise ValueError(f"missing entries (has {sorted(blob) if isinstance(blob, dict) else type(blob).__name__})")
    if blob["key"] != key:
        raise ValueError(f"stored key {blob['key']!r} is not the file's name {key!r}")
    for name in TENSORS:
        t = blob[name]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or tuple(t.shape) != (rows, seq_len):
            got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} is {got}, expected torch.int64 {(rows, seq_len)}")
    calib = {name: blob[name] for name in TENSORS}
    if tensor_checksum(calib) != blob["checksum"]:
        raise ValueError("checksum mismatch (the tokens changed after they were written)")
    if current is not None:
        require_current(blob.get("made_by"), current)
    return calib


def is_cached(cfg, tokenizer, cache_dir: str | Path | None) -> bool:
    """Whether cached_calibration would read this set from the cache instead of building it: its entry is
    there, sound (load_cached's checks) and made by this code and tokenizer (its made_by record). Reads
    only: a stale or damaged entry is reported and rebuilt by cached_calibration, not here."""
    if is_pretokenized(cfg) or cache_dir is None:
        return False
    material = calibration_key_material(cfg, tokenizer)
    key = key_of(material)
    path = cache_path(cache_dir, key)
    if not path.exists():
        return False
    try:
        load_cached(path, key, sum(material["counts"].values()), material["seq_len"], calibration_made_by(material))
    except (StaleEntry, ValueError):
        return False
    return True


def cached_calibration(cfg, tokenizer, cache_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """build_calibration(cfg, tokenizer), read from `<cache_dir>/calib/` when this exact set was built before."""
    if is_pretokenized(cfg) or cache_dir is None:
        return build_calibration(cfg, tokenizer)
    material = calibration_key_material(cfg, tokenizer)
    key = key_of(material)
    path = cache_path(cache_dir, key)
    if path.exists():
        try:
            calib = load_cached(path, key, sum(material["counts"].values()), material["seq_len"],
                                calibration_made_by(material))
            log.info("calibration tokens from cache %s", path)
            return calib
        except StaleEntry as exc:  # sound, but made by other code or tokenizer: rebuilt over
            report_stale("calibration cache", path, exc)
        except ValueError as exc:
            log.warning("calibration cache file %s is corrupt or partial: %s; deleting and rebuilding it", path, exc)
            path.unlink(missing_ok=True)
    calib = build_calibration(cfg, tokenizer)
    save_cached(path, key, material, calib)
    log.info("calibration tokens cached at %s", path)
    return calib


__all__ = ["cache_path", "cached_calibration", "calibration_key", "calibration_key_material", "calibration_made_by",
           "is_cached", "load_cached", "save_cached", "tokenizer_fingerprint"]
