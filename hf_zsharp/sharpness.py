"""Sharpness of a trained model: worst-case loss increase in a rho-ball and both ends of the Hessian spectrum.

All measures run in eval mode on a fixed list of batches and leave the model exactly as they found it
(weights, `.grad`, train/eval mode of every module, global RNG). Norms are global over all trainable
parameters, as in SAM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Vector = list[torch.Tensor]  # one tensor per trainable parameter
LANCZOS_TOL = 1e-3  # an end of the spectrum is converged when its residual bound is <= this x its magnitude


def hf_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Loss of a Hugging Face classifier: `model(**batch).loss` (the batch must hold `labels`)."""
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("model(**batch).loss is None: the batches must contain 'labels'")
    return loss


def _trainable(model: nn.Module) -> Vector:
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
    return [send_to_device(b, device) for b in batches]


def _norm(tensors: Vector) -> torch.Tensor:
    """Global L2 norm of a list of tensors, accumulated in at least float32."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms))


def _dot(a: Vector, b: Vector) -> float:
    """Inner product of two lists of tensors, accumulated in float64 (Lanczos' scalars need the digits)."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _axpy(alpha: float, x: Vector, y: Vector) -> Vector:
    """alpha * x + y, tensor by tensor."""
    return [yi + alpha * xi for xi, yi in zip(x, y, strict=True)]


def _scale(alpha: float | torch.Tensor, x: Vector) -> Vector:
    return [xi * (alpha.to(xi.dtype) if isinstance(alpha, torch.Tensor) else alpha) for xi in x]


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[tuple[Vector, Vector]]:
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
def _assign(params: Vector, values: Vector) -> None:
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def _random_direction(params: Vector, radius: float, seed: int) -> Vector:
    """A uniformly random point on the sphere of `radius` (private generator: global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype) for p in params]
    return _scale(radius / _norm(v), v)


def _loss_and_grad(model: nn.Module, params: Vector, batch: Any, loss_fn: LossFn) -> tuple[float, Vector]:
    """The batch loss at the current weights and its gradient (zeros for parameters the loss does not use)."""
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


# --------------------------------------------------------------------------------------------------------
# Worst-case loss increase


def adversarial_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    rho: float = 0.05,
    steps: int = 20,
    *,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    scale_invariant: bool = False,
    eta: float = 0.01,
) -> float:
    """Average over batches of max_{||e||_2 <= rho} L_b(w + e) - L_b(w) (m-sharpness, SAM literature).

    Per batch, a monotone projected gradient ascent: start at SAM's point rho * g / ||g|| (a random point
    of the sphere if g = 0, from seed + batch index), then `steps` trials e' = P(e + s * grad / ||grad||),
    P the projection onto the ball. A trial that raises the loss is kept and doubles the step s (at most
    2 rho); one that does not is dropped and halves s. The loss never decreases from one kept point to the
    next, so strong negative curvature cannot throw the ascent off (a fixed step can), and the step adapts
    to the curvature. Each trial costs one forward pass and, when kept, one backward pass. From SAM's point a
    few trials suffice (20 on a trained ResNet-20 are within 0.05 % of 80); from a random start (g = 0)
    expect a few dozen.

    `scale_invariant`: ASAM's adaptive sharpness (Kwon et al. 2021), the same ascent over e = T u with
    ||u||_2 <= rho and T = |w| + eta elementwise (w at the start), so rescaling a layer's weights (as BatchNorm
    permits) does not change the measure.
    """
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    loss_fn = loss_fn or hf_loss
    batches = _prepare(model, batches)
    increases = []
    with _measuring(model) as (params, origin):
        scale = [w.abs() + eta for w in origin] if scale_invariant else None
        for i, batch in enumerate(batches):
            _assign(params, origin)
            base, grad = _loss_and_grad(model, params, batch, loss_fn)
            grad = _times(scale, grad)
            g_norm = _norm(grad)
            u = _scale(rho / g_norm, grad) if g_norm > 0 else _random_direction(params, rho, seed + i)
            worst = _ascend(model, params, origin, batch, loss_fn, u, rho, steps, scale)
            increases.append(max(worst, base) - base)
    return sum(increases) / len(increases)


def _times(scale: Vector | None, x: Vector) -> Vector:
    """T x elementwise (x itself when T = 1)."""
    return x if scale is None else [t * xi for t, xi in zip(scale, x, strict=True)]


def _ascend(
    model: nn.Module,
    params: Vector,
    origin: Vector,
    batch: Any,
    loss_fn: LossFn,
    u: Vector,
    rho: float,
    steps: int,
    scale: Vector | None = None,
) -> float:
    """The largest loss that the monotone projected ascent from `u` finds on one batch, at w + T u (see above)."""
    _assign(params, _axpy(1.0, _times(scale, u), origin))
    best, grad = _loss_and_grad(model, params, batch, loss_fn)
    grad = _times(scale, grad)  # the gradient with respect to u
    step = rho
    for _ in range(steps):
        g_norm = _norm(grad)
        if g_norm == 0:  # a stationary point of the loss on the ball's interior: nothing to follow
            break
        trial = _axpy(step / g_norm.item(), grad, u)
        trial = _scale(min(1.0, rho / _norm(trial).item()), trial)
        _assign(params, _axpy(1.0, _times(scale, trial), origin))
        loss = loss_fn(model, batch)
        if loss.item() > best:
            best, u = loss.item(), trial
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grad = _times(
                scale, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            )
            step = min(2 * step, 2 * rho)
        else:
            step /= 2
    return best


# --------------------------------------------------------------------------------------------------------
# Hessian spectrum


def _hvp(model: nn.Module, params: Vector, batches: list[Any], v: Vector, loss_fn: LossFn) -> Vector:
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


def lanczos_extremes(
    matvec: Callable[[Vector], Vector], start: Vector, iters: int = 20, tol: float = LANCZOS_TOL
) -> dict[str, Any]:
    """Smallest and largest eigenvalue of a symmetric operator, by Lanczos with full reorthogonalisation.

    Returns {"min", "max", "min_error", "max_error", "min_converged", "max_converged", "iterations"}. The
    errors are the Ritz residuals |beta_k s_k|: an eigenvalue of the operator lies within that distance of each
    reported value (exact arithmetic), and the Ritz values lie inside the spectrum, approaching its ends from
    inside. Each end has its own test, relative to its own magnitude: converged when its residual is <= tol *
    |its value| (an end near 0 beside a large other end is thus not accepted on the other end's scale). Stops
    when both ends converged, after `iters` products, or when the Krylov space is invariant (then both values are
    exact eigenvalues and count as converged).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    q = _scale(1.0 / _norm(start).item(), start)
    basis: list[Vector] = []
    alphas: list[float] = []
    betas: list[float] = []
    result: dict[str, Any] = {}
    for k in range(iters):
        basis.append(q)
        w = matvec(q)
        alphas.append(_dot(w, q))
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough", Parlett)
            for b in basis:
                w = _axpy(-_dot(w, b), b, w)
        beta = _norm(w).item()
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        theta, vectors = torch.linalg.eigh(tridiagonal)
        residuals = (beta * vectors[-1]).abs()
        invariant = beta <= 1e-12 * theta.abs().max().item()  # w is rounding noise: the space is invariant
        ends = {"min": 0, "max": -1}
        result = {name: theta[i].item() for name, i in ends.items()}
        result |= {f"{name}_error": residuals[i].item() for name, i in ends.items()}
        result |= {
            f"{name}_converged": invariant or result[f"{name}_error"] <= tol * abs(result[name])
            for name in ends
        }
        result["iterations"] = k + 1
        if invariant or (result["min_converged"] and result["max_converged"]):
            break
        betas.append(beta)
        q = _scale(1.0 / beta, w)
    return result


def hessian_extremes(
    model: nn.Module,
    batches: Iterable[Any],
    iters: int = 20,
    tol: float = LANCZOS_TOL,
    seed: int = 0,
    *,
    loss_fn: LossFn | None = None,
) -> dict[str, Any]:
    """Smallest and largest eigenvalue of the Hessian of the batch-averaged loss (`lanczos_extremes` on HVPs).

    Negative curvature shows as a negative "min". The random start comes from a private generator seeded
    with `seed`. Attention runs on the math SDPA kernel, the only one with double backward.
    """
    loss_fn = loss_fn or hf_loss
    batches = _prepare(model, batches)
    with _measuring(model) as (params, _), _math_attention():
        start = _random_direction(params, 1.0, seed)
        return lanczos_extremes(lambda v: _hvp(model, params, batches, v, loss_fn), start, iters, tol)


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
    ascent_steps: int = 20,
    lanczos_iters: int = 20,
    *,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    scale_invariant_rho: float | None = None,
) -> dict[str, Any]:
    """The sharpness columns of the reproduction: worst-case increase (and, given `scale_invariant_rho`, its
    scale-invariant form at that radius), Hessian ends (with error bounds and convergence), loss at w."""
    batches = list(batches)
    spectrum = hessian_extremes(model, batches, lanczos_iters, seed=seed, loss_fn=loss_fn)
    measured = {
        "sharpness": adversarial_sharpness(model, batches, rho, ascent_steps, loss_fn=loss_fn, seed=seed),
        "hessian_max_eig": spectrum["max"],
        "hessian_min_eig": spectrum["min"],
        "hessian_max_eig_error": spectrum["max_error"],
        "hessian_min_eig_error": spectrum["min_error"],
        "hessian_max_eig_converged": spectrum["max_converged"],
        "hessian_min_eig_converged": spectrum["min_converged"],
        "lanczos_iterations": spectrum["iterations"],
        "loss": mean_loss(model, batches, loss_fn=loss_fn),
    }
    if scale_invariant_rho is not None:
        measured["scale_invariant_sharpness"] = adversarial_sharpness(
            model,
            batches,
            scale_invariant_rho,
            ascent_steps,
            loss_fn=loss_fn,
            seed=seed,
            scale_invariant=True,
        )
    return measured
