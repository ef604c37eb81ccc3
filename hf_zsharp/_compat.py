"""The torch features hf_zsharp relies on, and one clear line for a torch that lacks them.

pyproject.toml declares `torch>=2.6` as a lower bound (torch's wheels are too large to test two of them here):
2.6 is the first release with FSDP2's public `torch.distributed.fsdp.fully_shard` and DTensor's public
`torch.distributed.tensor`, which the sharded statistics of the optimizers read.
"""

from __future__ import annotations

import torch

TORCH_FLOOR = "2.6"


def require_torch(feature: str, version: str = TORCH_FLOOR) -> None:
    """Raise ImportError naming `feature` when the installed torch is older than `version`."""
    if torch.__version__ < version:  # TorchVersion compares as a version, not as a string
        raise ImportError(
            f"hf_zsharp's {feature} needs torch>={version}, found torch {torch.__version__}: "
            f"pip install -U 'torch>={version}'"
        )


def timm_optimizer_registry() -> object:
    """timm's default `OptimizerRegistry`, where `create_optimizer_v2(model, NAME)` and train.py's `--opt NAME`
    look optimizers up, for `hf_zsharp.timm` to register its own in.

    timm exports `OptimInfo` and `list_optimizers` but no way to register one: the registry is the private
    `timm.optim._optim_factory.default_registry`, with `register(OptimInfo)`; checked in timm 1.0.23 and 1.0.31.
    """
    try:
        from timm.optim import _optim_factory
    except ImportError:
        _optim_factory = None
    registry = getattr(_optim_factory, "default_registry", None)
    if not callable(getattr(registry, "register", None)):
        import timm

        raise ImportError(
            f"hf_zsharp.timm registers its optimizers in timm's optimizer registry "
            f"(timm.optim._optim_factory.default_registry, checked in timm 1.0.23 to 1.0.31), which timm "
            f"{timm.__version__} lacks: pip install 'timm>=1.0.23', or build the optimizer without timm's factory "
            "(hf_zsharp.create_sam_optimizer)."
        )
    return registry
