"""A sharpness-aware method's hyper-parameters beyond rho, each declared once, on its optimizer class.

From an `Option` come the constructor's check of the value, the training arguments' field (its flag, config-file
key and help), the key a run states it under (zsharp_args.json) and the model card's row label; its type and
default are the constructor's own (read off the signature).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """One hyper-parameter: the constructor argument `name`, the arguments `field` that sets it (also the key a run
    states it under), the `help` of its flag, the card's `label`, and what a valid value is (`choices`, or
    `check` with the `requirement` it says)."""

    name: str
    field: str
    help: str
    label: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    requirement: str = ""

    def validate(self, value: Any, name: str | None = None) -> None:
        """Raise a ValueError naming `name` (default: the constructor argument) if `value` is not valid."""
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name or self.name}: must be one of {', '.join(self.choices)}, got {value!r}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{name or self.name}: must be {self.requirement}, got {value!r}")

    def default(self, cls: type) -> Any:
        """The default of this argument in `cls`'s constructor."""
        return inspect.signature(cls.__init__).parameters[self.name].default
