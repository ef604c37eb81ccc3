"""ZSharpTrainingArguments and ZSharpTrainer on the CPU (DDP: test_ddp.py)."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from tiny_training import TinyData, TinyNet, decay_groups, flat, tiny_args
from transformers import HfArgumentParser, PretrainedConfig, TrainerCallback, get_linear_schedule_with_warmup

from hf_zsharp.args import ZSharpTrainingArguments
from hf_zsharp.optim import ASAM, SAM, FriendlySAM, ZSharp, frozen_batchnorm_stats
from hf_zsharp.support import check_supported
from hf_zsharp.trainer import ZSharpTrainer, check_fsdp2_batchnorm

# Two float32 computations of the same training that round differently (fused or for-loop AdamW, batch 8 or 2 x 4,
# the Trainer or a plain loop, another CPU's kernels or thread count) end a few ulps apart, because every gradient of
# TinyNet is far above its rounding error (test_the_tiny_training_is_insensitive_to_rounding). The float32 ulp of
# a number below 2 in magnitude, as all TinyNet's weights and BatchNorm statistics are, is at most
ULP = 2.0**-23
# Comparisons of such computations allow 8 ulps (9.5e-7): 4x the 2 ulps the rounding test allows.
ROUNDING = 8 * ULP


def train(tmp_path, model=None, dataset=None, callbacks=(), scaler=None, fp16_amp=False, **overrides):
    """Train `model` (default TinyNet()) with tiny_args(**overrides); returns the trainer."""
    model = TinyNet() if model is None else model
    trainer = ZSharpTrainer(
        model=model,
        args=tiny_args(str(tmp_path / "out"), **overrides),
        train_dataset=TinyData() if dataset is None else dataset,
        callbacks=list(callbacks),
    )
    if scaler is not None:
        # Accelerate only builds a GradScaler on GPUs; this is the one it would build (before prepare).
        trainer.accelerator.scaler = scaler
        trainer.accelerator.native_amp = fp16_amp
    trainer.train()
    return trainer


class StepRecorder(TrainerCallback):
    """Per optimizer step: parameters after it, the forward calls it made, whether Accelerate skipped it."""

    def __init__(self, model):
        self.model = model
        self.trainer = None
        self.params, self.calls, self.skipped, self.lrs, self.restored = [], [], [], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self._calls = self.model.calls
        self._start = flat(self.model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.restored.append(torch.equal(flat(self.model), self._start))

    def on_step_end(self, args, state, control, **kwargs):
        self.params.append(flat(self.model))
        self.calls.append(self.model.calls - self._calls)
        if self.trainer is not None:
            self.skipped.append(self.trainer.accelerator.optimizer_step_was_skipped)
            self.lrs.append(self.trainer.lr_scheduler.get_last_lr()[0])


def recorded_train(tmp_path, model=None, **kwargs):
    model = TinyNet() if model is None else model
    recorder = StepRecorder(model)
    trainer = ZSharpTrainer(
        model=model,
        args=tiny_args(
            str(tmp_path / "out"), **{k: v for k, v in kwargs.items() if k not in ("scaler", "fp16_amp")}
        ),
        train_dataset=TinyData(),
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    if kwargs.get("scaler") is not None:
        trainer.accelerator.scaler = kwargs["scaler"]
        trainer.accelerator.native_amp = kwargs.get("fp16_amp", False)
    trainer.train()
    return trainer, recorder


def reference_optimizer(model, weight_decay=0.0):
    """ZSharp over the Trainer's base for tiny_args (optim="adamw_torch_fused"), with its weight-decay groups."""
    return ZSharp(decay_groups(model, weight_decay), torch.optim.AdamW, lr=1e-2, seed=42, fused=True)


