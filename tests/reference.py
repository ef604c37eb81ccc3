"""Plain, independent references of the ascent steps (ZSharp, SAM, ASAM, Friendly-SAM) for the tests,
and the small models (CNN with BatchNorm, MLP, transformers ViT) the optimizer tests run them on.

Written from the paper's code (arXiv 2505.02369) and the official ASAM / F-SAM code, one tensor at
a time in float64, with no code shared with `hf_zsharp.optim`. Each function returns the perturbation `e`
(float64) per parameter, in the order of the gradients it was given. `count_host_reads` counts the
device-to-host reads of hf_zsharp's code (each a sync on an accelerator) on the CPU.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

EPS = 1e-12  # the paper's epsilon in the std and in every norm


def exact_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q) (linear interpolation) from a float64 sort; works for any dtype and size.

    The rank is torch.quantile's: q rounded to float32 (q is cast to the float32 input's dtype), times
    (n - 1) in float64. E.g. a 3072 x 3072 tensor at q = 0.95 has rank 8965323.74 (a product rounded to
    float32 would give 8965324.0 and keep one entry fewer). torch then lerps in float32; this lerps in float64, which
    differs only when the rank is within ~1e-7 of an integer (float rounding of degenerate sizes).
    """
    values = np.sort(x.detach().reshape(-1).to(torch.float64).numpy())  # numpy's sort: ~5x torch's on CPU
    n = values.size
    position = float(np.float32(q)) * (n - 1)
    below = math.floor(position)
    above = min(below + 1, n - 1)
    weight = position - below
    start, end = float(values[below]), float(values[above])
    # Same lerp formula as torch: the form that is exact at the nearer end point.
    if weight < 0.5:
        return torch.tensor(start + weight * (end - start), dtype=torch.float64)
    return torch.tensor(end - (end - start) * (1.0 - weight), dtype=torch.float64)


def zscore_mask(grad: torch.Tensor, percentile: float) -> torch.Tensor:
    """The paper's mask: |z| > quantile(|z|, Qp) (strict), z = (g - mean) / (unbiased std + eps)."""
    g = grad.detach().to(torch.float64)
    z = (g - g.mean()) / (g.std() + EPS)
    return z.abs() > exact_quantile(z.abs(), percentile)


def magnitude_mask(grad: torch.Tensor, percentile: float) -> torch.Tensor:
    """The magnitude control: |g| > quantile(|g|, Qp) (strict)."""
    g = grad.detach().to(torch.float64).abs()
    return g > exact_quantile(g, percentile)


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """|| [||g_p|| for all p] ||_2 in float64."""
    return torch.stack([g.detach().to(torch.float64).norm() for g in grads]).norm()


def sam_ascent(grads: Sequence[torch.Tensor], rho: float = 0.05) -> list[torch.Tensor]:
    """SAM (Foret et al. 2021): e = rho * g / (||g||_all + eps)."""
    scale = rho / (global_norm(grads) + EPS)
    return [g.detach().to(torch.float64) * scale for g in grads]


def zsharp_ascent(
    grads: Sequence[torch.Tensor],
    rho: float = 0.05,
    percentile: float = 0.95,
    radius: str = "tensor",
    mask: str = "zscore",
) -> list[torch.Tensor]:
    """ZSharp's perturbation as the paper's code computes it (radius="tensor"), or with one global norm.

    percentile == 0 disables the filter (the issue requires ZSharp to equal SAM then).
    """
    if percentile == 0:
        return sam_ascent(grads, rho)
    total = global_norm(grads)
    rule = {
        "zscore": zscore_mask,
        "magnitude": magnitude_mask,
        "none": lambda g, q: torch.ones_like(g, dtype=torch.bool),
    }[mask]
    directions, filtered = [], []
    for grad in grads:
        g = grad.detach().to(torch.float64)
        if g.ndim > 1:
            f = g * rule(g, percentile)
            directions.append(f)
            filtered.append(True)
        else:
            directions.append(g)
            filtered.append(False)
    if radius == "global":
        # One normalisation over the filtered directions and the unfiltered 1-D gradients; a filtered tensor
        # whose mask is empty contributes its plain gradient (the per-tensor fallback's direction).
        directions = [
            g.detach().to(torch.float64) if keep and not d.any() else d
            for d, g, keep in zip(directions, grads, filtered, strict=True)
        ]
        scale = rho / (global_norm(directions) + EPS)
        return [d * scale for d in directions]
    out = []
    for d, grad, keep in zip(directions, grads, filtered, strict=True):
        norm = d.norm()
        if keep and norm > 0:
            out.append(rho * d / (norm + EPS))
        else:
            out.append(rho * grad.detach().to(torch.float64) / (total + EPS))
    return out


