"""How far ZSharp's Z-score mask is from a plain magnitude mask: the per-step Jaccard overlap, for the percentile
sweep. ZSharp keeps the entries with the largest |g - mean(g)| per tensor; the magnitude control keeps the largest
|g| at the same share. The two coincide when a tensor's gradient mean is small against its spread."""

from __future__ import annotations

import threading
from typing import Any

from torch import Tensor
from transformers import TrainerCallback

from hf_zsharp.optim import ZSharp
from hf_zsharp.optim.selection import top_share
from hf_zsharp.two_pass import unwrap_sam_optimizer

LOG_KEY = "sam_mask_jaccard"


def _kept(scores: Tensor, percentile: float) -> set[int]:
    ((index, keep),) = top_share(scores.unsqueeze(0), percentile)
    return set(index[keep].tolist())


def mask_overlap(grads: list[Tensor], percentile: float) -> tuple[int, int]:
    """(|Z ∩ M|, |Z ∪ M|) summed over the tensors: Z the Z-score mask, M the magnitude mask at `percentile`."""
    both = either = 0
    for grad in grads:
        g = grad.detach().reshape(-1).float()
        zscore, magnitude = _kept((g - g.mean()).abs(), percentile), _kept(g.abs(), percentile)
        both += len(zscore & magnitude)
        either += len(zscore | magnitude)
    return both, either


class MaskOverlap(TrainerCallback):
    """For a Z-score ZSharp run: before each ascent, the Jaccard overlap |Z ∩ M| / |Z ∪ M| over the filtered
    entries; its mean over the steps since the last training log is added to that log as `sam_mask_jaccard`.
    It reads the gradients only (`first_step` is wrapped on this optimizer instance): training is unchanged."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.lock = threading.Lock()

    def on_train_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        zsharp = unwrap_sam_optimizer(optimizer)
        if not isinstance(zsharp, ZSharp) or zsharp.defaults["mask"] != "zscore":
            return
        first_step = zsharp.first_step

        def observed_first_step(*step_args: Any, **step_kwargs: Any) -> bool:
            self.observe(zsharp)
            return first_step(*step_args, **step_kwargs)

        zsharp.first_step = observed_first_step

    def observe(self, zsharp: ZSharp) -> None:
        both = either = 0
        for group in zsharp.param_groups:
            grads = [p.grad for p in group["params"] if p.ndim > 1 and p.grad is not None]
            if group["percentile"] > 0 and grads:
                b, e = mask_overlap(grads, group["percentile"])
                both, either = both + b, either + e
        if either:
            with self.lock:
                self.values.append(both / either)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not self.values or not state.log_history or "loss" not in state.log_history[-1]:
            return
        with self.lock:
            state.log_history[-1][LOG_KEY] = sum(self.values) / len(self.values)
            self.values.clear()
