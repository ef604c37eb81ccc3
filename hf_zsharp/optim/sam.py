"""The SAM family's shared two-step optimizer, with SAM, ASAM and Friendly-SAM.

One step of sharpness-aware minimization is two forward/backward passes:

    loss(w).backward();      optimizer.first_step(zero_grad=True)   # w <- w + e (the ascent)
    loss(w + e).backward();  optimizer.second_step(zero_grad=True)  # restore w, base step with g(w + e)

The variants differ only in the perturbation e, computed by `_moves`; everything else (saving and
restoring the moved entries, skipping on non-finite gradients, state dicts) lives in `SAM`. Moves, saves and
restores are horizontally fused: one `torch._foreach_*` op per group of whole-tensor moves (same device, dtype and
step size), and for the moves of chosen entries (ZSharp) one `take` and one `put_` per tensor on a pool of
positions scaled in one op; a step costs O(parameter tensors + shapes) kernels, not O(ops x tensors).

Under FSDP2 the parameters and gradients are DTensor shards: every statistic of the ascent is the whole tensor's,
reduced across ranks in one collective per step (three for ZSharp, see `sharded`), and each rank moves and
restores only its own shard.

Host-device syncs: on one process (or DDP), `first_step` makes exactly one (`fetch`). `second_step` checks the gradients on the device;
a torch fused base optimizer (`fused=True`) skips on that device flag with no sync, any other base optimizer
needs one more transfer to decide.

The contract of `step`: a step is begun by `first_step` (or `begin_plain_step`, for a step without ascent) and
finished by `second_step` or `step()`; `step(closure)` takes the whole step; `step()` with nothing begun raises, so
a loop that knows only `optimizer.step()` cannot silently train with the base optimizer alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.optim import Optimizer

from hf_zsharp._compat import honours_found_inf, step_unless_found_inf
from hf_zsharp.keys import ASCENT_STATISTICS

from . import selection
from .options import Option
from .second_pass import frozen_batchnorm_stats, replayed_rng, rng_state
from .sharded import local, process_group, whole_norms

EPS = 1e-12
# What `step()` says when no step was begun: how to take the two-pass step instead of a silent base step.
NO_STEP_BEGUN = (
    "{name}.step() was called without a closure and without first_step(): a sharpness-aware step takes two "
    "forward/backward passes. Call optimizer.step(closure) with a closure that runs forward and backward and returns "
    "the loss, or first_step() / second pass / second_step(); in your framework use its hf_zsharp integration "
    "(ZSharpTrainer or ZSharpMixin, accelerate_step, hf_zsharp.lightning.ZSharpLightningModule, "
    "hf_zsharp.timm.two_pass_step); begin_plain_step() first takes a deliberate step without ascent."
)


@dataclass
class Move:
    """One parameter's share of the ascent: `alpha * values` is added to the whole tensor.

    `norm` is the norm of `values` (a host float), used for the logged perturbation norm.
    """

    param: Tensor
    values: Tensor
    alpha: float
    norm: float


@dataclass
class SparseMoves:
    """Moves of chosen entries of several tensors, pooled: tensor i adds `alphas[i]` times its `counts[i]` values
    (the next slice of `values`, float32) at the logical flat positions in the same slice of `index` (int64).

    `norms[i]` is the norm of tensor i's values and `kept[i]` how many of them are kept (the others are zeros
    that ride along: a fixed-size top-k on accelerators), host numbers for the logged statistics.
    """

    params: list[Tensor]
    values: Tensor
    index: Tensor
    counts: list[int]
    alphas: list[float]
    norms: list[float]
    kept: list[int]


@dataclass
class Ascent:
    """A step's perturbation: whole-tensor moves and pools of sparse ones."""

    dense: list[Move]
    sparse: list[SparseMoves]

    def stats(self) -> dict[str, float]:
        """Norm of the whole perturbation and the share of entries it moved (ASCENT_STATISTICS), for logging."""
        squares = [(m.alpha * m.norm) ** 2 for m in self.dense]
        squares += [(a * n) ** 2 for s in self.sparse for a, n in zip(s.alphas, s.norms)]
        numel = sum(m.param.numel() for m in self.dense) + sum(
            p.numel() for s in self.sparse for p in s.params
        )
        kept = sum(m.param.numel() for m in self.dense) + sum(sum(s.kept) for s in self.sparse)
        return dict(zip(ASCENT_STATISTICS, (math.sqrt(sum(squares)), kept / max(numel, 1))))


