"""The SAM family's shared two-step optimizer, with SAM, ASAM and Friendly-SAM.

One step of sharpness-aware minimization is two forward/backward passes:

    loss(w).backward();      optimizer.first_step(zero_grad=True)   # w <- w + e (the ascent)
    loss(w + e).backward();  optimizer.second_step(zero_grad=True)  # restore w, base step with g(w + e)

The variants differ only in the perturbation e, computed by `_moves`; everything else (saving and
restoring the moved entries, skipping on non-finite gradients, state dicts) lives in `SAM`.

Under FSDP2 the parameters and gradients are DTensor shards: every statistic of the ascent is the whole tensor's,
reduced across ranks in one collective per step (three for ZSharp, see `sharded`), and each rank moves and
restores only its own shard.

Host-device syncs: on one process (or DDP), `first_step` makes exactly one (`fetch`). `second_step` checks the gradients on the device;
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

from .sharded import local, process_group, whole_norms

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
        *,
        method_defaults: dict[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        """`method_defaults`: the hyperparameters a variant adds to every parameter group (e.g. ASAM's eta)."""
        rho = self.default_rho if rho is None else rho
        check_argument(rho > 0, "rho", f"must be > 0, got {rho}")
        check_argument(
            isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer),
            "base_optimizer",
            f"must be a torch.optim.Optimizer class such as torch.optim.AdamW, got {base_optimizer!r}",
        )
        super().__init__(params, {"rho": rho, **(method_defaults or {}), **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        # One state too: `state_dict()` is then a plain torch one holding the base's state (what torch's
        # distributed checkpoint helpers, used for FSDP2, read), and `state` is empty only before the first step.
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.skipped_perturbation = False
        self._skip_base_step = False
        self.ascent_stats: dict[str, float] = {}
        self._saved: list[tuple[Tensor, Tensor | None, Tensor]] = []
        self._groups: dict[int, dict[str, Any]] = {}
        self._process_group = None  # FSDP2's, when the parameters are sharded (set by each first_step)
        self._skipped = 0  # steps first_step skipped (known on the host)
        self._skipped_on_device: Tensor | None = None  # steps second_step skipped (a device count)

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
        self._process_group = process_group(params)
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
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            self.base_optimizer.step()
            return
        found_inf = non_finite([local(p.grad) for p in params])
        group = process_group(params)
        if group is not None:  # FSDP2: each rank checks its shards; all skip if one finds a non-finite entry
            torch.distributed.all_reduce(found_inf, torch.distributed.ReduceOp.MAX, group=group)
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state (the base optimizer's, e.g. Adam moments) and param groups, shared with the base again.

        `Optimizer.load_state_dict` replaces the state and the group dicts (Accelerate's `prepare` calls it);
        relinking keeps an LR scheduler on this wrapper reaching the base optimizer.
        """
        super().load_state_dict(state_dict)
        self.base_optimizer.state = self.state
        self.base_optimizer.param_groups = self.param_groups

    def _moves(self, params: list[Tensor]) -> list[Move] | None:
        """SAM's perturbation for `params` (all with gradients), or None if the gradients are not finite."""
        grads = [local(p.grad) for p in params]
        (host_norms,) = self._norms(params, grads)
        return self._global_moves(params, grads, host_norms)

    def _norms(self, params: list[Tensor], *tensor_lists: list[Tensor]) -> list[list[float]]:
        """Per list of `params`' (local) tensors, their norms on the host: one `fetch`. Under FSDP2 the whole
        tensors' norms, in one collective; NaN everywhere if a rank found a non-finite one (all ranks skip)."""
        if self._process_group is None:
            return fetch(*(torch.stack(norms(tensors)) for tensors in tensor_lists))
        return fetch(*whole_norms(self._process_group, params, tensor_lists))

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
        """Save what `move` overwrites (of this rank's shard, under FSDP2), then add the perturbation."""
        param = local(move.param)
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
        super().__init__(params, base_optimizer, rho, method_defaults={"eta": eta}, **base_kwargs)

    def _moves(self, params: list[Tensor]) -> list[Move] | None:
        scales = [self._scale(p) for p in params]
        grads = [local(p.grad) for p in params]
        scaled = [g if t is None else g * t for g, t in zip(grads, scales)]
        directions = [g if t is None else g * t for g, t in zip(scaled, scales)]
        host_scaled, host_dirs = self._norms(params, scaled, directions)
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
        return local(param).abs() + group["eta"]


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
        friendly = {"sigma": sigma, "lmbda": lmbda}
        super().__init__(params, base_optimizer, rho, method_defaults=friendly, **base_kwargs)
        # Apart from `state`: a torch optimizer initialises a parameter's state only while it is empty.
        self.momentum: dict[Tensor, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """The state with each parameter's gradient EMA as "sam_momentum"; before a parameter's first ascent, zeros
        and "sam_momentum_started" 0 (a loader's template then holds every entry, as torch's distributed
        checkpoint needs: it loads only the entries a template has)."""
        state = super().state_dict()
        for index, p in enumerate(p for group in self.param_groups for p in group["params"]):
            momentum = self.momentum.get(p)
            entry = state["state"].setdefault(index, {})
            entry["sam_momentum"] = torch.zeros_like(p) if momentum is None else momentum
            entry["sam_momentum_started"] = torch.tensor(float(momentum is not None))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state, taking the gradient EMAs out of it (keys: parameter indices, or names from torch's
        distributed checkpoint helpers)."""
        saved = [key for group in state_dict["param_groups"] for key in group["params"]]
        param_of = dict(zip(saved, (p for group in self.param_groups for p in group["params"])))
        state = {key: dict(entry) for key, entry in state_dict["state"].items()}
        momenta = {
            key: (entry.pop("sam_momentum", None), entry.pop("sam_momentum_started", 0))
            for key, entry in state.items()
        }
        # No empty entries for the parameters that had only an EMA: a torch optimizer's state lists stepped ones.
        super().load_state_dict(
            {**state_dict, "state": {key: entry for key, entry in state.items() if entry}}
        )
        self.momentum = {
            param_of[key]: momentum.to(param_of[key])
            for key, (momentum, started) in momenta.items()
            if momentum is not None and float(started)
        }

    def _moves(self, params: list[Tensor]) -> list[Move] | None:
        grads = [local(p.grad) for p in params]
        momenta = [local(self.momentum.get(p)) for p in params]
        directions = [
            g if m is None else g - self._group(p)["sigma"] * m for p, g, m in zip(params, grads, momenta)
        ]
        grad_norms, direction_norms = self._norms(params, grads, directions)
        if not all(map(math.isfinite, grad_norms)):  # the momentum must not take in non-finite gradients
            return None
        for p, g, m in zip(params, grads, momenta):
            if m is None:
                self.momentum[p] = p.grad.clone()  # a DTensor under FSDP2: saved sharded
            else:
                lmbda = self._group(p)["lmbda"]
                m.mul_(lmbda).add_(g, alpha=1 - lmbda)
        return self._global_moves(params, directions, direction_norms)
