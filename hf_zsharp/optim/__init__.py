"""The SAM optimizer family: ZSharp and the paper's baselines, behind one factory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .batchnorm import frozen_batchnorm_stats
from .sam import ASAM, SAM, FriendlySAM
from .zsharp import ZSharp

__all__ = [
    "ASAM",
    "SAM",
    "FriendlySAM",
    "ZSharp",
    "METHODS",
    "create_sam_optimizer",
    "frozen_batchnorm_stats",
]

METHODS: dict[str, type[SAM]] = {"zsharp": ZSharp, "sam": SAM, "asam": ASAM, "fsam": FriendlySAM}


def create_sam_optimizer(
    method: str,
    params: Iterable[Any],
    base_optimizer: type[Optimizer] = torch.optim.AdamW,
    **kwargs: Any,
) -> SAM:
    """Build `METHODS[method]` around `base_optimizer`; `kwargs` go to the method, then the base optimizer."""
    if method not in METHODS:
        raise ValueError(f"method: unknown SAM method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](params, base_optimizer, **kwargs)