def fetch(*tensors: Tensor) -> list[list[float]]:
    """Copy several small tensors to the host in one transfer: every host-device sync of a step goes here."""
    device = tensors[0].device
    flat = torch.cat([(t if t.dim() == 1 else t.reshape(-1)).to(device) for t in tensors]).tolist()
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


@runtime_checkable
class TwoPassOptimizer(Protocol):
    """What the two-pass step (`hf_zsharp.two_pass.TwoPassStep`, the Lightning and timm integrations) needs of a
    sharpness-aware optimizer. `SAM` provides it for every variant, which changes only the ascent (`_moves`)."""

    param_groups: list[dict[str, Any]]
    ascent_stats: dict[str, float]  # after a first_step that moved the weights: ASCENT_STATISTICS
    scale_invariant: (
        bool  # whether the ascent ignores a global gradient scale (a GradScaler's): else unscale first
    )

    def first_step(self, zero_grad: bool = False) -> bool:
        """The ascent to w + e; False, moving nothing, when the gradients are not finite (the step is skipped)."""

    def restore(self) -> None:
        """Put back exactly what `first_step` moved."""

    def begin_plain_step(self) -> None:
        """Begin a step without ascent (the next `step()` is the base step alone)."""

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Finish a begun step: the base step on the current (second-pass) gradients, skipped if not finite."""

    def pop_skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients since the last call."""


def check_argument(ok: bool, name: str, message: str) -> None:
    """Raise a ValueError that names the offending argument."""
    if not ok:
        raise ValueError(f"{name}: {message}")


