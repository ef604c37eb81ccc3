"""The SAM optimizer family: ZSharp and the paper's baselines, one registry of what each method is, one factory."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from hf_zsharp.keys import ASCENT_STATISTICS

from .options import Option
from .sam import ASAM, SAM, FriendlySAM
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
    "OPTIONS",
    "Option",
    "ZSharp",
    "create_sam_optimizer",
    "frozen_batchnorm_stats",
    "stated_settings",
]


@dataclass(frozen=True)
class MethodInfo:
    """One sharpness-aware method: its class (whose `options` declare its hyper-parameters beyond rho), its title
    for model cards, and the constructor arguments it takes from run-wide settings (`from_run`: argument ->
    arguments field, e.g. ZSharp's random-mask seed from the run's seed)."""

    cls: type[SAM]
    title: str
    from_run: Mapping[str, str] = field(default_factory=dict)

    @property
    def default_rho(self) -> float:
        return self.cls.default_rho

    @property
    def options(self) -> tuple[Option, ...]:
        return self.cls.options

    def resolve(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The hyper-parameters the method's constructor makes of `kwargs` (rho and its options), defaults
        resolved: what `SAM.method_settings()` of the optimizer built with them reports."""
        rho = kwargs.get("rho")
        return {
            "rho": self.default_rho if rho is None else rho,
            **{o.name: kwargs.get(o.name, o.default(self.cls)) for o in self.options},
        }

    def setting_key(self, option: str) -> str:
        """The key under which a run states the constructor argument `option` (zsharp_args.json, the card): its
        arguments field (`sam_rho`, `zsharp_percentile`, ...)."""
        return "sam_rho" if option == "rho" else next(o.field for o in self.options if o.name == option)


METHODS: dict[str, MethodInfo] = {
    "zsharp": MethodInfo(ZSharp, "ZSharp (SAM with Z-score gradient filtering, Yun 2025)", {"seed": "seed"}),
    "sam": MethodInfo(SAM, "SAM (sharpness-aware minimization, Foret et al. 2021)"),
    "asam": MethodInfo(ASAM, "ASAM (adaptive SAM, Kwon et al. 2021)"),
    "fsam": MethodInfo(FriendlySAM, "Friendly-SAM (Li et al. 2024)"),
}
# Every method's options, each once, in the order of METHODS: the arguments' fields, the card's rows.
OPTIONS: tuple[Option, ...] = tuple(option for info in METHODS.values() for option in info.options)


def stated_settings(method: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A method's hyper-parameters (`SAM.method_settings()`: option -> value) under the keys a run states them."""
    info = METHODS[method]
    return {info.setting_key(option): value for option, value in values.items()}


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
