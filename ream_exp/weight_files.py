"""The checkpoint's safetensors files, checked from their headers before anything is loaded.

    check_weight_files(model_cfg)     # ConfigError naming the file, else None
    with ShardReader(path) as shard:  # one tensor at a time, read into a tensor of the caller's
        shard.read_into(name, out)

Each file is opened with the safetensors library, as from_pretrained opens it: that parses its header and
refuses a file whose header is not JSON, whose tensors' byte ranges do not cover the data exactly, or
whose tensor sizes disagree with their dtype and shape, without reading any tensor. A refusal is said in
one line with the numbers behind it (`refusal`). A sharded checkpoint's model.safetensors.index.json must
name shards that exist. Hub ids are checked where their files are already in the local hub cache.
`ShardReader` reads one tensor's bytes with plain file reads (no memory mapping, so the pages read are the
page cache's, not the process's) into a tensor the caller allocated, converting its dtype on the way a
bounded piece at a time (`CONVERT_CHUNK` bytes of the file), so that converting a tensor holds no second
copy of it; `shard.lazy(name, dtype)` is a tensor read only when indexed (`t[...]`), as a safetensors
slice is, for transformers' loading.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "E8M0": 8, "U16": 16, "I16": 16,
        "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64, "C64": 64,
        "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}  # bits per element of each safetensors dtype


def check_safetensors(path: Path) -> None:
    """The file as the safetensors library opens it (header parsed and checked; no tensor read)."""
    try:
        with safe_open(str(path), "pt"):
            pass
    except OSError as exc:
        raise ConfigError(f"weight file {path} cannot be read ({exc.strerror or exc})") from None
    except SafetensorError as exc:
        raise ConfigError(f"weight file {path} {refusal(path, exc)}") from None


def refusal(path: Path, exc: Exception) -> str:
    """Why the library refused the file, with the byte counts that say what is wrong where the header reads.

    The library's reason names neither the bytes a truncated file lacks nor the tensor whose size is off,
    and it does not expose the header's data_offsets (safe_open gives names, dtypes and shapes only, and
    only of a file it accepts): those come from reading the header here."""
    reason = str(exc).removeprefix("Error while deserializing header: ")
    size = path.stat().st_size
    read = _raw_header(path, size)
    if read is None:
        return f"is truncated or not a safetensors file ({size} bytes): {reason}"
    header_len, header = read
    data_size = size - 8 - header_len
    last = max(header, key=lambda name: header[name][2][1], default=None)
    if last is not None and header[last][2][1] > data_size:
        begin, end = header[last][2]
        return (f"is truncated: tensor {last!r} lies at bytes {begin}..{end} of the data, but the file holds only "
                f"{data_size} data bytes")
    for name, (dtype, shape, (begin, end)) in header.items():
        bits = BITS.get(dtype)
        if bits is not None and (end - begin) * 8 != math.prod(shape) * bits:
            return (f"is not a valid safetensors file: tensor {name!r} ({dtype} {shape}) needs "
                    f"{math.prod(shape) * bits // 8} bytes, but its data_offsets span {end - begin}")
    return f"is not a valid safetensors file: {reason}"


def _raw_header(path: Path, size: int) -> tuple[int, dict] | None:
    """The header's length and {tensor: (dtype, shape, (begin, end))} as the file's first bytes give them
    (an 8-byte little-endian length, then a JSON object; offsets count from the header's end); None where
    they do not."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER, size - 8):
            return None
        try:
            raw = json.loads(f.read(header_len))
            tensors = {name: (info["dtype"], [int(n) for n in info["shape"]],
                              (int(info["data_offsets"][0]), int(info["data_offsets"][1])))
                       for name, info in raw.items() if name != "__metadata__"}
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
    return header_len, tensors


def _shards(directory: Path) -> list[Path]:
    """The weight files a checkpoint directory loads from; [] when it has no safetensors weights."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{index} is not a safetensors index (no weight_map: {exc})") from None
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ConfigError(f"{index} names weight file(s) that do not exist: {', '.join(missing)}")
        return shards
    return [directory / SINGLE] if (directory / SINGLE).is_file() else []


def _cached_hub_shards(repo_id: str, revision: str | None) -> list[Path]:
    """The safetensors files of a hub model already in the local hub cache (the rest is not read yet)."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for filename in (INDEX, SINGLE):
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):
            found.append(Path(cached))
    if not found:
        return []
    if found[0].name == INDEX:  # only the shards that are cached; from_pretrained fetches the others
        weight_map = json.loads(found[0].read_text()).get("weight_map", {})
        paths = (try_to_load_from_cache(repo_id, name, revision=revision) for name in sorted(set(weight_map.values())))
        return [Path(p) for p in paths if isinstance(p, str)]
    return found


