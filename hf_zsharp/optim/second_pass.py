"""What the second pass of a sharpness-aware step must repeat and must not change.

It repeats the first pass's random draws (dropout masks, stochastic depth), so both passes see the same network,
and it leaves BatchNorm's running statistics alone: it runs at the perturbed weights w + e, whose batch statistics
would otherwise be mixed into the running mean/var (and `num_batches_tracked`) that evaluation uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from hf_zsharp._compat import BatchNorm

# The CPU generator's state and the accelerator device's (None on the CPU).
RngState = tuple[torch.Tensor, torch.Tensor | None]


@contextmanager
def frozen_batchnorm_stats(model: nn.Module | None = None) -> Iterator[nn.Module | None]:
    """Inside, BatchNorm layers in training mode normalise with batch statistics but update no running stats.

    With `model`, its layers; without, every BatchNorm layer that runs inside (through a global forward pre-hook),
    for callers that do not know the model, such as `SAM.step(closure)`.
    """
    if model is not None:
        layers = [m for m in model.modules() if isinstance(m, BatchNorm) and m.track_running_stats]
        for layer in layers:
            layer.track_running_stats = False
        try:
            yield model
        finally:
            for layer in layers:
                layer.track_running_stats = True
        return
    frozen: list[BatchNorm] = []

    def freeze(module: nn.Module, args: object) -> None:
        if isinstance(module, BatchNorm) and module.track_running_stats:
            module.track_running_stats = False
            frozen.append(module)

    handle = register_module_forward_pre_hook(freeze)
    try:
        yield None
    finally:
        handle.remove()
        for layer in frozen:
            layer.track_running_stats = True


def rng_state(device: torch.device) -> RngState:
    """The RNG states a forward pass can draw from: the CPU generator and the accelerator device's."""
    device_state = None if device.type == "cpu" else getattr(torch, device.type).get_rng_state(device)
    return torch.get_rng_state(), device_state


def set_rng_state(state: RngState, device: torch.device) -> None:
    """Put back the states `rng_state` read."""
    cpu_state, device_state = state
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        getattr(torch, device.type).set_rng_state(device_state, device)


@contextmanager
def replayed_rng(state: RngState | None, device: torch.device) -> Iterator[None]:
    """Inside, the generators draw again from `state` (a pass's start); after, they continue from where they were
    on entry, so the replay does not change later draws. `None`: no replay (the first pass ran elsewhere)."""
    if state is None:
        yield
        return
    after = rng_state(device)
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(after, device)
