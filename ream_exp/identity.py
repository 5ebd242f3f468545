"""What a result depends on, and what it does not: the one place run identities and cache keys come from.

    run_identity(cfg)           what decides whether two runs are the same run (compared on relaunch)
    config_digest(cfg)          its short digest (streamed resume, mix-search study names)
    model_identity(model_cfg)   the model as far as results go: its settings and a fingerprint of its weights
    baseline_key / stats_key    the cache keys of the uncompressed model's scores and routing statistics

Keys say which cache entry answers a question; what made an entry (the code versions, lm-eval's and the
tasks' versions) is recorded in the entry itself and checked on reading (cache_meta.py), not put here.

A result depends on the weights, the method and all its settings, the ratio, the calibration data and
settings, the seed, the eval settings and the package files a config names (the toy checkpoint, data and
tasks, by path relative to the package and content digest: a second clone at another path is the same run).
It does not depend on the settings in NOT_IDENTITY: where weights and intermediate data are placed (device,
device map, memory limits, offload, streaming, where hidden states wait, how much of the alignment's
activations observing keeps), where caches live, progress bars, the logger and the run directory. quant=none is
no quant stage at all, so it leaves the identity as it was before the quant group existed. Each of those is in
the list only because tests/test_identity.py shows
that changing it leaves the plan, the weights and the scores unchanged. A sweep's run directories are named
without them (`override_dirname_excluded`, read by conf/config.yaml), so a relaunch with another placement
finds the finished runs. A setting added later is left out at the value every earlier run had
(EARLIER_DEFAULTS: budget=uniform), so those runs keep their identity.

Weights: a local model directory is fingerprinted by its files' names, sizes and contents (whole files up
to FULL_DIGEST_BYTES, else the first MiB and SAMPLES evenly spaced MiB-blocks): a retrained or replaced
model is a new identity wherever it lies, a copied one the same. A hub id is itself plus model.revision.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import PACKAGE_DIR
from .calib import without_unread_sources

# Settings, by config group ("" = top level), that change where or how a run computes, never what.
NOT_IDENTITY: dict[str, tuple[str, ...]] = {
    "": ("progress", "logger", "cache_dir", "device", "run_dir"),
    "model": ("device_map", "max_memory", "offload_folder", "stream"),
    "calib": ("states_device", "states_dir"),
    "method": ("align_cache_mb",),
}
# Settings added after runs were made, left out of the identity at the value those runs had (what the code did
# before the setting existed), so finished runs stay finished.
EARLIER_DEFAULTS: dict[str, object] = {"budget": "uniform"}
# Eval settings that change what is written beside the scores, not the scores: out of the baseline's key
# (a run's own identity keeps them, since its directory holds what they write).
EVAL_OUTPUT_KEYS = ("log_samples",)
# Hydra settings that name directories, never a run's content.
HYDRA_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")

FULL_DIGEST_BYTES = 64 << 20
SAMPLES = 16
BLOCK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".jinja", ".py")


def override_dirname_excluded() -> list[str]:
    """The overrides Hydra leaves out of a sweep's run directory names (hydra.job.config.override_dirname)."""
    keys = [f"{group}.{key}" if group else key for group, names in NOT_IDENTITY.items() for key in names]
    return [*HYDRA_DIR_KEYS, *keys]


if not OmegaConf.has_resolver("identity_free_overrides"):
    # conf/config.yaml: hydra.job.config.override_dirname.exclude_keys
    OmegaConf.register_new_resolver("identity_free_overrides", override_dirname_excluded)


# ---- content digests ----------------------------------------------------------------------------------