class SAM(Optimizer):
    """Sharpness-aware minimization (Foret et al., 2021): e = rho * g / ||g||, one global norm.

    Wraps `base_optimizer` (a torch optimizer class, built here on the same parameter groups with
    `base_kwargs`). `step(closure)` runs the whole two-pass step; `step()` without a closure finishes a
    step begun with `first_step` (restore, then base step), so `GradScaler.step(optimizer)` and
    `Trainer`'s own `optimizer.step()` work unchanged, and raises when no step was begun.
    `adaptive=True` (davda54/sam's flag) is ASAM with eta 0: e = rho * T^2 g / ||T g||, T = |w|.
    """

    default_rho = 0.05
    # The method's hyper-parameters beyond rho (each checked here, and a flag of the training arguments).
    options: tuple[Option, ...] = ()
    # Whether the ascent is the same for gradients scaled by any positive factor (a GradScaler's loss scale); if
    # not, the two-pass step unscales the first-pass gradients before `first_step`.
    scale_invariant = True

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] = torch.optim.AdamW,
        rho: float | None = None,
        adaptive: bool = False,
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
        self.adaptive = bool(adaptive)
        method_defaults = {**({"eta": 0.0} if adaptive else {}), **(method_defaults or {})}
        for option in self.options:
            option.validate(method_defaults[option.name])
        self.method_keys = ("rho", *method_defaults)
        super().__init__(params, {"rho": rho, **method_defaults, **base_kwargs})
        complex_params = [
            _name(group, p) for group in self.param_groups for p in group["params"] if p.is_complex()
        ]
        check_argument(
            not complex_params,
            "params",
            f"complex parameters are not supported (the ascent's norms and statistics are real): {', '.join(complex_params)}",
        )
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        # One state too: `state_dict()` is then a plain torch one holding the base's state (what torch's
        # distributed checkpoint helpers, used for FSDP2, read), and `state` is empty only before the first step.
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.skipped_perturbation = False
        self.skips = Skips()
        # A step begun (first_step or begin_plain_step) that step() or second_step finishes.
        self._begun = False
        self.ascent_stats: dict[str, float] = {}
        # Per applied group: its tensors, then (dense) None, None and their copies, or (sparse) the positions
        # (int32 when they fit), per-tensor counts and the old values.
        self._saved: list[tuple[list[Tensor], Tensor | None, list[int] | None, list[Tensor]]] = []
        self._groups: dict[int, dict[str, Any]] = {}
        self._process_group = None  # FSDP2's, when the parameters are sharded (set by each first_step)

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
        sparse = [_name(self._groups[id(p)], p) for p in params if p.grad.is_sparse]
        if sparse:
            raise ValueError(
                f"{type(self).__name__} needs dense gradients; these are sparse: {', '.join(sparse)} (e.g. "
                "nn.Embedding(sparse=True): build it with sparse=False)."
            )
        self._begun = True
        self._process_group = process_group(params)
        ascent = self._moves(params) if params else Ascent([], [])
        self.skipped_perturbation = ascent is None
        self.skips.ascent(perturbed=ascent is not None)
        if ascent is not None:
            try:
                self._apply(ascent)
            except BaseException:
                self.restore()
                raise
            self.ascent_stats = ascent.stats()
        if zero_grad:
            self.zero_grad()
        return not self.skipped_perturbation

    @torch.no_grad()
    def restore(self) -> None:
        """Put back exactly the entries `first_step` moved (no-op when nothing is perturbed), last moved first."""
        for params, index, counts, old in reversed(self._saved):
            if index is None:
                torch._foreach_copy_(params, old)
            else:
                for param, positions, values in zip(params, index.long().split(counts), old):
                    _set_at(param, positions, values)
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
        self._begun = False
        if self.skips.take_base_step():
            self._base_step_if_finite()
        if zero_grad:
            self.zero_grad()

    def begin_plain_step(self) -> None:
        """Begin a step without ascent: the next `step()` is the base optimizer's step alone (skipped if the
        gradients are not finite). For deliberate plain steps, such as those between `sam_interval` ones."""
        if self._saved:
            raise RuntimeError(
                "begin_plain_step() after first_step(): finish that step with second_step() first"
            )
        self.skips.take_base_step()  # a skip left by a step that never reached step() does not skip this one
        self._begun = True

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
        self.skips.second_pass(found_inf)
        base = self.base_optimizer
        if _skips_on_device(base):
            step_unless_found_inf(base, found_inf)
        elif not fetch(found_inf)[0][0]:
            base.step()

    def pop_skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (either pass) since the last call; reads the device count."""
        return self.skips.pop()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Without `closure`: finish the step begun by `first_step` or `begin_plain_step` (see `second_step`);
        raises if none was begun, unless every gradient is zero or absent: then the two-pass step's ascent would
        be zero and its step the base step, which is taken (torch's distributed checkpoint initialises an
        optimizer's state so, with zero gradients at lr 0).

        With `closure` (forward, backward, return the loss): the whole two-pass step, two passes in all. If the
        gradients of the first pass are already there (davda54/sam's `loss.backward(); optimizer.step(closure)`),
        the closure runs once, as the second pass; otherwise (no gradient since the last step, as in torch's
        closure idiom or Lightning's) it runs the first pass too, and the second replays its random draws. The
        second pass leaves BatchNorm running statistics alone. Returns the first pass's loss when the closure
        ran it (else None); the gradients are cleared (None) afterwards, so the next step starts clean.
        """
        if closure is None:
            if not self._begun and not self._gradients_all_zero():
                raise RuntimeError(NO_STEP_BEGUN.format(name=type(self).__name__))
            self.second_step()
            return None
        if self._begun:
            raise RuntimeError(
                "step(closure) while a step is begun (first_step or begin_plain_step): finish it with step() or "
                "second_step() first"
            )
        loss, replay = None, None
        device = next((p.device for group in self.param_groups for p in group["params"]), torch.device("cpu"))
        if self._has_gradients():
            self._refuse_lightning(closure)  # Lightning's gradients here are an earlier micro-batch's
        else:
            replay = rng_state(device)
            with torch.enable_grad():
                loss = closure()
            if self._begun:  # the closure took both passes itself (hf_zsharp.lightning's): finish the step
                return self._finish_closure_step(loss)
            self._refuse_lightning(closure)
        if self.first_step(zero_grad=True):
            with torch.enable_grad(), frozen_batchnorm_stats(), replayed_rng(replay, device):
                closure()
        return self._finish_closure_step(loss)

    def _refuse_lightning(self, closure: Callable[..., Any]) -> None:
        """Refuse Lightning's own closure, before any move: without hf_zsharp's Lightning module it would log each
        step twice, and it cannot take the second pass under 16-bit precision or gradient accumulation."""
        if _from_lightning(closure):
            self.zero_grad(set_to_none=True)
            raise RuntimeError(
                f"{type(self).__name__} under PyTorch Lightning's automatic optimization: Lightning's closure would "
                "log each step twice and cannot take the second pass under 16-bit precision or gradient "
                "accumulation. Make your LightningModule subclass hf_zsharp.lightning.ZSharpLightningModule."
            )

    def _finish_closure_step(self, loss: Tensor | None) -> Tensor | None:
        self.second_step()
        self.zero_grad(set_to_none=True)
        return loss

    @property
    def step_begun(self) -> bool:
        """Whether a step was begun (`first_step` or `begin_plain_step`) that `step()` or `second_step` has not
        finished: true after a step a GradScaler skipped (it never called `step()`)."""
        return self._begun

    def _gradients_all_zero(self) -> bool:
        """Whether every gradient is zero or absent (one host read)."""
        grads = [local(p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        return not grads or not fetch(torch.stack(norms(grads)).ne(0).any().float())[0][0]

    def _has_gradients(self) -> bool:
        return any(p.grad is not None for group in self.param_groups for p in group["params"])

    def method_settings(self) -> dict[str, Any]:
        """The method's hyper-parameters as the optimizer uses them (its first parameter group's): rho and the
        variant's own (e.g. ZSharp's percentile, radius and mask), defaults resolved."""
        group = self.param_groups[0]
        return {key: group[key] for key in self.method_keys}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state (the base optimizer's, e.g. Adam moments) and param groups, shared with the base again.

        `Optimizer.load_state_dict` replaces the state and the group dicts (Accelerate's `prepare` calls it);
        relinking keeps an LR scheduler on this wrapper reaching the base optimizer. A state saved by another
        method (or by a plain optimizer) is refused, naming both: its groups would lack this method's settings.
        """
        self._check_method(state_dict)
        super().load_state_dict(state_dict)
        self.base_optimizer.state = self.state
        self.base_optimizer.param_groups = self.param_groups

    def _check_method(self, state_dict: dict[str, Any]) -> None:
        """Refuse a state whose parameter groups hold another method's hyper-parameters than this optimizer's."""
        groups = state_dict.get("param_groups") or [{}]
        saved = tuple(key for key in method_keys() if key in groups[0])
        if set(saved) != set(self.method_keys):
            raise ValueError(
                f"Cannot load this optimizer state into {type(self).__name__}: it was saved by "
                f"{_method_name(saved)}, whose settings differ ({', '.join(saved) or 'none'} instead of "
                f"{', '.join(self.method_keys)}). Resume with the method that saved it, or start a new run."
            )

    def _moves(self, params: list[Tensor]) -> Ascent | None:
        """SAM's perturbation for `params` (all with gradients), or None if the gradients are not finite."""
        if self.adaptive:
            return self._adaptive_moves(params)
        grads = [local(p.grad) for p in params]
        (host_norms,) = self._norms(params, grads)
        return self._global_moves(params, grads, host_norms)

    def _adaptive_moves(self, params: list[Tensor]) -> Ascent | None:
        """ASAM's perturbation: e = rho * T^2 g / ||T g||, T = |w| + eta where `_adapted` says, 1 elsewhere."""
        grads = [local(p.grad) for p in params]
        scaled, directions = list(grads), list(grads)
        for eta, positions in self._adapted(params).items():  # T g and T^2 g, T = |w| + eta, foreach ops
            scales = torch._foreach_abs([local(params[i]) for i in positions])
            torch._foreach_add_(scales, eta)
            tg = torch._foreach_mul([grads[i] for i in positions], scales)
            for i, x, y in zip(positions, tg, torch._foreach_mul(tg, scales)):
                scaled[i], directions[i] = x, y
        host_scaled, host_dirs = self._norms(params, scaled, directions)
        total = math.sqrt(sum(n * n for n in host_scaled))
        if not math.isfinite(total):
            return None
        alphas = [self._rho(p) / (total + EPS) for p in params]
        return Ascent([Move(*move) for move in zip(params, directions, alphas, host_dirs)], [])

    def _adapted(self, params: list[Tensor]) -> dict[float, list[int]]:
        """Positions of the parameters T applies to, by their group's eta (T = 1 for the others): as in the ASAM
        authors' code, those whose name contains "weight" when the groups hold names, else every parameter."""
        positions: dict[float, list[int]] = {}
        for i, p in enumerate(params):
            group = self._group(p)
            names = group.get("param_names")
            if names is None or "weight" in names[_position(group["params"], p)]:
                positions.setdefault(group["eta"], []).append(i)
        return positions

    def _norms(self, params: list[Tensor], *tensor_lists: list[Tensor]) -> list[list[float]]:
        """Per list of `params`' (local) tensors, their norms on the host: one `fetch`. Under FSDP2 the whole
        tensors' norms, in one collective; NaN everywhere if a rank found a non-finite one (all ranks skip)."""
        if self._process_group is None:
            return fetch(*(torch.stack(norms(tensors)) for tensors in tensor_lists))
        return fetch(*whole_norms(self._process_group, params, tensor_lists))

    def _global_moves(
        self, params: list[Tensor], directions: list[Tensor], direction_norms: list[float]
    ) -> Ascent | None:
        """e = rho * d / ||d|| with one norm over all tensors; None when that norm is not finite."""
        total = math.sqrt(sum(n * n for n in direction_norms))
        if not math.isfinite(total):
            return None
        alphas = [self._rho(p) / (total + EPS) for p in params]
        return Ascent([Move(*move) for move in zip(params, directions, alphas, direction_norms)], [])

    def _rho(self, param: Tensor) -> float:
        return self._group(param)["rho"]

    def _group(self, param: Tensor) -> dict[str, Any]:
        """The param group holding `param` (indexed at the start of each `first_step`)."""
        return self._groups[id(param)]

    def _apply(self, ascent: Ascent) -> None:
        """Save what `ascent` overwrites (of this rank's shards, under FSDP2), then add the perturbation."""
        for moves in _fusable(ascent.dense):
            self._apply_dense(moves)
        for moves in ascent.sparse:
            self._apply_sparse(moves)

    def _apply_dense(self, moves: list[Move]) -> None:
        """Whole-tensor moves of one device, dtype and step size: one copy and one add (foreach ops)."""
        params = [local(m.param) for m in moves]
        values = [m.values.to(p.dtype) for m, p in zip(moves, params)]
        self._saved.append((params, None, None, torch._foreach_clone(params)))
        alpha = moves[0].alpha
        if abs(alpha) <= torch.finfo(params[0].dtype).max:
            torch._foreach_add_(params, values, alpha=alpha)
        else:  # e.g. fp16 with gradients near zero: alpha = rho / ||g|| overflows, rho * g / ||g|| does not
            torch._foreach_add_(params, torch._foreach_mul(values, alpha))

    def _apply_sparse(self, moves: SparseMoves) -> None:
        """Chosen entries: scale the pooled values (one foreach op), then save and add per tensor (`_gather`,
        `_add_at`)."""
        params = [local(p) for p in moves.params]
        values = torch._foreach_mul(moves.values.split(moves.counts), moves.alphas)  # float32, as the norms
        if values[0].dtype != params[0].dtype:
            values = torch.cat(values).to(params[0].dtype).split(moves.counts)
        index = moves.index.split(moves.counts)
        old = [_gather(p, i) for p, i in zip(params, index)]
        small = max(p.numel() for p in params) < 2**31  # int32 positions: half the memory held until restore
        self._saved.append((params, moves.index.int() if small else moves.index, moves.counts, old))
        for p, i, v in zip(params, index, values):
            _add_at(p, i, v)


def _gather(param: Tensor, index: Tensor) -> Tensor:
    """`param`'s entries at logical flat positions `index` (int64). `take` needs no view (on an accelerator a view
    is an op of its own); on the CPU `index_select` on a flat view of a contiguous tensor runs ~5x faster."""
    if selection.row_by_row(param.device) and param.is_contiguous():
        return param.view(-1).index_select(0, index)
    return param.take(index)


def _add_at(param: Tensor, index: Tensor, values: Tensor) -> None:
    """Add `values` to `param`'s entries at logical flat positions `index` (distinct), as `_gather` chooses."""
    if selection.row_by_row(param.device) and param.is_contiguous():
        param.view(-1).index_add_(0, index, values)
    elif (
        torch.are_deterministic_algorithms_enabled()
    ):  # put_ has no deterministic kernel: torch would refuse it
        param.index_put_(torch.unravel_index(index, param.shape), values, accumulate=True)
    else:
        param.put_(index, values, accumulate=True)


def _set_at(param: Tensor, index: Tensor, values: Tensor) -> None:
    """Write `values` to `param`'s entries at logical flat positions `index` (distinct), as `_gather` chooses."""
    if selection.row_by_row(param.device) and param.is_contiguous():
        param.view(-1).index_copy_(0, index, values)
    elif torch.are_deterministic_algorithms_enabled():  # as in _add_at
        param.index_put_(torch.unravel_index(index, param.shape), values)
    else:
        param.put_(index, values)


class Skips:
    """The skip bookkeeping of the two-pass step: whether `second_step` must skip the base step (its `first_step`
    found non-finite gradients), and the steps skipped since the last `pop` (first passes counted on the host,
    second passes on the device: no sync until read)."""

    def __init__(self) -> None:
        self.skip_base_step = False
        self.first_pass = 0
        self.on_device: Tensor | None = None

    def ascent(self, perturbed: bool) -> None:
        """Record a `first_step`: a skipped ascent skips the base step of its `second_step`."""
        self.skip_base_step = not perturbed
        self.first_pass += not perturbed

    def take_base_step(self) -> bool:
        """Whether the base step may run (no skip pending); clears a pending skip either way."""
        skip, self.skip_base_step = self.skip_base_step, False
        return not skip

    def second_pass(self, found_inf: Tensor) -> None:
        """Count a second-pass skip flag (a device float, 1.0 when the base step is skipped)."""
        self.on_device = found_inf if self.on_device is None else self.on_device + found_inf

    def pop(self) -> int:
        """Steps skipped (either pass) since the last call; reads the device count (one transfer)."""
        on_device, self.on_device = self.on_device, None
        first_pass, self.first_pass = self.first_pass, 0
        return first_pass + (0 if on_device is None else int(fetch(on_device)[0][0]))


def _fusable(moves: list[Move]) -> list[list[Move]]:
    """`moves` in groups that one foreach op can apply: same device, parameter and value dtypes, step size."""
    groups: dict[tuple, list[Move]] = {}
    for m in moves:
        groups.setdefault((m.param.device, m.param.dtype, m.values.dtype, m.alpha), []).append(m)
    return list(groups.values())


def _skips_on_device(optimizer: Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` flag: torch's fused Adam(W), SGD and Adagrad.

    Not fused SGD before its momentum buffers exist: skipping its first step leaves them uninitialised.
    """
    if not honours_found_inf(optimizer):
        return False
    return not isinstance(optimizer, torch.optim.SGD) or all(
        group["momentum"] == 0 or "momentum_buffer" in optimizer.state.get(p, {})
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    )


def method_keys() -> tuple[str, ...]:
    """The hyper-parameters the variants add to the parameter groups (rho, adaptive and every declared option),
    whichever method saved a state: what tells one method's saved state from another's."""
    keys, classes = ["rho", "adaptive"], [SAM]
    while classes:
        cls = classes.pop(0)
        keys += [option.name for option in cls.options if option.name not in keys]
        classes += cls.__subclasses__()
    return tuple(keys)


def _method_name(keys: tuple[str, ...]) -> str:
    """The method whose parameter groups hold these of `method_keys()`."""
    if not keys:
        return "a plain optimizer (no rho: not a sharpness-aware one)"
    for name, marker in (("ZSharp", "percentile"), ("FriendlySAM", "sigma"), ("ASAM", "eta")):
        if marker in keys:
            return name
    return "SAM"


def _from_lightning(closure: Callable[..., Any]) -> bool:
    """Whether `closure` is PyTorch Lightning's (its precision plugin's wrapper or its loop's closure object)."""
    if isinstance(closure, functools.partial):
        return _from_lightning(closure.func) or any(map(_from_lightning, closure.args))
    owner = getattr(closure, "__self__", closure)
    return type(owner).__module__.split(".")[0] in ("lightning", "pytorch_lightning")


def _name(group: dict[str, Any], param: Tensor) -> str:
    """The parameter's name when the groups hold names (`model.named_parameters()`), else its shape."""
    names = group.get("param_names")
    return names[_position(group["params"], param)] if names else f"a parameter of shape {tuple(param.shape)}"


def _position(params: list[Tensor], param: Tensor) -> int:
    return next(i for i, p in enumerate(params) if p is param)


def _by_hyperparameter(
    optimizer: SAM, params: list[Tensor], name: str, momenta: list[Tensor | None]
) -> dict[float, list[int]]:
    """Positions of the parameters that have a momentum, by their group's value of `name` (one foreach op each)."""
    positions: dict[float, list[int]] = {}
    for i, (p, m) in enumerate(zip(params, momenta)):
        if m is not None:
            positions.setdefault(optimizer._group(p)[name], []).append(i)
    return positions


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): e = rho * T^2 g / ||T g|| with T = |w| + eta.

    As in the authors' code, T applies to parameters whose name contains "weight" (pass
    `model.named_parameters()`); without names it applies to every parameter.
    """

    default_rho = 0.5
    options = (
        Option(
            "eta",
            "asam_eta",
            "ASAM only: the offset of its per-entry scale T = |w| + eta.",
            "eta (ASAM: T = |w| + eta)",
            check=lambda eta: eta >= 0,
            requirement=">= 0",
        ),
    )

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] = torch.optim.AdamW,
        rho: float | None = None,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, rho, adaptive=True, method_defaults={"eta": eta}, **base_kwargs
        )


class FriendlySAM(SAM):
    """Friendly-SAM (Li et al., 2024): SAM on d = g - sigma * m, m an EMA (factor lmbda) of past gradients.

    As in the authors' code, the first step uses d = g and starts m = g.
    """

    scale_invariant = False  # the EMA mixes steps with different loss scales: it needs true gradients
    options = (
        Option(
            "sigma",
            "fsam_sigma",
            "Friendly-SAM only: the ascent follows g - sigma * m, m the moving average of past gradients.",
            "sigma (Friendly-SAM: ascent along g - sigma * m)",
        ),
        Option(
            "lmbda",
            "fsam_lmbda",
            "Friendly-SAM only: the factor of that moving average, m <- lmbda * m + (1 - lmbda) * g.",
            "lambda (Friendly-SAM: EMA factor of m)",
            check=lambda lmbda: 0 <= lmbda < 1,
            requirement="in [0, 1)",
        ),
    )

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] = torch.optim.AdamW,
        rho: float | None = None,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **base_kwargs: Any,
    ) -> None:
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

    def _moves(self, params: list[Tensor]) -> Ascent | None:
        grads = [local(p.grad) for p in params]
        momenta = [local(self.momentum.get(p)) for p in params]
        directions = list(grads)
        for sigma, positions in _by_hyperparameter(self, params, "sigma", momenta).items():
            differences = torch._foreach_sub(
                [grads[i] for i in positions], torch._foreach_mul([momenta[i] for i in positions], sigma)
            )
            for i, d in zip(positions, differences):
                directions[i] = d
        grad_norms, direction_norms = self._norms(params, grads, directions)
        if not all(map(math.isfinite, grad_norms)):  # the momentum must not take in non-finite gradients
            return None
        for lmbda, positions in _by_hyperparameter(self, params, "lmbda", momenta).items():
            ms = [momenta[i] for i in positions]
            torch._foreach_mul_(ms, lmbda)
            torch._foreach_add_(ms, [grads[i] for i in positions], alpha=1 - lmbda)
        for p, m in zip(params, momenta):
            if m is None:
                self.momentum[p] = p.grad.clone()  # a DTensor under FSDP2: saved sharded
        return self._global_moves(params, directions, direction_norms)
