"""timm: `--opt zsharp` and the other methods in timm's optimizer factory, and `two_pass_step` in a loop written
like timm's train.py, equal to the two-pass step by hand (fp32, clipping, the loss scaler under CPU autocast and
its overflow skip); the plain loop and gradient accumulation fail loudly; the README's timm section runs.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import pytest
import timm
import torch
from readme_blocks import code_blocks
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import model_parameters
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import CosineLRScheduler
from timm.utils import NativeScaler, dispatch_clip_grad
from torch import nn

import hf_zsharp.timm
from hf_zsharp import ASAM, SAM, FriendlySAM, ZSharp, frozen_batchnorm_stats
from hf_zsharp.timm import two_pass_step

AdamW, SGD = torch.optim.AdamW, torch.optim.SGD
# timm name -> (class, base optimizer, method options passed through create_optimizer_v2).
OPTIMIZERS = {
    "zsharp": (ZSharp, AdamW, {"percentile": 0.9}),
    "sam": (SAM, AdamW, {}),
    "asam": (ASAM, AdamW, {"eta": 0.02}),
    "fsam": (FriendlySAM, AdamW, {"sigma": 0.5, "lmbda": 0.8}),
    "zsharpsgd": (ZSharp, SGD, {"percentile": 0.9}),
    "samsgd": (SAM, SGD, {}),
    "asamsgd": (ASAM, SGD, {"eta": 0.02}),
    "fsamsgd": (FriendlySAM, SGD, {"sigma": 0.5, "lmbda": 0.8}),
}
LOSS = LabelSmoothingCrossEntropy(0.1)
STEPS = 3


def resnet() -> nn.Module:
    """A tiny timm ResNet with BatchNorm, dropout and drop path (random draws the second pass must replay)."""
    torch.manual_seed(0)
    return timm.create_model(
        "resnet18", pretrained=False, num_classes=5, layers=(1, 1, 1, 1), channels=(8, 8, 16, 16),
        stem_width=8, drop_rate=0.2, drop_path_rate=0.1,
    )  # fmt: skip


def vit() -> nn.Module:
    """A tiny timm ViT (LayerNorm, a 3-D pos_embed in no_weight_decay(), dropout and drop path)."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=8, embed_dim=16,
        depth=2, num_heads=2, drop_rate=0.1, drop_path_rate=0.1,
    )  # fmt: skip


MODELS = {"resnet": resnet, "vit": vit}


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 16, 16, generator=gen), torch.randint(5, (8,), generator=gen))
        for _ in range(STEPS)
    ]


def optimizer_for(model: nn.Module, name: str, lr: float = 0.05):
    return create_optimizer_v2(model, name, lr=lr, weight_decay=0.05, rho=0.1, **OPTIMIZERS[name][2])


def train_step(model, optimizer, input, target, args, *, patched, loss_scaler=None, amp_autocast=nullcontext):
    """One update of timm's train.py `train_one_epoch` (--grad-accum-steps 1), its code as written there; with
    `patched`, its `_forward()` / `_backward(loss)` pair replaced by `two_pass_step`."""
    need_update, second_order = True, False

    def _forward():
        with amp_autocast():
            output = model(input)
            loss = LOSS(output, target)
        return loss

    def _backward(_loss):
        if loss_scaler is not None:
            loss_scaler(
                _loss,
                optimizer,
                clip_grad=args.clip_grad,
                clip_mode=args.clip_mode,
                parameters=model_parameters(model, exclude_head="agc" in args.clip_mode),
                create_graph=second_order,
                need_update=need_update,
            )
        else:
            _loss.backward(create_graph=second_order)
            if need_update:
                if args.clip_grad is not None:
                    dispatch_clip_grad(
                        model_parameters(model, exclude_head="agc" in args.clip_mode),
                        value=args.clip_grad,
                        mode=args.clip_mode,
                    )
                optimizer.step()

    if patched:
        loss = two_pass_step(
            model,
            optimizer,
            _forward,
            loss_scaler=loss_scaler,
            clip_grad=args.clip_grad,
            clip_mode=args.clip_mode,
            parameters=model_parameters(model, exclude_head="agc" in args.clip_mode),
            need_update=need_update,
        )
    else:
        loss = _forward()
        _backward(loss)
    optimizer.zero_grad()
    return loss


