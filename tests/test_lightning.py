"""ZSharpLightningModule under a real Lightning Trainer: its steps equal the two-pass step by hand (fp32, bf16,
fp16 with a GradScaler), clipping acts once on the second-pass gradients, logs and outputs come from the pass at
w, non-finite gradients skip the step with the weights restored, and what it cannot serve is refused before any
step; a plain LightningModule with ZSharp fails loudly.

Lightning turns `precision="16-mixed"` on the CPU into bf16 (with a warning), so fp16 runs with an injected
`MixedPrecision("16-mixed", "cpu", scaler=...)` plugin: the same code path as on a GPU.
"""

from __future__ import annotations

import copy
import csv
import math
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from readme_blocks import code_blocks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_zsharp import create_sam_optimizer, frozen_batchnorm_stats
from hf_zsharp.keys import LOGGED_STATISTICS
from hf_zsharp.lightning import ZSharpLightningModule

STEPS = 3
METHODS = ["zsharp", "sam", "asam", "fsam"]
QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def cnn() -> nn.Module:
    """Dropout (random draws the second pass must replay) and BatchNorm (statistics it must leave alone)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def data(batches: int = STEPS) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    n = 8 * batches
    inputs, labels = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(10, (n,), generator=gen)
    return DataLoader(TensorDataset(inputs, labels), batch_size=8)


def build(method: str, params) -> torch.optim.Optimizer:
    return create_sam_optimizer(method, params, torch.optim.SGD, lr=0.1, momentum=0.9)


def scaler(init_scale: float = 2.0**10) -> torch.amp.GradScaler:
    """A scale that doubles every step: a FriendlySAM fed scaled gradients would mix scales in its EMA."""
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Steps:
    """The training code of the test modules: records every training_step call (both passes), logs its loss,
    and can poison calls (loss times inf) or skip batches (return None)."""

    def __init__(self, method: str = "zsharp", optimizer: type[torch.optim.Optimizer] | None = None) -> None:
        super().__init__()
        self.net = cnn()
        self.method, self.optimizer = method, optimizer
        self.losses: list[torch.Tensor] = []  # per training_step call
        self.poisoned: set[int] = set()  # training_step calls whose loss becomes inf
        self.skipped_batches: set[int] = set()
        self.outputs: list[dict] = []  # training_step's outputs, as Lightning hands them on
        self.weights: list[torch.Tensor] = []  # after each step

    def training_step(self, batch, batch_idx: int):
        if batch_idx in self.skipped_batches:
            return None
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if len(self.losses) in self.poisoned:
            loss = loss * math.inf
        self.losses.append(loss.detach())
        self.log("train_loss", loss)
        self.log_dict({"train_loss_dict": loss})
        return {"loss": loss, "call": len(self.losses)}

    def on_before_optimizer_step(self, optimizer) -> None:
        """A common place to log (between the passes and the base step): it must not reset the SAM statistics."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("grad_norm", torch.stack([g.norm() for g in grads]).norm())

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.outputs.append(outputs)
        self.weights.append(flat(self.net))

    def configure_optimizers(self):
        if self.optimizer is not None:
            return self.optimizer(self.parameters(), lr=0.1)
        return build(self.method, self.parameters())


class Net(Steps, ZSharpLightningModule):
    pass


class PlainNet(Steps, L.LightningModule):
    pass


def fit(
    module: L.LightningModule,
    precision: str = "32-true",
    steps: int = STEPS,
    grad_scaler: torch.amp.GradScaler | None = None,
    **kwargs,
) -> L.Trainer:
    """Train `module` for `steps` steps on `data(steps)`; "16-mixed" through `grad_scaler` (default `scaler()`)."""
    if precision == "16-mixed":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=grad_scaler or scaler())]
    else:
        kwargs["precision"] = precision
    trainer = L.Trainer(max_steps=steps, **{**QUIET, **kwargs})
    L.seed_everything(0, verbose=False)  # the by-hand loop starts from the same seed and the same loader
    trainer.fit(module, data(steps))
    return trainer


