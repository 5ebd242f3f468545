"""Compress a model larger than memory: the checkpoint streams through, one decoder layer at a time.

    model.stream=true

`LayerStream.open` builds the model on the meta device and materialises only what the current step
needs: the embeddings (and the rotary tables, computed as `from_pretrained` computes them) to capture
decoder layer 0's inputs, then each decoder layer in turn, read from the source safetensors shards (that
layer's keys only) and converted to the model's parameter names by transformers' own conversion mapping
(per-expert checkpoint tensors fused into `gate_up_proj`, Mixtral's renamed blocks, ...). When the
layer-wise driver is done with a layer (observed, compressed, propagated), `finished` writes it to
checkpoint.partial/ as a shard of its own, in the format `save_pretrained` writes (the reverse
conversion), atomically (temp file + os.replace), and puts the layer back on the meta device. Embeddings,
final norm and head are copied last; `save` writes the index, config.json with its provenance, the
tokenizer and the plan, then renames checkpoint.partial/ to checkpoint/.

Resume: checkpoint.partial/progress.json names the config's digest, a run id and the decoder layers
written so far; each written MoE layer's LayerPlan lies beside it (plans/). A relaunch with the same
config keeps them: the driver reads the calibration hidden states at the boundary from a kept
calib.states_dir when its manifest names this run and this boundary (methods/states.py), else
recomputes them by running the finished layers, the compressed ones read back from their shards
(sequential), the original ones with the observing forward (non-sequential, whose propagation used
it), and continues with the first layer not written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import uuid
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_torch_save, atomic_write
from .checkpoint import write_provenance
from .weight_files import BITS
from .config import ConfigError
from .moe import apply_layer_plan, decoder_layers, keep_experts, moe_layers
from .plan import LayerPlan

PARTIAL = "checkpoint.partial"  # the streamed output while it is being written (kept across relaunches)
PROGRESS = "progress.json"
PLANS = "plans"
INDEX = "model.safetensors.index.json"
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---- settings, checked before any weights load ------------------------------------------------------

def check_stream(cfg, model_config) -> bool:
    """Whether this run streams (model.stream); a ConfigError for settings streaming cannot honour."""
    stream = cfg.model.get("stream", False)
    if not isinstance(stream, bool):
        raise ConfigError(f"model.stream={stream!r} must be true or false")
    if not stream:
        return False
    if not cfg.save:
        raise ConfigError("model.stream=true writes the compressed model layer by layer into checkpoint/; "
                          "it needs save=true")
    if cfg.model.get("device_map"):
        raise ConfigError(f"model.stream=true loads one decoder layer at a time itself; set model.device_map=null "
                          f"(got {cfg.model.device_map!r})")
    if getattr(model_config, "quantization_config", None):
        raise ConfigError("model.stream=true reads plain (unquantised) safetensors weights; this checkpoint is "
                          "quantised: set model.stream=false")
    path = Path(str(cfg.model.path)).expanduser()
    if path.is_dir() and not ((path / INDEX).is_file() or (path / "model.safetensors").is_file()):
        raise ConfigError(f"model.stream=true reads safetensors shards; {path} has neither model.safetensors "
                          f"nor {INDEX}")
    return True


def resumable(partial: Path, digest: str) -> bool:
    """Whether `partial` is the streamed output of an unfinished run of this very config."""
    try:
        progress = json.loads((partial / PROGRESS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(progress, dict) and progress.get("config") == digest


# ---- the source checkpoint ---------------------------------------------------------------------------

def _source_dir(model_cfg) -> Path:
    path = Path(str(model_cfg.path)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # a hub id: its files on local disk, read shard by shard

    return Path(snapshot_download(str(model_cfg.path), revision=model_cfg.get("revision"),
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


def _key_files(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the shard that holds it."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / v for k, v in weight_map.items()}
    from safetensors import safe_open

    single = directory / "model.safetensors"
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _layer_of(key: str) -> int | None:
    m = _LAYER_KEY.search(key)
    return int(m.group(1)) if m else None


def _model_dtype(model_cfg, config) -> torch.dtype:
    name = model_cfg.get("dtype", "float32")
    if name == "auto":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        return saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved))
    return getattr(torch, name)


def meta_model(model_cfg, source: Path):
    """The CausalLM of `source` on the meta device, in the run's dtype, with its generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    trust = bool(model_cfg.get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    dtype = _model_dtype(model_cfg, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust).eval()
    if (source / "generation_config.json").is_file():  # as from_pretrained reads it
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model, dtype


