"""The fast selection kernel against the plain definition: entries above torch.quantile (linear)."""

import pytest
import torch

from hf_zsharp.optim import selection
from hf_zsharp.optim.selection import quantile_rank, top_share, top_share_centred, top_shares


def reference_kept(row: torch.Tensor, q: float) -> torch.Tensor:
    """Sorted positions of the entries strictly above torch.quantile(row, q)."""
    return (row > torch.quantile(row, q)).nonzero().squeeze(1)


def kept(index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return index[keep].sort().values


@pytest.mark.parametrize("n", [7, 1000, 70_001, 300_000])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
def test_matches_quantile_definition(n, q):
    scores = torch.randn(3, n, generator=torch.Generator().manual_seed(n)).abs()
    for row, (index, keep) in zip(scores, top_share(scores, q)):
        torch.testing.assert_close(kept(index, keep), reference_kept(row, q), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1000, 200_000])
def test_ties_and_zeros(n):
    """Many equal scores (exact zeros in a gradient) sit on the quantile: none of them is kept."""
    row = torch.zeros(n)
    row[: n // 30] = torch.rand(n // 30) + 1
    row[n // 30 : n // 10] = 0.5
    ((index, keep),) = top_share(row.unsqueeze(0), 0.95)
    torch.testing.assert_close(kept(index, keep), reference_kept(row, 0.95), rtol=0, atol=0)


def test_prefilter_fallback_is_exact(monkeypatch):
    """A sample that overestimates the bound (here: a sample of the largest entries) still gives the exact set."""
    n = 100_000
    row = torch.rand(n)
    largest = row.topk(selection._SAMPLE_SIZE).indices.numpy()
    monkeypatch.setattr(selection, "_sample_positions", lambda size: largest)
    ((index, keep),) = top_share(row.unsqueeze(0), 0.95)
    torch.testing.assert_close(kept(index, keep), reference_kept(row, 0.95), rtol=0, atol=0)


def test_does_not_touch_global_rng():
    scores = torch.rand(1, 100_000)
    state = torch.get_rng_state()
    top_share(scores, 0.95)
    assert torch.equal(state, torch.get_rng_state())


def test_rank_like_torch_quantile():
    assert quantile_rank(101, 0.5) == (50, 0.0)
    assert quantile_rank(101, 0.95)[0] == 94  # 0.95 in float32 is just below 0.95
    low, weight = quantile_rank(590_000, 0.95)
    assert low == 560_499 and 0 < weight < 1
    assert quantile_rank(70_001, 0.9)[0] == 62_999  # q in float32 puts torch's rank just below 63000


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_top_shares_matches_quantile_definition(q):
    """The accelerator kernel: several matrices of different widths at once, with ties, zeros and a 1-entry row."""
    generator = torch.Generator().manual_seed(0)
    ties = torch.zeros(2, 5000)
    ties[:, :300] = torch.rand(2, 300, generator=generator) + 1
    ties[:, 300:600] = 0.5
    matrices = [torch.randn(3, 1000, generator=generator).abs(), ties, torch.rand(1, 1), torch.rand(4, 7)]
    qs = [q, 0.95, q, 0.9]
    index, keep, counts = top_shares(matrices, qs)
    rows = [(row, mq) for m, mq in zip(matrices, qs) for row in m]
    assert len(counts) == len(rows) and sum(counts) == index.numel() == keep.numel()
    for (row, mq), i, k in zip(rows, index.split(counts), keep.split(counts)):
        torch.testing.assert_close(kept(i, k), reference_kept(row, mq), rtol=0, atol=0)


def test_centred_prefilter_matches_the_scores_it_does_not_form():
    """|row - center| in float32 (as torch forms it) on the prefilter path, against the formed scores."""
    row = torch.randn(200_000, generator=torch.Generator().manual_seed(3)) * 1e-3 + 0.25
    center = row.sum(dim=0, keepdim=True) / row.numel()
    index, keep = top_share_centred(row, center, 0.95)
    torch.testing.assert_close(kept(index, keep), reference_kept((row - center).abs(), 0.95), rtol=0, atol=0)
