"""FSDP2: the ascent's per-tensor statistics of sharded gradients, computed globally in a fixed number of collectives.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) parameters and gradients are DTensors split by rows (`Shard(0)`,
unevenly: the last ranks may hold fewer rows or none) over one process group. The ascent moves only this rank's
rows (`local`), but every statistic that decides it is the whole tensor's: gradient norms, the non-finite check,
and ZSharp's mean, exact `torch.quantile` threshold and kept norm. `global_sums` reduces any per-tensor sums in
one `all_reduce`; `exact_top_share` finds ZSharp's thresholds with it and at most two more collectives for all
tensors at once, never gathering a tensor of more than `SMALL` entries whole:

1. `all_reduce` (float64, with the caller's sums): per tensor the gradient's sum (for the mean) and a sample of
   its values at fixed global positions (each owned by one rank, the others add 0: the sum is exact). From the
   sample every rank derives the same bounds b <= quantile <= u (`sample_bounds`, a 4-sigma margin).
2. `all_gather` of seven numbers per tensor and rank: the counts of scores < b, <= b, < u, <= u and the sums
   of g^2 over scores > b, >= u and > u. Each order statistic the threshold needs is then b, u, or strictly between
   (`locate`); where the sample missed, the whole tensor is gathered instead (a window (-inf, inf)).
3. `all_gather` of the gradient values whose scores lie strictly in (b, u) (a few % of the entries; a block of
   tied scores at b or u stays out): every rank computes the same order statistics, threshold (torch.quantile's
   float32 lerp), kept count and kept sum of squares.

Tensors of at most `SMALL` entries skip the sample and are gathered whole in step 3. Locally, after step 1 each
rank takes its candidates, its entries with scores > b, in one pass over its shard (about 6 % of the entries at
percentile 0.95): every count, sum, window value and kept entry above b comes from them. Plain (non-DTensor)
parameters next to sharded ones (FSDP2's ignored parameters) are replicated: they count once, as on one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .._compat import require_torch
from .selection import quantile_rank

require_torch("sharded statistics (FSDP2's fully_shard, DTensor)")
if torch.distributed.is_available():
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import DTensor, Shard
else:  # torch built without distributed support: no DTensor can exist
    DTensor = ProcessGroup = ()

SMALL = 8192  # tensors up to this size are gathered whole (32 KiB in float32)
SIGMAS = 4.0  # margin of the sampled bounds, in standard deviations of a sample quantile
EVERYTHING = (-math.inf, math.inf)  # the bounds of a tensor gathered whole


def local(tensor: Tensor | None) -> Tensor | None:
    """This rank's part of a DTensor, a view of its storage (in-place changes reach the parameter); others as is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor (under FSDP2: sharded; `process_group` refuses other placements)."""
    return isinstance(tensor, DTensor)


def process_group(params: list[Tensor]) -> ProcessGroup | None:
    """The process group FSDP2 shards `params` over; None when none is a DTensor (one process, DDP)."""
    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
    if not meshes:
        return None
    placements = {p.placements for p in params if isinstance(p, DTensor)}
    if len(meshes) > 1 or placements != {(Shard(0),)}:
        raise ValueError(
            "The sharpness-aware ascent supports FSDP2's default sharding, Shard(0) over one 1-D device mesh; got "
            f"placements {sorted(map(str, placements))} on {len(meshes)} mesh(es) (HSDP, tensor parallelism and "
            "other placements are not supported)."
        )
    return next(iter(meshes)).get_group()


@dataclass
class Slice:
    """This rank's slice of one sharded tensor's flat gradient: entries `ranges[rank]` of `numel` (all ranks')."""

    grad: Tensor
    numel: int
    ranges: list[tuple[int, int]]
    rank: int

    @property
    def start(self) -> int:
        return self.ranges[self.rank][0]

    def sizes(self) -> list[int]:
        return [end - start for start, end in self.ranges]


