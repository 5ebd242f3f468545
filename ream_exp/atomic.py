"""Atomic file writes: results and cache entries are either whole or absent, never half-written.

A unique temporary file in the target's directory (so concurrent jobs of a sweep never share one),
flushed and fsynced, then os.replace'd onto the final name. `write_json` writes a JSON file so
(metrics.json, identity.json, cached scores).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a temporary file and move it onto `path` once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: Path, data) -> None:
    """Write atomically: a crash mid-write never leaves a truncated results file."""
    text = json.dumps(data, indent=1, default=float).encode()
    atomic_write(path, lambda f: f.write(text))
