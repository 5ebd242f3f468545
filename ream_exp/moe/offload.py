"""Real weights of modules that accelerate offloads, for code that reads or changes them directly.

A model loaded with a device_map that sends decoder layers to "cpu" (with an accelerator as main
device) or to "disk" keeps those layers' parameters on the meta device; an accelerate hook on each
module with parameters (`module._hf_hook`, an AlignDevicesHook with offload=True, installed as an
instance `forward` wrapper) loads them from its `weights_map` before every forward and drops them after.
Calling the module runs the hook, but reading `experts.gate_up_proj` outside a forward sees meta.

    with materialised([layer.experts, layer.router], write_back=True):
        ...  # real tensors on the execution device; changes (merges, sliced experts) are kept

Within the block each offloaded module holds its weights, loaded once, and its hook stops loading and
dropping them, so forwards inside (observation) reuse them. With write_back the module's tensors at
the end of the block become its new offloaded weights: they are kept in CPU memory (a dict replaces
the hook's weights map; the offload folder on disk is left as loaded). Modules without an offloading
hook are untouched, so on a plain model this is a no-op.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def offload_hook(module: nn.Module):
    """The accelerate hook that offloads this module's own weights, or None (not offloaded, or already
    materialised by an enclosing `materialised` block)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook holds several
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where the module computes: its offloading hook's execution device, else its first parameter's."""
    hook = offload_hook(module)
    if hook is not None and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def _own_tensors(module: nn.Module, hook) -> dict[str, torch.Tensor]:
    """The tensors the hook offloads: direct parameters, and buffers when it offloads buffers."""
    tensors = dict(module.named_parameters(recurse=hook.place_submodules))
    if hook.offload_buffers:
        tensors.update(module.named_buffers(recurse=hook.place_submodules))
    return tensors


@contextlib.contextmanager
def materialised(modules, write_back: bool = False):
    """Within the block, offloaded `modules` hold their real weights; see the module docstring."""
    held, done = [], False
    try:
        for module in modules:
            hook = offload_hook(module)
            if hook is None:
                continue
            hook.pre_forward(module)  # loads every offloaded tensor onto the execution device
            hook.offload = False  # forwards inside neither reload nor drop them
            held.append((module, hook))
        yield
        done = True
    finally:
        for module, hook in held:
            if write_back and done:  # a failed change is not kept as the module's weights
                hook.weights_map = {name: t.detach().to("cpu") for name, t in _own_tensors(module, hook).items()}
            hook.offload = True
            hook.post_forward(module, None)  # back to meta
