"""checkpoint.partial/: the output of a streamed run (model.stream=true), written one decoder layer at a time.

    partial = PartialCheckpoint(run_dir / PARTIAL, digest, source, moe_layers)   # resumes what it finds
    partial.write_shard(name, tensors); partial.record(index, name, plan)       # one finished layer
    partial.write_index(shards, total_parameters); partial.finish(run_dir / "checkpoint")

Each decoder layer is a shard of its own, in the format `save_pretrained` writes, written atomically
(temp file + os.replace). progress.json names the config's digest, a run id and the decoder layers
written so far; each written MoE layer's LayerPlan lies beside it (plans/). A relaunch with the same
config keeps them (`resumable`): layers are written in order, so what follows a gap is redone. The
streamed layer source that fills this folder is methods/layer_stream.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import torch

from .atomic import atomic_torch_save, atomic_write
from .plan import LayerPlan
from .weight_files import BITS, INDEX

PARTIAL = "checkpoint.partial"  # the streamed output while it is being written (kept across relaunches)
PROGRESS = "progress.json"
PLANS = "plans"


def resumable(partial: Path, digest: str) -> bool:
    """Whether `partial` is the streamed output of an unfinished run of this very config."""
    try:
        progress = json.loads((partial / PROGRESS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(progress, dict) and progress.get("config") == digest


class PartialCheckpoint:
    """checkpoint.partial/ of one run: its shards, its progress record and the finished MoE layers' plans."""

    def __init__(self, path: Path, digest: str, source: Path, moe: set[int]):
        self.path, self.digest, self.source = Path(path), digest, source
        self.written: dict[int, str] = {}  # decoder layer -> its shard's file name
        self.plans: dict[int, LayerPlan] = {}  # finished MoE layers' plans
        self.run_id = uuid.uuid4().hex  # names this streamed output (kept by a resume)
        self._resume(moe)

    # ---- resume ---------------------------------------------------------------------------------------
    def _resume(self, moe: set[int]) -> None:
        """Keep the layers an earlier attempt of this config wrote (`moe`: the MoE layers, which need a plan)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not resumable(self.path, self.digest):  # a fresh start (finished_run set other leftovers aside)
            self._save_progress()
            return
        progress = json.loads((self.path / PROGRESS).read_text())
        self.run_id = str(progress.get("run") or self.run_id)
        for i, name in sorted((int(i), n) for i, n in progress["layers"].items()):
            if i != len(self.written) or not (self.path / name).is_file():
                break  # layers are written in order; anything after a gap is redone
            if i in moe:
                plan_file = self.path / PLANS / f"layer-{i:05d}.pt"
                if not plan_file.is_file():
                    break
                self.plans[i] = LayerPlan(**torch.load(plan_file, weights_only=True))
            self.written[i] = name
        self._save_progress()

    def _save_progress(self) -> None:
        text = json.dumps({"config": self.digest, "run": self.run_id, "source": str(self.source),
                           "layers": {str(i): n for i, n in self.written.items()}}, indent=1).encode()
        atomic_write(self.path / PROGRESS, lambda f: f.write(text))

    def done(self, index: int) -> bool:
        """Whether decoder layer `index` is written (in this attempt or an earlier one)."""
        return index in self.written

    def plan_of(self, index: int) -> LayerPlan:
        return self.plans[index]

    def boundary(self) -> int:
        """The first decoder layer not written (the written ones are always 0..boundary-1)."""
        return len(self.written)

    def states_owner(self, boundary: int) -> dict:
        """Whose calibration hidden states a kept states_dir holds at `boundary` (see methods/states.py)."""
        return {"config": self.digest, "run": self.run_id, "boundary": int(boundary)}

    # ---- writing ----------------------------------------------------------------------------------------
    def write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.path / name
        tmp = path.with_name(f".{name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def record(self, index: int, name: str, plan: LayerPlan | None = None) -> None:
        """Decoder layer `index` is written as shard `name` (a MoE layer with its plan): saved in progress.json."""
        if plan is not None:
            atomic_torch_save(_plan_state(plan), self.path / PLANS / f"layer-{index:05d}.pt")
            self.plans[index] = plan
        self.written[index] = name
        self._save_progress()

    def write_index(self, shards: list[str], total_parameters: int) -> None:
        """model.safetensors.index.json over `shards` (every tensor of each, read from its header)."""
        from safetensors import safe_open

        weight_map, total = {}, 0
        for name in shards:
            with safe_open(self.path / name, "pt") as f:
                for k in f.keys():
                    weight_map[k] = name
                    sl = f.get_slice(k)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(self.path / INDEX, lambda f: f.write(text))

    def finish(self, directory: Path) -> None:
        """The progress record and plans removed, the folder renamed to `directory` (the finished checkpoint)."""
        (self.path / PROGRESS).unlink()
        for f in (self.path / PLANS).glob("*.pt"):
            f.unlink()
        if (self.path / PLANS).exists():
            (self.path / PLANS).rmdir()
        os.replace(self.path, directory)


def _plan_state(plan: LayerPlan) -> dict:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: str) -> int:
    return BITS[dtype] // 8
