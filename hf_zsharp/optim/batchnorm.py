"""Keep BatchNorm running statistics out of SAM's second pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, BatchNorm layers in training mode normalise with batch statistics but update no running stats.

    The second pass runs at perturbed weights w + e; its statistics would otherwise be mixed into the
    running mean/var (and `num_batches_tracked`) that evaluation uses.
    """
    layers = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.track_running_stats = True
