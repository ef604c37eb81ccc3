"""What a paper preset costs: training FLOPs per image counted on the real models, scaled to runs and GPU hours.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward + backward pass of the paper
models (matrix multiplications and convolutions, 2 FLOPs per multiply-add; normalisation, activations and the
optimizer's element-wise work are not counted). A two-pass method costs two forward + backward passes per
image, the base optimizer one; every epoch also evaluates the validation split (a forward pass per image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_zsharp.models import build_model
from hf_zsharp.reproduce.presets import PRESETS, VARIANTS, Preset

# Training split size, classes and image side of each paper dataset; 10 % of the training split is held out.
DATASETS = {"cifar10": (50_000, 10), "cifar100": (50_000, 100), "tiny-imagenet": (100_000, 200)}
VALIDATION_SHARE = 0.1
# The assumed sustained training throughput of one GPU, in FLOP/s. Small CIFAR models rarely keep a GPU busy:
# 10 TFLOP/s is about half an A100's fp32 peak (19.5) and 15 % of an H100 SXM's (67). Hours scale as 1 / this.
ASSUMED_FLOPS_PER_SECOND = 10e12


@dataclass(frozen=True)
class ModelCost:
    """Counted FLOPs per image of one model at one input size and class count."""

    model: str
    forward: float
    forward_backward: float


def count_flops(model_name: str, num_labels: int, image_size: int, batch: int = 1) -> ModelCost:
    """Forward and forward + backward FLOPs per image of a paper model, counted on a random batch."""
    labels = {i: str(i) for i in range(num_labels)}
    model = build_model(model_name, num_labels, labels, {v: k for k, v in labels.items()}, image_size)
    pixels = torch.randn(batch, 3, image_size, image_size)
    targets = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as forward:
        model(pixel_values=pixels, labels=targets)
    with FlopCounterMode(display=False) as both:
        model(pixel_values=pixels, labels=targets).loss.backward()
    return ModelCost(model_name, forward.get_total_flops() / batch, both.get_total_flops() / batch)


def run_flops(cost: ModelCost, train_images: int, epochs: float, two_pass: bool) -> float:
    """FLOPs of one run: every epoch trains on the training images and evaluates the validation images."""
    train = (1 - VALIDATION_SHARE) * train_images
    validation = VALIDATION_SHARE * train_images
    per_image = cost.forward_backward * (2 if two_pass else 1)
    return epochs * (train * per_image + validation * cost.forward)


def last_value(flags: Sequence[str], name: str) -> str:
    """The value of the last `name` flag (later flags win, as in the training parser)."""
    return [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == name][-1]


def preset_cost_table(
    presets: Sequence[str] = ("paper-cifar10", "paper-cifar100", "paper-tinyimagenet"),
) -> str:
    """A Markdown table per preset and model: GFLOPs per image, PFLOPs and GPU hours per run and per grid."""
    header = [
        "Preset", "Model", "Input", "Forward GFLOPs / image", "Two-pass step GFLOPs / image",
        "One two-pass run (PFLOPs)", "One two-pass run (GPU h)", "Grid: methods × seeds (GPU h)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in presets:
        preset: Preset = PRESETS[name]
        key = "tiny-imagenet" if "tinyimagenet" in name else name.removeprefix("paper-")
        train_images, classes = DATASETS[key]
        size = int(last_value(preset.train_args, "--image_size"))
        for model in preset.models:
            cost = count_flops(model, classes, size)
            two_pass = run_flops(cost, train_images, preset.epochs, two_pass=True)
            grid = sum(
                run_flops(cost, train_images, preset.epochs, two_pass=VARIANTS[m].rho is not None)
                for m in preset.methods
            ) * len(preset.seeds)
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        model,
                        f"{size}×{size}",
                        f"{cost.forward / 1e9:.2f}",
                        f"{2 * cost.forward_backward / 1e9:.2f}",
                        f"{two_pass / 1e15:.1f}",
                        f"{two_pass / ASSUMED_FLOPS_PER_SECOND / 3600:.1f}",
                        f"{grid / ASSUMED_FLOPS_PER_SECOND / 3600:.0f}",
                    ]
                )
                + " |"  # fmt: skip
            )
    return "\n".join(lines) + "\n"