def reference_zsharp(model, steps, batch_size=8, weight_decay=0.0, clip=0.0, autocast=None, reverse=False):
    """A plain loop with hf_zsharp.ZSharp and the Trainer's default linear schedule.

    `reverse` reverses the samples of every batch: the same mathematics, rounded differently.
    """
    opt = reference_optimizer(model, weight_decay)
    schedule = get_linear_schedule_with_warmup(opt, 0, steps)
    batches = TinyData().batches(batch_size)
    for batch in batches[:steps]:
        if reverse:
            batch = {key: value.flip(0) for key, value in batch.items()}

        def closure(batch=batch):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = model(**batch)["loss"]
            loss.backward()
            return loss

        if clip:
            opt.zero_grad()
            closure()
            opt.first_step(zero_grad=True)
            closure()
            opt.restore()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        else:
            opt.step(closure)
        schedule.step()
    return flat(model)


# --- arguments -------------------------------------------------------------------------------------------


def test_options_are_in_help_and_parse():
    parser = HfArgumentParser(ZSharpTrainingArguments)
    text = " ".join(parser.format_help().split())
    for option in (
        "--sam ",
        "--sam_rho",
        "--zsharp_percentile",
        "--sam_radius",
        "--sam_mask",
        "--sam_interval",
    ):
        assert option in text
    assert "--sam_sync_ascent" in text and "all-reduce the first-pass gradient" in text
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "o", "--sam", "asam", "--sam_rho", "0.3", "--sam_interval", "2", "--use_cpu", "True"]
    )
    assert (args.sam, args.sam_rho, args.sam_interval, args.sam_sync_ascent) == ("asam", 0.3, 2, False)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--sam", "adam"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sam": "sharp"}, "sam must be one of"),
        ({"sam_rho": 0.0}, "sam_rho must be a positive"),
        ({"sam_rho": math.nan}, "sam_rho must be a positive"),
        ({"zsharp_percentile": 1.0}, "zsharp_percentile"),
        ({"zsharp_percentile": -0.1}, "zsharp_percentile"),
        ({"sam_radius": "layer"}, "sam_radius"),
        ({"sam_mask": "topk"}, "sam_mask"),
        ({"sam_interval": 0}, "sam_interval"),
        ({"sam_interval": 1.5}, "sam_interval"),
        ({"optim": "lomo"}, "optim='lomo' cannot be the base"),
        ({"optim": "adamw_bnb_8bit"}, "cannot be the base"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ZSharpTrainingArguments(output_dir="o", use_cpu=True, **overrides)


def test_zsharp_only_options_warn_with_other_methods():
    with pytest.warns(UserWarning, match="only apply to sam='zsharp'"):
        ZSharpTrainingArguments(output_dir="o", use_cpu=True, sam="sam", zsharp_percentile=0.9)


def test_deepspeed_and_fsdp1_are_refused_at_start_up():
    # Semantics 9: a clear error naming them and pointing to FSDP2 and DDP, before training starts.
    with pytest.raises(ValueError, match="does not support DeepSpeed.*Use FSDP2.*DDP"):
        ZSharpTrainingArguments(output_dir="o", deepspeed="ds_config.json")
    with pytest.raises(ValueError, match="does not support FSDP1.*Use FSDP2.*DDP"):
        ZSharpTrainingArguments(output_dir="o", fsdp=True, fsdp_config={"version": 1})
    # FSDP2 (Transformers' default FSDP version) is accepted.
    assert ZSharpTrainingArguments(output_dir="o", fsdp=True, fsdp_config={"version": 2}).fsdp
    # Configured through Accelerate instead of the arguments: refused by the trainer (and accelerate_step).
    for kind, name in [(DistributedType.DEEPSPEED, "DeepSpeed"), (DistributedType.FSDP, "FSDP1")]:
        with pytest.raises(ValueError, match=f"does not support {name}.*Use FSDP2.*DDP"):
            check_supported(SimpleNamespace(distributed_type=kind, is_fsdp2=False))
    check_supported(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True))


