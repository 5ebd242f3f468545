"""Calibration tokens from a pre-tokenised file, used exactly as given (no re-sampling, no re-padding).

    calib = load_pretokenized("calib.pt")     # ream-exp ... calib=pretokenized calib.path=calib.pt

The file is a torch .pt dict with `input_ids` and `attention_mask`, both int64 (LongTensor) of shape
[n, seq_len] (the format in which the official REAM code stores its calibration batches). Run every
method on the very same tokens, or on another tool's calibration set. Pads are attention_mask == 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError

KEYS = ("input_ids", "attention_mask")


def load_pretokenized(path) -> dict[str, torch.Tensor]:
    if path in (None, "", "???"):
        raise ConfigError("calib=pretokenized needs calib.path=FILE (a .pt dict with input_ids, attention_mask)")
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"calib.path={str(path)!r}: pre-tokenised calibration file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"calib.path={str(path)!r} is not a torch .pt file of tensors: {exc}") from exc
    return check_pretokenized(data, f"calib.path={str(path)!r}")


def check_pretokenized(data, path="calibration data") -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a dict with keys {list(KEYS)}, got {type(data).__name__}")
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing}; expected {list(KEYS)}, found {sorted(map(str, data))}")
    for k in KEYS:
        t = data[k]
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{path}: {k} must be a torch.LongTensor, got {type(t).__name__}")
        if t.dtype != torch.long:
            raise ConfigError(f"{path}: {k} must be int64 (torch.long), got {t.dtype}")
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ConfigError(f"{path}: {k} must have shape [n, seq_len] with n, seq_len >= 1, got {list(t.shape)}")
    ids, mask = data["input_ids"], data["attention_mask"]
    if ids.shape != mask.shape:
        raise ConfigError(f"{path}: input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in shape")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ConfigError(f"{path}: attention_mask must hold only 0 (pad) and 1 (token)")
    if int(mask.sum()) == 0:
        raise ConfigError(f"{path}: attention_mask marks no token at all")
    if bool((ids < 0).any()):
        raise ConfigError(f"{path}: input_ids must be >= 0, but the smallest is {int(ids.min())}")
    return {"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}


def check_token_ids(ids: torch.Tensor, vocab_size: int, path="calibration data") -> None:
    """Every id (pads included: they pass the embedding too) must be a row of the model's embedding."""
    largest = int(ids.max())
    if largest >= vocab_size:
        raise ConfigError(f"{path}: input_ids go up to {largest}, beyond the model's vocabulary (vocab_size="
                          f"{vocab_size}: ids 0..{vocab_size - 1}); calib.path must hold this model's token ids")
