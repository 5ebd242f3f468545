"""The stages of one run, each a plain function: load, calibrate, compress, save, report."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_write


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


def load_model(model_cfg: DictConfig, device: str, offload_folder: str | Path | None = None):
    """AutoModelForCausalLM + AutoTokenizer from a directory or hub id (after the config was checked).

    With model.device_map, accelerate places the weights (model.max_memory per device; weights sent to
    "disk" go to model.offload_folder, else to `offload_folder`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = model_cfg.get("dtype", "float32")
    kwargs = dict(dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                  trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
                  **placement_kwargs(model_cfg, offload_folder))
    quant = getattr(load_model_config(model_cfg), "quantization_config", None) or {}
    if (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)) == "mxfp4":
        # gpt-oss ships MXFP4 experts; surgery needs the plain fused tensors, so dequantise on load.
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_cfg.path), **kwargs).eval()
    if not model_cfg.get("device_map"):
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_cfg.path), trust_remote_code=kwargs["trust_remote_code"])
    return model, tokenizer


def load_tokenizer(model_cfg: DictConfig):
    """The model's tokenizer alone (no weights): enough to key the calibration cache before loading."""
    from transformers import AutoTokenizer

    trust = bool(model_cfg.get("trust_remote_code"))
    return AutoTokenizer.from_pretrained(str(model_cfg.path), trust_remote_code=trust)


def load_model_config(model_cfg: DictConfig):
    """Only config.json: enough to reject an unsupported architecture or impossible ratio before download."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_cfg.path), trust_remote_code=bool(model_cfg.get("trust_remote_code")))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_json(path: Path, data) -> None:
    """Write atomically: a crash mid-write never leaves a truncated results file."""
    text = json.dumps(data, indent=1, default=float).encode()
    atomic_write(path, lambda f: f.write(text))


def score_table(rows: dict[str, dict]) -> str:
    """A plain text table: one row per model, columns MC / GEN / AVG and each task, in % ("61.0 ± 0.8"
    where the standard error is known)."""
    tasks = sorted({t for r in rows.values() for t in (r.get("tasks") or {})})
    head = ["model", "MC", "GEN", "AVG"] + tasks
    lines = [head]

    def fmt(value, stderr=None):
        if value is None:
            return "-"
        return f"{100 * value:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")

    for name, r in rows.items():
        task = lambda t: (r.get("tasks") or {}).get(t, {})
        lines.append([name] + [fmt(r.get(k), r.get(f"{k}_stderr")) for k in ("mc", "gen", "avg")]
                     + [fmt(task(t).get("score"), task(t).get("stderr")) for t in tasks])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines)
