"""Where the layer-wise driver keeps the calibration hidden states between decoder layers.

    calib.states_device: null     # on the model's execution device (fastest; what fits on one GPU)
    calib.states_device: cpu      # in CPU memory, each batch moved to the device while its layer runs
    calib.states_device: disk     # one file per batch under calib.states_dir (default: a temporary
                                  # directory under cache_dir, removed at the end)

The states are kept in the model's dtype, exactly as the decoder layers return them (a 2M-token
calibration of a 2048-wide model is 8 GB in bf16), and every copy is exact (`Tensor.to`, torch.save),
so the plans are the same bits wherever they wait. A store holds lists of tensors by key; it does not
know what they are (layerwise.BatchState does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

PLACES = (None, "cpu", "disk")


@dataclass(frozen=True)
class StatesConfig:
    """calib.states_device and calib.states_dir, with the cache_dir a temporary states_dir goes under."""

    place: str | None = None  # None | "cpu" | "disk"
    directory: str | None = None  # disk only; kept after the run when set
    scratch_root: str | None = None  # where a temporary directory is made when `directory` is None

    @classmethod
    def from_calib(cls, calib_cfg, cache_dir=None) -> "StatesConfig":
        scratch = str(Path(str(cache_dir)).expanduser() / "states") if cache_dir else None
        return cls(calib_cfg.get("states_device"), calib_cfg.get("states_dir") or None, scratch)


class StateStore:
    """Lists of tensors by key: held as given (place None), in CPU memory, or in files of `directory`."""

    def __init__(self, place: str | None = None, directory: str | Path | None = None):
        if place not in PLACES:
            raise ValueError(f"states place {place!r}: one of {PLACES}")
        if place == "disk" and directory is None:
            raise ValueError("a disk state store needs a directory")
        self.place, self.directory = place, Path(directory) if directory is not None else None
        self._held: dict[str, list[torch.Tensor]] = {}

    def put(self, key: str, tensors: list[torch.Tensor]) -> None:
        if self.place == "disk":
            _save_whole(list(tensors), self.directory / f"{key}.pt")
        elif self.place == "cpu":
            self._held[key] = [t.to("cpu") for t in tensors]
        else:
            self._held[key] = list(tensors)

    def get(self, key: str, device) -> list[torch.Tensor]:
        """The tensors of `key` on `device` (place None: the very tensors put, wherever they are)."""
        if self.place == "disk":
            return torch.load(self.directory / f"{key}.pt", map_location=device, weights_only=True)
        tensors = self._held[key]
        return [t.to(device) for t in tensors] if self.place == "cpu" else tensors


def _save_whole(obj, path: Path) -> None:
    """Written beside and renamed: a file is whole or absent. Not fsynced (unlike the project's results):
    these are scratch files rewritten for every layer, and an fsync per batch and layer adds minutes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def state_store(config: StatesConfig):
    """A StateStore for the block; a temporary disk directory is removed on exit, a configured one kept."""
    if config.place != "disk":
        yield StateStore(config.place)
        return
    if config.directory is not None:
        directory = Path(config.directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        yield StateStore("disk", directory)
        return
    root = Path(config.scratch_root) if config.scratch_root else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="states-", dir=root)
    try:
        yield StateStore("disk", directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
