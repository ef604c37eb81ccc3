"""Exact top-share selection: the fast kernel behind ZSharp's mask.

`top_share(scores, q)` finds, for every row of a (B, N) score matrix, the entries whose score exceeds
the row's `torch.quantile(row, q)` (linear interpolation), exactly and without sorting the row, as
positions: the caller can build the mask and save just the moved entries for an exact restore.
`top_shares` does the same for many matrices of different widths at once, in O(1) ops per matrix: the
accelerator path, where every op is a kernel launch. `tests/test_selection.py` checks both against
`torch.quantile`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

_SAMPLE_SIZE = 4096
_PREFILTER_MIN_N = 65536


def quantile_rank(n: int, q: float) -> tuple[int, float]:
    """Lower index and interpolation weight of quantile `q` among `n` sorted values, as torch.quantile has them.

    torch.quantile rounds `q` to the input's precision (float32 here) and forms the rank `q * (n - 1)` in
    float64; matching that keeps the mask identical to the paper's code near the threshold.
    """
    rank = float(np.float32(q)) * (n - 1)
    low = math.floor(rank)
    return low, rank - low


def row_by_row(device: torch.device) -> bool:
    """Whether ZSharp selects tensor by tensor with the exact NumPy prefilter (the CPU) rather than batched with
    `topk` (accelerators)."""
    return device.type == "cpu"


def top_share(scores: Tensor, q: float) -> list[tuple[Tensor, Tensor]]:
    """Per row of `scores` (B, N): the entries whose score exceeds the row's `torch.quantile(row, q)`.

    Returns `(index, keep)` per row: `index` holds positions that include every such entry, and the bool
    `keep` marks which of them are above the quantile. On accelerators `index` is the fixed-size top
    k = N - floor(q (N-1)) (no host sync); on the CPU it is exactly the kept entries.
    """
    n = scores.shape[1]
    low, weight = quantile_rank(n, q)
    k = n - low
    if row_by_row(scores.device) and n >= _PREFILTER_MIN_N and k <= n // 8:
        return [_kept_prefiltered(row, low, weight) for row in scores]
    values, index = torch.topk(scores, k, dim=1, sorted=False)
    below = values.min(dim=1).values
    above = values.kthvalue(2, dim=1).values if weight > 0 else below
    keep = values > torch.lerp(below, above, weight).unsqueeze(1)
    return list(zip(index, keep))


def top_shares(matrices: list[Tensor], qs: list[float]) -> tuple[Tensor, Tensor, list[int]]:
    """`top_share`'s accelerator form for many (B_i, N_i) score matrices (float32) at once, pooled row after row:
    the positions of each row's top k = N - floor(q (N - 1)) scores, whether each is above the row's
    `torch.quantile(row, q)` (q from `qs`, one per matrix), and k per row.

    Per matrix: one `topk`, and one more for the two order statistics the quantile interpolates (the two smallest
    of the top k); then the thresholds and the keep flags of all rows in a few ops. No host sync.
    """
    tops, where, pairs, weights, counts = [], [], [], [], []
    for scores, q in zip(matrices, qs):
        rows, n = scores.shape
        low, weight = quantile_rank(n, q)
        values, index = scores.topk(n - low, dim=1, sorted=False)
        pair = values.topk(2, dim=1, largest=False).values if n - low > 1 else values.expand(rows, 2)
        tops.append(values)
        where.append(index)
        pairs.append(pair)
        weights += [weight] * rows
        counts += [n - low] * rows
    device = matrices[0].device
    pair = flat(pairs).view(-1, 2)
    weight = torch.tensor(weights, dtype=torch.float32, device=device)
    threshold = torch.lerp(pair[:, 0], pair[:, 1], weight)  # torch.quantile's float32 lerp
    top = flat(tops)
    repeats = torch.tensor(counts, device=device)
    keep = top > threshold.repeat_interleave(repeats, output_size=top.numel())
    return flat(where), keep, counts


def flat(tensors: list[Tensor]) -> Tensor:
    """The entries of `tensors` (each in its logical order) one after the other in a new 1-D tensor: one op."""
    return torch._chunk_cat(tensors, 0, 1).view(-1)


def _kept_prefiltered(row: Tensor, low: int, weight: float) -> tuple[Tensor, Tensor]:
    """Exact kept entries of one long CPU row: rank only the entries above a sampled lower bound.

    CPU `torch.topk` costs ~20 passes over the row; a comparison plus `flatnonzero` costs ~3, and NumPy's
    (on the same memory, no copy) run about twice as fast as torch's for these steps. The bound is a sample
    quantile (fixed sample positions, no global RNG use) with a four-sigma margin; if it is not below the
    quantile after all, every entry becomes a candidate, so the result is exact either way.
    """
    scores = row.numpy()
    n = scores.size
    share = (n - low) / n
    margin = 4 * math.sqrt(share * (1 - share) / _SAMPLE_SIZE)
    j = max(0, math.floor((1 - share - margin) * _SAMPLE_SIZE) - 1)
    bound = np.partition(scores[_sample_positions(n)], j)[j]
    candidates = np.flatnonzero(scores >= bound)
    if candidates.size < n - low:
        candidates = np.arange(n)
    values = scores[candidates]
    rank = low - (n - candidates.size)  # position of the quantile's lower neighbour among candidates
    pair = np.partition(values, [rank, rank + 1] if weight > 0 else rank)
    threshold = _lerp(pair[rank], pair[rank + 1] if weight > 0 else pair[rank], weight)
    index = torch.from_numpy(candidates[values > threshold])
    return index, torch.ones_like(index, dtype=torch.bool)


def _lerp(below: np.float32, above: np.float32, weight: float) -> np.float32:
    """torch.lerp's float32 formula (exact at both ends), so the threshold rounds as torch.quantile's does."""
    w = np.float32(weight)
    return below + w * (above - below) if w < 0.5 else above - (above - below) * (np.float32(1) - w)


@lru_cache(maxsize=64)
def _sample_positions(n: int) -> np.ndarray:
    """Fixed pseudo-random positions in [0, n) from a private generator."""
    return np.random.default_rng(n).integers(n, size=_SAMPLE_SIZE)
