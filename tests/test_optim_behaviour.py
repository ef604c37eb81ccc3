"""What users of torch optimizers expect from the SAM family: robustness, exact restore, checkpoints,
Accelerate, argument checks and BatchNorm freezing (the step's contract: test_step_contract.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import reference as ref
import torch
from reference import cnn, count_host_reads, loss_of, mlp, model_with_grads, two_pass
from torch import nn

from hf_zsharp import SAM, ZSharp, create_sam_optimizer, frozen_batchnorm_stats

METHODS = ["zsharp", "sam", "asam", "fsam"]


def build(method: str, model: nn.Module, base: type = torch.optim.SGD, **kwargs):
    kwargs.setdefault("lr", 0.1)
    return create_sam_optimizer(method, model.named_parameters(), base, **kwargs)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (torch.equal alone treats -0.0 == 0.0)."""
    if not t.is_floating_point():
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bit_identical(model: nn.Module, saved: list[torch.Tensor]) -> None:
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(model.parameters(), saved, strict=True))


# Base optimizers by how `second_step` checks the gradients: on the host, or on the device (torch's fused ones).
BASES = {
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "foreach": True}),
    "sgd-fused": (torch.optim.SGD, {"momentum": 0.9, "fused": True}),
    "adamw-fused": (torch.optim.AdamW, {"lr": 1e-3, "fused": True}),
}


def build_on(method: str, model: nn.Module, base: str) -> SAM:
    base_cls, kwargs = BASES[base]
    return build(method, model, base_cls, **kwargs)


def test_factory_builds_each_method() -> None:
    model = mlp()
    classes = {m: type(build(m, model)) for m in METHODS}
    assert classes["zsharp"] is ZSharp and classes["sam"] is SAM
    assert all(issubclass(c, torch.optim.Optimizer) for c in classes.values())
    with pytest.raises(ValueError, match="method"):
        build("adam", model)


@pytest.mark.parametrize("poison", ["inf+nan", "nan", "-inf"])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_gradients_skip_the_step(method: str, poison: str) -> None:
    model = model_with_grads("cnn")
    optimizer = build(method, model, momentum=0.9)
    grad = model[0].weight.grad
    if "inf" in poison:
        grad.view(-1)[0] = float(poison.split("+")[0])
    if "nan" in poison:
        grad.view(-1)[1] = float("nan")
    saved = snapshot(model)
    assert optimizer.first_step() is False
    assert optimizer.skipped_perturbation is True
    assert_bit_identical(model, saved)
    # The second pass brings finite gradients; the base step must still be skipped.
    optimizer.zero_grad()
    loss_of(model).backward()
    optimizer.second_step()
    assert_bit_identical(model, saved)
    assert not optimizer.base_optimizer.state  # no momentum buffer was created
    # The next step proceeds normally.
    optimizer.zero_grad()
    loss_of(model).backward()
    assert optimizer.first_step() is True
    assert optimizer.skipped_perturbation is False


@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_second_pass_skips_the_base_step(method: str, base: str, poison: str) -> None:
    model = model_with_grads("cnn")
    optimizer = build_on(method, model, base)
    two_pass(model, optimizer, 0)  # the base optimizer has state (and fused SGD its momentum buffers)
    saved, base_state = snapshot(model), copy.deepcopy(optimizer.base_optimizer.state_dict())
    optimizer.zero_grad()
    loss_of(model, 1).backward()
    assert optimizer.first_step(zero_grad=True) is True
    loss_of(model, 1).backward()
    model[0].weight.grad.view(-1)[3] = float(poison)
    optimizer.second_step(zero_grad=True)
    assert_bit_identical(model, saved)
    after = optimizer.base_optimizer.state_dict()["state"]
    for key, state in base_state["state"].items():
        assert all(torch.equal(bits(v), bits(after[key][k])) for k, v in state.items())
    assert optimizer.pop_skipped_steps() == 1 and optimizer.pop_skipped_steps() == 0
    two_pass(model, optimizer, 2)  # the next step proceeds
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), saved, strict=True))


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("method", ["zsharp", "sam"])
def test_a_first_step_skipped_in_the_second_pass_leaves_no_trace(method: str, base: str) -> None:
    """Closure step with a non-finite second pass, then a normal step: as if only the normal step ran
    (the base optimizer starts fresh: no NaN, nor an uninitialised fused-SGD momentum buffer, kept)."""
    torch.manual_seed(0)
    model = cnn()
    twin = copy.deepcopy(model)
    optimizer, twin_optimizer = build_on(method, model, base), build_on(method, twin, base)
    calls = []

    def poisoned() -> torch.Tensor:
        calls.append(1)
        optimizer.zero_grad()
        loss = loss_of(model, 0) * (math.inf if len(calls) == 2 else 1.0)
        loss.backward()
        return loss

    optimizer.step(poisoned)
    assert len(calls) == 2
    two_pass(model, optimizer, 1)
    two_pass(twin, twin_optimizer, 1)
    assert_bit_identical(model, snapshot(twin))
    assert optimizer.pop_skipped_steps() == 1


