"""The Z-score vs magnitude mask overlap logged in the percentile sweep, against masks built with torch.quantile."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_zsharp.optim import ZSharp
from hf_zsharp.reproduce.mask_overlap import LOG_KEY, MaskOverlap, mask_overlap


def quantile_mask(scores: torch.Tensor, q: float) -> set[int]:
    """The paper's definition: keep the entries above torch.quantile(scores, q)."""
    return set(torch.nonzero(scores > torch.quantile(scores, q)).flatten().tolist())


@pytest.mark.parametrize("q", [0.8, 0.9, 0.95, 0.99])
def test_mask_overlap_is_the_jaccard_of_the_two_masks(q):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(40, 30, generator=gen) + 0.5, torch.randn(16, 3, 3, 3, generator=gen) * 0.1]
    both = either = 0
    for g in grads:
        z, m = quantile_mask((g - g.mean()).abs().flatten(), q), quantile_mask(g.abs().flatten(), q)
        both, either = both + len(z & m), either + len(z | m)
    assert mask_overlap(grads, q) == (both, either)
    assert 0 < both < either  # a mean of 0.5 against a spread of 1: the masks differ, but overlap


def test_zero_mean_gradients_give_the_same_masks():
    g = torch.tensor([[3.0, -1.0, 0.5, -3.5, 2.0, -2.0, 0.25, 0.75]])  # mean exactly 0
    both, either = mask_overlap([g], 0.5)
    assert both == either == 4


def test_the_callback_logs_the_mean_overlap_of_the_steps_since_the_last_training_log():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, rho=0.05, percentile=0.8, lr=0.1)
    callback = MaskOverlap()
    callback.on_train_begin(None, None, None, optimizer=optimizer)
    expected = []
    for _ in range(3):
        x, y = torch.randn(16, 8), torch.arange(16) % 3
        nn.functional.cross_entropy(model(x), y).backward()
        both, either = mask_overlap([p.grad for p in model.parameters() if p.ndim > 1], 0.8)
        expected.append(both / either)
        optimizer.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
    state = SimpleNamespace(log_history=[{"eval_loss": 1.0}])
    callback.on_log(None, state, None)  # an evaluation log: nothing added
    assert LOG_KEY not in state.log_history[-1]
    state.log_history.append({"loss": 1.0})
    callback.on_log(None, state, None)
    assert state.log_history[-1][LOG_KEY] == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert callback.values == []


def test_other_masks_are_left_alone():
    model = nn.Linear(4, 2)
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, mask="random", lr=0.1)
    MaskOverlap().on_train_begin(None, None, None, optimizer=optimizer)
    assert "first_step" not in vars(optimizer)
