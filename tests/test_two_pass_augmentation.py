"""The batch augmentation inside the model under ZSharpTrainer's two-pass step: both passes of a step see the
same augmented batch (the step replays the RNG), eagerly and under `--torch_compile`, and compiled training
(both passes, the ascent and the restore) ends on the eager weights."""

import pytest
import torch
from torch import nn

from hf_zsharp.args import ZSharpTrainingArguments
from hf_zsharp.augment import BatchAugment, augment_inputs
from hf_zsharp.image_data import CachedImages, collate_fn
from hf_zsharp.trainer import ZSharpTrainer

EPS = 2.0**-24  # float32's unit roundoff
LR, RHO, STEPS, BATCH = 0.1, 0.05, 3, 8


class ConvNet(nn.Module):
    """A 3x3 convolution, average pooling and a linear classifier (4 x 28 + 4 x 3 + 3 = 127 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(torch.relu(self.conv(pixel_values)).mean(dim=(2, 3)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def train(tmp_path, accumulation=1, **overrides):
    """Train a ConvNet with SAM on augmented 8x8 uint8 images; returns its weights and every augmented batch."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 8, 8, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (32,), generator=generator)
    model, augment, seen = ConvNet(), BatchAugment((0.5,) * 3, (0.25,) * 3, padding=2), []
    augment.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    augment_inputs(model, augment)
    args = ZSharpTrainingArguments(
        str(tmp_path / "out"),
        sam="sam",
        sam_rho=RHO,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        per_device_train_batch_size=BATCH // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        **overrides,
    )
    trainer = ZSharpTrainer(
        model=model, args=args, train_dataset=CachedImages(images, labels), data_collator=collate_fn
    )
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, seen, trainer


def test_both_passes_see_the_same_augmented_micro_batches(tmp_path):
    _, seen, _ = train(tmp_path, accumulation=2)
    # Per step: first passes of micro-batches a and b, then their second passes.
    assert len(seen) == 4 * STEPS
    for step in range(STEPS):
        a1, b1, a2, b2 = seen[4 * step : 4 * step + 4]
        assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, b1)
    assert not torch.equal(seen[0], seen[4])


@pytest.mark.slow  # inductor generates and compiles C++ kernels with gcc: ~20 s (up to ~50 s on a loaded machine)
def test_torch_compile_keeps_both_passes_and_the_restore_right(tmp_path):
    eager, eager_seen, _ = train(tmp_path / "eager")
    compiled, compiled_seen, trainer = train(tmp_path / "compiled", torch_compile=True)
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert len(compiled_seen) == 2 * STEPS  # two passes per step, augmented eagerly with the same draws
    for first, second, reference in zip(compiled_seen[::2], compiled_seen[1::2], eager_seen[::2]):
        assert torch.equal(first, second) and torch.equal(first, reference)
    # Compiled kernels sum in another order: each gradient entry, a sum of <= 8 images x 8 x 8 positions x
    # 4 channels of terms, moves by <= 2048 roundings of its partial sums; with |gradient| <= 4 here (logits of
    # unit-scale inputs) an SGD step (lr 0.1) moves a weight by <= 0.1 x 2048 x 4 x EPS, 3 steps by 3 x that
    # (the ascent's direction moves no more: it is the normalised gradient). A step that left the ascent in the
    # weights (restore lost) would be off by its largest entry, >= rho / sqrt(127 parameters) = 4.4e-3.
    atol = STEPS * LR * 2048 * 4 * EPS
    assert 20 * atol < RHO / 127**0.5
    for name, weight in eager.items():
        torch.testing.assert_close(compiled[name], weight, rtol=0, atol=atol, msg=name)
