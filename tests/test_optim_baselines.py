"""The paper's baselines: SAM against pytorch-optimizer's SAM, ASAM and Friendly-SAM against the references."""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from reference import loss_of, model_with_grads, vit
from torch import nn

from hf_zsharp import ASAM, SAM, FriendlySAM


def two_pass(model: nn.Module, optimizer, seed: int) -> list[torch.Tensor]:
    """One manual SAM step on batch `seed`; returns the weights at w + e."""
    optimizer.zero_grad()
    loss_of(model, seed).backward()
    optimizer.first_step(zero_grad=True)
    perturbed = [p.detach().clone() for p in model.parameters()]
    loss_of(model, seed).backward()
    optimizer.second_step(zero_grad=True)
    return perturbed


@pytest.mark.parametrize(
    ("name", "base", "kwargs"),
    [
        ("cnn", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}),
        # Adam's step lr * g / (|g| + eps) has slope up to lr / eps in g: with the default eps = 1e-8 a gradient
        # entry of 3e-8 (there is one at the first step) would magnify the two implementations' ulp-level
        # differences 1e4-fold, by an amount that depends on the CPU. eps = lr keeps the slope <= 1.
        ("mlp", torch.optim.AdamW, {"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01}),
    ],
)
def test_sam_equals_pytorch_optimizer_sam(name: str, base: type, kwargs: dict) -> None:
    from pytorch_optimizer import SAM as ReferenceSAM

    torch.manual_seed(0)
    ours_model = ref.BUILDERS[name]()
    theirs_model = copy.deepcopy(ours_model)
    ours = SAM(ours_model.parameters(), base, rho=0.05, **kwargs)
    theirs = ReferenceSAM(theirs_model.parameters(), base, rho=0.05, foreach=False, **kwargs)
    for seed in range(3):
        ours_perturbed = two_pass(ours_model, ours, seed)
        theirs_perturbed = two_pass(theirs_model, theirs, seed)
        # Both form the global norm in float32 (in a different order): agreement to a few fp32 ulps of |w|.
        for a, b in zip(ours_perturbed, theirs_perturbed, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(ours_model.state_dict().values(), theirs_model.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_asam_matches_reference(name: str) -> None:
    model = model_with_grads(name)
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    names, params = [n for n, _ in named], [p for _, p in named]
    assert any("weight" not in n for n in names)  # biases, cls token, position embeddings: T = 1
    before = [p.detach().clone() for p in params]
    expected = ref.asam_ascent(names, before, [p.grad for p in params], rho=0.5, eta=0.01)
    optimizer = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1)
    assert optimizer.first_step() is True
    for p, b, e in zip(params, before, expected, strict=True):
        want = b.double() + e
        torch.testing.assert_close(p.double(), want, rtol=2e-7, atol=1e-5 * float(e.abs().max()) + 1e-12)
    optimizer.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_asam_without_names_scales_every_tensor() -> None:
    model = model_with_grads("mlp")
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    expected = ref.asam_ascent(["weight"] * len(params), before, [p.grad for p in params])
    ASAM(model.parameters(), torch.optim.SGD, lr=0.1).first_step()
    for p, b, e in zip(params, before, expected, strict=True):
        torch.testing.assert_close(p.double(), b.double() + e, rtol=2e-7, atol=1e-5 * float(e.abs().max()))


def test_friendly_sam_matches_reference_over_steps() -> None:
    torch.manual_seed(0)
    model = vit()
    params = list(model.parameters())
    optimizer = FriendlySAM(model.parameters(), torch.optim.AdamW, rho=0.05, sigma=1.0, lmbda=0.9, lr=1e-3)
    reference = ref.FriendlySAMReference(rho=0.05, sigma=1.0, lmbda=0.9)
    for seed in range(3):
        optimizer.zero_grad()
        loss_of(model, seed).backward()
        expected = reference.ascent([p.grad for p in params])
        before = [p.detach().clone() for p in params]
        assert optimizer.first_step(zero_grad=True) is True
        for p, b, e in zip(params, before, expected, strict=True):
            # d = g - sigma m is a difference of fp32 tensors: fp32 ulps of |g| on top of the weights' ulp.
            atol = 1e-5 * float(e.abs().max()) + 2e-7 * float(b.abs().max()) + 1e-12
            torch.testing.assert_close(p.double(), b.double() + e, rtol=0, atol=atol)
        loss_of(model, seed).backward()
        optimizer.second_step(zero_grad=True)


def test_friendly_sam_first_step_is_sam() -> None:
    """With no momentum yet, Friendly-SAM's first ascent is SAM's."""
    model = model_with_grads("mlp")
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1).first_step()
    fsam = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, before, strict=True):
            p.copy_(b)
    SAM(model.parameters(), torch.optim.SGD, lr=0.1).first_step()
    assert all(torch.equal(a, p) for a, p in zip(fsam, params, strict=True))
