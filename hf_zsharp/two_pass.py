"""The two-pass sharpness-aware step inside an Accelerate loop: the one implementation behind `ZSharpTrainer`
and `accelerate_step`.

Per optimizer step: every micro-batch runs its first pass (forward + backward) as usual and is kept; at the
micro-batch where gradients synchronise, the optimizer ascends with the whole accumulated first-pass gradient,
every kept micro-batch runs again at the perturbed weights (same RNG draws, so the same dropout masks, and
BatchNorm running statistics frozen), and the weights are restored. The caller then clips and calls
`optimizer.step()` as usual, which is a plain base step on the second-pass gradients (skipped if they are not
finite), so clipping, a GradScaler (with its skip on overflow) and LR schedulers behave as without SAM.

Under FSDP2 the optimizer computes the ascent's statistics over the whole (sharded) tensors and moves each rank's
shards; the step here always ascends with the synced gradient (a rank holds only a shard of it).
"""

import contextlib
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim import Optimizer

from hf_zsharp.keys import ASCENT_STATISTICS, LOGGED_STATISTICS
from hf_zsharp.optim import frozen_batchnorm_stats
from hf_zsharp.optim.sam import TwoPassOptimizer
from hf_zsharp.optim.second_pass import RngState, rng_state, set_rng_state
from hf_zsharp.optim.sharded import is_sharded
from hf_zsharp.support import check_interval, check_supported

_LOSS_INCREASE, _SKIPPED_STEPS = LOGGED_STATISTICS[len(ASCENT_STATISTICS) :]


def inner_optimizer(optimizer: Optimizer | None) -> Optimizer | None:
    """The optimizer inside Accelerate's (or another) wrapper that keeps it as `.optimizer`: an hf_zsharp one if
    there is one."""
    while (
        optimizer is not None
        and not isinstance(optimizer, TwoPassOptimizer)
        and hasattr(optimizer, "optimizer")
    ):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap_sam_optimizer(optimizer: Optimizer) -> TwoPassOptimizer:
    """The hf_zsharp optimizer inside Accelerate's (or another) wrapper that keeps it as `.optimizer`."""
    inner = inner_optimizer(optimizer)
    if not isinstance(inner, TwoPassOptimizer):
        raise TypeError(
            f"The two-pass step needs an hf_zsharp optimizer (ZSharp, SAM, ASAM, FriendlySAM); got {type(optimizer)!r}."
        )
    return inner


class StepLog:
    """What the two-pass steps since the last `pop` did, for the logs: the sums of the optimizer's ascent statistics
    over the perturbed steps, their loss increases (on the device: no sync), and the steps a GradScaler skipped
    (counted here: the optimizer is never called then)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(ASCENT_STATISTICS, 0.0)
        self.perturbed = 0
        self.increases = torch.zeros(
            2
        )  # sum of the finite loss increases, their count (float32: MPS has no float64)
        self.scaler_skips = 0

    def ascent(self, stats: dict[str, float]) -> None:
        """Add one perturbed step's ascent statistics."""
        self.perturbed += 1
        for key in self.sums:
            self.sums[key] += stats[key]

    def increase(self, increase: torch.Tensor) -> None:
        """Add a step's loss increase on the device (no host sync); a non-finite one is left out."""
        finite = increase.isfinite()
        update = torch.stack([torch.where(finite, increase, 0.0), finite.float()])
        self.increases = self.increases.to(update.device) + update

    def pop(self, optimizer_skips: int) -> dict[str, float]:
        """The means since the last call with `sam_` keys (empty if nothing happened), and reset."""
        skipped = optimizer_skips + self.scaler_skips
        if not self.perturbed and not skipped:
            return {}
        means = (v / self.perturbed for v in self.sums.values()) if self.perturbed else ()
        stats = dict(zip(LOGGED_STATISTICS, means))  # self.sums is keyed by ASCENT_STATISTICS, in order
        total, count = self.increases.tolist()
        if count:
            stats[_LOSS_INCREASE] = total / count
        stats[_SKIPPED_STEPS] = float(skipped)
        self.reset()
        return stats


