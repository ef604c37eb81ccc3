"""ZSharp: SAM whose ascent keeps only the gradient entries with the largest Z-scores (arXiv 2505.02369).

Per tensor with ndim > 1: z = (g - mean) / (std + 1e-12), keep `|z| > quantile(|z|, percentile)`,
f = g * mask, e = rho * f / ||f|| (per tensor; plain SAM direction if the mask is empty). 1-D tensors
get plain SAM, rho * g / ||g_all||. Since z is an increasing affine map of |g - mean|, the mask is
computed on |g - mean| directly: std never changes which entries are kept.

Only the ~(1 - percentile) share of moved entries is saved for the restore. On accelerators the selection is
batched: the gradients of all filtered tensors are copied into one flat buffer, scored in a few ops for all of
them, and ranked by one `topk` per shape (`selection.top_shares`); on the CPU each tensor is selected on its own
by an exact sampled prefilter (`selection.top_share`), tensors side by side on torch's threads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import selection
from .options import Option
from .sam import EPS, SAM, Ascent, Move, SparseMoves, fetch, norms
from .selection import flat, on_device, top_share, top_share_centred, top_shares
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
    """The filtered gradients of some tensors, pooled tensor after tensor: `counts[i]` flat positions of tensor i
    (in this rank's shard under FSDP2) and the float32 gradient values there (zeros where not kept); on the
    device, each tensor's kept norm and kept count."""

    params: list[Tensor]
    values: Tensor
    index: Tensor
    counts: list[int]
    norm: Tensor
    kept: Tensor

    def moves(
        self, rows: list[int], alphas: list[float], norms: list[float], kept: list[float]
    ) -> SparseMoves:
        """The moves of tensors `rows` (all of them in the usual case: no copy) with their step sizes."""
        if len(rows) == len(self.params):
            values, index = self.values, self.index
        else:
            pieces, positions = self.values.split(self.counts), self.index.split(self.counts)
            values, index = torch.cat([pieces[i] for i in rows]), torch.cat([positions[i] for i in rows])
        return SparseMoves(
            [self.params[i] for i in rows],
            values,
            index,
            [self.counts[i] for i in rows],
            alphas,
            [norms[i] for i in rows],
            [int(kept[i]) for i in rows],
        )


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

    options = (
        Option(
            "percentile",
            "zsharp_percentile",
            "ZSharp only: entries of each filtered gradient tensor with |z-score| above this quantile are kept for "
            "the ascent (0.95 keeps about one entry in twenty).",
            "Z-score percentile Q_p",
            check=lambda q: 0 <= q < 1,
            requirement="in [0, 1) (0 disables the filter: plain SAM)",
        ),
        Option(
            "radius",
            "sam_radius",
            "ZSharp only: normalise the filtered ascent per tensor ('tensor', the paper's code) or over all "
            "tensors at once ('global').",
            "Radius normalisation",
            choices=RADII,
        ),
        Option(
            "mask",
            "sam_mask",
            "ZSharp only: which gradient entries to keep: 'zscore' (the method), the ablation controls 'magnitude' "
            "(largest |g|) and 'random' at the same sparsity, or 'none' (every entry: SAM normalised per tensor).",
            "Mask",
            choices=MASKS,
        ),
    )

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
        filtering = {"percentile": percentile, "radius": radius, "mask": mask}
        super().__init__(params, base_optimizer, rho, method_defaults=filtering, **base_kwargs)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _moves(self, params: list[Tensor]) -> Ascent | None:
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
        # Filtered tensors whose mask kept something move sparsely; the others take the SAM direction.
        sparse = [
            (b, [i for i, n in enumerate(b_norms) if n > 0], b_norms, b_kept)
            for b, b_norms, b_kept in zip(batches, host[1 : 1 + len(batches)], host[1 + len(batches) :])
        ]
        moved = {id(b.params[i]) for b, rows, *_ in sparse for i in rows}
        sam_direction = [p for p in params if id(p) not in moved]
        if self.defaults["radius"] == "global":  # one norm over every tensor's direction
            norm = math.sqrt(
                sum(b_norms[i] ** 2 for _, rows, b_norms, _ in sparse for i in rows)
                + sum(norm_of[id(p)] ** 2 for p in sam_direction)
            )
            divisor, dense_norm = (lambda n: norm), norm
        else:  # each filtered tensor by its own norm; the others by the global gradient norm, as in SAM
            divisor, dense_norm = (lambda n: n), total
        pools = [
            b.moves(
                rows, [self._rho(b.params[i]) / (divisor(b_norms[i]) + EPS) for i in rows], b_norms, b_kept
            )
            for b, rows, b_norms, b_kept in sparse
            if rows
        ]
        dense = [
            Move(p, local(p.grad), self._rho(p) / (dense_norm + EPS), norm_of[id(p)]) for p in sam_direction
        ]
        return Ascent(dense, pools)

    def _layerwise_moves(self, params: list[Tensor], filtered: list[Tensor]) -> Ascent | None:
        """mask="none": each filtered tensor moves by rho along its whole gradient; the others as in SAM."""
        grads = [local(p.grad) for p in params]
        (host,) = self._norms(params, grads)
        total = math.sqrt(sum(n * n for n in host))
        if not math.isfinite(total):
            return None
        layerwise = {id(p) for p in filtered}
        moves = [
            Move(p, g, self._rho(p) / ((n if id(p) in layerwise and n > 0 else total) + EPS), n)
            for p, g, n in zip(params, grads, host)
        ]
        return Ascent(moves, [])

    def _select_all(self, filtered: list[Tensor]) -> list[Selection]:
        """The selections of the filtered (unsharded) tensors: on the CPU tensor by tensor (side by side on torch's
        threads, except the random mask, which draws in a fixed order), on accelerators batched (`_select_batched`)
        per device and gradient dtype."""
        if not filtered:
            return []
        if selection.row_by_row(filtered[0].device):
            if self.defaults["mask"] == "random":
                return [self._select_row(p) for p in filtered]
            return _map_threads(self._select_row, filtered)
        chunks: dict[tuple, list[list[Tensor]]] = defaultdict(list)
        for bucket in _same_shape(filtered, self._group):
            chunks[bucket[0].device, bucket[0].grad.dtype].append(bucket)
        return [self._select_batched(buckets) for buckets in chunks.values()]

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
            batches = [
                self._select_slices(b) if is_sharded(b[0]) else self._select_all(b)[0] for b in buckets
            ]
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
        batches = self._select_all([p for b in buckets if not is_sharded(b[0]) for p in b])
        batches += [
            Selection([p], k.values, k.index, [k.index.numel()], k.sumsq.sqrt()[None], k.count[None])
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
        kept = torch.stack([keep.sum() for _, keep in selected])
        return Selection(
            params, torch.cat(values), torch.cat(indices), [i.numel() for i in indices], sums_of_squares, kept
        )

    def _select_row(self, param: Tensor) -> Selection:
        """Filter one tensor's gradient (the CPU path): its exactly kept entries, their norm and count."""
        grad = param.grad.reshape(-1)
        row = grad.unsqueeze(0).float()
        mask, q = self.defaults["mask"], self._group(param)["percentile"]
        if mask == "random":
            draw = torch.rand(row.shape, generator=self._generator(row.device), device=row.device)
            ((index, keep),) = top_share(draw, q)
        else:
            center = row.sum(dim=1, keepdim=True) / row.shape[1] if mask == "zscore" else row.new_zeros(1)
            index, keep = top_share_centred(row[0], center, q)
        del row
        values = grad.index_select(0, index).float() * keep
        return Selection([param], values, index, [index.numel()], values.norm()[None], keep.sum()[None])

    def _select_batched(self, buckets: list[list[Tensor]]) -> Selection:
        """Filter the gradients of tensors of one device and dtype at once (the accelerator path), in O(shapes) ops:
        one flat float32 copy of all of them, the scores of every entry in a few ops over it, one `topk` per shape
        (`top_shares`), then the kept values, norms and counts of all tensors in a few more."""
        params = [p for bucket in buckets for p in bucket]
        device = params[0].device
        widths = [bucket[0].numel() for bucket in buckets]
        sizes = [len(bucket) * n for bucket, n in zip(buckets, widths)]
        grads = flat([p.grad for p in params]).float()
        mask = self.defaults["mask"]
        if mask == "random":
            generator = self._generator(device)
            rows = [
                torch.rand((len(b), n), generator=generator, device=device) for b, n in zip(buckets, widths)
            ]
        else:
            if mask == "zscore":  # |g - mean| per row, the mean as the CPU path forms it
                scores = torch.empty_like(grads)
                rows = [piece.view(len(b), n) for piece, b, n in zip(scores.split(sizes), buckets, widths)]
                for piece, row, n in zip(grads.split(sizes), rows, widths):
                    piece = piece.view(row.shape)
                    torch.sub(piece, piece.sum(dim=1, keepdim=True) / n, out=row)
                scores.abs_()
            else:
                scores = grads.abs()
                rows = [piece.view(len(b), n) for piece, b, n in zip(scores.split(sizes), buckets, widths)]
            del scores
        index, keep, counts = top_shares(rows, [self._group(b[0])["percentile"] for b in buckets])
        del rows
        starts = on_device(
            list(accumulate([0] + [n for b, n in zip(buckets, widths) for _ in b][:-1])), torch.int64, device
        )
        repeats = on_device(counts, torch.int64, device)
        positions = index + starts.repeat_interleave(repeats, output_size=index.numel())
        values = grads.take(positions) * keep
        norm = torch.stack(torch._foreach_norm(values.split(counts)))
        kept = torch.stack(torch._foreach_norm(keep.float().split(counts), 1))
        return Selection(params, values, index, counts, norm, kept)

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
            if selection.row_by_row(p.device)
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
    if threads == 1 or len(items) < 2 or items[0].device.type != "cpu":
        return [function(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))