# ---- the stream --------------------------------------------------------------------------------------

def _is_meta(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type == "meta"


class LayerStream:
    """The model of a streamed run: meta skeleton plus the one decoder layer in memory; see the module doc."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, source: Path, out: Path, device: str, digest: str):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model, self.dtype, self.source, self.out, self.device = model, dtype, source, out, device
        self.digest = digest
        self.keys = _key_files(source)
        self.mapping = get_model_conversion_mapping(model)  # the same list from_pretrained would use
        self.layers = decoder_layers(model)
        self.moe = {l.index: l for l in moe_layers(model)}
        self.names = {id(m): n for n, m in model.named_modules()}
        self.written: dict[int, str] = {}  # decoder layer -> its shard's file name
        self.plans: dict[int, LayerPlan] = {}  # finished MoE layers' plans
        self.compressed_shape: set[int] = set()  # meta layers already given their compressed shape
        self.run_id = uuid.uuid4().hex  # names this streamed output (kept by a resume)
        self._resume()
        self.load_rest()

    @classmethod
    def open(cls, model_cfg, device: str, run_dir: Path, digest: str) -> "LayerStream":
        source = _source_dir(model_cfg)
        model, dtype = meta_model(model_cfg, source)
        return cls(model, dtype, source, Path(run_dir) / PARTIAL, device, digest)

    # ---- resume ---------------------------------------------------------------------------------------
    def _resume(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if not resumable(self.out, self.digest):  # a fresh start (finished_run set other leftovers aside)
            self._save_progress()
            return
        progress = json.loads((self.out / PROGRESS).read_text())
        self.run_id = str(progress.get("run") or self.run_id)
        for i, name in sorted((int(i), n) for i, n in progress["layers"].items()):
            if i != len(self.written) or not (self.out / name).is_file():
                break  # layers are written in order; anything after a gap is redone
            if i in self.moe:
                plan_file = self.out / PLANS / f"layer-{i:05d}.pt"
                if not plan_file.is_file():
                    break
                self.plans[i] = LayerPlan(**torch.load(plan_file, weights_only=True))
            self.written[i] = name
        self._save_progress()

    def _save_progress(self) -> None:
        text = json.dumps({"config": self.digest, "run": self.run_id, "source": str(self.source),
                           "layers": {str(i): n for i, n in self.written.items()}}, indent=1).encode()
        atomic_write(self.out / PROGRESS, lambda f: f.write(text))

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

    # ---- reading ----------------------------------------------------------------------------------------
    def _load(self, keys: list[str], files: dict[str, Path]) -> None:
        """Read `keys` from their shards into the model (converted as from_pretrained converts them)."""
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from transformers.utils import logging as hf_logging

        with contextlib.ExitStack() as stack:
            if hf_logging.is_progress_bar_enabled():  # one "Loading weights" bar per layer says nothing
                hf_logging.disable_progress_bar()
                stack.callback(hf_logging.enable_progress_bar)
            handles = {f: stack.enter_context(safe_open(f, "pt")) for f in sorted({files[k] for k in keys})}
            tensors = {k: handles[files[k]].get_slice(k) for k in keys}
            config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, weight_mapping=self.mapping)
            convert_and_load_state_dict_in_model(self.model, tensors, config)
        self._own_storage()

    def _own_storage(self) -> None:
        """Give every loaded tensor that still lies in a memory-mapped shard (the ones loading did not
        convert or move: attention, norms, router on CPU) a copy of its own. Such a tensor's storage is
        the mapping's memory (not torch's, so not resizable) and keeps the whole mapping alive, with the
        shard's pages read so far (the experts' too, though fusing copied them): resident memory that
        would stay until the layer is freed."""
        for t in self.model.state_dict(keep_vars=True).values():
            if t is not None and not _is_meta(t) and not t.untyped_storage().resizable():
                t.data = t.data.clone()

    def _check_loaded(self, selected) -> None:
        """Every tensor of the model entries `selected(name)` is real after loading: non-persistent buffers
        (rotary tables) are computed as from_pretrained computes them; a tensor missing from the checkpoint
        is an error."""
        for name, t in self.model.state_dict(keep_vars=True).items():
            if selected(name) and _is_meta(t):
                raise ValueError(f"model.stream=true: {self.source} has no tensor for {name}; streaming needs "
                                 "every weight in the checkpoint (from_pretrained would initialise it)")
        for path, owner in self.model.named_modules():
            meta = [n for n, b in owner._buffers.items() if _is_meta(b) and selected(f"{path}.{n}")]
            if not meta:
                continue
            if "RotaryEmbedding" not in type(owner).__name__:
                raise ValueError(f"model.stream=true cannot compute buffer(s) {meta} of {type(owner).__name__}")
            for n in meta:
                owner._buffers[n] = torch.empty_like(owner._buffers[n], device=self.device)
            self.model._init_weights(owner)

    def load_rest(self) -> None:
        """Embeddings, final norm, head and rotary tables: everything outside the decoder layers."""
        rest = [k for k in self.keys if _layer_of(k) is None]
        self._load(rest, self.keys)
        self.model.tie_weights()
        self._check_loaded(lambda name: _layer_of(name) is None)

    def free_rest(self) -> None:
        """Back to meta: what only capturing layer 0's inputs needed (buffers stay: they are tiny)."""
        for name, p in _rest_parameters(self.model, self.layers):
            _to_meta(self.model, name, p)

    def load(self, index: int) -> None:
        """Decoder layer `index` from the source checkpoint (no-op when it is in memory)."""
        layer = self.layers[index]
        if not any(_is_meta(p) for p in layer.parameters()):
            return
        keys = [k for k in self.keys if _layer_of(k) == index]
        self._load(keys, self.keys)
        self._check_loaded(lambda name: _layer_of(name) == index)

    def load_written(self, index: int) -> None:
        """Decoder layer `index` as written (compressed) by an earlier attempt, read back from its shard."""
        self._compressed_skeleton(index)
        shard = self.out / self.written[index]
        from safetensors import safe_open

        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
        self._load(keys, {k: shard for k in keys})
        self._check_loaded(lambda name: _layer_of(name) == index)

    def _compressed_skeleton(self, index: int) -> None:
        """Give a finished MoE layer's meta skeleton its compressed shape (slicing meta tensors: the shape
        is all a meta tensor has, merges change values only)."""
        if index in self.plans and index not in self.compressed_shape:
            keep_experts(self.moe[index], self.plans[index].keep)
            self.compressed_shape.add(index)

    def release(self, index: int) -> None:
        """Decoder layer `index` back to meta (its compressed shape kept for the final parameter count)."""
        layer = self.layers[index]
        prefix = self.names[id(layer)]
        for name, p in list(layer.named_parameters()) + list(layer.named_buffers()):
            _to_meta(self.model, f"{prefix}.{name}", p)
        self._compressed_skeleton(index)
        _return_freed_memory()

    @contextlib.contextmanager
    def capturing(self):
        """Embeddings in memory while the driver captures decoder layer 0's inputs, then back to meta."""
        if any(_is_meta(p) for _, p in _rest_parameters(self.model, self.layers)):
            self.load_rest()
        try:
            yield
        finally:
            self.free_rest()

    # ---- writing ----------------------------------------------------------------------------------------
    def _state_dict(self, keep) -> dict[str, torch.Tensor]:
        """The tensors save_pretrained would write for the model's entries selected by `keep(name)`."""
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = {k: v for k, v in self.model.state_dict().items() if keep(k)}
        for ignored in self.model._keys_to_ignore_on_save or ():
            state.pop(ignored, None)
        state = remove_tied_weights_from_state_dict(state, self.model)
        self.model._weight_conversions = [c for c in self.mapping if c.was_used()]  # as after from_pretrained
        return {k: v.contiguous() for k, v in revert_weight_conversion(self.model, state).items()}

    def _write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.out / name
        tmp = path.with_name(f".{name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{len(self.layers) + 1:05d}.safetensors"

    def finished(self, index: int, plan: LayerPlan | None = None) -> None:
        """Write decoder layer `index` (compressed as planned) as its own shard, record it, free it."""
        prefix = self.names[id(self.layers[index])] + "."
        name = self.shard_name(index)
        self._write_shard(name, self._state_dict(lambda k: k.startswith(prefix)))
        if plan is not None:
            atomic_torch_save(_plan_state(plan), self.out / PLANS / f"layer-{index:05d}.pt")
            self.plans[index] = plan
            self.compressed_shape.add(index)
        self.written[index] = name
        self._save_progress()
        self.release(index)

    def complete(self, plans: list[LayerPlan]) -> None:
        """Every decoder layer not written yet: loaded, compressed by its (unapplied) plan, written."""
        by_layer = {lp.layer: lp for lp in plans}
        for i in range(len(self.layers)):
            if self.done(i):
                self._compressed_skeleton(i)
                continue
            self.load(i)
            lp = by_layer.get(i)
            if lp is not None:
                apply_layer_plan(self.moe[i], lp)
            self.finished(i, lp)

    def save(self, tokenizer, directory: Path, cfg, plan, experts_before: int, calibrated: bool = True) -> None:
        """The rest (embeddings, norm, head), index, config.json, tokenizer, plan and provenance; then the
        partial folder becomes `directory` (refused if it exists: nothing already written is replaced)."""
        directory = Path(directory)
        if directory.exists():
            raise FileExistsError(f"{directory} exists; the streamed checkpoint is not written over it")
        self.load_rest()
        rest = self.shard_name(len(self.layers))
        self._write_shard(rest, self._state_dict(lambda k: _layer_of(k) is None))
        self.free_rest()
        self._write_index(rest)
        model = self.model
        model.config.dtype = str(self.dtype).split(".")[1]  # what save_pretrained records
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(self.out)
        if model.can_generate():
            model.generation_config.save_pretrained(self.out)
        write_provenance(model, tokenizer, self.out, cfg, plan, experts_before, calibrated)
        (self.out / PROGRESS).unlink()
        for f in (self.out / PLANS).glob("*.pt"):
            f.unlink()
        if (self.out / PLANS).exists():
            (self.out / PLANS).rmdir()
        os.replace(self.out, directory)

    def _write_index(self, rest: str) -> None:
        from safetensors import safe_open

        weight_map, total = {}, 0
        for name in [*(self.written[i] for i in range(len(self.layers))), rest]:
            with safe_open(self.out / name, "pt") as f:
                for k in f.keys():
                    weight_map[k] = name
                    sl = f.get_slice(k)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        index = {"metadata": {"total_parameters": self.model.num_parameters(), "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(self.out / INDEX, lambda f: f.write(text))


# ---- helpers -----------------------------------------------------------------------------------------

def _plan_state(plan: LayerPlan) -> dict:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: str) -> int:
    return BITS[dtype] // 8


def _rest_parameters(model: nn.Module, layers: nn.ModuleList):
    inside = {id(p) for p in layers.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in inside]


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Hand the heap memory freed with a layer back to the operating system (glibc's malloc_trim; a no-op
    without glibc). glibc keeps freed chunks of the sizes a layer allocates for reuse, so without it the
    resident set of a streamed run grows by a fraction of a layer per layer. Values are untouched."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _to_meta(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter/buffer `name` of `model` by a meta tensor of the same shape (frees its memory)."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    meta = torch.empty_like(tensor, device="meta")
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(meta, requires_grad=tensor.requires_grad)
    else:
        module._buffers[attr] = meta


class InMemory:
    """The driver's view of a model held in memory whole: nothing to load, write or resume."""

    def done(self, index: int) -> bool:
        return False

    def boundary(self) -> int:
        return 0

    def states_owner(self, boundary: int) -> None:
        return None  # nothing to resume: kept states are never read back

    def load(self, index: int) -> None:
        pass

    def finished(self, index: int, plan: LayerPlan | None = None) -> None:
        pass

    load_written = release = load

    def complete(self, plans) -> None:
        pass

    @contextlib.contextmanager
    def capturing(self):
        yield

