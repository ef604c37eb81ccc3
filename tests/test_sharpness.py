"""Sharpness measures: known answers on quadratics (in float64), and a small real classifier left as found.

Tolerances: the quadratics run in float64 (unit roundoff 1.1e-16) on 10 dimensions with |eigenvalues| <= 8, so
one evaluation rounds by ~1e-15 relative; 1e-10 leaves five orders of magnitude. Where an iteration is cut short,
the tolerance is its convergence, stated at the assertion.
"""

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hf_zsharp.sharpness import (
    adversarial_sharpness,
    hessian_extremes,
    lanczos_extremes,
    measure_sharpness,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# An indefinite spectrum: the negative end (-8) is larger in magnitude than the positive one (5), the case where
# power iteration returns -8 for "lambda max" and a fixed-step ascent heads for the wrong direction.
EIGS = torch.tensor([5.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.1, 0.05, 0.01, -8.0], dtype=torch.float64)
ROUNDING = 1e-10


def symmetric(eigs: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Q diag(eigs) Q^T with a random orthogonal Q."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return (q * eigs) @ q.T


class Quadratic(nn.Module):
    """L_b(w) = scale_b * 0.5 (w - w*)^T A (w - w*); the weights start at w* + offset."""

    def __init__(self, eigs: torch.Tensor = EIGS, offset: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("A", symmetric(eigs))
        self.register_buffer("w_star", torch.linspace(-1, 1, len(eigs), dtype=torch.float64))
        start = self.w_star if offset is None else self.w_star + offset
        self.w = nn.Parameter(start.clone())


def quadratic_loss(model: Quadratic, batch: dict) -> torch.Tensor:
    d = model.w - model.w_star
    return batch["scale"] * 0.5 * d @ model.A @ d


BATCHES = [
    {"scale": torch.tensor(1.0, dtype=torch.float64)},
    {"scale": torch.tensor(3.0, dtype=torch.float64)},
]
MEAN_SCALE = 2.0  # per-batch maxima averaged: (1 + 3) / 2


def trust_region_max(a: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """max_{||e|| <= rho} g.e + e.A.e / 2, for g with a component on A's top eigenvector (the "easy case").

    The maximiser is e = (mu I - A)^-1 g with mu > lambda_max and ||e|| = rho; mu is found by bisection.
    """
    lam, v = torch.linalg.eigh(a)
    gt = v.T @ g
    low, high = lam.max().item(), lam.max().item() + 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if torch.linalg.vector_norm(gt / (mid - lam)) > rho else (low, mid)
    e = v @ (gt / (high - lam))
    return (g @ e + 0.5 * e @ a @ e).item()


# ---------------------------------------------------------------------------------------------------------
# Worst-case loss increase


@pytest.mark.parametrize("rho", [0.01, 0.05, 0.5])
def test_sharpness_at_a_minimum_is_half_lambda_max_rho_squared(rho):
    value = adversarial_sharpness(Quadratic(), BATCHES, rho=rho, steps=60, loss_fn=quadratic_loss)
    exact = MEAN_SCALE * 0.5 * EIGS.max().item() * rho**2
    # At a minimum the ascent starts from a random point of the sphere (the gradient is zero) and, despite the
    # strong negative curvature, climbs to within 1e-7 in 40 trials and to rounding in 60; it never overshoots.
    assert value == pytest.approx(exact, rel=ROUNDING)
    assert value <= exact * (1 + ROUNDING)


def test_sharpness_with_a_gradient_solves_the_trust_region_problem():
    offset = 0.01 * torch.cos(torch.arange(10, dtype=torch.float64))
    model = Quadratic(offset=offset)
    rho = 0.05
    g = model.A @ offset
    base = 0.5 * offset @ model.A @ offset
    # L(w + e) - L(w) = scale * (g.e + e.A.e / 2): the trust-region maximum, per batch.
    exact = MEAN_SCALE * trust_region_max(model.A, g, rho)
    assert exact > 0 and base > 0
    value = adversarial_sharpness(model, BATCHES, rho=rho, steps=60, loss_fn=quadratic_loss)
    assert value == pytest.approx(exact, rel=ROUNDING)
    # With a gradient, SAM's starting point is close: the default 20 trials are within 1e-9 (measured 3e-15).
    default = adversarial_sharpness(model, BATCHES, rho=rho, loss_fn=quadratic_loss)
    assert exact * (1 - 1e-9) <= default <= exact * (1 + ROUNDING)


def test_scale_invariant_sharpness_solves_the_trust_region_problem_in_scaled_coordinates():
    offset = 0.01 * torch.cos(torch.arange(10, dtype=torch.float64))
    model = Quadratic(offset=offset)
    rho, eta = 0.05, 0.01
    t = model.w.detach().abs() + eta  # e = T u, ||u|| <= rho: the problem in u has T A T and T g
    exact = MEAN_SCALE * trust_region_max(t[:, None] * model.A * t, t * (model.A @ offset), rho)
    value = adversarial_sharpness(
        model, BATCHES, rho=rho, steps=60, loss_fn=quadratic_loss, scale_invariant=True, eta=eta
    )
    assert value == pytest.approx(exact, rel=ROUNDING)


class TwoLayers(nn.Module):
    """logits = W2 relu(W1 x), no biases: (c W1, W2 / c) is the same function for every c > 0."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(scale * torch.randn(6, 12, generator=gen, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(3, 6, generator=gen, dtype=torch.float64) / scale)

    def forward(self, pixel_values, labels):
        logits = torch.relu(pixel_values.flatten(1) @ self.w1.T) @ self.w2.T
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits, labels))


def test_scale_invariant_sharpness_ignores_a_rescaling_that_leaves_the_function_unchanged():
    batches = tiny_batches(dtype=torch.float64)
    plain, adaptive = [
        [
            adversarial_sharpness(TwoLayers(c), batches, rho=0.05, steps=10, scale_invariant=si, eta=0.0)
            for c in (1.0, 4.0)
        ]
        for si in (False, True)
    ]
    # Along the ascent the loss as a function of u is the same for both models: only rounding differs.
    assert adaptive[0] == pytest.approx(adaptive[1], rel=1e-9) and adaptive[0] > 0
    assert plain[0] != pytest.approx(plain[1], rel=0.01)  # the plain measure moves with the rescaling


def test_ascent_is_monotone_from_sams_point():
    offset = 0.01 * torch.cos(torch.arange(10, dtype=torch.float64))
    model = Quadratic(offset=offset)
    values = [
        adversarial_sharpness(model, BATCHES, rho=0.05, steps=steps, loss_fn=quadratic_loss)
        for steps in (0, 1, 2, 5, 10, 20)
    ]
    assert values == sorted(values)  # more trials never lose ground (steps=0: SAM's one-step point)
    assert values[0] < values[-1]


def test_a_local_maximum_has_zero_sharpness():
    # w* is the maximum of a concave quadratic: every perturbation lowers the loss.
    model = Quadratic(eigs=-EIGS.abs() - 0.1)
    assert adversarial_sharpness(model, BATCHES, rho=0.05, steps=10, loss_fn=quadratic_loss) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Hessian spectrum


def test_lanczos_on_the_whole_space_returns_both_ends_exactly():
    a = symmetric(torch.tensor([4.0, 2.5, 1.0, 0.5, 0.0, -0.2, -1.0, -3.0, -6.0, -9.5], dtype=torch.float64))
    result = lanczos_extremes(lambda v: [a @ v[0]], [torch.ones(10, dtype=torch.float64)], iters=10, tol=0)
    assert result["min"] == pytest.approx(-9.5, abs=ROUNDING * 10)
    assert result["max"] == pytest.approx(4.0, abs=ROUNDING * 10)
    assert result["iterations"] == 10


def test_lanczos_stops_early_on_an_invariant_space():
    # Nine distinct eigenvalues (0.1 twice): the Krylov space of any start has dimension 9.
    a = symmetric(EIGS)
    result = lanczos_extremes(lambda v: [a @ v[0]], [torch.ones(10, dtype=torch.float64)], iters=50, tol=0)
    assert result["iterations"] == 9
    assert (result["min"], result["max"]) == (pytest.approx(-8.0, abs=1e-9), pytest.approx(5.0, abs=1e-9))


def test_lanczos_cut_short_stays_inside_the_spectrum_within_its_error_bounds():
    eigs = torch.linspace(-2.0, 3.0, 200, dtype=torch.float64)
    a = symmetric(eigs, seed=3)
    start = [torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    result = lanczos_extremes(lambda v: [a @ v[0]], start, iters=12, tol=0)
    # Ritz values lie inside the spectrum; within each residual bound lies an eigenvalue (up to rounding).
    assert -2.0 - ROUNDING <= result["min"] < result["max"] <= 3.0 + ROUNDING
    for end in ("min", "max"):
        nearest = (eigs - result[end]).abs().min().item()
        assert nearest <= result[f"{end}_error"] + ROUNDING
    assert result["max_error"] > 1e-6  # 12 products on a dense spectrum of 200: not converged, and it says so


def outlier_operator() -> torch.Tensor:
    """Issue 18's diagonal operator: 2,000 dimensions, top eigenvalue 100, a bulk uniform in +-1e-3 and two
    negative outliers, -0.5 and -0.2. A stop on residuals <= 1e-3 x 100 accepts a bulk Ritz value as lambda_min."""
    diagonal = (
        torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    ) * 1e-3
    diagonal[:3] = torch.tensor([100.0, -0.5, -0.2], dtype=torch.float64)
    return diagonal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lanczos_keeps_iterating_until_lambda_min_converges_on_its_own_scale(seed):
    diagonal = outlier_operator()
    start = [torch.randn(2000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)]
    result = lanczos_extremes(lambda v: [diagonal * v[0]], start, iters=200)
    assert result["min_converged"] and result["max_converged"]
    assert result["min_error"] <= 1e-3 * abs(result["min"])
    # Within min_error of the Ritz value lies an eigenvalue; only -0.5 is that close (up to rounding).
    assert result["min"] == pytest.approx(-0.5, abs=result["min_error"] + ROUNDING)
    assert result["max"] == pytest.approx(100.0, abs=result["max_error"] + 100 * ROUNDING)


def test_lanczos_cut_short_says_lambda_min_did_not_converge():
    diagonal = outlier_operator()
    start = [torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    result = lanczos_extremes(lambda v: [diagonal * v[0]], start, iters=3)
    assert result["iterations"] == 3 and result["max_converged"]
    assert not result["min_converged"] and result["min_error"] > 1e-3 * abs(result["min"])


def test_hessian_extremes_of_a_quadratic_model():
    result = hessian_extremes(Quadratic(), BATCHES, iters=20, tol=0, loss_fn=quadratic_loss)
    # Hessian of the mean loss = 2 A (mean scale 2); A has nine distinct eigenvalues.
    assert result["min"] == pytest.approx(2 * -8.0, abs=1e-9)
    assert result["max"] == pytest.approx(2 * 5.0, abs=1e-9)
    assert result["iterations"] == 9


# ---------------------------------------------------------------------------------------------------------
# A real classifier


class TinyClassifier(nn.Module):
    """An HF-like image classifier: model(pixel_values=..., labels=...) -> output with .loss."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)
        ).to(dtype)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def tiny_batches(n=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [
        {"pixel_values": torch.randn(8, 3, 2, 2, generator=gen, dtype=dtype), "labels": torch.arange(8) % 3}
        for _ in range(n)
    ]


def test_real_model_is_left_exactly_as_found():
    torch.manual_seed(0)
    model = TinyClassifier()
    model.train()
    model.net[2].eval()  # a per-module mode that must come back as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    result = measure_sharpness(model, tiny_batches(), rho=0.1, ascent_steps=3, lanczos_iters=10)

    assert set(result) == {
        "sharpness", "hessian_max_eig", "hessian_min_eig", "hessian_max_eig_error", "hessian_min_eig_error",
        "hessian_max_eig_converged", "hessian_min_eig_converged", "lanczos_iterations", "loss",
    }  # fmt: skip
    assert all(isinstance(v, (int, float)) and torch.isfinite(torch.tensor(v)) for v in result.values())
    assert result["sharpness"] > 0 and result["loss"] > 0
    assert result["hessian_min_eig"] < result["hessian_max_eig"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # weights + BN stats
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model.net[2].training and model.net[4].training
    assert torch.equal(torch.get_rng_state(), rng)


def test_real_model_measured_in_eval_mode_and_reproducible():
    model = TinyClassifier()
    in_train = measure_sharpness(model.train(), tiny_batches(), rho=0.1, ascent_steps=2, lanczos_iters=5)
    in_eval = measure_sharpness(model.eval(), tiny_batches(), rho=0.1, ascent_steps=2, lanczos_iters=5)
    assert in_train == in_eval  # dropout off, BatchNorm on running stats, private seeds


def test_real_model_hessian_ends_match_the_full_hessian():
    torch.manual_seed(0)  # the model, not the tests run before, decides the spectrum
    model = TinyClassifier(torch.float64).eval()
    batches = tiny_batches(dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def mean_loss(flat):
        params = dict(zip(names, torch.split(flat, [s.numel() for s in shapes]), strict=True))
        params = {n: t.view(s) for (n, t), s in zip(params.items(), shapes, strict=True)}
        return sum(functional_call(model, params, kwargs=b).loss for b in batches) / len(batches)

    eigs = torch.linalg.eigvalsh(torch.autograd.functional.hessian(mean_loss, flat0))
    assert eigs.min() < 0 < eigs.max()  # an indefinite Hessian: both ends matter
    result = hessian_extremes(model, batches, iters=len(flat0), tol=1e-12)
    # Lanczos converges on the ends first: both residual bounds fall below 1e-12 * |lambda| well before
    # len(flat0) products; float64 HVPs of a 111-parameter model round at ~1e-15.
    assert result["max"] == pytest.approx(eigs.max().item(), rel=1e-9)
    assert result["min"] == pytest.approx(eigs.min().item(), rel=1e-9)


def test_hugging_face_vit_runs_through_double_backward():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, num_labels=3, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    batches = [{"pixel_values": torch.randn(4, 3, 8, 8), "labels": torch.tensor([0, 1, 2, 0])}]
    result = measure_sharpness(model, batches, rho=0.05, ascent_steps=2, lanczos_iters=3)
    assert result["sharpness"] >= 0 and result["hessian_max_eig"] > result["hessian_min_eig"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0.0}, "rho"),
        ({"rho": -1.0}, "rho"),
        ({"ascent_steps": -1}, "steps"),
        ({"lanczos_iters": 0}, "iters"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_sharpness(TinyClassifier(), tiny_batches(), **kwargs)


def test_empty_batches_and_missing_labels_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        measure_sharpness(TinyClassifier(), [])
    with pytest.raises(ValueError, match="empty"):
        hessian_extremes(TinyClassifier(), iter([]))
    with pytest.raises(ValueError, match="labels"):
        adversarial_sharpness(TinyClassifier(), [{"pixel_values": torch.randn(2, 3, 2, 2)}])
