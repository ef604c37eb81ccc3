"""The paper's base optimizer and learning-rate schedule, as `run_training` hooks for the paper presets."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback


def paper_lr_factor(
    step: int, steps_per_epoch: int, warmup_epochs: int = 5, step_epochs: int = 30, gamma: float = 0.75
) -> float:
    """LR multiplier at optimizer step `step`: linear warm-up over `warmup_epochs`, then x`gamma` every `step_epochs`."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return gamma ** ((step - warmup_steps) // (step_epochs * steps_per_epoch))


class PaperLRSchedule(TrainerCallback):
    """Turns `Trainer`'s constant schedule (`lr_scheduler_type="constant"`) into `paper_lr_factor`."""

    def __init__(self, warmup_epochs: int = 5, step_epochs: int = 30, gamma: float = 0.75) -> None:
        self.warmup_epochs = warmup_epochs
        self.step_epochs = step_epochs
        self.gamma = gamma

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        lr_scheduler: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        # Accelerate may wrap the scheduler (AcceleratedScheduler keeps it as `.scheduler`).
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(
                f"PaperLRSchedule needs lr_scheduler_type='constant' (a LambdaLR); got {type(scheduler).__name__}."
            )
        batches = len(train_dataloader)
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)

        def factor(step: int) -> float:
            return paper_lr_factor(step, steps_per_epoch, self.warmup_epochs, self.step_epochs, self.gamma)

        scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
        for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        # What `get_last_lr()` (and so Trainer's "learning_rate" log) reports until the scheduler's next step.
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def paper_trainer_hooks(training_args: Any) -> dict[str, Any]:
    """`run_training` extras for the paper's recipe: torch.optim.Adam (coupled L2) and `PaperLRSchedule`."""
    adam = {
        "lr": training_args.learning_rate,
        "betas": (training_args.adam_beta1, training_args.adam_beta2),
        "eps": training_args.adam_epsilon,
    }
    return {"optimizer_cls_and_kwargs": (torch.optim.Adam, adam), "callbacks": [PaperLRSchedule()]}
