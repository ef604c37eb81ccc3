"""The datasets hf_zsharp knows by name, with their facts, each under one key.

A dataset's key is `dataset_key` of its name (Hub id, path or "digits"), so `uoft-cs/cifar10`, a local
`./CIFAR-10/` copy and the cost model all find the same entry. Importing this module costs nothing (no torch,
no datasets), so the argument parser can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DIGITS = "digits"  # scikit-learn's handwritten digits, embedded: no download
DEFAULT_IMAGE_SIZE = 32  # the paper models' input side for a dataset without an entry


@dataclass(frozen=True)
class DatasetFacts:
    """What hf_zsharp knows of a dataset: its Hub id, the per-channel statistics of its training images (None:
    computed from them), the input side of the paper's from-scratch models, the training split's size and class
    count (the cost model), and the split evaluated on."""

    key: str
    hub_id: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    image_size: int
    train_images: int | None
    classes: int
    eval_split: str


# Key, Hub id, mean, std (those the ZSharp paper's code base uses), paper input side, training images, classes and
# evaluation split of each dataset.
DATASETS: dict[str, DatasetFacts] = {row[0]: DatasetFacts(*row) for row in (
    (DIGITS, None, None, None, 16, None, 10, "test"),
    ("cifar10", "uoft-cs/cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 50_000, 10, "test"),
    ("cifar100", "uoft-cs/cifar100", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 32, 50_000, 100, "test"),
    ("tinyimagenet", "zh-plus/tiny-imagenet", (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), 64, 100_000, 200, "valid"),
)}  # fmt: skip


def dataset_key(dataset_name: str) -> str:
    """The key of a dataset: the last part of its Hub id or path, lower-case letters and digits only
    (`uoft-cs/cifar10`, `./CIFAR-10/` -> `cifar10`)."""
    return re.sub(r"[^a-z0-9]", "", Path(dataset_name.rstrip("/")).name.lower())


def dataset_facts(dataset_name: str) -> DatasetFacts | None:
    """The facts of a known dataset, by any of its names; None for another dataset."""
    return DATASETS.get(dataset_key(dataset_name))


def paper_image_size(dataset_name: str) -> int:
    """The input side of the paper's from-scratch models on this dataset."""
    facts = dataset_facts(dataset_name)
    return DEFAULT_IMAGE_SIZE if facts is None else facts.image_size