def slice_of(param: Tensor, group: ProcessGroup) -> Slice:
    """`param`'s gradient as this rank holds it. FSDP2 gives rank r the rows [r c, (r + 1) c) clipped to the
    tensor, c = ceil(rows / world) (torch.chunk's split)."""
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    rows = param.shape[0]
    size, row_numel = -(-rows // world), param.numel() // rows
    ranges = [(min(r * size, rows) * row_numel, min((r + 1) * size, rows) * row_numel) for r in range(world)]
    grad = local(param.grad).reshape(-1)
    start, end = ranges[rank]
    if grad.numel() != end - start:
        raise ValueError(
            f"Rank {rank} holds {grad.numel()} entries of a {tuple(param.shape)} parameter, not the {end - start} "
            "of FSDP2's row split: only fully_shard's default layout is supported."
        )
    return Slice(grad, param.numel(), ranges, rank)


def global_sums(group: ProcessGroup, values: Tensor) -> Tensor:
    """The float64 sum of `values` over the ranks of `group`: one `all_reduce`."""
    values = values.to(torch.float64)
    torch.distributed.all_reduce(values, group=group)
    return values


def gather_rows(group: ProcessGroup, values: Tensor) -> Tensor:
    """`values` (1-D, the same length on every rank) of all ranks as the rows of a (world, n) tensor: one `all_gather`."""
    world = torch.distributed.get_world_size(group)
    out = values.new_empty(world * values.numel())
    torch.distributed.all_gather_single(out, values.contiguous(), group=group)
    return out.view(world, values.numel())


def sums_of_squares(tensors: list[Tensor]) -> Tensor:
    """The float64 sum of squares of each tensor (this rank's parts), stacked."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square()


def squares_to_reduce(params: list[Tensor], squares: Tensor) -> Tensor:
    """What the ranks sum for whole-tensor norms: the sums of squares of sharded tensors (0 for plain ones, which
    every rank holds whole and counts once), then a flag: 1 if a plain one is not finite on this rank."""
    sharded = torch.tensor([is_sharded(p) for p in params], device=squares.device)
    flag = squares[~sharded].isfinite().all().logical_not().double().reshape(1)
    return torch.cat([torch.where(sharded, squares, 0.0), flag])


def norms_from(params: list[Tensor], squares: Tensor, reduced: Tensor) -> Tensor:
    """Whole-tensor norms from `squares_to_reduce`'s sums over the ranks: NaN for all if a rank raised the flag."""
    sharded = torch.tensor([is_sharded(p) for p in params], device=squares.device)
    whole = torch.where(sharded, reduced[:-1], squares).sqrt()
    return torch.where(reduced[-1] > 0, math.nan, whole)


def whole_norms(
    group: ProcessGroup, params: list[Tensor], tensor_lists: tuple[list[Tensor], ...]
) -> list[Tensor]:
    """Per list of tensors (this rank's parts of `params`' tensors), the whole tensors' norms: one `all_reduce`."""
    squares = [sums_of_squares(tensors) for tensors in tensor_lists]
    reduced = global_sums(group, torch.cat([squares_to_reduce(params, s) for s in squares]))
    return [norms_from(params, s, r) for s, r in zip(squares, reduced.split(len(params) + 1))]


def scores(values: Tensor, mean: float) -> Tensor:
    """ZSharp's float32 scores |g - mean| (mean 0: the magnitude mask's |g|), computed alike on every rank."""
    return (values.float() - mean).abs_()


@dataclass
class Kept:
    """ZSharp's selection in one sharded tensor: the scores above `threshold` (a float32 device scalar) are kept;
    this rank's (`index` into its flat shard, float32 `values`), and the whole tensor's `count` and `sumsq`."""

    threshold: Tensor
    index: Tensor
    values: Tensor
    count: Tensor
    sumsq: Tensor


@dataclass
class _Plan:
    """One tensor's way to its threshold: its mean, the bounds (b, u), this rank's candidates (its entries with
    scores above b: every count, sum and kept entry needed above b comes from them) and round 2's counts."""

    slice: Slice
    q: float
    mean: float
    bounds: tuple[float, float] = EVERYTHING
    index: Tensor | None = None  # the candidates' positions in the flat shard
    scores: Tensor | None = None
    values: Tensor | None = None  # their gradient values, float32
    counts: np.ndarray | None = None  # (world, 7): < b, <= b, < u, <= u; sums of g^2 over > b, >= u, > u

    def take_candidates(self, bounds: tuple[float, float]) -> Tensor:
        """Take this rank's entries with scores > b (one pass over the shard); return its row of `counts`."""
        (b, u), grad = bounds, self.slice.grad
        s = scores(grad, self.mean)
        self.bounds, self.index = bounds, (s > b).nonzero().squeeze(1)
        self.scores, self.values = s.index_select(0, self.index), grad.index_select(0, self.index).float()
        n, above_b = s.numel(), self.index.numel()
        below_b = n - above_b - ((s == b).sum() if math.isfinite(b) else 0)
        g2 = self.values.double().square()
        from_u, above_u = self.scores >= u, self.scores > u
        # With u == b the sum over scores >= u is never read (the threshold is then b).
        row = [below_b, n - above_b, below_b if u == b else n - from_u.sum(), n - above_u.sum()]
        row += [g2.sum(), g2[from_u].sum(), g2[above_u].sum()]
        return torch.stack([torch.as_tensor(x, dtype=torch.float64, device=grad.device) for x in row])

    def whole(self) -> None:
        """Gather the whole tensor: the window (-inf, inf); its counts follow from the layout alone (the sums over
        scores > -inf are never read: a threshold is never -inf)."""
        self.take_candidates(EVERYTHING)
        self.counts = np.array([[0, 0, n, n, 0, 0, 0] for n in self.slice.sizes()], dtype=np.float64)


def exact_top_share(
    group: ProcessGroup, slices: list[Slice], qs: list[float], centred: bool, sums: Tensor
) -> tuple[Tensor, list[Kept] | None]:
    """Per slice, this rank's entries whose scores exceed the whole tensor's `torch.quantile(scores, q)`, with the
    whole tensor's kept count and sum of squares; scores are |g - mean| (`centred`: ZSharp's Z-score order) or
    |g| (the magnitude mask).

    `sums` (float64, non-negative: sums of squares, flags) is reduced in the first collective and returned. If
    one of them is not finite, nothing more is computed (None), on every rank alike.
    """
    device = sums.device
    positions = [_sample_positions(s.numel, device) for s in slices]
    parts = [sums.to(torch.float64)]
    for s, where in zip(slices, positions):
        if centred:
            parts.append(s.grad.sum(dtype=torch.float64).reshape(1))
        if where is not None:
            own = (where >= s.start) & (where < s.start + s.grad.numel())
            sample = torch.zeros(where.numel(), dtype=torch.float64, device=device)
            parts.append(sample.masked_scatter_(own, s.grad[where[own] - s.start].double()))
    reduced = global_sums(group, torch.cat(parts))
    sums, rest = reduced[: sums.numel()], reduced[sums.numel() :].cpu().numpy()
    if not np.isfinite(sums.cpu().numpy()).all():
        return sums, None
    plans, rows = [], []
    for s, q, where in zip(slices, qs, positions):
        mean = float(np.float32(rest[0] / s.numel)) if centred else 0.0
        rest = rest[1:] if centred else rest
        plan = _Plan(s, q, mean)
        if where is None:
            plan.whole()
        else:
            sample = scores(torch.from_numpy(rest[: where.numel()]), mean).numpy()
            rows.append(plan.take_candidates(sample_bounds(sample, s.numel, q)))
            rest = rest[where.numel() :]
        plans.append(plan)
    _count_around_bounds(group, [plan for plan in plans if plan.counts is None], rows)
    windows = _gather_windows(group, plans)
    return sums, [_threshold(plan, window) for plan, window in zip(plans, windows)]


def sample_bounds(scores: np.ndarray, numel: int, q: float) -> tuple[float, float]:
    """Bounds b <= v_low and v_high <= u (with high probability) on the two order statistics torch.quantile
    interpolates, from a uniform sample of the scores; -inf / inf where the margin leaves the sample."""
    m = scores.size
    low, weight = quantile_rank(numel, q)
    lower, upper = low / numel, (low + (weight > 0) + 1) / numel
    margin = SIGMAS * math.sqrt(max(lower * (1 - lower), upper * (1 - upper), 1 / m) / m) + 1 / m
    j, k = math.floor((lower - margin) * m), math.ceil((upper + margin) * m)
    ordered = np.sort(scores)
    return float(ordered[j]) if j >= 0 else -math.inf, float(ordered[k]) if k < m else math.inf


def locate(rank: int, counts: np.ndarray) -> str:
    """Where the `rank`-th smallest score (0-based) lies, from the global counts of scores < b, <= b, < u, <= u:
    "b", "u", "window" (strictly between) or "missed" (outside [b, u]: the sample's bounds failed)."""
    below_b, upto_b, below_u, upto_u = counts[:4]
    if below_b <= rank < upto_b:
        return "b"
    if upto_b <= rank < below_u:
        return "window"
    if below_u <= rank < upto_u:
        return "u"
    return "missed"


def _needed_ranks(plan: _Plan) -> tuple[int, int]:
    """The 0-based ranks of the two order statistics torch.quantile interpolates (equal when it needs one)."""
    low, weight = quantile_rank(plan.slice.numel, plan.q)
    return low, low + (weight > 0)


def _count_around_bounds(group: ProcessGroup, sampled: list[_Plan], rows: list[Tensor]) -> None:
    """Round 2: every rank's counts around the bounds of each sampled tensor (see `_Plan.counts`). A tensor whose
    needed order statistics fall outside its bounds is gathered whole instead."""
    if not sampled:
        return
    gathered = gather_rows(group, torch.cat(rows)).cpu().numpy().reshape(-1, len(sampled), 7)
    for i, plan in enumerate(sampled):
        plan.counts = gathered[:, i]
        if "missed" in {locate(rank, plan.counts.sum(axis=0)) for rank in _needed_ranks(plan)}:
            plan.whole()


def _gather_windows(group: ProcessGroup, plans: list[_Plan]) -> list[Tensor | None]:
    """Round 3: per tensor whose threshold needs them, its gradient values with scores strictly in (b, u), from
    every rank in rank order; None where the needed order statistics are b or u themselves."""
    wanted = [
        i
        for i, plan in enumerate(plans)
        if "window" in {locate(rank, plan.counts.sum(axis=0)) for rank in _needed_ranks(plan)}
    ]
    windows: list[Tensor | None] = [None] * len(plans)
    if not wanted:
        return windows
    flat = torch.cat([plans[i].values[plans[i].scores < plans[i].bounds[1]] for i in wanted])
    lengths = np.array([plans[i].counts[:, 2] - plans[i].counts[:, 1] for i in wanted], dtype=np.int64).T
    padding = flat.new_zeros(int(lengths.sum(axis=1).max()) - flat.numel())
    rows = gather_rows(group, torch.cat([flat, padding]))
    ends = lengths.cumsum(axis=1)
    for column, i in enumerate(wanted):
        pieces = [rows[r, int(end - lengths[r, column]) : int(end)] for r, end in enumerate(ends[:, column])]
        windows[i] = torch.cat(pieces)
    return windows


def _threshold(plan: _Plan, window: Tensor | None) -> Kept:
    """The threshold torch.quantile would give on the whole tensor, from the counts and window, and what it keeps.

    Kept are the scores > b if the threshold is b; otherwise those >= u (> u if the threshold is u) and the
    window's above the threshold. (A window left ungathered is empty when b < threshold < u: the two order
    statistics, ranks low and low + 1, are then b and u themselves.) The threshold is never below b, so this
    rank's kept entries are among its candidates.
    """
    (b, u), total = plan.bounds, plan.counts.sum(axis=0)
    below_b, upto_b, below_u, upto_u, sumsq_above_b, sumsq_from_u, sumsq_above_u = total
    numel, device = plan.slice.numel, plan.slice.grad.device
    window_scores = None if window is None else scores(window, plan.mean)
    stats = []
    for rank in _needed_ranks(plan):
        place = locate(rank, total)
        if place == "window":  # the (rank - upto_b)-th smallest of the window (kthvalue counts from 1)
            stats.append(window_scores.kthvalue(rank - int(upto_b) + 1).values)
        else:
            stats.append(torch.tensor(b if place == "b" else u, dtype=torch.float32, device=device))
    threshold = torch.lerp(stats[0], stats[1], quantile_rank(numel, plan.q)[1])
    at_b, at_u = threshold == b, threshold == u
    case = torch.where(at_b, 0, torch.where(at_u, 2, 1))
    count = torch.tensor(
        [numel - upto_b, numel - below_u, numel - upto_u], dtype=torch.float64, device=device
    )
    sumsq = torch.tensor([sumsq_above_b, sumsq_from_u, sumsq_above_u], dtype=torch.float64, device=device)
    count, sumsq = count[case], sumsq[case]
    if window is not None:
        above = (window_scores > threshold) & ~at_b
        count = count + above.sum()
        sumsq = sumsq + window.double().square()[above].sum()
    mine = plan.scores > threshold
    return Kept(threshold, plan.index[mine], plan.values[mine], count, sumsq)


@lru_cache(maxsize=256)
def _sample_positions(numel: int, device: torch.device) -> Tensor | None:
    """Fixed pseudo-random global positions of a tensor's sample, about (0.44 numel)^(2/3) of them (the size that
    balances the sample's bytes against the window's); None for tensors gathered whole."""
    if numel <= SMALL:
        return None
    size = min(math.ceil((0.44 * numel) ** (2 / 3)), numel // 8)
    return torch.from_numpy(np.random.default_rng(numel).integers(numel, size=size)).to(device)