def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's content (of its first block and SAMPLES blocks spread over it, when large).
    Keyed by size and mtime so a process digests each file once; the digest itself ignores both."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_DIGEST_BYTES:
            for chunk in iter(lambda: f.read(BLOCK), b""):
                h.update(chunk)
        else:
            for offset in [0] + [(size - BLOCK) * i // (SAMPLES - 1) for i in range(SAMPLES)]:
                f.seek(offset)
                h.update(f.read(BLOCK))
    return h.hexdigest()


def content_digest(path: Path) -> str:
    """A file's or a directory's content digest (a directory: its files' relative paths and digests)."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return _file_digest(str(path), st.st_size, st.st_mtime_ns)
    files = sorted(f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    return _sha(json.dumps([[f.relative_to(path).as_posix(), content_digest(f)] for f in files]))


def weights_fingerprint(path: Path) -> dict:
    """A local model directory's files that make the model (weights, config, tokenizer), by name and content."""
    files = sorted(f for f in Path(path).iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    return {"files": {f.name: [f.stat().st_size, content_digest(f)] for f in files}}


def _package_relative(value: str) -> str | None:
    """`value`'s path relative to the installed package when it lies inside it (${pkg:...}), else None."""
    root = str(PACKAGE_DIR) + os.sep
    return value[len(root):].replace(os.sep, "/") if value.startswith(root) else None


def _portable(node):
    """The resolved config with every path inside the package replaced by its relative path and content."""
    if isinstance(node, dict):
        return {k: _portable(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_portable(v) for v in node]
    if isinstance(node, str):
        rel = _package_relative(node)
        if rel is not None and (PACKAGE_DIR / rel).exists():
            return {"package_file": rel, "sha256": content_digest(PACKAGE_DIR / rel)}
    return node


# ---- identities -----------------------------------------------------------------------------------------

def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _model_weights(model: dict) -> dict:
    path = str(model.get("path") or "")
    local = Path(path).expanduser()
    if path and local.is_dir():
        return weights_fingerprint(local)
    return {"hub": path, "revision": model.get("revision")}


def _model_part(model: dict) -> dict:
    kept = {k: v for k, v in model.items() if k not in NOT_IDENTITY["model"] and k != "path"}
    return {**_portable(kept), "weights": _model_weights(model)}


def run_identity(cfg) -> dict:
    """What decides whether two runs are the same: the resolved config without NOT_IDENTITY's settings and
    the calibration sources the mix gives no weight, package paths portable, the model by its weights."""
    plain = _plain(cfg)
    plain.pop("hydra", None)
    kept = {k: v for k, v in plain.items() if k not in NOT_IDENTITY[""]
            and not (k in EARLIER_DEFAULTS and v == EARLIER_DEFAULTS[k])}
    for group, keys in NOT_IDENTITY.items():
        if group and isinstance(kept.get(group), dict):
            kept[group] = {k: v for k, v in kept[group].items() if k not in keys}
    if isinstance(kept.get("calib"), dict):
        kept["calib"] = without_unread_sources(kept["calib"])
    if (kept.get("quant") or {}).get("name", "none") == "none":  # no quant stage: the runs made before it
        kept.pop("quant", None)
    if isinstance(plain.get("model"), dict):
        kept["model"] = _model_part(plain["model"])
    return _portable(kept)


def digest(*parts) -> str:
    return _sha(json.dumps(parts, sort_keys=True, default=str))[:16]


def config_digest(cfg) -> str:
    """The short digest of run_identity: what a streamed relaunch must match to resume."""
    return digest(run_identity(cfg))


def model_identity(model_cfg) -> dict:
    return _model_part(_plain(model_cfg))


def baseline_key(model_cfg, eval_cfg) -> str:
    """Cache key of the uncompressed model's scores: the model and the eval settings (output settings aside)."""
    settings = {k: v for k, v in _plain(eval_cfg).items() if k not in EVAL_OUTPUT_KEYS}
    return digest(model_identity(model_cfg), _portable(settings))


def stats_key(model_cfg, calib) -> str:
    """Cache key of the uncompressed model's routing statistics: the model and the exact calibration tokens."""
    tokens = hashlib.sha256()
    for name in ("input_ids", "attention_mask"):
        tokens.update(calib[name].contiguous().numpy().tobytes())
    return digest(model_identity(model_cfg), tokens.hexdigest())
