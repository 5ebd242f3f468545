"""The per-layer observation cache: one file per MoE layer of a non-sequential method's observations.

    stats/<key>-layers-<what>-<layer>.pt      (docs/caches.md)

Without propagation through compressed layers a layer's `LayerObservation` depends only on the model,
the calibration tokens, what is observed and the sampling seed, not on the ratio: a sweep over ratios
observes once. Each entry records what made it (observe.STATS_VERSION and
observation.OBSERVATION_VERSION); a stale or damaged entry is observed again, never trusted.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

import torch

from .. import observe
from ..atomic import atomic_torch_save
from ..cache_meta import made_by, require_current
from ..moe import MoELayer
from ..observe import load_cache_entry
from . import observation
from .observation import LayerObservation, Needs


def observation_cache(ctx, needs: Needs, layers: list[MoELayer]) -> dict[int, Path] | None:
    """Per-layer cache files of a non-sequential method's observations (None: no cache configured).

    Without propagation through compressed layers the observations depend only on the model, the
    calibration tokens (both in ctx.stats_path's key), what is observed and the sampling seed, not on
    the ratio: a sweep over ratios observes once.
    """
    if ctx.stats_path is None:
        return None
    observed = {k: v for k, v in vars(needs).items() if k != "align_cache_mb"}  # what is saved does not depend on it
    key = hashlib.sha256(repr((sorted(observed.items()), ctx.seed)).encode()).hexdigest()[:12]
    stem = Path(ctx.stats_path)
    return {l.index: stem.with_name(f"{stem.stem}-layers-{key}-{l.index}.pt") for l in layers}


def observation_made_by() -> dict:
    """What makes a per-layer observation entry now (cache_meta.made_by): the observing forward's
    version (observe.STATS_VERSION) and the observation code's (observation.OBSERVATION_VERSION)."""
    return made_by({"observe": observe.STATS_VERSION, "observation": observation.OBSERVATION_VERSION})


def save_observation(obs: LayerObservation, path: Path) -> None:
    state = {k: v for k, v in vars(obs).items() if k not in observation.NOT_SAVED}
    state["made_by"] = observation_made_by()
    atomic_torch_save(state, path)  # a killed run never leaves a half-written entry


OBSERVATION_KEYS = tuple(f.name for f in fields(LayerObservation) if f.name not in observation.NOT_SAVED)


def _observation_state(path: Path, num_experts: int, **load) -> dict:
    """The saved state (without its record), after checking what made it (StaleEntry when other code did),
    its keys and expert count; raises on any damage."""
    state = torch.load(path, weights_only=True, **load)
    if isinstance(state, dict):
        require_current(state.pop("made_by", None), observation_made_by())
    missing = set(OBSERVATION_KEYS) - set(state) if isinstance(state, dict) else set(OBSERVATION_KEYS)
    if missing:
        raise ValueError(f"missing entries {sorted(missing)}")
    if int(state["num_experts"]) != num_experts:
        raise ValueError(f"{state['num_experts']} experts observed, the layer has {num_experts}")
    return state


def cached_observations(cache: dict[int, Path], layers: list[MoELayer]) -> bool:
    """Whether every layer's entry is there, readable and made by this code. Checked before any layer is
    compressed (a memory-mapped read: structure and keys, no tensor data); damaged entries are reported and
    deleted; the first stale one is reported (one log line) and all are observed again and overwritten."""
    return all(load_cache_entry(cache[l.index], lambda p, n=l.num_experts: _observation_state(p, n, mmap=True),
                                "observation cache") is not None for l in layers)


def load_observation(path: Path, device, num_experts: int) -> LayerObservation:
    try:
        state = _observation_state(path, num_experts, map_location=device)
    except Exception as exc:  # damaged past what the up-front check reads: earlier layers are already merged
        path.unlink(missing_ok=True)
        raise RuntimeError(f"observation cache {path} is damaged ({type(exc).__name__}: {exc}); "
                           "deleted it, rerun to recompute it") from exc
    obs = LayerObservation(num_experts, device)
    obs.__dict__.update(state)
    return obs
