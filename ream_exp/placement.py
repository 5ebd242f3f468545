"""Where a model's weights go: the device a run uses, and the accelerate placement from_pretrained gets
(model.device_map, model.max_memory, model.offload_folder, or a scratch offload folder in the run
directory when the map may send weights to disk)."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def max_memory_map(max_memory) -> dict:
    """model.max_memory as accelerate takes it: GPU ordinals as ints ("0" or 0), "cpu", "mps", "disk"."""
    plain = OmegaConf.to_container(max_memory, resolve=True) if isinstance(max_memory, DictConfig) else max_memory
    return {int(k) if str(k).isdigit() else str(k): v for k, v in dict(plain).items()}


def may_offload_to_disk(device_map) -> bool:
    """Whether accelerate may put weights on disk: a map naming "disk", or one it computes (auto, ...)."""
    if isinstance(device_map, str):
        return True
    plain = OmegaConf.to_container(device_map, resolve=True) if isinstance(device_map, DictConfig) else device_map
    return "disk" in dict(plain).values()


def placement_kwargs(model_cfg: DictConfig, offload_folder: str | Path | None = None) -> dict:
    """from_pretrained's device_map, max_memory and offload_folder (model.offload_folder, else the
    `offload_folder` given, used only when the map may send weights to disk); {} without a device_map."""
    device_map = model_cfg.get("device_map")
    if not device_map:
        return {}
    kwargs = {"device_map": OmegaConf.to_container(device_map, resolve=True) if isinstance(device_map, DictConfig)
              else device_map}
    if model_cfg.get("max_memory"):
        kwargs["max_memory"] = max_memory_map(model_cfg.max_memory)
    folder = model_cfg.get("offload_folder") or (offload_folder if may_offload_to_disk(device_map) else None)
    if folder:
        kwargs["offload_folder"] = str(Path(str(folder)).expanduser())
    return kwargs


@contextmanager
def offload_scratch(model_cfg: DictConfig, run_dir: Path):
    """The default offload folder of a run whose device map may send weights to disk: a fresh directory
    in the run directory, removed when the run ends (None when model.offload_folder is set or no disk)."""
    device_map = model_cfg.get("device_map")
    if model_cfg.get("offload_folder") or not device_map or not may_offload_to_disk(device_map):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="offload-", dir=run_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