def test_trainer_refuses_deepspeed_configured_by_accelerate(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "accelerate.Accelerator.distributed_type",
        property(lambda self: DistributedType.DEEPSPEED),
        raising=True,
    )
    with pytest.raises(ValueError, match="does not support DeepSpeed.*Use FSDP2.*DDP"):
        ZSharpTrainer(model=TinyNet(), args=tiny_args(str(tmp_path)), train_dataset=TinyData())


# --- optimizer construction -------------------------------------------------------------------------------


def test_optimizer_wraps_the_optim_base_with_trainer_weight_decay_groups(tmp_path):
    args = tiny_args(str(tmp_path), weight_decay=0.1, adam_beta1=0.8)
    trainer = ZSharpTrainer(model=TinyNet(), args=args, train_dataset=TinyData())
    opt = trainer.create_optimizer()
    assert isinstance(opt, ZSharp) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["param_names"] == ["net.0.weight", "net.2.weight"]
    assert no_decay["param_names"] == ["net.0.bias", "net.2.bias"]
    assert decay["betas"] == (0.8, 0.999) and decay["lr"] == 1e-2
    assert (decay["rho"], decay["percentile"], opt.defaults["radius"], opt.defaults["mask"]) == (
        0.05,
        0.95,
        "tensor",
        "zscore",
    )


@pytest.mark.parametrize(
    ("sam", "optim", "cls", "base", "rho"),
    [
        ("asam", "sgd", ASAM, torch.optim.SGD, 0.5),
        ("sam", "rmsprop", SAM, torch.optim.RMSprop, 0.05),
        ("fsam", "adamw_torch", FriendlySAM, torch.optim.AdamW, 0.05),
    ],
)
def test_optimizer_follows_sam_and_optim(tmp_path, sam, optim, cls, base, rho):
    trainer = ZSharpTrainer(
        model=TinyNet(), args=tiny_args(str(tmp_path), sam=sam, optim=optim), train_dataset=TinyData()
    )
    opt = trainer.create_optimizer()
    assert type(opt) is cls and type(opt.base_optimizer) is base
    assert opt.param_groups[0]["rho"] == rho


def test_optimizer_cls_and_kwargs_gives_the_base(tmp_path):
    trainer = ZSharpTrainer(
        model=TinyNet(),
        args=tiny_args(str(tmp_path)),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    )
    opt = trainer.create_optimizer()
    assert type(opt) is ZSharp and type(opt.base_optimizer) is torch.optim.SGD
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.1


def test_sam_rho_overrides_the_method_default(tmp_path):
    args = tiny_args(str(tmp_path), sam="asam", sam_rho=0.2)
    assert ZSharpTrainer(model=TinyNet(), args=args).create_optimizer().param_groups[0]["rho"] == 0.2


def test_sam_none_is_a_stock_trainer(tmp_path):
    trainer, recorder = recorded_train(tmp_path, sam="none")
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    assert recorder.calls == [1, 1, 1, 1]
    assert not any("sam_perturbation_norm" in log for log in trainer.state.log_history)


def test_a_plain_optimizer_is_refused(tmp_path):
    model = TinyNet()
    with pytest.raises(ValueError, match="cannot take a two-pass step"):
        ZSharpTrainer(
            model=model, args=tiny_args(str(tmp_path)), optimizers=(torch.optim.SGD(model.parameters()), None)
        )