def by_hand(model, optimizer, input, target, args, *, scaler=None, autocast=nullcontext) -> torch.Tensor:
    """The reference step: first pass, ascent, second pass with BatchNorm frozen and the first pass's draws
    replayed, restore, then unscale / clip / step as train.py's `_backward`."""

    def loss() -> torch.Tensor:
        with autocast():
            return LOSS(model(input), target)

    def backward(value: torch.Tensor) -> None:
        (value if scaler is None else scaler.scale(value)).backward()

    draws = torch.get_rng_state()
    first = loss()
    backward(first)
    if optimizer.first_step():
        optimizer.zero_grad()
        after = torch.get_rng_state()
        torch.set_rng_state(draws)
        with frozen_batchnorm_stats(model):
            backward(loss())
        torch.set_rng_state(after)
        optimizer.restore()
    if args.clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        exclude_head = "agc" in args.clip_mode
        dispatch_clip_grad(model_parameters(model, exclude_head), args.clip_grad, mode=args.clip_mode)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad()
    return first.detach()


def counted(model: nn.Module) -> list[int]:
    """Forward passes of `model`, counted by a hook."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def assert_changed(a: nn.Module, b: nn.Module) -> None:
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def args_for(clip_grad: float | None = None, clip_mode: str = "norm") -> SimpleNamespace:
    return SimpleNamespace(clip_grad=clip_grad, clip_mode=clip_mode)


def run(model_name: str, name: str, args: SimpleNamespace, patched: bool, **kwargs):
    """STEPS updates of a fresh model: the train.py loop (patched) or by hand; the model, optimizer and losses."""
    model = MODELS[model_name]().train()
    optimizer = optimizer_for(model, name)
    torch.manual_seed(1)  # the draws of dropout and drop path
    losses = []
    for input, target in batches():
        if patched:
            losses.append(train_step(model, optimizer, input, target, args, patched=True, **kwargs))
        else:
            losses.append(by_hand(model, optimizer, input, target, args, **kwargs))
    return model, optimizer, losses


# The factory.


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_create_optimizer_v2_builds_ours_on_timms_parameter_groups(name: str) -> None:
    cls, base, options = OPTIMIZERS[name]
    model = vit()
    optimizer = create_optimizer_v2(model, name, lr=0.01, weight_decay=0.05, rho=0.07, **options)
    assert type(optimizer) is cls and type(optimizer.base_optimizer) is base
    assert optimizer.base_optimizer.param_groups is optimizer.param_groups
    names = {p: n for n, p in model.named_parameters()}
    decay = {names[p]: group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay.keys() == set(names.values())
    assert decay["pos_embed"] == decay["cls_token"] == 0.0  # model.no_weight_decay(), though not 1-D
    assert decay["blocks.0.attn.qkv.weight"] == decay["head.weight"] == 0.05
    assert all(value == 0.0 for n, value in decay.items() if model.get_parameter(n).ndim <= 1)
    for group in optimizer.param_groups:
        assert group["rho"] == 0.07 and group["lr"] == 0.01
        assert all(group[key] == value for key, value in options.items())
        if base is SGD:
            assert group["momentum"] == 0.9 and not group["nesterov"]  # timm's default momentum
        else:
            assert group["betas"] == (0.9, 0.999)


def test_every_name_is_listed_with_a_description() -> None:
    listed = dict(list_optimizers(with_description=True))
    for name in OPTIMIZERS:
        assert "two_pass_step" in listed[name]
    assert "zsharp" in list_optimizers("zsharp*")


def test_layer_decay_groups_reach_the_base_optimizer_through_timms_scheduler() -> None:
    model = vit()
    optimizer = create_optimizer_v2(
        model, "zsharp", lr=0.01, weight_decay=0.05, layer_decay=0.5, percentile=0.8
    )
    scales = {group["lr_scale"] for group in optimizer.param_groups}
    assert len(scales) > 2 and max(scales) == 1.0
    CosineLRScheduler(optimizer, t_initial=10).step(0)
    for group, base_group in zip(optimizer.param_groups, optimizer.base_optimizer.param_groups, strict=True):
        assert base_group["lr"] == pytest.approx(0.01 * group["lr_scale"])
        assert group["percentile"] == 0.8
        assert all(group["weight_decay"] == 0 for p in group["params"] if p.ndim <= 1)


# The loop.


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_patched_train_py_loop_equals_the_two_pass_step_by_hand(name: str) -> None:
    model, optimizer, losses = run("resnet", name, args_for(), patched=True)
    reference, _, reference_losses = run("resnet", name, args_for(), patched=False)
    assert_same_state(model, reference)  # weights, BatchNorm statistics: bit for bit
    assert_changed(model, resnet())
    assert losses == reference_losses  # the first pass's loss, for timm's loss meter
    assert not losses[0].requires_grad


def test_two_forward_passes_per_step_and_batchnorm_statistics_advance_once() -> None:
    model = resnet().train()
    one_pass = copy.deepcopy(model)
    optimizer = optimizer_for(model, "zsharp", lr=0.0)  # lr 0: only the passes touch the model's state
    calls = counted(model)
    input, target = batches()[0]
    torch.manual_seed(1)
    train_step(model, optimizer, input, target, args_for(), patched=True)
    assert len(calls) == 2
    torch.manual_seed(1)  # the same drop-path draws, which the later BatchNorm layers see
    one_pass(input)
    assert_same_state(model, one_pass)  # running mean/var and num_batches_tracked: the first pass's only


@pytest.mark.parametrize("name", ["zsharp", "asamsgd"])
def test_vit_with_dropout_and_drop_path_equals_by_hand(name: str) -> None:
    model, _, _ = run("vit", name, args_for(), patched=True)
    reference, _, _ = run("vit", name, args_for(), patched=False)
    assert_same_state(model, reference)
    assert_changed(model, vit())


@pytest.mark.parametrize("clip", [(0.05, "norm"), (0.01, "agc"), (1e-3, "value")])
def test_clipping_equals_by_hand(clip: tuple[float, str]) -> None:
    """AGC reads the weights: they are restored before clipping."""
    model, _, _ = run("resnet", "zsharp", args_for(*clip), patched=True)
    reference, _, _ = run("resnet", "zsharp", args_for(*clip), patched=False)
    assert_same_state(model, reference)
    unclipped, _, _ = run("resnet", "zsharp", args_for(), patched=True)
    assert_changed(model, unclipped)  # the clipping was active


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_scaler_under_cpu_autocast_equals_by_hand(dtype: torch.dtype) -> None:
    autocast = partial(torch.autocast, "cpu", dtype=dtype)
    loss_scaler = NativeScaler(device="cpu")
    model, _, _ = run("resnet", "zsharp", args_for(0.5), True, loss_scaler=loss_scaler, amp_autocast=autocast)
    scaler = torch.amp.GradScaler("cpu")
    reference, _, _ = run("resnet", "zsharp", args_for(0.5), False, scaler=scaler, autocast=autocast)
    assert_same_state(model, reference)
    assert_changed(model, resnet())
    assert loss_scaler._scaler.get_scale() == scaler.get_scale()  # fp16: the first steps overflow at 2**16


def overflowing(forward, calls: set[int]):
    """`forward` whose loss is multiplied by 1e38 on the given calls (1: first pass, 2: second): the scaled
    gradients overflow float32."""
    count = [0]

    def wrapped() -> torch.Tensor:
        count[0] += 1
        return forward() * (1e38 if count[0] in calls else 1.0)

    return wrapped, count


@pytest.mark.parametrize("overflow", [1, 2])
def test_an_overflow_skips_the_step_with_the_weights_exactly_restored(overflow: int) -> None:
    model = resnet().train()
    optimizer = optimizer_for(model, "zsharp")
    input, target = batches()[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss_scaler = NativeScaler(device="cpu")
    forward, count = overflowing(lambda: LOSS(model(input), target), {overflow})
    two_pass_step(model, optimizer, forward, loss_scaler=loss_scaler, clip_grad=1.0, clip_mode="agc")
    assert count[0] == overflow  # no second pass after a first-pass overflow
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert loss_scaler._scaler.get_scale() == 2.0**15  # the scaler skipped the step and backed off
    optimizer.zero_grad()
    train_step(model, optimizer, input, target, args_for(), patched=True, loss_scaler=loss_scaler)
    assert_changed(model, resnet())  # the next step is taken


def test_friendly_sam_under_the_scaler_ascends_with_unscaled_gradients() -> None:
    """A power-of-two loss scale is exact: with the first pass unscaled, the run equals the unscaled one."""
    loss_scaler = NativeScaler(device="cpu")
    model, optimizer, _ = run("resnet", "fsam", args_for(), True, loss_scaler=loss_scaler)
    reference, plain, _ = run("resnet", "fsam", args_for(), True)
    assert_same_state(model, reference)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(optimizer.momentum[p], plain.momentum[q])  # the gradient EMA, never scaled


def test_with_ddp_the_patched_loop_equals_by_hand(tmp_path) -> None:
    """A DDP-wrapped model (one gloo process): BatchNorm frozen through the wrapper, both passes reduced."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(resnet().train())
        optimizer = optimizer_for(ddp, "zsharp")
        torch.manual_seed(1)
        for input, target in batches():
            train_step(ddp, optimizer, input, target, args_for(0.05), patched=True)
    finally:
        torch.distributed.destroy_process_group()
    reference, _, _ = run("resnet", "zsharp", args_for(0.05), patched=False)
    assert_same_state(ddp.module, reference)


