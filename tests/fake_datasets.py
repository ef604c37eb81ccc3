"""Tiny generated image datasets with the exact schemas and file layouts of the Hub datasets the CLI supports.

`uoft-cs/cifar10` (img, label), `uoft-cs/cifar100` (img, fine_label, coarse_label) and
`zh-plus/tiny-imagenet` (image, label; splits train/valid; some greyscale JPEGs) are written as parquet
files laid out like the Hub repositories, so `datasets.load_dataset(<dir>)` and
`datasets.load_dataset("parquet", data_files=...)` read them as they would read the real ones. Each class
has its own mean colour, so a model can learn something from a few steps.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
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
# Tiny-ImageNet's labels are 200 WordNet ids; these stand-ins have the same form.
TINY_IMAGENET_LABELS = [f"n{1443537 + 1000 * i:08d}" for i in range(200)]

CIFAR10_FEATURES = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_LABELS)})
CIFAR100_FEATURES = Features(
    {
        "img": Image(),
        "fine_label": ClassLabel(names=CIFAR100_FINE_LABELS),
        "coarse_label": ClassLabel(names=CIFAR100_COARSE_LABELS),
    }
)
TINY_IMAGENET_FEATURES = Features({"image": Image(), "label": ClassLabel(names=TINY_IMAGENET_LABELS)})

CORRUPT_IMAGE_BYTES = b"this is not an image"


def class_image(label: int, size: int, rng: np.random.Generator, mode: str = "RGB") -> PIL.Image.Image:
    """A noisy image whose mean colour depends on the label."""
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256], dtype=np.float64)
    pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    image = PIL.Image.fromarray(pixels)
    return image if mode == "RGB" else image.convert(mode)


def encode(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _labels(num_examples: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    # Cycle through the first classes so that every split holds several examples of each class used.
    return [int(i % num_classes) for i in rng.permutation(num_examples)]


def cifar10_split(num_examples: int, seed: int = 0, corrupt: int = 0) -> Dataset:
    """A CIFAR-10 split (PNG-encoded 32x32 RGB images, 10 classes); the first `corrupt` images are undecodable."""
    rng = np.random.default_rng(seed)
    labels = _labels(num_examples, 10, rng)
    images = [{"bytes": encode(class_image(y, 32, rng), "PNG"), "path": None} for y in labels]
    for i in range(corrupt):
        images[i] = {"bytes": CORRUPT_IMAGE_BYTES, "path": f"corrupt_{i}.png"}
    return Dataset.from_dict({"img": images, "label": labels}, features=CIFAR10_FEATURES)


def cifar100_split(num_examples: int, seed: int = 0, num_fine_classes: int = 10) -> Dataset:
    """A CIFAR-100 split (fine and coarse labels); only the first `num_fine_classes` fine classes occur."""
    rng = np.random.default_rng(seed)
    fine = _labels(num_examples, num_fine_classes, rng)
    images = [{"bytes": encode(class_image(y, 32, rng), "PNG"), "path": None} for y in fine]
    coarse = [y % 20 for y in fine]
    return Dataset.from_dict(
        {"img": images, "fine_label": fine, "coarse_label": coarse}, features=CIFAR100_FEATURES
    )


def tiny_imagenet_split(
    num_examples: int, seed: int = 0, num_classes: int = 10, greyscale_every: int = 4
) -> Dataset:
    """A Tiny-ImageNet split: 64x64 JPEGs, every `greyscale_every`-th one greyscale (mode "L"), as on the Hub."""
    rng = np.random.default_rng(seed)
    labels = _labels(num_examples, num_classes, rng)
    images = []
    for i, y in enumerate(labels):
        mode = "L" if i % greyscale_every == 0 else "RGB"
        images.append({"bytes": encode(class_image(y, 64, rng, mode), "JPEG"), "path": None})
    return Dataset.from_dict({"image": images, "label": labels}, features=TINY_IMAGENET_FEATURES)


def _readme(config_name: str, files: dict[str, str]) -> str:
    lines = ["---", "configs:", f"- config_name: {config_name}", "  data_files:"]
    for split, pattern in files.items():
        lines += [f"  - split: {split}", f"    path: {pattern}"]
    lines += ["  default: true", "---", ""]
    return "\n".join(lines)


def write_hub_layout(
    root: Path, config_name: str, folder: str, splits: dict[str, Dataset], suffix: str = ""
) -> Path:
    """Write `splits` as `<root>/<folder>/<split>-00000-of-00001<suffix>.parquet` plus the Hub README's configs."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    for split, dataset in splits.items():
        dataset.to_parquet(str(root / folder / f"{split}-00000-of-00001{suffix}.parquet"))
    files = {split: f"{folder}/{split}-*" for split in splits}
    (root / "README.md").write_text(_readme(config_name, files))
    return root


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