def test_args_must_be_zsharp_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="needs arguments with the sharpness-aware options"):
        ZSharpTrainer(model=TinyNet(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


# --- the two-pass step -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("net", "run"),
    [
        ({}, {"steps": 5, "weight_decay": 0.1}),
        ({}, {"steps": 4, "clip": 0.05}),
        ({"batchnorm": True}, {"steps": 5}),
        ({}, {"steps": 8, "batch_size": 4}),
    ],
    ids=["decay", "clipped", "batchnorm", "batch4"],
)
def test_the_tiny_training_is_insensitive_to_rounding(net, run):
    # What the ROUNDING tolerance rests on. Reversing each batch changes the rounding of every reduction over it,
    # as another CPU or code path does: the weights may differ by rounding (7.5e-8 at most measured), not more. A
    # gradient that is rounding noise alone (a biased Linear before BatchNorm, which cancels the bias) breaks this:
    # Adam divides it by its own size, so rounding picks the direction of lr-sized steps (1.6e-2 apart measured).
    model = TinyNet(**net)
    straight = reference_zsharp(copy.deepcopy(model), **run)
    reversed_ = reference_zsharp(copy.deepcopy(model), reverse=True, **run)
    torch.testing.assert_close(reversed_, straight, rtol=0, atol=2 * ULP)


def test_matches_a_plain_zsharp_loop(tmp_path):
    model = TinyNet()
    expected = reference_zsharp(copy.deepcopy(model), steps=5, weight_decay=0.1)
    train(tmp_path, model, max_steps=5, weight_decay=0.1)
    # Trainer vs plain loop: the same mathematics, possibly rounded differently.
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=ROUNDING)
    assert not torch.equal(flat(model), flat(TinyNet()))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big, small = TinyNet(), TinyNet()
    train(tmp_path / "big", big, per_device_train_batch_size=8)
    trainer, recorder = recorded_train(
        tmp_path / "small", small, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    # One ascent from the whole accumulated gradient, then both micro-batches again: 4 forwards per step.
    assert recorder.calls == [4, 4, 4, 4]
    # Batch 8 vs two means of 4 averaged: the same mathematics, rounded differently.
    torch.testing.assert_close(flat(small), flat(big), rtol=0, atol=ROUNDING)


def test_weights_are_restored_before_clipping_and_the_step(tmp_path):
    model = TinyNet()
    expected = reference_zsharp(copy.deepcopy(model), steps=4, clip=0.05)
    trainer, recorder = recorded_train(tmp_path, model, max_grad_norm=0.05)
    assert recorder.restored == [True] * 4
    # Trainer vs plain loop: the same mathematics, possibly rounded differently.
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=ROUNDING)
    # Clipping was active: a clipped run differs from an unclipped one (by 1e-3) far beyond rounding.
    assert (expected - reference_zsharp(TinyNet(), steps=4)).abs().max() > 100 * ROUNDING


def test_non_finite_first_pass_skips_the_step(tmp_path):
    model = TinyNet()
    model.poison = {5}  # the first pass of step 2 (steps 0 and 1 used calls 1-4)
    trainer, recorder = recorded_train(tmp_path, model, logging_steps=4)
    assert recorder.calls == [2, 2, 1, 2]  # no second pass for the skipped step
    assert torch.equal(recorder.params[2], recorder.params[1])
    assert (
        not torch.equal(recorder.params[3], recorder.params[2]) and torch.isfinite(recorder.params[3]).all()
    )
    assert trainer.state.log_history[0]["sam_skipped_steps"] == 1


def test_a_skip_does_not_skip_the_next_plain_step(tmp_path):
    model = TinyNet()
    model.poison = {1}  # step 0 (two-pass) is skipped; step 1 is a plain step (sam_interval=2)
    trainer, recorder = recorded_train(tmp_path, model, sam_interval=2, max_steps=2)
    assert recorder.calls == [1, 1]
    assert torch.equal(recorder.params[0], flat(TinyNet()))
    assert not torch.equal(recorder.params[1], recorder.params[0])


def scaler(**kwargs):
    return torch.amp.GradScaler("cpu", **{"init_scale": 2.0**10, "growth_interval": 1000, **kwargs})


def fp16_run_poisoned(tmp_path, call: int):
    """An fp16 run with a GradScaler whose forward call number `call` gives an infinite loss."""
    model = TinyNet()
    model.poison = {call}
    grad_scaler = scaler()
    _, recorder = recorded_train(
        tmp_path, model, scaler=grad_scaler, fp16=True, fp16_amp=True, max_grad_norm=1.0
    )
    return model, grad_scaler, recorder


