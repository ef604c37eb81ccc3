"""ZSharp: SAM whose ascent keeps only the gradient entries with the largest Z-scores (arXiv 2505.02369).

Per tensor with ndim > 1: z = (g - mean) / (std + 1e-12), keep `|z| > quantile(|z|, percentile)`,
f = g * mask, e = rho * f / ||f|| (per tensor; plain SAM direction if the mask is empty). 1-D tensors
get plain SAM, rho * g / ||g_all||. Since z is an increasing affine map of |g - mean|, the mask is
computed on |g - mean| directly: std never changes which entries are kept.

Only the ~(1 - percentile) share of moved entries is saved for the restore, and tensors of one shape are
selected in one batched call (`selection.top_share`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .sam import EPS, SAM, Move, check_argument, fetch, norms
from .selection import top_share
from .sharded import (
    exact_top_share,
    global_sums,
    is_sharded,
    local,
    norms_from,
    slice_of,
    squares_to_reduce,
    sums_of_squares,
)

RADII = ("tensor", "global")
MASKS = ("zscore", "magnitude", "random", "none")


@dataclass
class Selection:
    """The filtered gradients of a batch of tensors: per tensor the kept values, their flat positions (in this
    rank's shard under FSDP2), and, on the device, the norm of the kept values and how many were kept."""

    params: list[Tensor]
    values: list[Tensor]
    index: list[Tensor]
    norm: Tensor
    kept: Tensor


class ZSharp(SAM):
    """Sharpness-aware minimization with Z-score gradient filtering.

    Args:
        params: parameters or parameter groups (named parameters are accepted).
        base_optimizer: torch optimizer class for the descent step, built with `base_kwargs`.
        rho: perturbation radius (per filtered tensor with `radius="tensor"`).
        percentile: Qp; entries with |z| above the Qp quantile of their tensor are kept. 0 disables
            filtering, which is exactly SAM.
        radius: "tensor" (the paper's code: each filtered tensor moves by rho) or "global" (one
            normalisation: the whole perturbation has norm rho). Optimizer-wide.
        mask: "zscore" (the method), or the controls "magnitude" (largest |g|) and "random" (uniform
            random entries), both keeping the same share of entries, and "none" (every entry: SAM normalised
            per tensor, ZSharp's radius without its filter). Optimizer-wide.
        seed: seed of the private generator used by `mask="random"` (one per device; its state is in
            `state_dict()`, so a resumed run draws the same masks).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] = torch.optim.AdamW,
        rho: float | None = None,
        percentile: float = 0.95,
        radius: str = "tensor",
        mask: str = "zscore",
        seed: int = 0,
        **base_kwargs: Any,
    ) -> None:
        check_argument(0 <= percentile < 1, "percentile", f"must be in [0, 1), got {percentile}")
        check_argument(radius in RADII, "radius", f"must be one of {RADII}, got {radius!r}")
        check_argument(mask in MASKS, "mask", f"must be one of {MASKS}, got {mask!r}")
        filtering = {"percentile": percentile, "radius": radius, "mask": mask}
        super().__init__(params, base_optimizer, rho, method_defaults=filtering, **base_kwargs)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _moves(self, params: list[Tensor]) -> list[Move] | None:
        filtered = [p for p in params if p.ndim > 1 and self._group(p)["percentile"] > 0]
        if not filtered or (self.defaults["mask"] == "none" and self.defaults["radius"] == "global"):
            return super()._moves(params)
        if self.defaults["mask"] == "none":
            return self._layerwise_moves(params, filtered)
        if self._process_group is None:
            grad_norms, batches = torch.stack(norms([p.grad for p in params])), self._select_all(filtered)
        else:
            selected = self._select_sharded(params, filtered)
            if selected is None:
                return None
            grad_norms, batches = selected
        host = fetch(grad_norms, *(b.norm for b in batches), *(b.kept for b in batches))
        norm_of = dict(zip(map(id, params), host[0]))
        total = math.sqrt(sum(n * n for n in host[0]))
        if not math.isfinite(total):
            return None
        kept = [  # filtered tensors whose mask kept something; the others take the SAM direction
            (p, values, index, norm, int(count))
            for b, norms, counts in zip(batches, host[1 : 1 + len(batches)], host[1 + len(batches) :])
            for p, values, index, norm, count in zip(b.params, b.values, b.index, norms, counts)
            if norm > 0
        ]
        filtered_ids = {id(p) for p, *_ in kept}
        sam_direction = [p for p in params if id(p) not in filtered_ids]
        if self.defaults["radius"] == "global":  # one norm over every tensor's direction
            norm = math.sqrt(
                sum(n * n for *_, n, _ in kept) + sum(norm_of[id(p)] ** 2 for p in sam_direction)
            )
            per_tensor, dense_norm = [norm] * len(kept), norm
        else:  # each filtered tensor by its own norm; the others by the global gradient norm, as in SAM
            per_tensor, dense_norm = [n for *_, n, _ in kept], total
        moves = [
            _sparse_move(p, values, index, self._rho(p) / (divisor + EPS), n, count)
            for (p, values, index, n, count), divisor in zip(kept, per_tensor)
        ]
        moves += [
            Move(p, local(p.grad), self._rho(p) / (dense_norm + EPS), norm_of[id(p)]) for p in sam_direction
        ]
        return moves

    def _layerwise_moves(self, params: list[Tensor], filtered: list[Tensor]) -> list[Move] | None:
        """mask="none": each filtered tensor moves by rho along its whole gradient; the others as in SAM."""
        grads = [local(p.grad) for p in params]
        (host,) = self._norms(params, grads)
        total = math.sqrt(sum(n * n for n in host))
        if not math.isfinite(total):
            return None
        layerwise = {id(p) for p in filtered}
        return [
            Move(p, g, self._rho(p) / ((n if id(p) in layerwise and n > 0 else total) + EPS), n)
            for p, g, n in zip(params, grads, host)
        ]

    def _select_all(self, filtered: list[Tensor]) -> list[Selection]:
        """`_select` over the filtered tensors, batched by shape (the random mask draws in a fixed order)."""
        groups = _same_shape(filtered, self._group)
        if self.defaults["mask"] == "random":  # one generator: draw in a fixed order
            return [self._select(group) for group in groups]
        return _map_threads(self._select, groups)

    def _select_sharded(
        self, params: list[Tensor], filtered: list[Tensor]
    ) -> tuple[Tensor, list[Selection]] | None:
        """FSDP2: the gradient norms and `_select`'s batches, each statistic the whole tensor's (see `sharded`).

        Plain (replicated) tensors are selected as on one process. The random mask draws every tensor whole, as
        one process would (one collective for the norms); the others find the exact threshold in three.
        Returns None, on every rank alike, when a gradient is not finite.
        """
        group = self._process_group
        squares = sums_of_squares([local(p.grad) for p in params])
        to_reduce = squares_to_reduce(params, squares)
        buckets = _same_shape(filtered, self._group)
        if self.defaults["mask"] == "random":  # the draw needs no statistic: one collective for every sum
            batches = [self._select_slices(b) if is_sharded(b[0]) else self._select(b) for b in buckets]
            drawn = [b for b, bucket in zip(batches, buckets) if is_sharded(bucket[0])]
            reduced = global_sums(group, torch.cat([to_reduce, *(b.norm for b in drawn)]))
            kept = reduced[to_reduce.numel() :].split([len(b.params) for b in drawn])
            for b, sumsq in zip(drawn, kept):
                b.norm = sumsq.sqrt()
            return norms_from(params, squares, reduced[: to_reduce.numel()]), batches
        sharded = [p for b in buckets if is_sharded(b[0]) for p in b]
        slices = [slice_of(p, group) for p in sharded]
        percentiles = [self._group(p)["percentile"] for p in sharded]
        reduced, kept = exact_top_share(
            group, slices, percentiles, self.defaults["mask"] == "zscore", to_reduce
        )
        if kept is None:
            return None
        batches = [self._select(b) for b in buckets if not is_sharded(b[0])]
        batches += [
            Selection([p], [k.values], [k.index], k.sumsq.sqrt()[None], k.count[None])
            for p, k in zip(sharded, kept)
        ]
        return norms_from(params, squares, reduced), batches

    def _select_slices(self, params: list[Tensor]) -> Selection:
        """Random mask on sharded tensors: the whole tensors' draw and selection, as one process makes them, then
        this rank's entries; `norm` holds their local sums of squares, for the caller to reduce into the norm."""
        slices = [slice_of(p, self._process_group) for p in params]
        shape = (len(params), slices[0].numel)
        draw = torch.rand(
            shape, generator=self._generator(slices[0].grad.device), device=slices[0].grad.device
        )
        selected = top_share(draw, self._group(params[0])["percentile"])
        indices, values = [], []
        for piece, (index, keep) in zip(slices, selected):
            start, end = piece.ranges[piece.rank]
            mine = index[keep & (index >= start) & (index < end)] - start
            indices.append(mine)
            values.append(piece.grad.index_select(0, mine).float())
        sums_of_squares = torch.stack([v.double().square().sum() for v in values])
        return Selection(
            params, values, indices, sums_of_squares, torch.stack([keep.sum() for _, keep in selected])
        )

    def _select(self, params: list[Tensor]) -> Selection:
        """Filter the gradients of same-shape tensors at once: kept values, their positions, norms, counts."""
        grads = [p.grad.reshape(-1) for p in params]
        rows = (grads[0].unsqueeze(0) if len(grads) == 1 else torch.stack(grads)).float()
        mask = self.defaults["mask"]
        if mask == "zscore":
            scores = (rows - rows.sum(dim=1, keepdim=True) / rows.shape[1]).abs_()
        elif mask == "magnitude":
            scores = rows.abs()
        else:
            scores = torch.rand(rows.shape, generator=self._generator(rows.device), device=rows.device)
        selected = top_share(scores, self._group(params[0])["percentile"])
        del rows, scores
        values = [g.index_select(0, index).float() * keep for g, (index, keep) in zip(grads, selected)]
        return Selection(
            params,
            values,
            [index for index, _ in selected],
            torch.stack(torch._foreach_norm(values)),
            torch.stack([keep.sum() for _, keep in selected]),
        )

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state plus the random mask's generator states, by device."""
        state = super().state_dict()
        if self._generators:
            state["mask_generators"] = {str(d): g.get_state() for d, g in self._generators.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state and the generators; a generator saved for another index of the only device type
        in use (DDP rank 0's cuda:0, loaded on rank 1's cuda:1) is used there: all ranks draw alike."""
        state_dict = dict(state_dict)
        generators = state_dict.pop("mask_generators", {})
        super().load_state_dict(state_dict)
        devices = {p.device for group in self.param_groups for p in group["params"]}
        self._generators = {}
        for name, generator_state in generators.items():
            device = torch.device(name)
            same_type = [d for d in devices if d.type == device.type]
            if device not in devices and len(same_type) == 1:
                device = same_type[0]
            if device in devices:
                self._generator(device).set_state(generator_state.cpu())

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self._seed)
        return self._generators[device]


def _same_shape(params: list[Tensor], group_of: Any) -> list[list[Tensor]]:
    """Split `params` into lists to select in one batched call: same shape, dtype, device and param group.

    On the CPU, where the selection goes row by row anyway, each tensor stays alone (stacking would
    only add a copy).
    """
    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        key = (
            id(p)
            if p.device.type == "cpu"
            else (p.shape, p.grad.dtype, p.device, id(group_of(p)), is_sharded(p))
        )
        buckets[key].append(p)
    return list(buckets.values())


def _map_threads(function: Any, items: list) -> list:
    """`[function(x) for x in items]`; CPU items on torch's intra-op thread count at once.

    The CPU selection (`selection._kept_prefiltered`) is a chain of single-threaded NumPy/torch calls that
    release the GIL, so tensors can be processed side by side.
    """
    threads = torch.get_num_threads()
    if threads == 1 or len(items) < 2 or items[0][0].device.type != "cpu":
        return [function(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))


def _sparse_move(param: Tensor, values: Tensor, index: Tensor, alpha: float, norm: float, kept: int) -> Move:
    """A move of the entries at `index`, saved as int32 positions (half the memory of int64).

    Non-contiguous tensors (e.g. channels_last) cannot be indexed flat: they get a dense move instead. Under FSDP2
    `index` and `values` are this rank's shard's.
    """
    shard = local(param)
    if not shard.is_contiguous():
        dense = torch.zeros(shard.numel(), dtype=values.dtype, device=values.device)
        return Move(param, dense.index_put_((index,), values).view(shard.shape), alpha, norm, kept=kept)
    small = shard.numel() < 2**31
    return Move(param, values, alpha, norm, index.to(torch.int32) if small else index, kept)