@pytest.mark.parametrize(
    ("base", "second_step_reads"), [("sgd", 1), ("adamw", 1), ("sgd-fused", 0), ("adamw-fused", 0)]
)
@pytest.mark.parametrize("method", METHODS)
def test_host_reads_per_step(method: str, base: str, second_step_reads: int, monkeypatch) -> None:
    """One host read in first_step; second_step's check rides on the device with a fused base optimizer."""
    model = model_with_grads("cnn")
    optimizer = build_on(method, model, base)
    two_pass(
        model, optimizer, 0
    )  # fused SGD reads its first check on the host, before it has momentum buffers
    optimizer.zero_grad()
    loss_of(model, 1).backward()
    reads = count_host_reads(monkeypatch)
    optimizer.first_step(zero_grad=True)
    assert reads == ["tolist"]
    loss_of(model, 1).backward()
    reads.clear()
    optimizer.second_step()
    assert len(reads) == second_step_reads
    reads.clear()
    assert optimizer.pop_skipped_steps() == 0
    assert reads == ["tolist"]  # the skip count, read once when logged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_restore_is_bit_exact(method: str, dtype: torch.dtype) -> None:
    model = model_with_grads("mlp", dtype=dtype, zeros=True)
    with torch.no_grad():
        model[0].weight.view(-1)[:7] = -0.0  # signed zeros must come back too
    saved = snapshot(model)
    optimizer = build(method, model)
    assert optimizer.first_step() is True
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), saved, strict=True))
    optimizer.restore()
    assert_bit_identical(model, saved)
    optimizer.restore()  # no-op without a perturbation
    assert_bit_identical(model, saved)


@pytest.mark.parametrize("method", METHODS)
def test_second_step_with_zero_lr_leaves_weights_bit_identical(method: str) -> None:
    model = model_with_grads("cnn")
    saved = snapshot(model)
    optimizer = build(method, model, lr=0.0)
    optimizer.first_step()
    optimizer.second_step()
    assert_bit_identical(model, saved)


def test_channels_last_conv_matches_reference_and_restores() -> None:
    """Non-contiguous (channels_last) kernels: same perturbation as the reference, exact restore."""
    torch.manual_seed(0)
    model = cnn().to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    loss_of(model).backward()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    expected = ref.zsharp_ascent([p.grad for p in params])
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    optimizer.first_step()
    for p, b, e in zip(params, before, expected, strict=True):
        torch.testing.assert_close(p.double(), b.double() + e, rtol=2e-7, atol=1e-5 * float(e.abs().max()))
    optimizer.restore()
    assert all(torch.equal(bits(p), bits(b)) for p, b in zip(params, before, strict=True))


def test_param_groups_use_their_own_rho_and_lr() -> None:
    model = model_with_grads("mlp")
    first, rest = list(model[0].parameters()), [p for m in model[1:] for p in m.parameters()]
    params = first + rest
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    optimizer = ZSharp(
        [{"params": first, "rho": 0.2, "lr": 0.5}, {"params": rest}], torch.optim.SGD, rho=0.05, lr=0.1
    )
    optimizer.first_step()
    e_first = ref.zsharp_ascent(grads, rho=0.2)[: len(first)]
    e_rest = ref.zsharp_ascent(grads, rho=0.05)[len(first) :]
    for p, b, e in zip(params, before, e_first + e_rest, strict=True):
        torch.testing.assert_close(p.double(), b.double() + e, rtol=2e-7, atol=1e-5 * float(e.abs().max()))
    optimizer.second_step()
    for p, b, g, lr in zip(params, before, grads, [0.5] * len(first) + [0.1] * len(rest), strict=True):
        torch.testing.assert_close(p, b - lr * g)


