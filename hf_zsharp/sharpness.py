"""Sharpness of a trained model: worst-case loss increase in a rho-ball and top Hessian eigenvalue.

Both measures run in eval mode on a fixed list of batches and leave the model exactly as they found it
(weights, `.grad`, train/eval mode of every module, global RNG).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def hf_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Loss of a Hugging Face classifier: `model(**batch).loss` (the batch must hold `labels`)."""
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("model(**batch).loss is None: the batches must contain 'labels'")
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (a mapping, or a single tensor) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to measure sharpness over")
    return params


def _prepare(model: nn.Module, batches: Iterable[Any]) -> list[Any]:
    """Materialise the fixed batch list on the model's device; reject an empty one."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: sharpness needs at least one batch")
    device = _trainable(model)[0].device
    return [_to_device(b, device) for b in batches]


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors, accumulated in at least float32."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Inner product of two lists of tensors, accumulated in at least float32."""
    return float(
        sum((x * y).sum(dtype=torch.promote_types(x.dtype, torch.float32)) for x, y in zip(a, b, strict=True))
    )


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Eval mode and autograd on; on exit restore every module's mode and the weights bit for bit.

    Yields the trainable parameters and a saved copy of their values.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = _trainable(model)
    saved = [p.detach().clone() for p in params]
    model.eval()
    try:
        with torch.enable_grad():
            yield params, saved
    finally:
        _assign(params, saved)
        for m, training in modes:
            m.training = training


@torch.no_grad()
def _assign(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def _random_direction(params: list[torch.Tensor], radius: float, seed: int) -> list[torch.Tensor]:
    """A uniformly random point on the sphere of `radius` (private generator: global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype) for p in params]
    scale = radius / _norm(v)
    return [t * scale.to(t.dtype) for t in v]


def adversarial_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float = 0.05,
    steps: int = 5,
    step_size: float | None = None,
    *,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> float:
    """Average over batches of max_{||e||_2 <= rho} L_b(w + e) - L_b(w) (m-sharpness, SAM literature).

    Per batch: start on the rho-sphere at a random point (so a zero gradient, e.g. at a minimum, does
    not stall), take `steps` normalised-gradient ascent steps of `step_size`, projecting back onto the
    ball, and keep the largest loss seen (e = 0 included, so the estimate is >= 0). Batch i starts from
    seed + i. The norm is global over all trainable parameters. The default step, 10 * rho, lands each iterate
    near rho * the normalised gradient (iterated SAM ascent); on a quadratic and a small MLP it converged
    faster than steps of rho or 2 * rho, which keep more of the random start.
    """
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    loss_fn = loss_fn or hf_loss
    step_size = 10 * rho if step_size is None else step_size
    batches = _prepare(model, batches)
    increases = []
    with _measuring(model) as (params, origin):
        for i, batch in enumerate(batches):
            _assign(params, origin)
            with torch.no_grad():
                base = worst = loss_fn(model, batch).item()
            e = _random_direction(params, rho, seed + i)
            for _ in range(steps):
                _assign(params, [w + d for w, d in zip(origin, e, strict=True)])
                loss = loss_fn(model, batch)
                worst = max(worst, loss.item())
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
                scale = step_size / _norm(grads).clamp_min(1e-12)
                e = [d + g * scale.to(g.dtype) for d, g in zip(e, grads, strict=True)]
                shrink = (rho / _norm(e)).clamp_max(1.0)
                e = [d * shrink.to(d.dtype) for d in e]
            _assign(params, [w + d for w, d in zip(origin, e, strict=True)])
            with torch.no_grad():
                worst = max(worst, loss_fn(model, batch).item())
            increases.append(worst - base)
    return sum(increases) / len(increases)


def _hvp(
    model: nn.Module, params: list[torch.Tensor], batches: list[Any], v: list[torch.Tensor], loss_fn: LossFn
) -> list[torch.Tensor]:
    """Hessian of the batch-averaged loss times v, by double backward one batch at a time."""
    out = [torch.zeros_like(p) for p in params]
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True, allow_unused=True)
        used = [(g, t) for g, t in zip(grads, v, strict=True) if g is not None]
        dot = sum((g * t).sum() for g, t in used)
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        for o, h in zip(out, hv, strict=True):
            if h is not None:
                o.add_(h.detach(), alpha=1 / len(batches))
    return out


def hessian_max_eigenvalue(
    model: nn.Module,
    batches: Iterable[Any],
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    *,
    loss_fn: LossFn | None = None,
) -> float:
    """Dominant eigenvalue of the Hessian of the batch-averaged loss, by power iteration on HVPs.

    Power iteration finds the eigenvalue of largest magnitude: the largest one near a minimum, where
    negative curvature is small.

    Stops after `iters` iterations or when the Rayleigh quotient changes by <= tol (relative). The random
    start comes from a private generator seeded with `seed`. Attention runs on the math SDPA kernel,
    the only one with double backward.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    loss_fn = loss_fn or hf_loss
    batches = _prepare(model, batches)
    eig = 0.0
    with _measuring(model) as (params, _), _math_attention():
        v = _random_direction(params, 1.0, seed)
        for _ in range(iters):
            hv = _hvp(model, params, batches, v, loss_fn)
            new = _dot(hv, v)
            hnorm = _norm(hv)
            converged = abs(new - eig) <= tol * max(abs(new), 1e-12)
            eig = new
            if converged or hnorm == 0:
                break
            v = [h / hnorm.to(h.dtype) for h in hv]
    return eig


def _math_attention() -> contextlib.AbstractContextManager:
    """Force the math scaled-dot-product-attention kernel (fused kernels lack double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def mean_loss(model: nn.Module, batches: Iterable[Any], *, loss_fn: LossFn | None = None) -> float:
    """Average loss over the batches, in eval mode and without gradients."""
    loss_fn = loss_fn or hf_loss
    batches = _prepare(model, batches)
    with _measuring(model), torch.no_grad():
        return sum(loss_fn(model, b).item() for b in batches) / len(batches)


def measure_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float = 0.05,
    ascent_steps: int = 5,
    power_iters: int = 20,
    *,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The sharpness row of the reproduction table: {"sharpness", "hessian_max_eig", "loss"}."""
    if power_iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {power_iters}")
    batches = list(batches)
    return {
        "sharpness": adversarial_sharpness(model, batches, rho, ascent_steps, loss_fn=loss_fn, seed=seed),
        "hessian_max_eig": hessian_max_eigenvalue(model, batches, power_iters, seed=seed, loss_fn=loss_fn),
        "loss": mean_loss(model, batches, loss_fn=loss_fn),
    }
