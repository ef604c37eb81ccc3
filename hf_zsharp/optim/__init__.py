"""The SAM optimizer family: ZSharp and the paper's baselines, one registry of what each method is, one factory."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from .sam import ASAM, ASCENT_STATISTICS, SAM, FriendlySAM
from .second_pass import frozen_batchnorm_stats
from .zsharp import MASKS, RADII, ZSharp

__all__ = [
    "ASAM",
    "ASCENT_STATISTICS",
    "MASKS",
    "METHODS",
    "RADII",
    "SAM",
    "FriendlySAM",
    "MethodInfo",
    "ZSharp",
    "create_sam_optimizer",
    "frozen_batchnorm_stats",
]


@dataclass(frozen=True)
class MethodInfo:
    """One sharpness-aware method: its class, its title for model cards, and the options it reads.

    `options` maps the method's constructor arguments (beyond `rho`) to the `ZSharpTrainingArguments` fields
    that set them.
    """

    cls: type[SAM]
    title: str
    options: dict[str, str]

    @property
    def default_rho(self) -> float:
        return self.cls.default_rho


METHODS: dict[str, MethodInfo] = {
    "zsharp": MethodInfo(
        ZSharp,
        "ZSharp (SAM with Z-score gradient filtering, Yun 2025)",
        {"percentile": "zsharp_percentile", "radius": "sam_radius", "mask": "sam_mask", "seed": "seed"},
    ),
    "sam": MethodInfo(SAM, "SAM (sharpness-aware minimization, Foret et al. 2021)", {}),
    "asam": MethodInfo(ASAM, "ASAM (adaptive SAM, Kwon et al. 2021)", {}),
    "fsam": MethodInfo(FriendlySAM, "Friendly-SAM (Li et al. 2024)", {}),
}


def create_sam_optimizer(
    method: str,
    params: Iterable[Any],
    base_optimizer: type[Optimizer] = torch.optim.AdamW,
    **kwargs: Any,
) -> SAM:
    """Build `METHODS[method]` around `base_optimizer`; `kwargs` go to the method, then the base optimizer."""
    if method not in METHODS:
        raise ValueError(f"method: unknown SAM method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method].cls(params, base_optimizer, **kwargs)
