"""The paper's base optimizer and learning-rate schedule, as `run_training` hooks for the paper presets."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LinearLR, SequentialLR, StepLR

from hf_zsharp._compat import mark_lr_scheduler_created
from hf_zsharp.trainer import ZSharpTrainer


def paper_lr_factor(
    step: int, steps_per_epoch: int, warmup_epochs: int = 5, step_epochs: int = 30, gamma: float = 0.75
) -> float:
    """LR multiplier at optimizer step `step`: linear warm-up over `warmup_epochs`, then x`gamma` every `step_epochs`."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return gamma ** ((step - warmup_steps) // (step_epochs * steps_per_epoch))


def paper_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    warmup_epochs: int = 5,
    step_epochs: int = 30,
    gamma: float = 0.75,
) -> SequentialLR:
    """`paper_lr_factor` from torch's schedulers: LinearLR over the warm-up, then StepLR."""
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    decay = StepLR(optimizer, step_size=step_epochs * steps_per_epoch, gamma=gamma)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])


class PaperRecipeTrainer(ZSharpTrainer):
    """`ZSharpTrainer` with the paper's learning-rate schedule (`paper_lr_scheduler`) in place of
    `lr_scheduler_type`; the steps per epoch are the Trainer's own count."""

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        self.steps_per_epoch = values[1]  # num_update_steps_per_epoch
        return values

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = paper_lr_scheduler(optimizer or self.optimizer, self.steps_per_epoch)
            mark_lr_scheduler_created(self)
        return self.lr_scheduler


def paper_trainer_hooks(training_args: Any) -> dict[str, Any]:
    """`run_training` extras for the paper's recipe: torch.optim.Adam (coupled L2) and `PaperRecipeTrainer`."""
    adam = {
        "lr": training_args.learning_rate,
        "betas": (training_args.adam_beta1, training_args.adam_beta2),
        "eps": training_args.adam_epsilon,
    }
    return {"optimizer_cls_and_kwargs": (torch.optim.Adam, adam), "trainer_cls": PaperRecipeTrainer}
