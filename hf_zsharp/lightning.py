"""The two-pass sharpness-aware step under PyTorch Lightning's automatic optimization.

Subclass `ZSharpLightningModule` instead of `lightning.pytorch.LightningModule` and return an hf_zsharp optimizer
(ZSharp, SAM, ASAM, FriendlySAM; with an LR scheduler if you like) from `configure_optimizers`. Each optimizer
step then takes two forward/backward passes through Lightning's own closure: the pass at w (whose loss, logs and
outputs are the step's), the ascent to w + e, the pass at w + e with the same random draws and BatchNorm
running statistics frozen, the exact restore of w; then Lightning's precision plugin clips the second-pass
gradients and steps as usual (with a GradScaler under "16-mixed": its skip on overflow included).

The step logs `sam_perturbation_norm`, `sam_kept_fraction`, `sam_loss_increase` (L(w + e) - L(w) of the batch)
and `sam_skipped_steps` (the steps skipped for non-finite gradients since the fit started).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.loops.optimization.automatic import Closure
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
except ImportError as error:
    raise ImportError(
        "hf_zsharp.lightning needs PyTorch Lightning: pip install 'hf_zsharp[lightning]'"
    ) from error

from hf_zsharp.keys import ASCENT_STATISTICS, LOGGED_STATISTICS
from hf_zsharp.optim import SAM, frozen_batchnorm_stats
from hf_zsharp.optim.second_pass import replayed_rng, rng_state
from hf_zsharp.two_pass import unwrap_sam_optimizer

_ASCENT_KEYS = LOGGED_STATISTICS[: len(ASCENT_STATISTICS)]
_LOSS_INCREASE, _SKIPPED_STEPS = LOGGED_STATISTICS[len(ASCENT_STATISTICS) :]

# Strategies the two-pass step would get wrong, and why.
UNSUPPORTED_STRATEGIES: dict[type, str] = {
    DeepSpeedStrategy: "its engine runs backward and the optimizer step itself, so two passes would step twice",
    FSDPStrategy: "FSDP1's flat parameters hide the whole tensors whose statistics the ascent needs",
}


class ZSharpLightningModule(pl.LightningModule):
    """A LightningModule whose automatic optimization takes the sharpness-aware two-pass step.

    Write `training_step` and `configure_optimizers` as usual; `configure_optimizers` returns an hf_zsharp
    optimizer. `self.log` calls made while the second pass (at w + e) runs are dropped, so the logs, the
    progress bar and `training_step`'s outputs are those of the pass at w. If you override `on_fit_start`,
    `optimizer_step` or `log`, call `super()`'s.
    """

    _sam_second_pass = False  # while True, `log` drops its calls (class defaults: no __init__ to override)
    _sam_scaler_skips = 0  # steps a GradScaler skipped since the fit started (the optimizer never sees them)

    def on_fit_start(self) -> None:
        """Refuse, before any step, the set-ups in which the two-pass step would be wrong."""
        super().on_fit_start()
        trainer = self.trainer
        if not self.automatic_optimization:
            raise ValueError(
                "ZSharpLightningModule needs automatic optimization, but automatic_optimization = False: under "
                "manual optimization subclass lightning.pytorch.LightningModule and take the two passes in "
                "training_step yourself (manual_backward, optimizer.first_step(zero_grad=True), the second pass "
                "under hf_zsharp.frozen_batchnorm_stats, optimizer.second_step(zero_grad=True))."
            )
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"ZSharpLightningModule does not support Trainer(accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}): the pass at w + e needs every micro-batch of the step again, "
                "and Lightning keeps only the last one. Raise the batch size instead (or use ZSharpTrainer or "
                "hf_zsharp.accelerate_step, which keep the micro-batches)."
            )
        for strategy, reason in UNSUPPORTED_STRATEGIES.items():
            if isinstance(trainer.strategy, strategy):
                raise ValueError(
                    f"ZSharpLightningModule does not support Trainer(strategy={type(trainer.strategy).__name__}): "
                    f"{reason}. Use one device or DDP."
                )
        for optimizer in trainer.optimizers:
            try:
                sam = unwrap_sam_optimizer(optimizer)
            except TypeError as error:
                raise ValueError(
                    "ZSharpLightningModule: configure_optimizers must return an hf_zsharp optimizer (ZSharp, SAM, "
                    f"ASAM, FriendlySAM, e.g. ZSharp(self.parameters(), torch.optim.AdamW, lr=...)); it returned "
                    f"{type(optimizer).__name__}."
                ) from error
            sam.pop_skipped_steps()  # `sam_skipped_steps` counts from here
        self._sam_scaler_skips = 0

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: LightningOptimizer,
        optimizer_closure: Closure,
    ) -> None:
        """One sharpness-aware step: both passes run inside the closure handed to Lightning's optimizer step."""
        # Lightning's wrapper passes for a SAM instance but holds none of its state: step the optimizer inside.
        sam = unwrap_sam_optimizer(optimizer.optimizer)
        sam.zero_grad(set_to_none=True)  # no stale gradients: `SAM.step(closure)` must run the closure first
        stats: dict[str, torch.Tensor] = {}

        def two_pass() -> torch.Tensor | None:
            rng = rng_state(self.device)
            # Lightning keeps this pass's result: the step's loss, logs and outputs.
            loss = optimizer_closure()
            if loss is None:  # training_step returned None: Lightning's skip of this batch, no ascent
                sam.begin_plain_step()
                return None
            self._unscale_for_ascent(sam)
            if not sam.first_step():  # non-finite gradients: the optimizer (or the GradScaler) skips the step
                return loss
            # On the device now, while it is idle after the ascent's read (later, the copy would wait for the step).
            ascent = torch.tensor([sam.ascent_stats[name] for name in ASCENT_STATISTICS], device=self.device)
            stats.update(zip(_ASCENT_KEYS, ascent))
            try:
                with self._quiet(), frozen_batchnorm_stats(self), replayed_rng(rng, self.device):
                    perturbed_loss = optimizer_closure.closure().loss  # not stored: Lightning keeps pass 1's
            finally:
                sam.restore()
            if perturbed_loss is not None:
                stats[_LOSS_INCREASE] = perturbed_loss - loss
            return loss

        optimizer.step(closure=two_pass)
        # Under "16-mixed" the GradScaler calls `sam.step()` only for finite gradients: a step still begun was skipped.
        if stats and sam.step_begun:
            self._sam_scaler_skips += 1
        # Logged together, after the step: Lightning resets a hook's logged values when another hook logs in between
        # on the first batch (e.g. `on_before_optimizer_step`, which runs between the passes and the base step).
        self.log_dict({**stats, _SKIPPED_STEPS: self._skipped_steps(sam)})

    def log(self, *args: Any, **kwargs: Any) -> None:
        """`LightningModule.log`, except during the second pass (also drops `log_dict`, which calls it)."""
        if not self._sam_second_pass:
            super().log(*args, **kwargs)

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        self._sam_second_pass = True
        try:
            yield
        finally:
            self._sam_second_pass = False

    def _unscale_for_ascent(self, sam: SAM) -> None:
        """Divide the first-pass gradients by the GradScaler's scale for an optimizer whose ascent depends on it."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if sam.scale_invariant or scaler is None or not scaler.is_enabled():
            return
        grads = [p.grad for group in sam.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / scaler.get_scale())

    def _skipped_steps(self, sam: SAM) -> torch.Tensor | int:
        """Steps skipped for non-finite gradients since the fit started: the optimizer's count, read without the
        host sync of `pop_skipped_steps` (its second-pass part stays on the device), plus the GradScaler's skips."""
        on_host = sam.skips.first_pass + self._sam_scaler_skips
        return on_host if sam.skips.on_device is None else sam.skips.on_device + on_host
