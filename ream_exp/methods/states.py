"""Where the layer-wise driver keeps the calibration hidden states between decoder layers.

    calib.states_device: null     # on the model's execution device (fastest; what fits on one GPU)
    calib.states_device: cpu      # in CPU memory, each batch moved to the device while its layer runs
    calib.states_device: disk     # one file per batch under calib.states_dir (default: a temporary
                                  # directory under cache_dir, removed at the end)

A states_dir that is kept (set explicitly) also serves a streamed run's resume (model.stream=true):
after each decoder layer is written, manifest.json records whose states the files are (the config's
digest, the streamed output's run id) and at which layer boundary, with each file's size. Any write to
the store first removes the manifest, so a manifest present means every file is whole and at that
boundary; a relaunch that finds it matching (every file there, of its recorded size, and opening as a
saved tensor list) reads the states instead of running the finished layers again. The batch files are
renamed into place but not fsynced: a killed process leaves them whole, an operating-system crash may
not (delete states_dir after one).

The states are kept in the model's dtype, exactly as the decoder layers return them (a 2M-token
calibration of a 2048-wide model is 8 GB in bf16), and every copy is exact (`Tensor.to`, torch.save),
so the plans are the same bits wherever they wait. A store holds lists of tensors by key; it does not
know what they are (capture.BatchState does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write

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


MANIFEST = "manifest.json"


class StateStore:
    """Lists of tensors by key: held as given (place None), in CPU memory, or in files of `directory`
    (`kept`: a directory that outlives the run, whose files a manifest can vouch for)."""

    def __init__(self, place: str | None = None, directory: str | Path | None = None, kept: bool = False):
        if place not in PLACES:
            raise ValueError(f"states place {place!r}: one of {PLACES}")
        if place == "disk" and directory is None:
            raise ValueError("a disk state store needs a directory")
        self.place, self.directory = place, Path(directory) if directory is not None else None
        self.kept = kept and place == "disk"
        self._held: dict[str, list[torch.Tensor]] = {}
        self._sealed = self.kept and (self.directory / MANIFEST).exists()

    def put(self, key: str, tensors: list[torch.Tensor]) -> None:
        if self.place == "disk":
            if self._sealed:  # from now on the files are no longer what the manifest says
                (self.directory / MANIFEST).unlink(missing_ok=True)
                self._sealed = False
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


    # ---- the manifest of a kept directory ---------------------------------------------------------
    def _sizes(self, keys) -> dict[str, int] | None:
        try:
            return {k: (self.directory / f"{k}.pt").stat().st_size for k in keys}
        except OSError:
            return None

    def seal(self, owner: dict, keys: list[str]) -> None:
        """Record that the files of `keys` are whole and are what `owner` says (no-op unless kept)."""
        if not self.kept:
            return
        text = json.dumps({"owner": owner, "files": self._sizes(keys)}, sort_keys=True).encode()
        atomic_write(self.directory / MANIFEST, lambda f: f.write(text))
        self._sealed = True

    def sealed_for(self, owner: dict) -> list[str] | None:
        """The keys the manifest vouches for when it was sealed for exactly `owner` and every file is
        there with its recorded size; None otherwise (no manifest, another run, another boundary)."""
        if not self.kept:
            return None
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("owner") != owner:
            return None
        files = manifest.get("files")
        if not isinstance(files, dict) or not files or self._sizes(files) != files:
            return None
        for key in files:  # each file opens as what torch.save wrote (structure only: memory-mapped)
            try:
                torch.load(self.directory / f"{key}.pt", mmap=True, weights_only=True)
            except Exception:
                return None
        return sorted(files)


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
        yield StateStore("disk", directory, kept=True)
        return
    root = Path(config.scratch_root) if config.scratch_root else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="states-", dir=root)
    try:
        yield StateStore("disk", directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