class TwoPassStep:
    """Runs micro-batches under the two-pass rule and keeps the ascent statistics for logging.

    `sync_ascent=False` (the SAM paper's m-sharpness under DDP): first passes run under `no_sync`, so each
    replica perturbs with its own gradient; only the second pass is all-reduced. Under FSDP2 (sharded parameters)
    the ascent is always synced: a rank holds only a shard of any gradient, and FSDP2 keeps an unsynced one
    unsharded, out of the optimizer's reach. A perturbation skipped for
    non-finite gradients on any replica is skipped on all of them. Non-finite second-pass gradients are
    all-reduced too, so the optimizer's (or a GradScaler's) skip of the base step agrees on all replicas.

    The logged `sam_loss_increase` is L(w + e) - L(w) of the step's batch, from the losses both passes compute
    anyway. `loss_shares=True` says that `forward_backward` returns each micro-batch's share of the step's
    loss (as `Trainer.training_step` does), which add up; otherwise the micro-batches' losses are averaged.
    `second_pass` is a context the second passes run in (e.g. keeping a trainer's per-step metrics to the first).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: Optimizer,
        sync_ascent: bool = False,
        loss_shares: bool = False,
        second_pass: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        check_supported(accelerator)
        self.accelerator = accelerator
        self.model = model
        self.optimizer = unwrap_sam_optimizer(optimizer)
        self.sharded = getattr(accelerator, "is_fsdp2", False) or any(map(is_sharded, model.parameters()))
        self.sync_ascent = sync_ascent or self.sharded
        self.loss_shares = loss_shares
        self.second_pass = second_pass
        self.optimizer_steps = 0
        self._pending: list[tuple[Callable[[], torch.Tensor], RngState, torch.Tensor]] = []
        self.log = StepLog()
        self._scaler_decides = False  # whether a GradScaler's verdict on the last step is still to be counted

    def __call__(self, forward_backward: Callable[[], torch.Tensor], perturb: bool = True) -> torch.Tensor:
        """Run one micro-batch's `forward_backward` (returns the loss); on the synchronising micro-batch of a
        `perturb` step, also the ascent and the second pass of all the step's micro-batches. Returns the
        first-pass loss.

        `perturb` must be the same for all micro-batches of one optimizer step (False: a plain step).
        """
        self._count_scaler_skip()
        sync = self.accelerator.sync_gradients
        if not perturb:
            if self._pending:
                raise RuntimeError("perturb changed within one optimizer step (between its micro-batches).")
            if sync:
                self.optimizer.begin_plain_step()
                self.optimizer_steps += 1
                self._scaler_decides = self._scaler_enabled()
            return forward_backward()
        rng = rng_state(self.accelerator.device)
        with self._first_pass_sync():
            loss = forward_backward()
        self._pending.append((forward_backward, rng, loss))
        if sync:
            try:
                self._ascend_and_rerun()
            finally:
                self._pending = []
            self.optimizer_steps += 1
        return loss

    def pop_stats(self) -> dict[str, float]:
        """Mean ascent statistics of the two-pass steps since the last call, with `sam_` keys for the logs.

        `sam_skipped_steps` counts the steps skipped for non-finite gradients in either pass (by the optimizer or
        a GradScaler); reading the optimizer's device-side count is this call's one host sync.
        """
        self._count_scaler_skip()
        return self.log.pop(self.optimizer.pop_skipped_steps())

    def _first_pass_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.sync_ascent else self.accelerator.no_sync(self.model)

    def _ascend_and_rerun(self) -> None:
        optimizer = self.optimizer
        if not optimizer.scale_invariant and self._scaler_enabled():
            # E.g. Friendly-SAM's gradient EMA mixes steps with different loss scales: give it true gradients.
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            torch._foreach_mul_(grads, 1.0 / self.accelerator.scaler.get_scale())
        if self.sharded:
            _reshard(self.model)
        perturbed = optimizer.first_step()
        if not self._all_replicas(perturbed):
            self._share_the_skip(perturbed)
            return
        self.log.ascent(optimizer.ascent_stats)
        self._scaler_decides = self._scaler_enabled()
        after_first_pass = rng_state(self.accelerator.device)
        try:
            self.model.zero_grad(set_to_none=True)
            last = len(self._pending) - 1
            increase = torch.zeros((), device=self.accelerator.device)
            with frozen_batchnorm_stats(self.model), self.second_pass():
                for i, (forward_backward, rng, first_loss) in enumerate(self._pending):
                    set_rng_state(rng, self.accelerator.device)
                    with self.accelerator.no_sync(self.model) if i < last else contextlib.nullcontext():
                        increase += forward_backward().float() - first_loss.float()
            self.log.increase(increase if self.loss_shares else increase / len(self._pending))
        finally:
            set_rng_state(after_first_pass, self.accelerator.device)
            optimizer.restore()

    def _scaler_enabled(self) -> bool:
        scaler = self.accelerator.scaler
        return scaler is not None and scaler.is_enabled()

    def _count_scaler_skip(self) -> None:
        """Count the last step if a GradScaler skipped it: the optimizer, never called then, cannot count it."""
        if self._scaler_decides and self.accelerator.optimizer_step_was_skipped:
            self.log.scaler_skips += 1
        self._scaler_decides = False

    def _all_replicas(self, perturbed: bool) -> bool:
        """Whether every replica perturbed; replicas can only disagree when each uses its own gradient."""
        if self.sync_ascent or self.accelerator.num_processes == 1:
            return perturbed
        flag = torch.tensor(0.0 if perturbed else 1.0, device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() == 0.0

    def _share_the_skip(self, perturbed: bool) -> None:
        """A replica's first-pass gradient was not finite: all-reduce the first-pass gradients (as a synced ascent
        would), so that every replica holds that non-finite gradient, skips its ascent (the optimizer counts it,
        once) and its step alike, and a GradScaler skips and lowers its scale on every replica."""
        if self.sync_ascent or self.accelerator.num_processes == 1:
            return  # every replica holds the same gradient and has skipped already
        optimizer = self.optimizer
        if perturbed:
            optimizer.restore()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            torch._foreach_copy_(
                grads, [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]
            )
        if perturbed:
            optimizer.first_step()


_STEPS: "weakref.WeakKeyDictionary[Optimizer, TwoPassStep]" = weakref.WeakKeyDictionary()


def accelerate_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Optimizer,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    sync_ascent: bool = False,
    interval: int = 1,
) -> torch.Tensor:
    """The two-pass replacement of `accelerator.backward(loss)` in an Accelerate loop.

    Call it inside `accelerator.accumulate(model)` with the current micro-batch: `loss_fn(model, batch)` returns its
    loss (default: `model(**batch).loss`, for a dict batch and a transformers model). The batch is held with its own
    first pass, so under gradient accumulation each micro-batch's second pass runs on that micro-batch. Then clip and
    call `optimizer.step()`, `scheduler.step()`, `optimizer.zero_grad()` as usual; `pop_sam_stats(optimizer)` gives
    the ascent statistics for `accelerator.log`. `interval=k` takes the two-pass step every k optimizer steps
    (plain steps in between). Returns the first-pass loss, detached.
    """
    check_interval(interval)
    if callable(batch) and not isinstance(batch, (Mapping, torch.Tensor)):
        raise TypeError(
            "accelerate_step takes the micro-batch itself, not a closure: accelerate_step(accelerator, model, "
            "optimizer, batch) or with loss_fn=lambda model, batch: ... (a closure such as `lambda: "
            "model(**batch).loss` reads `batch` when the second pass runs, a later micro-batch under accumulation)."
        )
    if loss_fn is None:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"accelerate_step: a {type(batch).__name__} batch needs loss_fn(model, batch) returning the loss "
                "(the default, model(**batch).loss, takes a dict batch)."
            )
        loss_fn = _model_loss
    step = _STEPS.get(optimizer)
    if step is None or step.model is not model or step.sync_ascent != sync_ascent:
        step = _STEPS[optimizer] = TwoPassStep(accelerator, model, optimizer, sync_ascent=sync_ascent)
    forward_backward = functools.partial(_backward, accelerator, loss_fn, model, batch)
    return step(forward_backward, perturb=step.optimizer_steps % interval == 0)


def pop_sam_stats(optimizer: Optimizer) -> dict[str, float]:
    """The ascent statistics of the `accelerate_step` steps of `optimizer` since the last call (means, with `sam_`
    keys: LOGGED_STATISTICS), for `accelerator.log`; empty before the first step. One host sync."""
    step = _STEPS.get(optimizer)
    return {} if step is None else step.pop_stats()


def _model_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a model returns for `batch`: a transformers `ModelOutput`'s (or a dict's) "loss"."""
    outputs = model(**batch)
    return outputs["loss"] if isinstance(outputs, Mapping) else outputs.loss


def _backward(
    accelerator: Accelerator,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    model: nn.Module,
    batch: Any,
) -> torch.Tensor:
    loss = loss_fn(model, batch)
    accelerator.backward(loss)
    return loss.detach()


def _reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters, so that the next forward gathers the perturbed shards.

    A module that keeps them after backward (`set_reshard_after_backward(False)`) would otherwise run the second
    pass at the unperturbed weights.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