def by_hand(model: nn.Module, optimizer, precision: str, clip: float | None = None, grad_scaler=None) -> None:
    """The reference: per batch, the first pass, first_step, the second pass with the first pass's random draws
    and BatchNorm statistics frozen, the restore, clipping and the base step (through a GradScaler for fp16)."""
    L.seed_everything(0, verbose=False)

    def forward_backward(x: torch.Tensor, y: torch.Tensor) -> None:
        with (
            torch.autocast("cpu", AUTOCAST[precision], cache_enabled=False)
            if precision in AUTOCAST
            else nullcontext()
        ):
            loss = nn.functional.cross_entropy(model(x), y)
        (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()

    for x, y in data(STEPS):
        rng = torch.get_rng_state()
        forward_backward(x, y)
        if grad_scaler is not None and not optimizer.scale_invariant:
            torch._foreach_mul_([p.grad for p in model.parameters()], 1.0 / grad_scaler.get_scale())
        if optimizer.first_step(zero_grad=True):
            after = torch.get_rng_state()
            torch.set_rng_state(rng)
            with frozen_batchnorm_stats(model):
                forward_backward(x, y)
            torch.set_rng_state(after)
            optimizer.restore()
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        if clip is not None:
            nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        if grad_scaler is None:
            optimizer.step()
        else:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        optimizer.zero_grad(set_to_none=True)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def twins(method: str = "zsharp") -> tuple[Net, nn.Module]:
    torch.manual_seed(1)
    module = Net(method)
    return module, copy.deepcopy(module.net).train()


CASES = [("32-true", m) for m in METHODS] + [
    ("bf16-mixed", "zsharp"),
    ("16-mixed", "zsharp"),
    ("16-mixed", "fsam"),
]


@pytest.mark.parametrize(("precision", "method"), CASES)
def test_steps_equal_the_two_pass_step_by_hand(precision: str, method: str) -> None:
    module, reference = twins(method)
    before = flat(module.net)
    plugin_scaler = scaler()
    trainer = fit(module, precision, grad_scaler=plugin_scaler)
    reference_scaler = scaler() if precision == "16-mixed" else None
    by_hand(reference, build(method, reference.parameters()), precision, grad_scaler=reference_scaler)

    assert_same_state(module.net, reference)  # weights and BatchNorm statistics, bit for bit
    assert not torch.equal(flat(module.net), before)
    assert len(module.losses) == 2 * STEPS  # two forward/backward passes per step
    assert module.net[1].num_batches_tracked == STEPS  # BatchNorm's statistics advance in the first pass only
    assert trainer.global_step == STEPS
    if reference_scaler is not None:  # no step skipped: the scale grew once per step
        assert plugin_scaler.get_scale() == reference_scaler.get_scale() == 2.0 ** (10 + STEPS)


class ClipCounter(Net):
    clips = 0

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        self.clips += 1
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_gradient_clipping_acts_once_on_the_second_pass_gradients(precision: str) -> None:
    torch.manual_seed(1)
    module = ClipCounter("zsharp")
    reference = copy.deepcopy(module.net).train()
    fit(module, precision, gradient_clip_val=0.05)  # well below the gradients' norm: every step clips
    grad_scaler = scaler() if precision == "16-mixed" else None
    by_hand(reference, build("zsharp", reference.parameters()), precision, clip=0.05, grad_scaler=grad_scaler)
    assert_same_state(module.net, reference)  # clipping twice, or the first pass's gradients, differs
    assert module.clips == STEPS


def test_logs_and_outputs_come_from_the_pass_at_w(tmp_path) -> None:
    module = Net("zsharp")
    trainer = fit(module, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1)
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["train_loss"]]
    assert [int(row["step"]) for row in rows] == list(range(STEPS))
    for step, row in enumerate(rows):
        first, second = module.losses[2 * step], module.losses[2 * step + 1]
        assert float(row["train_loss"]) == float(row["train_loss_dict"]) == first.item() != second.item()
        assert float(row["sam_loss_increase"]) == (second - first).item()
        assert 0 < float(row["sam_kept_fraction"]) < 1  # ZSharp keeps about 5 % of the filtered entries
        assert float(row["sam_perturbation_norm"]) > 0
        assert float(row["sam_skipped_steps"]) == 0
        assert module.outputs[step]["call"] == 2 * step + 1  # training_step's output of the pass at w
        assert torch.equal(module.outputs[step]["loss"], first)
    metrics = trainer.callback_metrics
    assert set(LOGGED_STATISTICS) <= metrics.keys()
    assert torch.equal(metrics["train_loss"], module.losses[-2])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("poisoned_pass", [0, 1])
def test_non_finite_gradients_skip_the_step_and_leave_the_weights(precision: str, poisoned_pass: int) -> None:
    module = Net("zsharp")
    module.poisoned = {2 + poisoned_pass}  # the first or the second pass of step 1
    trainer = fit(module, precision)
    weights = module.weights
    assert torch.equal(weights[1], weights[0])  # the perturbation restored exactly, no base step
    assert not torch.equal(weights[2], weights[1])  # the next step trains
    assert len(module.losses) == 2 * STEPS - (poisoned_pass == 0)  # no second pass after a non-finite first
    assert trainer.callback_metrics["sam_skipped_steps"] == 1