def check_weight_files(model_cfg) -> None:
    """Every safetensors file the model would load, checked from its header (before any weights load)."""
    path = Path(str(model_cfg.path)).expanduser()
    if path.is_dir():
        shards = _shards(path)
    else:
        try:
            shards = _cached_hub_shards(str(model_cfg.path), model_cfg.get("revision"))
        except (ValueError, OSError):  # not a valid repo id, or an unreadable cache: from_pretrained will say
            shards = []
    for shard in shards:
        check_safetensors(shard)


# ---- reading one tensor ------------------------------------------------------------------------------

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


CONVERT_CHUNK = 64 * 2**20  # file bytes read and converted at a time (a tensor converted on reading)


class ShardReader:
    """One safetensors file, read tensor by tensor with plain file reads (see the module doc). Reads may come
    from several threads (transformers' loading materialises tensors in a thread pool)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        read = _raw_header(self.path, self.path.stat().st_size)
        if read is None:
            raise ValueError(f"{self.path} is truncated or not a safetensors file")
        header_len, self.header = read  # {name: (dtype, shape, (begin, end))}
        self.data_start = 8 + header_len
        self.file = self.path.open("rb")
        self._lock = threading.Lock()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def shape(self, name: str) -> list[int]:
        return list(self.header[name][1])

    def dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self.header[name][0]]

    def _read(self, name: str, begin: int, target: torch.Tensor) -> None:
        """The file's data bytes from `begin` on, as many as the contiguous CPU tensor `target` holds, into it."""
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        with self._lock:
            self.file.seek(self.data_start + begin)
            got = self.file.readinto(view)
        if got != len(view):
            raise ValueError(f"{self.path} is truncated: tensor {name!r} could not be read whole")

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Tensor `name` copied into `out` (same shape; any dtype and device: converted as `Tensor.copy_`
        converts). Read straight into `out` when it is a contiguous CPU tensor of the file's dtype; into a
        contiguous `out` of another dtype or device through a buffer of at most CONVERT_CHUNK bytes, one
        piece after the other (elementwise, so the same values as converting the whole); else through a
        buffer of one tensor's bytes."""
        file_dtype, file_shape, (begin, end) = self.header[name]
        dtype, shape = TORCH_DTYPES[file_dtype], tuple(file_shape)
        if tuple(out.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {list(shape)}, not {list(out.shape)}")
        if end - begin != out.numel() * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, not {list(shape)} of {dtype}")
        if out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
            self._read(name, begin, out)
            return
        if not out.is_contiguous():
            buffer = torch.empty(shape, dtype=dtype)
            self._read(name, begin, buffer)
            out.copy_(buffer)
            return
        flat, numel = out.view(-1), out.numel()
        step = max(1, CONVERT_CHUNK // dtype.itemsize)
        buffer = torch.empty(min(step, numel), dtype=dtype)
        for first in range(0, numel, step):
            piece = buffer[:min(step, numel - first)]
            self._read(name, begin + first * dtype.itemsize, piece)
            flat[first:first + len(piece)].copy_(piece)

    def lazy(self, name: str, dtype: torch.dtype | None = None) -> "LazyTensor":
        return LazyTensor(self, name, dtype)


class LazyTensor:
    """Tensor `name` of a shard, read when indexed (`t[...]`: a new CPU tensor in `dtype`, by default the
    file's), as a safetensors slice is read; the reader must be open then."""

    def __init__(self, reader: ShardReader, name: str, dtype: torch.dtype | None = None):
        self.reader, self.name = reader, name
        self.dtype = dtype or reader.dtype(name)

    def get_shape(self) -> list[int]:
        return self.reader.shape(self.name)

    def get_dtype(self) -> str:
        return self.reader.header[self.name][0]

    def __getitem__(self, index) -> torch.Tensor:
        out = torch.empty(self.get_shape(), dtype=self.dtype)
        self.reader.read_into(self.name, out)
        return out if index is Ellipsis else out[index]
