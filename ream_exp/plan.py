"""A compression plan: per MoE layer, which experts survive and what is merged into them.

A plan is plain data (JSON-able) so it can be saved as plan.json, diffed between methods and tested on
its own. Methods make plans; `ream_exp.moe.surgery.apply_plan` is the one place that changes a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


def experts_to_keep(num_experts: int, ratio: float) -> int:
    """N' = N - round(N * ratio) (SPEC 1), rounding halves up so 0.5 never rounds to even."""
    return num_experts - int(math.floor(num_experts * ratio + 0.5))


@dataclass
class LayerPlan:
    layer: int  # decoder layer index
    num_experts: int  # N before compression
    keep: list[int]  # surviving experts, in their new order
    # groups[i] lists the experts merged into keep[i] (centroid first); None = plain pruning.
    groups: list[list[int]] | None = None
    merge_weights: list[list[float]] | None = None
    # Merging methods: the expert whose router row survives for each group (= groups[i][0] = keep[i]).
    centroids: list[int] | None = None
    saliency: list[float] | None = None  # the per-expert score the method ranked by
    scores: dict[str, list[float]] = field(default_factory=dict)  # other statistics worth keeping
    # Neuron permutations for merging: perms[member] = order of member's neurons matched to its centroid.
    # Large, so kept out of plan.json (saved next to it as plan_perms.pt).
    perms: dict[int, list[int]] | None = field(default=None, repr=False)
    applied: bool = False  # set by surgery; sequential methods apply layers as they go

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [e for e in range(self.num_experts) if e not in kept]


@dataclass
class Plan:
    method: str
    ratio: float
    layers: list[LayerPlan]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for layer in d["layers"]:
            layer.pop("perms")
            layer.pop("applied")
        return d

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / "plan.json"
        path.write_text(json.dumps(self.to_dict(), indent=1))
        perms = {lp.layer: lp.perms for lp in self.layers if lp.perms}
        if perms:
            import torch

            torch.save(perms, Path(run_dir) / "plan_perms.pt")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        d = json.loads(Path(path).read_text())
        layers = [LayerPlan(**lp) for lp in d.pop("layers")]
        return cls(layers=layers, **d)
