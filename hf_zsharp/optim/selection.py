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

from hf_zsharp._compat import chunk_cat

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
        return [
            _kept_prefiltered(row, np.float32(0), low, weight) for row in scores
        ]  # scores >= 0: |s - 0| = s
    values, index = torch.topk(scores, k, dim=1, sorted=False)
    below = values.min(dim=1).values
    above = values.kthvalue(2, dim=1).values if weight > 0 else below
    keep = values > torch.lerp(below, above, weight).unsqueeze(1)
    return list(zip(index, keep))


def top_share_centred(row: Tensor, center: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """`top_share` of one CPU row's scores |row - center| (float32 `row`, a float32 one-entry `center`; the
    scores as torch computes them), without forming the scores when the row is long (the prefilter)."""
    n = row.numel()
    low, weight = quantile_rank(n, q)
    if n >= _PREFILTER_MIN_N and n - low <= n // 8:
        return _kept_prefiltered(row, center.numpy().reshape(()), low, weight)
    ((index, keep),) = top_share((row - center.reshape(())).abs_().unsqueeze(0), q)
    return index, keep


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
    weight = on_device(weights, torch.float32, device)
    threshold = torch.lerp(pair[:, 0], pair[:, 1], weight)  # torch.quantile's float32 lerp
    top = flat(tops)
    repeats = on_device(counts, torch.int64, device)
    keep = top > threshold.repeat_interleave(repeats, output_size=top.numel())
    return flat(where), keep, counts


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list as a tensor on `device`; on CUDA pinned and copied asynchronously, with no host sync (a copy
    from pageable memory would wait for the device's queue)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def flat(tensors: list[Tensor]) -> Tensor:
    """The entries of `tensors` (each in its logical order) one after the other in a new 1-D tensor: one op."""
    return chunk_cat(tensors)


def _kept_prefiltered(row: Tensor, center: np.float32, low: int, weight: float) -> tuple[Tensor, Tensor]:
    """Exact kept entries of one long CPU row, scores |row - center|: rank only the entries above a sampled bound.

    CPU `torch.topk` costs ~20 passes over the row; the candidates (scores >= the bound) cost two comparisons of
    the row against center +- bound and a `flatnonzero` (NumPy, on the same memory, about twice as fast as
    torch's CPU kernels for these), and the scores are formed for the candidates only. The bound is a sample
    quantile (fixed sample positions, no global RNG use) with a four-sigma margin; if it is not below the
    quantile after all, every entry becomes a candidate, so the result is exact either way. Likewise only the
    candidates up to a sample quantile four sigmas above are partitioned, unless the quantile lies beyond it.
    """
    values = row.numpy()
    n = values.size
    share = (n - low) / n
    margin = 4 * math.sqrt(share * (1 - share) / _SAMPLE_SIZE)
    j = max(0, math.floor((1 - share - margin) * _SAMPLE_SIZE) - 1)
    above = min(_SAMPLE_SIZE - 1, math.ceil((1 - share + margin) * _SAMPLE_SIZE)) - j - 1
    sample = np.partition(np.abs(values[_sample_positions(n)] - center), j)
    bound = sample[j]
    ceiling = np.partition(sample[j + 1 :], above)[above] if above >= 0 else bound
    candidates, scores = _at_least(values, center, bound)
    if candidates.size < n - low:
        candidates, scores = np.arange(n), np.abs(values - center)
    rank = low - (n - candidates.size)  # position of the quantile's lower neighbour among candidates
    # Both neighbours lie among the candidates <= ceiling (the lowest ones) unless the upper margin failed too.
    band = np.compress(scores <= ceiling, scores)
    part = np.partition(band if band.size >= rank + 2 else scores, rank)
    threshold = _lerp(part[rank], part[rank + 1 :].min() if weight > 0 else part[rank], weight)
    index = torch.from_numpy(np.compress(scores > threshold, candidates))
    return index, torch.ones_like(index, dtype=torch.bool)


def _at_least(values: np.ndarray, center: np.float32, bound: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Positions and scores of the entries whose float32 score |values - center| is >= `bound`, exactly.

    A score >= bound needs |x - center| >= bound (1 - 2^-24) - 2^-150 in exact arithmetic (float32 rounding), so
    x >= hi or x <= lo with the slack below finds a superset in two comparisons of the raw values; the exact
    scores of that superset (a few % of the row) then decide.
    """
    c, b = float(center), float(bound)
    slack = (abs(c) + abs(b)) * 2.0**-20 + 2.0**-140
    hi, lo = np.float32(c + b - slack), np.float32(c - b + slack)
    hi = np.nextafter(hi, np.float32(-np.inf)) if hi > c + b - slack else hi  # round outwards
    lo = np.nextafter(lo, np.float32(np.inf)) if lo < c - b + slack else lo
    if lo < hi:
        mask = np.zeros(-(-values.size // 8) * 8, dtype=bool)  # whole 8-entry words for `_flatnonzero`
        np.logical_or(values >= hi, values <= lo, out=mask[: values.size])
        superset = _flatnonzero(mask)
    else:
        superset = np.arange(values.size)
    scores = np.abs(values[superset] - center)
    above = scores >= bound
    return np.compress(above, superset), np.compress(above, scores)


def _flatnonzero(mask: np.ndarray) -> np.ndarray:
    """`np.flatnonzero` of a bool array whose size is a multiple of 8, about twice as fast on a sparse mask: the
    8-entry words holding a True first (one pass over n / 8 words), then the entries of those words only."""
    words = mask.view(np.uint64)
    nonzero = np.flatnonzero(words != 0)
    within = np.flatnonzero(words[nonzero].view(bool))
    return nonzero[within >> 3] * 8 + (within & 7)


def _lerp(below: np.float32, above: np.float32, weight: float) -> np.float32:
    """torch.lerp's float32 formula (exact at both ends), so the threshold rounds as torch.quantile's does."""
    w = np.float32(weight)
    return below + w * (above - below) if w < 0.5 else above - (above - below) * (np.float32(1) - w)


@lru_cache(maxsize=64)
def _sample_positions(n: int) -> np.ndarray:
    """Fixed pseudo-random positions in [0, n) from a private generator."""
    return np.random.default_rng(n).integers(n, size=_SAMPLE_SIZE)
