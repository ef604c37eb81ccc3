"""ZSharp and the SAM baselines in timm: `--opt zsharp` in timm's optimizer factory, and the two-pass step for
timm's train.py.

Importing this module registers, in timm's optimizer registry, `zsharp`, `sam`, `asam` and `fsam` (base AdamW)
and `zsharpsgd`, `samsgd`, `asamsgd` and `fsamsgd` (base SGD with timm's momentum, 0.9 by default), so that
`create_optimizer_v2(model, "zsharp", lr=..., rho=..., percentile=...)` builds the optimizer on timm's parameter
groups (no weight decay on 1-D parameters and `no_weight_decay()` names, layer decay). Such an optimizer refuses
a plain `optimizer.step()`: in train.py, `two_pass_step` replaces the `_forward()` / `_backward(loss)` pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import OptimInfo
from timm.utils import NativeScaler, dispatch_clip_grad
from torch import Tensor, nn
from torch.optim import Optimizer

from hf_zsharp._compat import timm_grad_scaler, timm_optimizer_registry
from hf_zsharp.optim import METHODS, SAM, frozen_batchnorm_stats
from hf_zsharp.optim.second_pass import replayed_rng, rng_state

# Per base optimizer: the suffix of the registered names and the options timm's factory passes it.
BASES: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "": (torch.optim.AdamW, {"has_betas": True}),
    "sgd": (torch.optim.SGD, {"has_eps": False, "has_momentum": True}),
}


def _register() -> None:
    """Register every method of METHODS with every base of BASES (names without "_": timm's factory reads
    `lookahead_NAME` by splitting on it)."""
    registry = timm_optimizer_registry()
    for method, info in METHODS.items():
        for suffix, (base, options) in BASES.items():
            registry.register(
                OptimInfo(
                    name=method + suffix,
                    opt_class=info.cls,
                    description=f"{info.title} on torch.optim.{base.__name__}; train with "
                    "hf_zsharp.timm.two_pass_step",
                    defaults={"base_optimizer": base},
                    **options,
                )
            )


_register()


def two_pass_step(
    model: nn.Module,
    optimizer: Optimizer,
    forward: Callable[[], Tensor],
    *,
    loss_scaler: NativeScaler | torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    parameters: Iterable[Tensor] | None = None,
    need_update: bool = True,
) -> Tensor:
    """The whole sharpness-aware step, in place of train.py's `loss = _forward(); _backward(loss)`.

    `forward()` returns the loss (train.py's `_forward`, autocast included); the other arguments are those
    train.py gives `loss_scaler(...)`. Pass 1: `forward()` and backward (scaled by the loss scaler's GradScaler),
    the ascent `optimizer.first_step()` (on unscaled gradients for a method that is not scale-invariant, such as
    Friendly-SAM); pass 2, at the perturbed weights: `forward()` again with pass 1's random draws (same dropout
    and drop-path masks) and BatchNorm's running statistics frozen (they advance once per step), and backward.
    Then the weights are restored before clipping (AGC reads them), and the base step is taken as train.py's
    `_backward` takes it: unscale, clip, `scaler.step`, `scaler.update`, so an overflow skips it and lowers the
    scale. Non-finite first-pass gradients skip the second pass and the step. Returns pass 1's loss, detached.

    With a DDP model both passes' gradients are all-reduced: the ascent uses the global batch's gradient.
    `need_update=False` (`--grad-accum-steps` > 1) is refused: `_forward` reads `input` and `target` when it
    runs, so an earlier micro-batch cannot be run again at the perturbed weights.
    """
    if not need_update:
        raise ValueError(
            "two_pass_step(need_update=False): gradient accumulation (timm's --grad-accum-steps > 1) is not "
            "supported, since train.py's _forward reads the current micro-batch, and the earlier ones cannot be "
            "run again at the perturbed weights. Use --grad-accum-steps 1 (with a larger --batch-size, or more "
            "processes), or hf_zsharp.accelerate_step, which keeps each micro-batch."
        )
    sam = _sam_optimizer(optimizer)
    scaler = _grad_scaler(loss_scaler)
    device = next(model.parameters()).device
    first_draws = rng_state(device)
    loss = forward()
    _backward(loss, scaler)
    if scaler is not None and scaler.is_enabled() and not sam.scale_invariant:
        grads = [p.grad for group in sam.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
    if sam.first_step():
        try:
            model.zero_grad(set_to_none=True)
            with frozen_batchnorm_stats(model), replayed_rng(first_draws, device):
                _backward(forward(), scaler)
        finally:
            sam.restore()
    if clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        dispatch_clip_grad(
            model.parameters() if parameters is None else parameters, clip_grad, mode=clip_mode
        )
    if scaler is None:
        optimizer.step()  # finishes the step begun by first_step: the base step on pass 2's gradients
    else:
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def _backward(loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def _sam_optimizer(optimizer: Optimizer) -> SAM:
    if not isinstance(optimizer, SAM):
        raise TypeError(
            "two_pass_step needs an hf_zsharp optimizer (timm's --opt zsharp, sam, asam, fsam or their *sgd "
            f"forms, without lookahead_), got {type(optimizer).__name__}."
        )
    return optimizer


def _grad_scaler(loss_scaler: NativeScaler | torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    """The GradScaler of timm's NativeScaler (its `_scaler`), or the one given."""
    scaler = timm_grad_scaler(loss_scaler)
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"two_pass_step: loss_scaler must be timm's NativeScaler (--amp-impl native) or a "
            f"torch.amp.GradScaler, got {type(loss_scaler).__name__}: APEX's scaler scales the loss inside its "
            "own context, which cannot be split into two passes."
        )
    return scaler