def test_a_loss_scale_overflow_skips_the_steps() -> None:
    module = Net("zsharp")
    before = flat(module.net)
    huge = scaler(init_scale=2.0**60)  # the first-pass gradients overflow: no ascent, no second pass, no step
    trainer = fit(module, "16-mixed", steps=2, grad_scaler=huge)
    assert torch.equal(flat(module.net), before)
    assert len(module.losses) == 2
    assert trainer.callback_metrics["sam_skipped_steps"] == 2
    assert huge.get_scale() == 2.0**58


def test_a_training_step_returning_none_skips_its_batch() -> None:
    module = Net("zsharp")
    module.skipped_batches = {1}
    trainer = fit(module)
    assert torch.equal(module.weights[1], module.weights[0])
    assert not torch.equal(module.weights[2], module.weights[1])
    assert len(module.losses) == 2 * (STEPS - 1)
    assert trainer.global_step == STEPS


@pytest.mark.parametrize(
    ("attributes", "trainer_kwargs", "match"),
    [
        ({}, {"accumulate_grad_batches": 2}, r"accumulate_grad_batches=2\).*Raise the batch size"),
        ({"automatic_optimization": False}, {}, r"automatic_optimization = False.*first_step"),
        ({"optimizer": torch.optim.AdamW}, {}, r"hf_zsharp optimizer.*AdamW"),
    ],
    ids=["accumulation", "manual-optimization", "plain-optimizer"],
)
def test_unsupported_setups_are_refused_before_any_step(
    attributes: dict, trainer_kwargs: dict, match: str
) -> None:
    module = Net("zsharp")
    for name, value in attributes.items():
        setattr(module, name, value)
    before = flat(module.net)
    with pytest.raises(ValueError, match=match):
        fit(module, **trainer_kwargs)
    assert module.losses == []
    assert torch.equal(flat(module.net), before)


def test_two_optimizers_are_refused_by_lightning_itself() -> None:
    """Lightning refuses several optimizers under automatic optimization (before `on_fit_start`), and the
    module refuses manual optimization: no set-up reaches a step with two."""
    module = Net("zsharp")
    module.configure_optimizers = lambda: [
        build("sam", module.net[:2].parameters()),
        build("sam", module.net[2:].parameters()),
    ]
    with pytest.raises(RuntimeError, match="multiple optimizers is only supported with manual optimization"):
        fit(module)
    assert module.losses == []


@pytest.mark.parametrize("strategy", [DeepSpeedStrategy, FSDPStrategy])
def test_strategies_that_own_backward_or_flatten_parameters_are_refused(strategy: type) -> None:
    module = Net("zsharp")
    # DeepSpeed is not installed here (and FSDP needs a process group): a trainer holding such a strategy.
    module._trainer = SimpleNamespace(
        strategy=strategy.__new__(strategy),
        accumulate_grad_batches=1,
        optimizers=[build("zsharp", module.parameters())],
    )
    with pytest.raises(ValueError, match=rf"strategy={strategy.__name__}\)"):
        module.on_fit_start()


@pytest.mark.parametrize(
    ("precision", "accumulation"),
    [("32-true", 1), ("16-mixed", 1), ("32-true", 2)],
    ids=["32", "16", "accumulate"],
)
def test_a_plain_lightning_module_with_zsharp_fails_loudly(precision: str, accumulation: int) -> None:
    """Without the module, Lightning's own closure is refused before any move; with accumulate_grad_batches=2
    the gradients there at `step(closure)` are an earlier micro-batch's, not a first pass of this one."""
    module = PlainNet("zsharp")
    before = flat(module.net)
    with pytest.raises(RuntimeError, match=r"hf_zsharp\.lightning\.ZSharpLightningModule"):
        fit(module, precision, accumulate_grad_batches=accumulation)
    assert torch.equal(flat(module.net), before)


def test_importing_without_lightning_says_what_to_install(monkeypatch) -> None:
    for name in [name for name in sys.modules if name == "lightning" or name.startswith("lightning.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "hf_zsharp.lightning")
    with pytest.raises(ImportError, match=r"pip install 'hf_zsharp\[lightning\]'"):
        import hf_zsharp.lightning  # noqa: F401


def test_readme_example_trains() -> None:
    (block,) = code_blocks("## With PyTorch Lightning")
    namespace: dict = {}
    exec(block, namespace)
    torch.manual_seed(0)
    module = namespace["LitModel"](cnn())
    # One batch per epoch: two steps are two epochs, so the per-epoch LR scheduler steps too.
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0, **QUIET)
    trainer.fit(module, data(batches=1))
    assert trainer.global_step == 2
    assert set(LOGGED_STATISTICS) <= trainer.callback_metrics.keys()
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 2
    assert (
        optimizer.param_groups[0]["lr"]
        == optimizer.base_optimizer.param_groups[0]["lr"]
        == scheduler.get_last_lr()[0]
    )