def asam_ascent(
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rho: float = 0.5,
    eta: float = 0.01,
) -> list[torch.Tensor]:
    """ASAM (Kwon et al. 2021, official code): T = |w| + eta on "weight" tensors (1 elsewhere),
    e = rho * T^2 g / (||T g||_all + 1e-16)."""
    scales = [
        p.detach().to(torch.float64).abs() + eta if "weight" in n else torch.ones((), dtype=torch.float64)
        for n, p in zip(names, params, strict=True)
    ]
    scaled = [t * g.detach().to(torch.float64) for t, g in zip(scales, grads, strict=True)]
    norm = global_norm(scaled) + 1e-16
    return [rho * t * tg / norm for t, tg in zip(scales, scaled, strict=True)]


class FriendlySAMReference:
    """Friendly-SAM (Li et al. 2024, official code): d = g - sigma * m_old, m = lmbda * m_old + (1 - lmbda) g;
    on the first call m = g and d = g; then SAM's ascent along d."""

    def __init__(self, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9) -> None:
        self.rho, self.sigma, self.lmbda = rho, sigma, lmbda
        self.momentum: list[torch.Tensor] | None = None

    def ascent(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        g = [x.detach().to(torch.float64) for x in grads]
        if self.momentum is None:
            self.momentum = [x.clone() for x in g]
            directions = g
        else:
            directions = [x - self.sigma * m for x, m in zip(g, self.momentum, strict=True)]
            self.momentum = [
                self.lmbda * m + (1 - self.lmbda) * x for x, m in zip(g, self.momentum, strict=True)
            ]
        return sam_ascent(directions, self.rho)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(config)


BUILDERS = {"cnn": cnn, "mlp": mlp, "vit": vit}


def loss_of(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """A classification loss on a fixed random batch suited to the model's input."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    labels = torch.randint(10, (8,), generator=gen)
    if isinstance(model, nn.Sequential) and isinstance(model[0], nn.Linear):
        logits = model(torch.randn(8, 20, generator=gen).to(dtype))
    elif isinstance(model, nn.Sequential):
        logits = model(torch.randn(8, 3, 8, 8, generator=gen).to(dtype))
    else:
        logits = model(pixel_values=torch.randn(8, 3, 16, 16, generator=gen).to(dtype)).logits
    return nn.functional.cross_entropy(logits.float(), labels)


def two_pass(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """One manual two-pass step (first_step, second_step) of a SAM-family optimizer on batch `seed`."""
    optimizer.zero_grad()
    loss_of(model, seed).backward()
    optimizer.first_step(zero_grad=True)
    loss_of(model, seed).backward()
    optimizer.second_step(zero_grad=True)


def model_with_grads(name: str, dtype: torch.dtype = torch.float32, zeros: bool = False) -> nn.Module:
    """A model with the gradients of one batch; `zeros` plants exact zeros (50 %, 97 %, all) and one None."""
    torch.manual_seed(0)
    model = BUILDERS[name]().to(dtype)
    loss_of(model).backward()
    if zeros:
        gen = torch.Generator().manual_seed(1)
        params = list(model.parameters())
        filtered = [p for p in params if p.ndim > 1]
        filtered[0].grad.zero_()
        for i, p in enumerate(filtered[1:]):
            share = 0.97 if i % 2 else 0.5
            p.grad.masked_fill_(torch.rand(p.shape, generator=gen) < share, 0)
        params[-1].grad = None
    return model


def count_host_reads(monkeypatch) -> list[str]:
    """Record every tensor-to-Python read made by hf_zsharp's own code: a host-device sync each on a GPU."""
    reads: list[str] = []
    package = f"{os.sep}hf_zsharp{os.sep}"

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            if package in sys._getframe(1).f_code.co_filename:
                reads.append(name)
            return original(self, *args)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    return reads
