"""The SAM family's shared two-step optimizer, with SAM, ASAM and Friendly-SAM.

One step of sharpness-aware minimization is two forward/backward passes:

    loss(w).backward();      optimizer.first_step(zero_grad=True)   # w <- w + e (the ascent)
    loss(w + e).backward();  optimizer.second_step(zero_grad=True)  # restore w, base step with g(w + e)

The variants differ only in the perturbation e, computed by `_moves`; everything else (saving and
restoring the moved entries, skipping on non-finite gradients, state dicts) lives in `SAM`.

Host-device syncs: `first_step` makes exactly one (`fetch`). `second_step` checks the gradients on the device;
a torch fused base optimizer (`fused=True`) skips on that device flag with no sync, any other base optimizer
needs one more transfer to decide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

EPS = 1e-12


@dataclass
class Move:
    """One parameter's share of the ascent: `alpha * values` is added at flat positions `index` (all if None).

    `norm` is the norm of `values` (a host float), used for the logged perturbation norm.
    """

    param: Tensor
    values: Tensor
    alpha: float
    norm: float
    index: Tensor | None = None
    kept: int | None = None


def fetch(*tensors: Tensor) -> list[list[float]]:
    """Copy several small tensors to the host in one transfer: every host-device sync of a step goes here."""
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).float().to(device) for t in tensors]).tolist()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()])
        start += t.numel()
    return out


def norms(tensors: list[Tensor]) -> list[Tensor]:
    """The L2 norm of each tensor, never in half precision: float32, or float64 when a tensor is float64."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch._foreach_norm(tensors, 2, dtype=dtype)


def non_finite(grads: list[Tensor]) -> Tensor:
    """Float32 device flag: 1.0 if a gradient holds inf/NaN (or its norm overflows float32); no host sync."""
    return torch.stack(norms(grads)).float().isfinite().all().logical_not().float()


def check_argument(ok: bool, name: str, message: str) -> None:
    """Raise a ValueError that names the offending argument."""
    if not ok:
        raise ValueError(f"{name}: {message}")