def test_grad_scaler_overflow_in_the_second_pass_skips_like_stock(tmp_path):
    model, grad_scaler, recorder = fp16_run_poisoned(tmp_path, 6)  # the second pass of step 2
    assert recorder.skipped == [False, False, True, False]
    assert torch.equal(recorder.params[2], recorder.params[1])  # restored, and the step skipped
    assert grad_scaler.get_scale() == 2.0**9
    # The LR scheduler does not advance on the skipped step (as in stock Trainer).
    assert recorder.lrs[2] == recorder.lrs[1] != recorder.lrs[0]
    assert torch.isfinite(flat(model)).all()


def test_grad_scaler_overflow_in_the_first_pass_skips_the_second(tmp_path):
    model, grad_scaler, recorder = fp16_run_poisoned(tmp_path, 3)  # the first pass of step 1
    assert recorder.calls == [2, 1, 2, 2]
    assert recorder.skipped == [False, True, False, False]
    assert torch.equal(recorder.params[1], recorder.params[0])
    assert grad_scaler.get_scale() == 2.0**9


def test_fp16_unscales_once_per_step_and_trains(tmp_path):
    grad_scaler = scaler()
    calls = []
    unscale = grad_scaler.unscale_
    grad_scaler.unscale_ = lambda optimizer: (calls.append(1), unscale(optimizer))[1]
    model = TinyNet()
    forward_dtypes = []
    model.net[0].register_forward_hook(lambda m, i, o: forward_dtypes.append(o.dtype))
    trainer, recorder = recorded_train(
        tmp_path, model, scaler=grad_scaler, fp16=True, fp16_amp=True, max_grad_norm=1.0
    )
    assert len(calls) == 4  # by clipping; GradScaler.step then does not unscale again
    assert forward_dtypes == [torch.float16] * 8  # both passes under fp16 autocast
    assert recorder.skipped == [False] * 4 and torch.isfinite(flat(model)).all()


@pytest.mark.parametrize("sam", ["zsharp", "fsam"])
def test_the_ascent_is_unchanged_by_loss_scaling(tmp_path, sam):
    # fp32 arithmetic with a GradScaler whose scale doubles every step: scaled gradients are exact multiples.
    reference, scaled = TinyNet(), TinyNet()
    train(tmp_path / "ref", reference, sam=sam, max_steps=5)
    grad_scaler = scaler(growth_interval=1)
    train(tmp_path / "scaled", scaled, sam=sam, max_steps=5, scaler=grad_scaler)
    assert grad_scaler.get_scale() == 2.0**15
    # Exactly equal: scaling by a power of two commutes with every float32 rounding (nothing overflows, and the
    # ascent's 1e-12 guard on the norm is below half an ulp of gradient norms above 1e-4).
    assert torch.equal(flat(scaled), flat(reference))


def test_bf16_autocast_on_cpu(tmp_path):
    model = TinyNet()
    expected = reference_zsharp(copy.deepcopy(model), steps=4, autocast=torch.bfloat16)
    forward_dtypes = []
    model.net[0].register_forward_hook(lambda m, i, o: forward_dtypes.append(o.dtype))
    train(tmp_path, model, bf16=True)
    assert forward_dtypes == [torch.bfloat16] * 8
    # Exactly equal, as the reference runs the Trainer's own kernels (fused AdamW included). No rounding tolerance
    # would do: one float32 ulp can flip a weight's bf16 rounding (2**-8), which moves the others by ~2e-4.
    assert torch.equal(flat(model), expected)


