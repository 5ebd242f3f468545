"""Working buffers of the layer-wise driver, reused batch after batch and layer after layer on a CPU.

    with scratch_buffers():                                   # run_layerwise holds one for the whole run
        gate = scratch("dense.gate", (n, t, i), dtype, device)   # the same memory at every call of that name

A large tensor allocated afresh is mapped afresh by the C allocator (glibc maps each block of 32 MiB or more on
its own and unmaps it when it is freed), so every new one pays a page fault per 4 KiB page on its first write:
at the merge benchmark's parity shape that was about a quarter of REAM's CPU time (docs/benchmarks.md, "Merge
speed"). Inside `scratch_buffers()` the few large tensors of observing and aligning (the dense pass's products,
the kept alignment products, the alignment's blocks and cost operands, the PCA's weight features) come from
buffers that live as long as the block, each name one buffer, grown when a call asks for more. A name's tensor
is valid until the next call of that name: each user takes its names for what it holds at once and no longer.
Outside the block, and on a GPU (whose caching allocator reuses memory already), `scratch` allocates as
torch.empty does. Where the memory comes from never changes what is computed in it.

A lean pool (`scratch_buffers(lean=True)`, a streamed run's: its peak is a layer plus the working set) frees the
buffers a user declares spent (`spent("kept.")`, the kept alignment products before the PCA's copy of the layer),
so they are never alive with what comes next; a plain pool keeps them for the next layer, trading that memory for
the page faults of allocating them again.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch


class _Pool:
    """The buffers of one `scratch_buffers` block, by name, and whether `spent` frees them (lean)."""

    def __init__(self, lean: bool):
        self.buffers: dict[str, torch.Tensor] = {}
        self.lean = lean


_POOL: contextvars.ContextVar[_Pool | None] = contextvars.ContextVar("ream_exp_scratch", default=None)


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor of `shape`: a view of the buffer `name` inside `scratch_buffers()` on a CPU, else new."""
    pool = _POOL.get()
    device = torch.device(device)
    if pool is None or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    buffers = pool.buffers
    buf = buffers.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buffers.pop(name, None)
        del buf  # the old buffer is freed before the larger one is allocated
        buf = buffers[name] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def spent(prefix: str) -> None:
    """The buffers whose names start with `prefix` are not needed before the next layer: a lean pool frees them."""
    pool = _POOL.get()
    if pool is not None and pool.lean:
        for name in [n for n in pool.buffers if n.startswith(prefix)]:
            del pool.buffers[name]


def pooled() -> list[str]:
    """The names of the buffers the pool holds now (none outside `scratch_buffers`)."""
    pool = _POOL.get()
    return sorted(pool.buffers) if pool is not None else []


@contextlib.contextmanager
def scratch_buffers(lean: bool = False):
    """Within the block `scratch` reuses its buffers; they are freed on exit. Nested blocks share the outer one.
    `lean`: `spent` buffers are freed at once (see the module doc)."""
    if _POOL.get() is not None:
        yield
        return
    token = _POOL.set(_Pool(lean))
    try:
        yield
    finally:
        _POOL.get().buffers.clear()
        _POOL.reset(token)
