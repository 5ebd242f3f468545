"""A compression plan: per MoE layer, which experts survive and what is merged into them.

A plan is plain data (JSON-able) so it can be saved as plan.json, diffed between methods and tested on
its own. Methods make plans; `ream_exp.moe.surgery.apply_plan` is the one place that changes a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_torch_save, atomic_write


def experts_to_keep(num_experts: int, ratio: float) -> int:
    """N' = N - round(N * ratio) (docs/algorithms.md), rounding halves up so 0.5 never rounds to even."""
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
    # The merge operator and its settings, {"op": "ties", "merge_density": 0.2} (docs/algorithms.md, "Merge
    # operators"); None: the weighted average of merge_weights (and no key in plan.json).
    merge: dict | None = None
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
            if layer["merge"] is None:  # plans that average read as before
                layer.pop("merge")
        if self._perms():
            d["perms_file"] = PERMS_FILE  # so a plan.json whose permutations went missing is refused
        return d

    def _perms(self) -> dict[int, dict[int, list[int]]]:
        return {lp.layer: lp.perms for lp in self.layers if lp.perms}

    def save(self, run_dir: str | Path) -> Path:
        """plan.json, and plan_perms.pt beside it when the plan aligns neurons (both written atomically)."""
        path = Path(run_dir) / "plan.json"
        perms = self._perms()
        if perms:  # the permutations first: a plan.json that names them never exists without them
            atomic_torch_save(perms, Path(run_dir) / PERMS_FILE)
        text = json.dumps(self.to_dict(), indent=1).encode()
        atomic_write(path, lambda f: f.write(text))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """plan.json and, when it names one, its permutations file beside it (refused if missing)."""
        path = Path(path)
        d = json.loads(path.read_text())
        named = d.pop("perms_file", None)
        perms_path = path.parent / (named or PERMS_FILE)
        # older plan.json files do not name their permutations file: take it when it lies beside them
        perms = _load_perms(perms_path) if named or perms_path.exists() else {}
        layers = [LayerPlan(**lp) for lp in d.pop("layers")]
        for lp in layers:
            lp.perms = perms.pop(lp.layer, None)
            _check_perms(lp)
        if perms:
            raise ValueError(f"{perms_path} has permutations for layers {sorted(perms)} "
                             f"that {path} does not plan")
        return cls(layers=layers, **d)


PERMS_FILE = "plan_perms.pt"


def _load_perms(path: Path) -> dict[int, dict[int, list[int]]]:
    if not path.exists():
        raise FileNotFoundError(f"{path.parent / 'plan.json'} merges with neuron permutations, but {path} is "
                                "missing; copy it next to plan.json (a plan without them would merge unaligned)")
    import torch

    return torch.load(path, weights_only=True)


def _check_perms(lp: LayerPlan) -> None:
    """Every permutation belongs to a non-centroid member of this layer's groups."""
    if not lp.perms:
        return
    members = {j for g in (lp.groups or []) for j in g[1:]}
    stray = sorted(set(lp.perms) - members)
    if stray:
        raise ValueError(f"layer {lp.layer}: permutations for experts {stray}, which no group merges")
