"""Tiny generated image datasets with the exact schemas and file layouts of the Hub datasets the CLI supports.

`uoft-cs/cifar10` (img, label), `uoft-cs/cifar100` (img, fine_label, coarse_label) and
`zh-plus/tiny-imagenet` (image, label; splits train/valid; some greyscale JPEGs) are written as parquet
files laid out like the Hub repositories, so `datasets.load_dataset(<dir>)` and
`datasets.load_dataset("parquet", data_files=...)` read them as they would read the real ones. Each class
has its own mean colour, so a model can learn something from a few steps. The CIFAR-10 and Tiny-ImageNet splits
and the layout writer live in `scripts/benchmarking.py` (the benchmarks generate data with them too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from benchmarking import (
    CIFAR10_FEATURES,
    CIFAR10_LABELS,
    TINY_IMAGENET_FEATURES,
    TINY_IMAGENET_LABELS,
    cifar10_split,
    class_image,
    cycled_labels,
    encode,
    tiny_imagenet_split,
    write_hub_layout,
)
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

__all__ = [
    "CIFAR10_FEATURES",
    "CIFAR10_LABELS",
    "CIFAR100_COARSE_LABELS",
    "CIFAR100_FEATURES",
    "CIFAR100_FINE_LABELS",
    "TINY_IMAGENET_FEATURES",
    "TINY_IMAGENET_LABELS",
    "cifar10_split",
    "cifar100_split",
    "encode",
    "tiny_imagenet_split",
    "write_cifar10",
    "write_cifar100",
    "write_hub_layout",
    "write_imagefolder",
    "write_saved_to_disk",
    "write_tiny_imagenet",
]

CIFAR100_FINE_LABELS = (  # noqa: SIM905 (100 names, one string reads better)
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard "
    "lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear "
    "pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal "
    "shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
CIFAR100_COARSE_LABELS = (  # noqa: SIM905
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
    "vehicles_1 vehicles_2"
).split()
CIFAR100_FEATURES = Features(
    {
        "img": Image(),
        "fine_label": ClassLabel(names=CIFAR100_FINE_LABELS),
        "coarse_label": ClassLabel(names=CIFAR100_COARSE_LABELS),
    }
)


def cifar100_split(num_examples: int, seed: int = 0, num_fine_classes: int = 10) -> Dataset:
    """A CIFAR-100 split (fine and coarse labels); only the first `num_fine_classes` fine classes occur."""
    rng = np.random.default_rng(seed)
    fine = cycled_labels(num_examples, num_fine_classes, rng)
    images = [{"bytes": encode(class_image(y, 32, rng), "PNG"), "path": None} for y in fine]
    coarse = [y % 20 for y in fine]
    return Dataset.from_dict(
        {"img": images, "fine_label": fine, "coarse_label": coarse}, features=CIFAR100_FEATURES
    )


def write_cifar10(root: Path, num_train: int = 40, num_test: int = 20) -> Path:
    """uoft-cs/cifar10's layout: plain_text/{train,test}-00000-of-00001.parquet."""
    splits = {"train": cifar10_split(num_train, seed=0), "test": cifar10_split(num_test, seed=1)}
    return write_hub_layout(root, "plain_text", "plain_text", splits)


def write_cifar100(root: Path, num_train: int = 40, num_test: int = 20) -> Path:
    """uoft-cs/cifar100's layout: cifar100/{train,test}-00000-of-00001.parquet."""
    splits = {"train": cifar100_split(num_train, seed=0), "test": cifar100_split(num_test, seed=1)}
    return write_hub_layout(root, "cifar100", "cifar100", splits)


def write_tiny_imagenet(root: Path, num_train: int = 40, num_valid: int = 20) -> Path:
    """zh-plus/tiny-imagenet's layout: data/{train,valid}-00000-of-00001-<hash>.parquet (splits train/valid)."""
    splits = {
        "train": tiny_imagenet_split(num_train, seed=0),
        "valid": tiny_imagenet_split(num_valid, seed=1),
    }
    return write_hub_layout(root, "default", "data", splits, suffix="-1359597a978bc4fa")


def write_imagefolder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "fish"), per_class: int = 4
) -> Path:
    """An imagefolder directory: <root>/{train,test}/<class>/<n>.png (RGB, greyscale and RGBA images mixed)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", max(1, per_class // 2))):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                mode = ("RGB", "L", "RGBA")[i % 3]
                class_image(label, 32, rng, mode).save(folder / f"{i}.png")
    return root


def write_saved_to_disk(root: Path, num_train: int = 40) -> Path:
    """A DatasetDict with only a "train" split (CIFAR-10 schema) saved with `save_to_disk`."""
    DatasetDict({"train": cifar10_split(num_train)}).save_to_disk(str(root))
    return root
