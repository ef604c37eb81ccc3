"""The optimizer's step contract: the real two-pass step in every form users write, or a loud error.

`step()` with nothing begun raises (a one-step loop would otherwise train the base optimizer alone); `step(closure)`
takes exactly two passes in davda54/sam's form (first-pass gradients already there) and in torch's closure idiom
(none there), equal to first_step / second pass / second_step by hand, with BatchNorm's running statistics left to
the first pass and the first pass's random draws replayed; a state saved by another method is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import cnn, loss_of, mlp
from torch import nn

from hf_zsharp import ASAM, SAM, FriendlySAM, ZSharp, create_sam_optimizer, frozen_batchnorm_stats

METHODS = ["zsharp", "sam", "asam", "fsam"]


def build(method: str, model: nn.Module, **kwargs):
    return create_sam_optimizer(
        method, model.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs
    )


class Counted(nn.Module):
    """A model that counts its forward passes, with dropout (random draws) and BatchNorm (running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
        )  # fmt: skip
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=gen), torch.randint(10, (8,), generator=gen)


def by_hand(model: nn.Module, optimizer, seed: int, replay: bool) -> None:
    """The reference step: first pass, first_step, the second pass with frozen BatchNorm statistics (and, if
    `replay`, the first pass's random draws), second_step."""
    x, y = batch(seed)
    rng = torch.get_rng_state()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    after = torch.get_rng_state()
    if replay:
        torch.set_rng_state(rng)
    with frozen_batchnorm_stats(model):
        nn.functional.cross_entropy(model(x), y).backward()
    if replay:
        torch.set_rng_state(after)
    optimizer.second_step(zero_grad=True)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("method", METHODS)
def test_step_without_closure_or_first_step_refuses_to_take_a_base_step(method: str) -> None:
    model = mlp()
    optimizer = build(method, model)
    before = copy.deepcopy(model.state_dict())
    loss_of(model).backward()
    with pytest.raises(
        RuntimeError, match=r"step\(\) was called without a closure and without first_step\(\)"
    ):
        optimizer.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_step_with_zero_gradients_initialises_the_state_as_torch_checkpointing_does() -> None:
    """torch.distributed.checkpoint's `_init_optim_state` calls `step()` with zero gradients at lr 0: with no
    gradient the ascent is zero and the two-pass step is the base step, so it is taken, not refused."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = mlp()
    before = copy.deepcopy(model.state_dict())
    optimizer = ZSharp(model.parameters(), torch.optim.AdamW, lr=1e-3)
    _init_optim_state(optimizer)
    assert len(optimizer.state) == len(list(model.parameters()))  # Adam's moments exist
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_deliberate_plain_step_is_the_base_optimizers_step() -> None:
    model = mlp()
    twin = copy.deepcopy(model)
    loss_of(model).backward()
    loss_of(twin).backward()
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    optimizer.begin_plain_step()
    optimizer.step()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    assert_same_state(model, twin)
    with pytest.raises(RuntimeError, match="without first_step"):
        optimizer.step()  # one plain step per begin_plain_step


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["davda54", "torch-idiom"])
def test_closure_step_takes_two_passes_equal_to_the_step_by_hand(method: str, form: str) -> None:
    torch.manual_seed(0)
    reference = Counted().train()
    model = copy.deepcopy(reference)
    manual, optimizer = build(method, reference), build(method, model)
    for seed in range(3):
        # davda54's form: the user's first pass draws, then the closure's second pass draws on (no replay).
        torch.manual_seed(seed)
        by_hand(reference, manual, seed, replay=form == "torch-idiom")
        torch.manual_seed(seed)
        x, y = batch(seed)

        def closure(x=x, y=y) -> torch.Tensor:
            if form == "torch-idiom":
                optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        calls = model.calls
        if form == "davda54":  # davda54/sam's README: the first pass by the user, then step(closure)
            nn.functional.cross_entropy(model(x), y).backward()
            assert optimizer.step(closure) is None
        else:
            assert optimizer.step(closure) is not None  # the first pass's loss
        assert_same_state(model, reference)  # weights and BatchNorm statistics, exactly
        assert model.calls - calls == 2
        assert all(p.grad is None for p in model.parameters())  # the next step starts clean


@pytest.mark.parametrize("form", ["davda54", "torch-idiom"])
def test_the_closures_second_pass_leaves_batchnorm_statistics_alone(form: str) -> None:
    """The running statistics after the step are those of one forward pass: the first."""
    model = cnn().train()
    one_pass = copy.deepcopy(model)
    loss_of(one_pass, 0)
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.0)  # lr 0: only the passes touch the model

    def closure() -> torch.Tensor:
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    if form == "davda54":
        loss_of(model, 0).backward()
    optimizer.step(closure)
    for key, value in one_pass.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(model.state_dict()[key], value), key


def test_step_with_a_closure_inside_a_begun_step_is_refused() -> None:
    model = mlp()
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model).backward()
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="while a step is begun"):
        optimizer.step(lambda: loss_of(model))
    optimizer.second_step()


def test_davda54_signature_adaptive_true_is_asam_with_eta_zero() -> None:
    torch.manual_seed(0)
    model = cnn()
    twin = copy.deepcopy(model)
    # davda54/sam's example: SAM(model.parameters(), base, rho=2.0, adaptive=True, lr=..., momentum=...)
    adaptive = SAM(model.parameters(), torch.optim.SGD, rho=2.0, adaptive=True, lr=0.1, momentum=0.9)
    asam = ASAM(twin.parameters(), torch.optim.SGD, rho=2.0, eta=0.0, lr=0.1, momentum=0.9)
    assert adaptive.method_settings() == {"rho": 2.0, "eta": 0.0}
    for seed in range(2):
        for m, opt in ((model, adaptive), (twin, asam)):
            loss_of(m, seed).backward()
            opt.first_step(zero_grad=True)
            loss_of(m, seed).backward()
            opt.second_step(zero_grad=True)
    assert_same_state(model, twin)


@pytest.mark.parametrize("saved", METHODS)
def test_loading_another_methods_state_is_refused_naming_both(saved: str) -> None:
    model = mlp()
    saver = build(saved, model)
    target = build(METHODS[(METHODS.index(saved) + 1) % len(METHODS)], model)  # the next method
    named = f"into {type(target).__name__}: it was saved by {type(saver).__name__}"
    with pytest.raises(ValueError, match=named):
        target.load_state_dict(saver.state_dict())


def test_loading_a_plain_optimizers_state_is_refused() -> None:
    model = mlp()
    state = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="saved by a plain optimizer"):
        ZSharp(model.parameters()).load_state_dict(state)
    assert isinstance(FriendlySAM(model.parameters()), SAM)


@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")
def test_complex_parameters_are_refused_at_construction_naming_them() -> None:
    model = nn.Linear(3, 3).to(torch.complex64)
    with pytest.raises(ValueError, match="params: complex parameters are not supported.*weight, bias"):
        ZSharp(model.named_parameters())


def test_sparse_gradients_are_refused_naming_the_parameter_before_any_move() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    optimizer = ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.1)
    model(torch.tensor([1, 2])).sum().backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError, match=r"needs dense gradients; these are sparse: 0\.weight .*sparse=False"
    ):
        optimizer.first_step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