# What fails loudly.


@pytest.mark.parametrize("scaled", [False, True])
def test_the_unpatched_train_py_loop_raises_instead_of_training_adamw(scaled: bool) -> None:
    model = resnet().train()
    before = copy.deepcopy(model.state_dict())
    optimizer = optimizer_for(model, "zsharp")
    input, target = batches()[0]
    loss_scaler = NativeScaler(device="cpu") if scaled else None
    with pytest.raises(RuntimeError, match=r"without first_step\(\).*hf_zsharp.timm.two_pass_step"):
        train_step(model, optimizer, input, target, args_for(1.0), patched=False, loss_scaler=loss_scaler)
    for key, value in model.named_parameters():
        assert torch.equal(value, before[key]), key


def test_gradient_accumulation_is_refused_naming_the_flag() -> None:
    model = resnet().train()
    optimizer = optimizer_for(model, "zsharp")
    calls = counted(model)
    with pytest.raises(ValueError, match="--grad-accum-steps"):
        two_pass_step(model, optimizer, lambda: model(batches()[0][0]).sum(), need_update=False)
    assert not calls  # refused before any pass


def test_other_optimizers_and_scalers_are_refused() -> None:
    model = resnet()
    with pytest.raises(TypeError, match="hf_zsharp optimizer.*lookahead"):
        two_pass_step(
            model, create_optimizer_v2(model, "lookahead_zsharp"), lambda: model(batches()[0][0]).sum()
        )
    with pytest.raises(TypeError, match="NativeScaler"):
        two_pass_step(model, optimizer_for(model, "sam"), lambda: None, loss_scaler=object())


# The README.


def test_the_readme_timm_section_runs() -> None:
    setup, patch = code_blocks("## With timm")
    namespace: dict = {}
    exec(setup, namespace)
    assert isinstance(namespace["optimizer"], ZSharp)
    assert namespace["optimizer"].param_groups[0]["percentile"] == 0.95
    model = resnet().train()
    optimizer = optimizer_for(model, "zsharp")
    input, target = batches()[0]
    loop = {
        "hf_zsharp": hf_zsharp,
        "model": model,
        "optimizer": optimizer,
        "_forward": lambda: LOSS(model(input), target),
        "loss_scaler": NativeScaler(device="cpu"),
        "args": args_for(0.01, "agc"),
        "model_parameters": model_parameters,
        "need_update": True,
    }
    exec(patch, loop)
    assert loop["loss"].ndim == 0
    assert_changed(model, resnet())
