"""The non-public APIs of torch, transformers and timm that hf_zsharp relies on, each behind one name here with the
versions it was checked on, and one clear line for a torch that lacks a feature.

pyproject.toml declares `torch>=2.6` as a lower bound (torch's wheels are too large to test two of them here):
2.6 is the first release with FSDP2's public `torch.distributed.fsdp.fully_shard` and DTensor's public
`torch.distributed.tensor`, which the sharded statistics of the optimizers read. Not wrapped: torch's
`torch._foreach_*` ops (used throughout the optimizers, stable since torch 1.13 and what torch's own optimizers
call) and the private Trainer methods `ZSharpMixin` overrides, which `check_trainer_hooks` checks instead.
Checked on: torch 2.14.1, transformers 5.10.1 and 5.25.0, timm 1.0.23 and 1.0.31.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules import batchnorm

TORCH_FLOOR = "2.6"
BatchNorm = batchnorm._BatchNorm  # the base of every BatchNorm layer, SyncBatchNorm included


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


def chunk_cat(tensors: list[Tensor]) -> Tensor:
    """The entries of `tensors` one after the other, in one kernel: torch's private `_chunk_cat` (the op FSDP2
    uses for its reduce-scatter buffers)."""
    return torch._chunk_cat(tensors, 0, 1).view(-1)


# torch's optimizers whose fused `step()` skips itself on a device flag `found_inf` (the protocol GradScaler uses).
FUSED_FOUND_INF = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def honours_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` skips on a `found_inf` attribute with no host sync: torch's fused optimizers,
    which say so by the private `_step_supports_amp_scaling`."""
    return isinstance(optimizer, FUSED_FOUND_INF) and getattr(optimizer, "_step_supports_amp_scaling", False)


def step_unless_found_inf(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """`optimizer.step()`, skipped on the device when `found_inf` (a float32 flag) is 1 (`honours_found_inf`)."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


# The private `transformers.Trainer` methods `ZSharpMixin` overrides (or calls), and what for.
TRAINER_HOOKS = {
    "_save": "save an FSDP2 model as its own class",
    "_load_optimizer_and_scheduler": "refuse a resume of another method or other settings",
}


def check_trainer_hooks(trainer_class: type) -> None:
    """Raise ImportError naming the private Trainer method a transformers version no longer has."""
    import transformers

    missing = [name for name in TRAINER_HOOKS if not hasattr(trainer_class, name)]
    if missing:
        raise ImportError(
            f"hf_zsharp's ZSharpMixin overrides Trainer.{', Trainer.'.join(missing)} "
            f"({'; '.join(TRAINER_HOOKS[name] for name in missing)}), which transformers {transformers.__version__} "
            "lacks: install a version in hf_zsharp's range (pip install 'transformers>=5.10.1')."
        )


def mark_lr_scheduler_created(trainer: Any) -> None:
    """Tell a `Trainer` whose `create_scheduler` built its own scheduler that it did (its private
    `_created_lr_scheduler`, which decides whether the scheduler is saved and stepped as Trainer's own)."""
    trainer._created_lr_scheduler = True


def timm_grad_scaler(loss_scaler: Any) -> Any:
    """The `torch.amp.GradScaler` inside timm's `NativeScaler` (its private `_scaler`), or `loss_scaler` itself."""
    return getattr(loss_scaler, "_scaler", loss_scaler)