def test_batchnorm_statistics_come_from_the_first_pass_only(tmp_path):
    model = TinyNet(batchnorm=True)
    reference = copy.deepcopy(model)
    train(tmp_path, model, max_steps=3)
    bn = model.net[1]
    assert bn.num_batches_tracked.item() == 3
    opt = reference_optimizer(reference)
    schedule = get_linear_schedule_with_warmup(opt, 0, 3)
    for batch in TinyData().batches(8)[:3]:
        reference(**batch)["loss"].backward()
        opt.first_step(zero_grad=True)
        with frozen_batchnorm_stats(reference):
            reference(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    # Trainer vs plain loop: the same mathematics, possibly rounded differently (statistics below 2 as well).
    torch.testing.assert_close(bn.running_mean, reference.net[1].running_mean, rtol=0, atol=ROUNDING)
    torch.testing.assert_close(bn.running_var, reference.net[1].running_var, rtol=0, atol=ROUNDING)
    torch.testing.assert_close(flat(model), flat(reference), rtol=0, atol=ROUNDING)


def dropout_masks(tmp_path, **overrides):
    model = TinyNet(dropout=0.5)
    masks = []
    dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    dropout.register_forward_hook(lambda m, i, o: masks.append(o == 0))
    train(tmp_path, model, max_steps=3, **overrides)
    return masks


def test_dropout_draws_the_same_mask_in_both_passes(tmp_path):
    masks = dropout_masks(tmp_path / "zsharp")
    assert len(masks) == 6
    for first, second in zip(masks[0::2], masks[1::2]):
        assert torch.equal(first, second)
    assert not torch.equal(masks[0], masks[2])
    # The replay leaves the RNG where one pass would: the first passes draw the masks of a stock Trainer.
    stock = dropout_masks(tmp_path / "stock", sam="none")
    for first, plain in zip(masks[0::2], stock):
        assert torch.equal(first, plain)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sam_interval_takes_one_two_pass_step_every_k(tmp_path, accumulation):
    batch = 8 // accumulation
    trainer, recorder = recorded_train(
        tmp_path,
        sam_interval=3,
        max_steps=7,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
    )
    two_pass, plain = 2 * accumulation, accumulation
    assert recorder.calls == [two_pass, plain, plain, two_pass, plain, plain, two_pass]


def test_resume_from_a_checkpoint_continues_identically(tmp_path):
    for sam in ("zsharp", "fsam"):
        run = {
            "sam": sam,
            "max_steps": 6,
            "save_strategy": "steps",
            "save_steps": 3,
            "per_device_train_batch_size": 16,
        }
        straight = TinyNet(dropout=0.2)
        trainer = train(tmp_path / sam, straight, train_sampling_strategy="random", **run)
        resumed = TinyNet(dropout=0.2)
        trainer = ZSharpTrainer(
            model=resumed,
            args=tiny_args(str(tmp_path / sam / "out"), train_sampling_strategy="random", **run),
            train_dataset=TinyData(),
        )
        trainer.train(resume_from_checkpoint=str(tmp_path / sam / "out" / "checkpoint-3"))
        # Exactly: the same computation, from every state restored (weights, Adam moments, RNG, data order).
        torch.testing.assert_close(flat(resumed), flat(straight), rtol=0, atol=0)
        # The checkpoint held the base optimizer's state (Adam moments) too.
        state = torch.load(tmp_path / sam / "out" / "checkpoint-3" / "optimizer.pt", weights_only=True)
        assert state["state"][0]["exp_avg"].abs().sum() > 0


def test_ascent_statistics_are_averaged_into_the_logs(tmp_path):
    stats = []

    class Peek(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            stats.append(dict(optimizer.optimizer.ascent_stats))

    trainer = train(tmp_path, callbacks=[Peek()], logging_steps=2)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log, pair in zip(logs, (stats[:2], stats[2:])):
        assert log["sam_perturbation_norm"] == pytest.approx(sum(s["perturbation_norm"] for s in pair) / 2)
        assert log["sam_kept_fraction"] == pytest.approx(sum(s["kept_fraction"] for s in pair) / 2)
        assert 0 < log["sam_kept_fraction"] < 0.5 and log["sam_skipped_steps"] == 0


def loss_increases_of_a_plain_loop(steps: int) -> list[float]:
    """L(w + e) - L(w) of each step's batch (8 examples), measured around the optimizer's own steps."""
    model = TinyNet()
    opt = ZSharp(decay_groups(model, 0.0), torch.optim.AdamW, lr=1e-2, fused=True)
    schedule = get_linear_schedule_with_warmup(opt, 0, steps)
    increases = []
    for batch in TinyData().batches(8)[:steps]:
        before = model(**batch)["loss"]
        before.backward()
        opt.first_step(zero_grad=True)
        after = model(**batch)["loss"]
        after.backward()
        opt.step()  # restore, then the base step
        opt.zero_grad()
        schedule.step()
        increases.append(float(after.detach()) - float(before.detach()))
    return increases


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_ascent_loss_increase_is_logged(tmp_path, accumulation):
    expected = loss_increases_of_a_plain_loop(4)
    assert all(increase > 0 for increase in expected)  # the ascent does raise the loss
    trainer = train(
        tmp_path,
        logging_steps=2,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    logs = [log["sam_loss_increase"] for log in trainer.state.log_history if "loss" in log]
    # Means of two steps; each a difference of two float32 losses near 1 (a few ulps), halves averaged when
    # accumulating: a few times 1e-7 at most.
    torch.testing.assert_close(logs, [sum(expected[:2]) / 2, sum(expected[2:]) / 2], rtol=0, atol=1e-6)


def test_fsdp2_with_bf16_refuses_a_batchnorm_model_before_training():
    """The known limitation is said in one line instead of `expected scalar type BFloat16 but found Float`."""
    with_norm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    fsdp2_bf16 = SimpleNamespace(is_fsdp2=True, mixed_precision="bf16")
    with pytest.raises(
        ValueError, match="FSDP2 with bf16 mixed precision cannot train this model: it has BatchNorm2d"
    ):
        check_fsdp2_batchnorm(with_norm, fsdp2_bf16)
    check_fsdp2_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2)), fsdp2_bf16)  # no BatchNorm
    check_fsdp2_batchnorm(with_norm, SimpleNamespace(is_fsdp2=True, mixed_precision="no"))
    check_fsdp2_batchnorm(with_norm, SimpleNamespace(is_fsdp2=False, mixed_precision="bf16"))