def test_first_step_zero_grad() -> None:
    model = model_with_grads("mlp")
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    optimizer.first_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip_keeps_base_momentum_and_hyperparameters() -> None:
    torch.manual_seed(0)
    model = mlp()
    kwargs = {"rho": 0.07, "percentile": 0.9, "lr": 2e-3, "weight_decay": 0.01, "betas": (0.8, 0.99)}
    optimizer = ZSharp(model.parameters(), torch.optim.AdamW, **kwargs)
    for seed in range(2):
        two_pass(model, optimizer, seed)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)

    clone = copy.deepcopy(model)
    restored = ZSharp(clone.parameters(), torch.optim.AdamW, lr=1.0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    for name, value in kwargs.items():
        assert restored.param_groups[0][name] == value
        assert restored.base_optimizer.param_groups[0][name] == value
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.base_optimizer.state[p][key], restored.base_optimizer.state[q][key])
    # Both continue identically.
    for m, opt in ((model, optimizer), (clone, restored)):
        opt.zero_grad()
        loss_of(m, 5).backward()
        opt.first_step(zero_grad=True)
        loss_of(m, 5).backward()
        opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clone.parameters(), strict=True))


@pytest.mark.parametrize("saved_on", ["cpu", "cpu:0"])
def test_random_mask_resumes_bit_identically(saved_on: str) -> None:
    """The random mask's generator state travels in the state dict: a reloaded optimizer draws the same masks.

    "cpu:0" stands for a state saved on another index of the device type in use (DDP rank 0's cuda:0 loaded
    on rank 1's cuda:1), which is used as well.
    """
    torch.manual_seed(0)
    model = mlp()
    kwargs = {"mask": "random", "seed": 3, "lr": 0.1, "momentum": 0.9}
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, **kwargs)
    two_pass(model, optimizer, 0)
    state = optimizer.state_dict()
    if saved_on != "cpu":
        state["mask_generators"] = {saved_on: state["mask_generators"].pop("cpu")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    clone = copy.deepcopy(model)
    restored = ZSharp(clone.parameters(), torch.optim.SGD, **kwargs)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for seed in (1, 2):
        two_pass(model, optimizer, seed)
        two_pass(clone, restored, seed)
    assert_bit_identical(clone, snapshot(model))


def test_scheduler_on_wrapper_reaches_base_optimizer() -> None:
    model = mlp()
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.load_state_dict(optimizer.state_dict())
    optimizer.begin_plain_step()
    optimizer.step()
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_prepare_keeps_base_optimizer_linked(accelerator) -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = ZSharp(model.parameters(), torch.optim.AdamW, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, prepared, scheduler = accelerator.prepare(model, optimizer, scheduler)
    wrapper = prepared.optimizer
    assert wrapper is optimizer
    base = wrapper.base_optimizer
    accelerator.backward(loss_of(model))
    assert wrapper.first_step(zero_grad=True) is True
    accelerator.backward(loss_of(model))
    prepared.step()  # restore + base step, through AcceleratedOptimizer
    prepared.zero_grad()
    assert base.state  # the base optimizer stepped
    scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert wrapper.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_bad_arguments_raise_value_error_naming_them() -> None:
    params = list(mlp().parameters())
    cases = [
        ({"rho": 0.0}, "rho"),
        ({"rho": -0.1}, "rho"),
        ({"percentile": 1.0}, "percentile"),
        ({"percentile": -0.1}, "percentile"),
        ({"radius": "layer"}, "radius"),
        ({"mask": "topk"}, "mask"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            ZSharp(params, torch.optim.SGD, lr=0.1, **kwargs)
    for base in (torch.optim.SGD(params, lr=0.1), object, "AdamW", nn.Linear):
        with pytest.raises(ValueError, match="base_optimizer"):
            ZSharp(params, base, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=0, lr=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_empty_parameters_move_nothing(method: str) -> None:
    model = model_with_grads("mlp")
    empty = nn.Parameter(torch.zeros(0, 5))
    empty.grad = torch.zeros(0, 5)
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.clone()
    params = [*model.named_parameters(), ("empty.weight", empty)]
    optimizer = create_sam_optimizer(method, params, torch.optim.SGD, lr=0.1)
    assert optimizer.first_step() is True
    assert build(method, twin).first_step() is True
    assert_bit_identical(model, snapshot(twin))  # the same perturbation as without the empty tensor
    optimizer.second_step()
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("method", METHODS)
def test_fp16_all_zero_gradients_move_nothing_and_do_not_get_stuck(method: str) -> None:
    torch.manual_seed(0)
    model = mlp().half()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    saved = snapshot(model)
    optimizer = build(method, model)
    for _ in range(2):
        assert optimizer.first_step() is True
        assert_bit_identical(model, saved)
        optimizer.second_step()
        assert_bit_identical(model, saved)


@pytest.mark.parametrize("method", ["zsharp", "sam"])
def test_fp16_tiny_gradients_match_reference(method: str) -> None:
    """A few subnormal fp16 gradient entries (~6e-8): rho / ||g|| is beyond fp16's range, rho * g / ||g|| not.

    Weights are zeroed so that w + e = round(e) shows e; tolerance as in test_optim_reference's fp16 test.
    """
    model = mlp().half()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
            p.grad = torch.zeros_like(p)
            p.grad.view(-1)[::97] = torch.randn(p.grad.view(-1)[::97].shape, generator=gen) * 5e-8
    grads = [p.grad.clone() for p in model.parameters()]
    assert 0.05 / float(ref.global_norm(grads)) > torch.finfo(torch.float16).max
    expected = ref.zsharp_ascent(grads) if method == "zsharp" else ref.sam_ascent(grads)
    assert build(method, model).first_step() is True
    info = torch.finfo(torch.float16)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.double(), e, rtol=2 * info.eps, atol=info.tiny * info.eps)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["after_every_move", "between_groups"])
def test_an_error_in_first_step_restores_the_weights_and_saves_nothing(
    method: str, where: str, monkeypatch
) -> None:
    """An error after some or all moves were applied (the whole-tensor group first, then ZSharp's sparse pool)."""
    model = model_with_grads("cnn")
    optimizer = build(method, model)
    saved = snapshot(model)
    name = "_apply" if where == "after_every_move" or method != "zsharp" else "_apply_sparse"
    apply = getattr(optimizer, name)

    def fail_after_applying(moves) -> None:
        apply(moves)
        raise RuntimeError("injected")

    monkeypatch.setattr(optimizer, name, fail_after_applying)
    with pytest.raises(RuntimeError, match="injected"):
        optimizer.first_step()
    assert_bit_identical(model, saved)
    monkeypatch.undo()
    assert optimizer.first_step() is True  # not stuck in "first_step() called twice"
    optimizer.restore()
    assert_bit_identical(model, saved)


def test_frozen_batchnorm_stats() -> None:
    torch.manual_seed(0)
    model = cnn().train()
    loss_of(model, 0)  # running stats move once
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    twin = copy.deepcopy(model)
    with frozen_batchnorm_stats(model):
        inside = loss_of(model, 1)
    # Inside: batch statistics still normalise (same loss as a normal training forward), buffers untouched.
    assert torch.equal(inside, loss_of(twin, 1))
    for key, value in buffers.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.training
    # After: running statistics update again.
    loss_of(model, 2)
    assert not torch.equal(model.state_dict()["1.running_mean"], buffers["1.running_mean"])
    assert int(model.state_dict()["1.num_batches_tracked"]) == int(buffers["1.num_batches_tracked"]) + 1


def test_a_skipped_step_does_not_skip_the_next_plain_step() -> None:
    param = torch.nn.Parameter(torch.ones(3, 3))
    optimizer = ZSharp([param], torch.optim.SGD, lr=1.0)
    param.grad = torch.full((3, 3), math.inf)
    assert not optimizer.first_step()
    optimizer.second_step()
    assert torch.equal(param, torch.ones(3, 3)) and optimizer.skipped_perturbation
    param.grad = torch.ones(3, 3)
    optimizer.begin_plain_step()
    optimizer.step()  # a plain step: nothing perturbed, the base optimizer steps
    assert torch.equal(param, torch.zeros(3, 3))
