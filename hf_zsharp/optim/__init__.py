"""The SAM optimizer family: ZSharp and the paper's baselines, one registry of what each method is, one factory."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from hf_zsharp.keys import ASCENT_STATISTICS

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
    "ZSharp",
    "create_sam_optimizer",
    "frozen_batchnorm_stats",
    "stated_settings",
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

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The constructor's options that its parameter groups hold besides rho (e.g. ZSharp's percentile, radius
        and mask; ASAM's eta), read off the signature."""
        own = ("self", "params", "base_optimizer", "rho", "adaptive", "seed")
        return tuple(
            name
            for name, parameter in inspect.signature(self.cls.__init__).parameters.items()
            if name not in own and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        )

    def resolve(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The hyper-parameters the method's constructor makes of `kwargs` (rho and `hyperparameters`), defaults
        resolved: what `SAM.method_settings()` of the optimizer built with them reports."""
        defaults = inspect.signature(self.cls.__init__).parameters
        rho = kwargs.get("rho")
        return {
            "rho": self.default_rho if rho is None else rho,
            **{name: kwargs.get(name, defaults[name].default) for name in self.hyperparameters},
        }

    def setting_key(self, option: str) -> str:
        """The key under which a run states `option` (zsharp_args.json, the card): the arguments field that sets
        it (`sam_rho`, `zsharp_percentile`, ...), or `<method>_<option>` for one that no field sets."""
        if option == "rho":
            return "sam_rho"
        return self.options.get(option) or f"{next(k for k, v in METHODS.items() if v is self)}_{option}"


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