class TinyNetForImageClassification(TinyNet):
    """TinyNet under an image classifier's name: the kind of model hf_zsharp's own card describes."""


def test_create_model_card_writes_the_hf_zsharp_card_for_an_image_classifier(tmp_path):
    """Trainer.push_to_hub and users calling create_model_card get hf_zsharp's card, not Trainer's generic one."""
    args = tiny_args(str(tmp_path), eval_strategy="steps", eval_steps=2, logging_steps=1, sam_rho=0.1)
    trainer = ZSharpTrainer(
        model=TinyNetForImageClassification(),
        args=args,
        train_dataset=TinyData(),
        eval_dataset=TinyData(16, 2),
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny-zsharp", finetuned_from="someone/base", dataset="someone/data")
    card = (tmp_path / "README.md").read_text()
    assert "# tiny-zsharp" in card and "ZSharp (SAM with Z-score gradient filtering" in card
    assert "| rho (ascent radius) | 0.1 |" in card and "| Evaluation loss |" in card
    assert "base_model: someone/base" in card and (tmp_path / "training_curves.png").is_file()
    assert "pipeline_tag: image-classification" in card


def test_another_model_keeps_the_host_trainers_card_with_the_zsharp_section(tmp_path):
    """A model that is not an image classifier is never described as one: Trainer's own card, plus what ZSharp
    did (method, settings with rho resolved) and its tags; a second call replaces the section."""
    model = TinyNet()
    model.config = PretrainedConfig()  # Trainer's own card reads the model's config
    trainer = train(tmp_path, model, sam="asam", logging_steps=1)
    for _ in range(2):
        trainer.create_model_card(model_name="tiny-asam")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "image classifier" not in card and "image-classification" not in card
    assert (
        "generated_from_trainer" in card and "sharpness-aware-minimization" in card
    )  # Trainer's tags and ours
    assert card.count("## Sharpness-aware training") == 1
    assert "ASAM (adaptive SAM" in card and "| rho (ascent radius) | 0.5 |" in card
    assert "| eta (ASAM: T = |w| + eta) | 0.01 |" in card
    stated = json.loads((tmp_path / "out" / "zsharp_args.json").read_text())
    assert stated["sam_rho"] == 0.5 and stated["asam_eta"] == 0.01


@pytest.mark.parametrize(
    ("sam", "rho", "stated"),
    [
        (
            "zsharp",
            None,
            {"sam_rho": 0.05, "zsharp_percentile": 0.95, "sam_radius": "tensor", "sam_mask": "zscore"},
        ),
        ("fsam", 0.2, {"sam_rho": 0.2, "fsam_sigma": 1.0, "fsam_lmbda": 0.9}),
        ("sam", None, {"sam_rho": 0.05}),
    ],
)
def test_the_stated_settings_are_the_optimizers_with_defaults_resolved(tmp_path, sam, rho, stated):
    trainer = ZSharpTrainer(model=TinyNet(), args=tiny_args(str(tmp_path), sam=sam, sam_rho=rho))
    assert {key: trainer.stated_settings()[key] for key in stated} == stated  # before training: resolved
    trainer = train(tmp_path, sam=sam, sam_rho=rho)
    settings = trainer.stated_settings()
    assert {key: settings[key] for key in stated} == stated
    assert trainer.optimizer.optimizer.method_settings() == {
        option: settings[key]
        for option, key in zip(trainer.optimizer.optimizer.method_keys, stated, strict=True)
    }


def _checkpointed(tmp_path, **run):
    train(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, **run)
    return str(tmp_path / "out" / "checkpoint-2")


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"sam_rho": 0.5}, r"sam_rho 0\.05 \(this run: 0\.5\)"),
        ({"zsharp_percentile": 0.5}, r"zsharp_percentile 0\.95 \(this run: 0\.5\)"),
        ({"sam_mask": "random"}, r"sam_mask 'zscore' \(this run: 'random'\)"),
    ],
)
def test_a_resume_with_other_sharpness_settings_is_refused_naming_them(tmp_path, changed, named):
    checkpoint = _checkpointed(tmp_path)
    trainer = ZSharpTrainer(
        model=TinyNet(),
        args=tiny_args(str(tmp_path / "again"), max_steps=4, **changed),
        train_dataset=TinyData(),
    )
    with pytest.raises(ValueError, match=named):
        trainer.train(resume_from_checkpoint=checkpoint)


@pytest.mark.parametrize(
    ("saved", "resumed"), [("zsharp", "sam"), ("sam", "fsam"), ("none", "zsharp"), ("zsharp", "none")]
)
def test_a_resume_with_another_method_is_refused_naming_both(tmp_path, saved, resumed):
    classes = {"zsharp": "ZSharp", "sam": "SAM", "fsam": "FriendlySAM", "none": "a plain optimizer"}
    named = f"into {classes[resumed]}: it was saved by {classes[saved]}"
    if resumed == "none":
        named = "was trained with a sharpness-aware method"
    checkpoint = _checkpointed(tmp_path, sam=saved)
    trainer = ZSharpTrainer(
        model=TinyNet(),
        args=tiny_args(str(tmp_path / "again"), max_steps=4, sam=resumed),
        train_dataset=TinyData(),
    )
    with pytest.raises(ValueError, match=named):
        trainer.train(resume_from_checkpoint=checkpoint)