class SAM(Optimizer):
    """Sharpness-aware minimization (Foret et al., 2021): e = rho * g / ||g||, one global norm.

    Wraps `base_optimizer` (a torch optimizer class, built here on the same parameter groups with
    `base_kwargs`). `step(closure)` runs the whole two-pass step; `step()` without a closure finishes a
    step begun with `first_step` (restore, then base step), so `GradScaler.step(optimizer)` and
    `Trainer`'s own `optimizer.step()` work unchanged.
    """

    default_rho = 0.05

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] = torch.optim.AdamW,
        rho: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        rho = self.default_rho if rho is None else rho
        check_argument(rho > 0, "rho", f"must be > 0, got {rho}")
        check_argument(
            isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer),
            "base_optimizer",
            f"must be a torch.optim.Optimizer class such as torch.optim.AdamW, got {base_optimizer!r}",
        )
        super().__init__(params, {"rho": rho, **self._extra_defaults(), **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.skipped_perturbation = False
        self._skip_base_step = False
        self.ascent_stats: dict[str, float] = {}
        self._saved: list[tuple[Tensor, Tensor | None, Tensor]] = []
        self._groups: dict[int, dict[str, Any]] = {}
        self._skipped = 0  # steps first_step skipped (known on the host)
        self._skipped_on_device: Tensor | None = None  # steps second_step skipped (a device count)

    def _extra_defaults(self) -> dict[str, Any]:
        """Hyperparameters a variant adds to every parameter group."""
        return {}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Move the weights to w + e. Returns False, leaving them untouched, if the gradients are not finite.

        Atomic: if anything raises, the entries already moved are restored and nothing stays saved.
        """
        if self._saved:
            raise RuntimeError("first_step() called twice: call restore() or second_step() in between")
        self._groups = {id(p): group for group in self.param_groups for p in group["params"]}
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        params = [p for p in params if p.numel()]  # empty tensors move nothing
        moves = self._moves(params) if params else []
        self.skipped_perturbation = self._skip_base_step = moves is None
        if moves is None:
            self._skipped += 1
        else:
            try:
                for move in moves:
                    self._apply(move)
            except BaseException:
                self.restore()
                raise
            self.ascent_stats = _stats(moves)
        if zero_grad:
            self.zero_grad()
        return not self.skipped_perturbation

    @torch.no_grad()
    def restore(self) -> None:
        """Put back exactly the entries `first_step` moved (no-op when nothing is perturbed)."""
        for param, index, old in self._saved:
            if index is None:
                param.copy_(old)
            else:
                param.view(-1).index_put_((index,), old)
        self._saved = []

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w, then step the base optimizer with the gradients taken at w + e, if they are finite.

        The base step is skipped when this step's `first_step` found non-finite gradients
        (`skipped_perturbation` stays readable) or when the gradients now are not finite; later steps are not
        affected. The second check is a device flag: a torch fused base optimizer skips on it without a host
        sync (the `found_inf` protocol GradScaler uses); any other base optimizer reads it (one transfer).
        """
        self.restore()
        if not self._skip_base_step:
            self._base_step_if_finite()
        self._skip_base_step = False
        if zero_grad:
            self.zero_grad()

    def _base_step_if_finite(self) -> None:
        """Step the base optimizer unless a gradient is not finite, counting skips on the device."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self.base_optimizer.step()
            return
        found_inf = non_finite(grads)
        count = self._skipped_on_device
        self._skipped_on_device = found_inf if count is None else count + found_inf
        base = self.base_optimizer
        if _skips_on_device(base):
            base.found_inf = found_inf
            try:
                base.step()
            finally:
                del base.found_inf
        elif not fetch(found_inf)[0][0]:
            base.step()

    def pop_skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (either pass) since the last call; reads the device count."""
        on_device, self._skipped_on_device = self._skipped_on_device, None
        skipped, self._skipped = self._skipped, 0
        return skipped + (0 if on_device is None else int(fetch(on_device)[0][0]))

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """With `closure` (zero grads, forward, backward, return loss): the full two-pass step.

        Without: finish the current step (see `second_step`); a plain base step if nothing is perturbed (also
        skipped if the gradients are not finite).
        """
        if closure is None:
            self.second_step()
            return None
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        if self.first_step(zero_grad=True):
            with torch.enable_grad():
                closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapper's state and param groups, plus the base optimizer's state (e.g. Adam moments)."""
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load both states and keep one set of param-group dicts shared with the base optimizer.

        `Optimizer.load_state_dict` replaces the group dicts (Accelerate's `prepare` calls it); relinking
        keeps an LR scheduler on this wrapper reaching the base optimizer.
        """
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_optimizer", None)
        super().load_state_dict(state_dict)
        if base_state is not None:
            self.base_optimizer.load_state_dict(base_state)
        self.base_optimizer.param_groups = self.param_groups

    def _moves(self, params: list[Tensor]) -> list[Move] | None:
        """SAM's perturbation for `params` (all with gradients), or None if the gradients are not finite."""
        grads = [p.grad for p in params]
        (host_norms,) = fetch(torch.stack(norms(grads)))
        return self._global_moves(params, grads, host_norms)

    def _global_moves(
        self, params: list[Tensor], directions: list[Tensor], direction_norms: list[float]
    ) -> list[Move] | None:
        """e = rho * d / ||d|| with one norm over all tensors; None when that norm is not finite."""
        total = math.sqrt(sum(n * n for n in direction_norms))
        if not math.isfinite(total):
            return None
        return [
            Move(p, d, self._rho(p) / (total + EPS), n)
            for p, d, n in zip(params, directions, direction_norms)
        ]

    def _rho(self, param: Tensor) -> float:
        return self._group(param)["rho"]

    def _group(self, param: Tensor) -> dict[str, Any]:
        """The param group holding `param` (indexed at the start of each `first_step`)."""
        return self._groups[id(param)]

    def _apply(self, move: Move) -> None:
        """Save what `move` overwrites, then add the perturbation."""
        param = move.param
        if move.index is None:
            self._saved.append((param, None, param.clone()))
            if abs(move.alpha) <= torch.finfo(param.dtype).max:
                param.add_(move.values.to(param.dtype), alpha=move.alpha)
            else:  # e.g. fp16 with gradients near zero: alpha = rho / ||g|| overflows, rho * g / ||g|| does not
                param.add_(move.values * move.alpha)
        else:
            flat = param.view(-1)
            self._saved.append((param, move.index, flat.index_select(0, move.index)))
            flat.index_add_(0, move.index, (move.values * move.alpha).to(param.dtype))


def _stats(moves: list[Move]) -> dict[str, float]:
    """Norm of the whole perturbation and the share of entries it moved, for logging."""
    norm = math.sqrt(sum((m.alpha * m.norm) ** 2 for m in moves))
    numel = sum(m.param.numel() for m in moves)
    kept = sum(m.param.numel() if m.kept is None else m.kept for m in moves)
    return {"perturbation_norm": norm, "kept_fraction": kept / max(numel, 1)}


_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def _skips_on_device(optimizer: Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` flag: torch's fused Adam(W), SGD and Adagrad.

    Not fused SGD before its momentum buffers exist: skipping its first step leaves them uninitialised.
    """
    if not (isinstance(optimizer, _FUSED) and getattr(optimizer, "_step_supports_amp_scaling", False)):
        return False
    return not isinstance(optimizer, torch.optim.SGD) or all(
        group["momentum"] == 0 or "momentum_buffer" in optimizer.state.get(p, {})
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    )


def _position(params: list[Tensor], param: Tensor) -> int:
    return next(i for i, p in enumerate(params) if p is param)


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): e = rho * T^2 g / ||T g|| with T = |w| + eta.

    As in the authors' code, T applies to parameters whose name contains "weight" (pass
    `model.named_parameters()`); without names it applies to every parameter.
    """

    default_rho = 0.5

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] = torch.optim.AdamW,
        rho: float | None = None,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        check_argument(eta >= 0, "eta", f"must be >= 0, got {eta}")
        self._eta = eta
        super().__init__(params, base_optimizer, rho, **base_kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return {"eta": self._eta}

    def _moves(self, params: list[Tensor]) -> list[Move] | None:
        scales = [self._scale(p) for p in params]
        scaled = [p.grad if t is None else p.grad * t for p, t in zip(params, scales)]
        directions = [g if t is None else g * t for g, t in zip(scaled, scales)]
        scaled_norms = norms(scaled)
        direction_norms = norms(directions)
        host_scaled, host_dirs = fetch(torch.stack(scaled_norms), torch.stack(direction_norms))
        total = math.sqrt(sum(n * n for n in host_scaled))
        if not math.isfinite(total):
            return None
        return [Move(p, d, self._rho(p) / (total + EPS), n) for p, d, n in zip(params, directions, host_dirs)]

    def _scale(self, param: Tensor) -> Tensor | None:
        """T = |w| + eta for adapted parameters, None (T = 1) otherwise."""
        group = self._group(param)
        names = group.get("param_names")
        if names is not None and "weight" not in names[_position(group["params"], param)]:
            return None
        return param.abs() + group["eta"]


class FriendlySAM(SAM):
    """Friendly-SAM (Li et al., 2024): SAM on d = g - sigma * m, m an EMA (factor lmbda) of past gradients.

    As in the authors' code, the first step uses d = g and starts m = g.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] = torch.optim.AdamW,
        rho: float | None = None,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **base_kwargs: Any,
    ) -> None:
        check_argument(0 <= lmbda < 1, "lmbda", f"must be in [0, 1), got {lmbda}")
        self._friendly = {"sigma": sigma, "lmbda": lmbda}
        super().__init__(params, base_optimizer, rho, **base_kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return dict(self._friendly)

    def _moves(self, params: list[Tensor]) -> list[Move] | None:
        grads = [p.grad for p in params]
        momenta = [self.state[p].get("momentum") for p in params]
        directions = [
            g if m is None else g - self._group(p)["sigma"] * m for p, g, m in zip(params, grads, momenta)
        ]
        grad_norms, direction_norms = fetch(torch.stack(norms(grads)), torch.stack(norms(directions)))
        if not all(map(math.isfinite, grad_norms)):  # the momentum must not take in non-finite gradients
            return None
        for p, g, m in zip(params, grads, momenta):
            if m is None:
                self.state[p]["momentum"] = g.clone()
            else:
                lmbda = self._group(p)["lmbda"]
                m.mul_(lmbda).add_(g, alpha=1 - lmbda)
        return self._global_moves(params, directions, direction_norms)
