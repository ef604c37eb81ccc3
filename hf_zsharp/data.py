"""Image-classification data for training: load (Hub, local folders, embedded digits), check, decode, transform.

`load_image_dataset` returns a `DatasetDict` with "train" and "eval" splits holding two columns: "image"
(undecoded, `datasets.Image(decode=False)`) and "labels" (a `ClassLabel`, whose names are the classes). The
per-image transforms here are the streaming path (`with_image_transforms`: decoded and augmented on access, in
DataLoader workers) and the reference that `hf_zsharp.image_data`'s cached, batched path reproduces.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from torchvision.transforms import v2

logger = logging.getLogger(__name__)

DIGITS = "digits"
IMAGE, LABELS = "image", "labels"  # the columns of a loaded dataset
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val")
IMAGE_COLUMN_NAMES = ("img", "image")
LABEL_COLUMN_NAMES = ("label", "fine_label", "labels", "coarse_label")

# Per-channel mean and std of the training images (the values the ZSharp paper's code base uses for CIFAR).
NORMALIZATION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}

_DECODER = datasets.Image()


class DataError(ValueError):
    """A problem with the dataset the user asked for, worded to be shown as is (no traceback needed)."""


# --------------------------------------------------------------------------------------------------------
# Loading


def load_image_dataset(
    dataset_name: str,
    *,
    dataset_config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    train_val_split: float | None = None,
    cache_dir: str | None = None,
    seed: int = 42,
    verify_images: bool = True,
    num_proc: int | None = None,
) -> DatasetDict:
    """Load an image-classification dataset as "train" and "eval" splits with the columns "image" and "labels".

    `dataset_name` is a Hub id, a local directory (imagefolder layout, data files such as parquet, or a
    `save_to_disk` folder) or "digits" (scikit-learn's handwritten digits, embedded). The image and label columns
    are detected unless named, and renamed; the class names are those of the "labels" `ClassLabel`. The
    evaluation split is `eval_split`, else a `train_val_split` fraction of the training split, else the first of
    test / validation / valid / val. With `verify_images`, images that cannot be decoded are dropped and counted.
    """
    if eval_split is not None and train_val_split is not None:
        raise DataError(
            "Pass either an evaluation split name or a train/validation split fraction, not both."
        )
    if train_val_split is not None and not 0.0 < train_val_split < 1.0:
        raise DataError(
            f"The train/validation split fraction must be between 0 and 1, got {train_val_split}."
        )
    raw = _load_raw(dataset_name, dataset_config, cache_dir)
    splits = list(raw)
    if train_split not in raw:
        raise DataError(f"Dataset {dataset_name!r} has no split {train_split!r}; its splits are {splits}.")
    features = raw[train_split].features
    image_column = _resolve_image_column(features, image_column, dataset_name)
    label_column = _resolve_label_column(features, label_column, dataset_name)
    if image_column == label_column:
        raise DataError(f"The image and label columns are both {image_column!r}; name them separately.")

    if eval_split is not None and eval_split not in raw:
        raise DataError(f"Dataset {dataset_name!r} has no split {eval_split!r}; its splits are {splits}.")
    if eval_split is None and train_val_split is None:
        eval_split = next((name for name in EVAL_SPLIT_NAMES if name in raw and name != train_split), None)
        if eval_split is None:
            raise DataError(
                f"Dataset {dataset_name!r} has no evaluation split (found {splits}; looked for "
                f"{', '.join(EVAL_SPLIT_NAMES)}). Name one with --eval_split, or hold out a fraction of "
                f"{train_split!r} with --train_val_split (e.g. 0.1)."
            )
    kept = [train_split] if eval_split is None else [train_split, eval_split]
    for name in kept:
        if len(raw[name]) == 0:
            raise DataError(f"Split {name!r} of {dataset_name!r} is empty; choose another split.")
    for name in kept[1:]:
        missing = [col for col in (image_column, label_column) if col not in raw[name].column_names]
        if missing:
            raise DataError(
                f"Split {name!r} of {dataset_name!r} lacks column(s) {missing}; its columns are "
                f"{raw[name].column_names}."
            )
    dataset = DatasetDict({name: raw[name].select_columns([image_column, label_column]) for name in kept})
    dataset = _as_image_column(dataset, image_column, dataset_name)
    dataset = _as_class_labels(dataset, label_column, dataset_name)
    dataset = dataset.rename_columns(
        {old: new for old, new in ((image_column, IMAGE), (label_column, LABELS)) if old != new}
    )

    if eval_split is None:
        dataset = _hold_out(dataset[train_split], train_val_split, seed)
    else:
        dataset = DatasetDict({"train": dataset[train_split], "eval": dataset[eval_split]})
    if verify_images:
        dataset = DatasetDict(
            {
                split: drop_undecodable_images(ds, split=split, num_proc=num_proc)
                for split, ds in dataset.items()
            }
        )
    logger.info(
        "Dataset %s: %d training and %d evaluation images, %d classes (image column %r, label column %r).",
        dataset_name,
        len(dataset["train"]),
        len(dataset["eval"]),
        dataset["train"].features[LABELS].num_classes,
        image_column,
        label_column,
    )
    return dataset


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 8x8 handwritten digits upsampled to 32x32 RGB, with a fixed stratified 80/20 split."""
    return DatasetDict(_digits())


@cache
def _digits() -> DatasetDict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [
        PIL.Image.fromarray(array).resize((32, 32), PIL.Image.Resampling.BILINEAR).convert("RGB")
        for array in pixels
    ]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"image": [images[i] for i in idx], "label": labels[idx].tolist()}, features=features
            )
            for split, idx in (("train", train_idx), ("test", test_idx))
        }
    )


def _load_raw(dataset_name: str, dataset_config: str | None, cache_dir: str | None) -> DatasetDict:
    if dataset_name == DIGITS:
        return load_digits_dataset()
    path = Path(dataset_name).expanduser()
    if path.is_dir():
        loaded = _load_local(path, dataset_config, cache_dir)
    elif path.exists():
        raise DataError(
            f"{dataset_name!r} is a file; pass a directory (imagefolder layout, data files, or a dataset "
            "saved with save_to_disk) or a Hub dataset id."
        )
    elif _looks_like_local_path(dataset_name):
        raise DataError(f"Local dataset path {dataset_name!r} does not exist.")
    else:
        loaded = _load_hub(dataset_name, dataset_config, cache_dir)
    if isinstance(loaded, Dataset):
        return DatasetDict({"train": loaded})
    return loaded


def _load_local(path: Path, dataset_config: str | None, cache_dir: str | None) -> Dataset | DatasetDict:
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if saved:
        _refuse_empty_saved_splits(path)
    try:
        if saved:
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path), dataset_config, cache_dir=cache_dir)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as err:
        raise DataError(f"Could not load a dataset from the directory {str(path)!r}: {err}") from err


def _refuse_empty_saved_splits(path: Path) -> None:
    """A `save_to_disk` split with no rows has no data file, and `load_from_disk` fails on it with an IndexError."""
    states = [path / "state.json"] if (path / "state.json").is_file() else sorted(path.glob("*/state.json"))
    for state in states:
        if not json.loads(state.read_text(encoding="utf-8")).get("_data_files", [None]):
            where = "" if state.parent == path else f"split {state.parent.name!r} of "
            raise DataError(
                f"The {where}saved dataset {str(path)!r} holds no rows; remove it or add examples."
            )


def _load_hub(dataset_name: str, dataset_config: str | None, cache_dir: str | None) -> DatasetDict:
    try:
        return datasets.load_dataset(dataset_name, dataset_config, cache_dir=cache_dir)
    except ConnectionError as err:
        offline = " (HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(
            f"Dataset {dataset_name!r} is not available: the Hugging Face Hub cannot be reached{offline} and it "
            "is not in the local cache. Run once where the Hub is reachable (then HF_HUB_OFFLINE=1 reuses the "
            "cache), or pass a local path: an imagefolder directory, a directory of data files (e.g. parquet), "
            f"or a dataset saved with save_to_disk. '{DIGITS}' is an embedded dataset that needs no network."
        ) from err
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(
            f"Dataset {dataset_name!r} was not found on the Hub (or it is private/gated: log in with "
            "`hf auth login`). Check the id, or pass a local directory."
        ) from err
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as err:
        raise DataError(f"Could not load dataset {dataset_name!r}: {err}") from err


def _looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


# --------------------------------------------------------------------------------------------------------
# Columns and splits


def _requested_column(features: Features, requested: str, kind: str, dataset_name: str) -> str:
    """A column the user named, or a DataError that lists the columns that exist."""
    if requested not in features:
        raise DataError(
            f"{kind} column {requested!r} not found in {dataset_name!r}; its columns are {list(features)}."
        )
    return requested


def _resolve_image_column(features: Features, requested: str | None, dataset_name: str) -> str:
    if requested is not None:
        return _requested_column(features, requested, "Image", dataset_name)
    found = next((name for name, feat in features.items() if isinstance(feat, datasets.Image)), None)
    found = found or next((name for name in IMAGE_COLUMN_NAMES if name in features), None)
    if found is None:
        raise DataError(
            f"No image column found in {dataset_name!r} (no Image feature, no column named "
            f"{' or '.join(IMAGE_COLUMN_NAMES)}); its columns are {list(features)}. Name it with --image_column_name."
        )
    return found


def _resolve_label_column(features: Features, requested: str | None, dataset_name: str) -> str:
    if requested is not None:
        return _requested_column(features, requested, "Label", dataset_name)
    class_labels = [name for name, feat in features.items() if isinstance(feat, ClassLabel)]
    found = next((name for name in LABEL_COLUMN_NAMES if name in class_labels), None)
    found = found or next(iter(class_labels), None)
    found = found or next((name for name in LABEL_COLUMN_NAMES if name in features), None)
    if found is None:
        raise DataError(
            f"No label column found in {dataset_name!r} (no ClassLabel feature, no column named "
            f"{', '.join(LABEL_COLUMN_NAMES)}); its columns are {list(features)}. Name it with --label_column_name."
        )
    return found


def _as_image_column(dataset: DatasetDict, image_column: str, dataset_name: str) -> DatasetDict:
    """Keep images undecoded in storage; the transforms decode them (and name the file when one fails)."""
    feature = next(iter(dataset.values())).features[image_column]
    stored_as_files = getattr(feature, "dtype", None) in ("string", "large_string", "binary", "large_binary")
    stored_as_struct = isinstance(feature, dict) and set(feature) <= {"bytes", "path"}
    if not (isinstance(feature, datasets.Image) or stored_as_files or stored_as_struct):
        raise DataError(
            f"Column {image_column!r} of {dataset_name!r} does not hold images (it holds {feature}); name the "
            "image column with --image_column_name."
        )
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def _as_class_labels(dataset: DatasetDict, label_column: str, dataset_name: str) -> DatasetDict:
    """Make the label column one `ClassLabel` shared by every split, and refuse labels outside its range.

    Strings are encoded with one mapping (the sorted union over the splits), integers 0..n-1 are named
    "0".."n-1", and `ClassLabel` splits whose names differ are aligned by name, so that a label means the
    same class in training and evaluation.
    """
    features = [split.features[label_column] for split in dataset.values()]
    if all(isinstance(feature, ClassLabel) for feature in features):
        names = list(features[0].names)
        names += sorted({n for f in features[1:] for n in f.names} - set(names))
        for split, feature in zip(list(dataset), features):
            _check_label_range(dataset[split], label_column, feature.num_classes, dataset_name, split)
            if list(feature.names) != names:
                dataset[split] = _renumber_labels(dataset[split], label_column, feature.names, names)
        return dataset
    dtypes = {getattr(feature, "dtype", None) for feature in features}
    if dtypes <= {"string", "large_string"}:
        names = sorted({str(v) for split in dataset.values() for v in split.unique(label_column)})
        return dataset.cast_column(label_column, ClassLabel(names=names))
    if not all(dtype is not None and re.fullmatch(r"u?int\d+", dtype) for dtype in dtypes):
        raise DataError(
            f"Column {label_column!r} of {dataset_name!r} holds {features[0]}, not class labels; name the label "
            "column with --label_column_name."
        )
    values = {int(v) for split in dataset.values() for v in split.unique(label_column)}
    if min(values) < 0:
        raise DataError(
            f"Column {label_column!r} of {dataset_name!r} has negative labels (unlabelled examples?); "
            "choose another evaluation split with --eval_split or --train_val_split."
        )
    return dataset.cast_column(label_column, ClassLabel(names=[str(i) for i in range(max(values) + 1)]))


def _renumber_labels(split: Dataset, label_column: str, old: Sequence[str], new: list[str]) -> Dataset:
    """Re-encode a `ClassLabel` column from the names `old` to the names `new` (in memory: no cache files)."""
    index = {name: i for i, name in enumerate(new)}
    mapping = np.array([index[name] for name in old], dtype=np.int64)
    features = split.features.copy()
    features[label_column] = ClassLabel(names=new)
    return split.map(
        lambda batch: {label_column: mapping[np.asarray(batch[label_column], dtype=np.int64)].tolist()},
        batched=True,
        features=features,
        keep_in_memory=True,
        desc="Aligning class labels",
    )


def _check_label_range(
    split: Dataset, label_column: str, num_classes: int, dataset_name: str, name: str
) -> None:
    """Refuse `ClassLabel` values outside 0..num_classes-1 (e.g. -1 for unlabelled examples) before training."""
    bad = [v for v in split.unique(label_column) if v is None or not 0 <= v < num_classes]
    if bad:
        bad.sort(key=lambda v: -math.inf if v is None else v)
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise DataError(
            f"Column {label_column!r} of {dataset_name!r} (split {name!r}) holds labels outside 0..{num_classes - 1} "
            f"({num_classes} class names): {shown}. Fix the data, or choose another split with --eval_split or "
            "--train_val_split (-1 usually marks unlabelled examples)."
        )


def _hold_out(train: Dataset, fraction: float, seed: int) -> DatasetDict:
    """Split `fraction` of the training split off for evaluation, stratified by label when every class allows.

    `Dataset.train_test_split` splits an in-memory table of the row numbers and labels, whose rows are then
    selected in memory: on a dataset read from files, `keep_in_memory=True` fails (huggingface/datasets#5699),
    and without it the index files would be written next to the data (e.g. into a `save_to_disk` folder).
    """
    rows = Dataset.from_dict(
        {"row": np.arange(len(train)), LABELS: train[LABELS][:]},
        features=Features({"row": datasets.Value("int64"), LABELS: train.features[LABELS]}),
    )
    try:
        split = rows.train_test_split(
            test_size=fraction, seed=seed, stratify_by_column=LABELS, keep_in_memory=True
        )
    except ValueError:  # a class with a single example, or fewer held-out examples than classes
        split = rows.train_test_split(test_size=fraction, seed=seed, keep_in_memory=True)
    return DatasetDict(
        {
            name: train.select(np.sort(split[part]["row"][:]), keep_in_memory=True)
            for name, part in (("train", "train"), ("eval", "test"))
        }
    )


# --------------------------------------------------------------------------------------------------------
# Decoding


def _image_name(value: Any, index: int | None = None) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    if path:
        return os.path.basename(path)
    return f"#{index}" if index is not None else "(stored without a file name)"


def decode_image(value: dict[str, Any] | PIL.Image.Image, index: int | None = None) -> PIL.Image.Image:
    """Decode one stored image ({"bytes", "path"} or already a PIL image) to RGB; greyscale/RGBA are converted."""
    try:
        image = _DECODER.decode_example(value)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, ValueError, DecompressionBombError, ...)
        raise DataError(f"Could not decode image {_image_name(value, index)}: {err}") from err


def _decodable(batch: dict[str, list]) -> dict[str, list[bool]]:
    ok = []
    for value in batch[IMAGE]:
        try:
            decode_image(value)
            ok.append(True)
        except DataError:
            ok.append(False)
    return {"decodable": ok}


def drop_undecodable_images(
    dataset: Dataset, *, split: str = "train", num_proc: int | None = None
) -> Dataset:
    """Decode every image once and drop those that fail, logging how many were skipped and their names.

    Everything it computes stays in memory: no cache files are written next to the user's data.
    """
    checked = dataset.select_columns([IMAGE]).map(
        _decodable,
        batched=True,
        remove_columns=[IMAGE],
        num_proc=num_proc,
        keep_in_memory=True,
        desc=f"Checking that the {split} images decode",
    )
    ok = np.asarray(checked["decodable"], dtype=bool)
    if ok.all():
        return dataset
    bad = np.flatnonzero(~ok)
    if len(bad) == len(dataset):
        raise DataError(f"None of the {len(dataset)} images of the {split} split can be decoded.")
    names = [_image_name(dataset[int(i)][IMAGE], int(i)) for i in bad[:10]]
    logger.warning(
        "Skipped %d of %d %s images that could not be decoded: %s%s",
        len(bad),
        len(dataset),
        split,
        ", ".join(names),
        ", ..." if len(bad) > len(names) else "",
    )
    return dataset.select(np.flatnonzero(ok), keep_in_memory=True)


# --------------------------------------------------------------------------------------------------------
# Transforms

Transform = Callable[[PIL.Image.Image], torch.Tensor]


class ResizeTo:
    """Resize a PIL image to `size` x `size` unless it already has that size."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        if image.size == (self.size, self.size):
            return image
        return image.resize((self.size, self.size), PIL.Image.Resampling.BILINEAR)


def _to_normalized_tensor(mean: Sequence[float] | None, std: Sequence[float] | None) -> list:
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if mean is not None and std is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return steps


def paper_transforms(
    mean: Sequence[float], std: Sequence[float], image_size: int = 32, padding: int = 4
) -> tuple[Transform, Transform]:
    """The paper's recipe for from-scratch models: RandomCrop(size, padding 4) + horizontal flip, then normalise."""
    train = v2.Compose(
        [
            ResizeTo(image_size),
            v2.RandomCrop(image_size, padding=padding),
            v2.RandomHorizontalFlip(),
            *_to_normalized_tensor(mean, std),
        ]
    )
    evaluation = v2.Compose([ResizeTo(image_size), *_to_normalized_tensor(mean, std)])
    return train, evaluation


def timm_transforms(data_config: dict[str, Any]) -> tuple[Transform, Transform]:
    """timm's own train and eval transforms for a resolved data config (`timm.data.resolve_data_config`)."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=True), create_transform(
        **data_config, is_training=False
    )


@dataclass(frozen=True)
class ProcessorRecipe:
    """What a pretrained model's image processor asks for: the crop (height, width), the evaluation resize
    (shortest edge, or (height, width)) before the center crop, and the normalisation (None: scale only)."""

    crop: tuple[int, int]
    resize: int | tuple[int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def eval_geometry(self) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
        """Resize then center crop: the deterministic part of the evaluation transform."""
        return v2.Compose([v2.Resize(self.resize), v2.CenterCrop(self.crop)])


def processor_recipe(image_processor: Any) -> ProcessorRecipe:
    """The sizes and normalisation of a transformers image processor (crop_pct and crop_size included)."""
    size = image_processor.size
    shortest_edge = size.get("shortest_edge")
    if shortest_edge:
        crop = (shortest_edge, shortest_edge)
        crop_pct = getattr(image_processor, "crop_pct", None)
        resize: int | tuple[int, int] = int(shortest_edge / crop_pct) if crop_pct else shortest_edge
    else:
        crop = resize = (size["height"], size["width"])
    crop_size = getattr(image_processor, "crop_size", None)
    if crop_size and getattr(image_processor, "do_center_crop", False) and crop_size.get("height"):
        crop = (crop_size["height"], crop_size["width"])
    normalize = getattr(image_processor, "do_normalize", True)
    mean = getattr(image_processor, "image_mean", None) if normalize else None
    std = getattr(image_processor, "image_std", None) if normalize else None
    return ProcessorRecipe(
        crop, resize, None if mean is None else tuple(mean), None if std is None else tuple(std)
    )


def processor_transforms(image_processor: Any) -> tuple[Transform, Transform]:
    """Transforms matching a pretrained model's image processor: RandomResizedCrop + flip / resize + center crop.

    transformers' timm wrapper processor (it carries a timm `data_config`) gets timm's transforms instead.
    """
    if hasattr(image_processor, "data_config"):
        return timm_transforms(image_processor.data_config)
    recipe = processor_recipe(image_processor)
    to_tensor = _to_normalized_tensor(recipe.mean, recipe.std)
    train = v2.Compose([v2.RandomResizedCrop(recipe.crop), v2.RandomHorizontalFlip(), *to_tensor])
    return train, v2.Compose([recipe.eval_geometry(), *to_tensor])


def normalization_stats(
    dataset_name: str, train_dataset: Dataset | None = None, max_images: int = 5000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std for `dataset_name`: known values for CIFAR-10/100 and Tiny-ImageNet, else computed.

    The computed statistics use up to `max_images` training images (decoded to RGB, pixels in [0, 1]).
    """
    key = re.sub(r"[^a-z0-9]", "", Path(dataset_name.rstrip("/")).name.lower())
    if key in NORMALIZATION_STATS:
        return NORMALIZATION_STATS[key]
    if train_dataset is None:
        raise ValueError(
            f"No known normalisation statistics for {dataset_name!r}; pass the training split to compute them."
        )
    rng = np.random.default_rng(0)
    count = min(max_images, len(train_dataset))
    indices = np.sort(rng.choice(len(train_dataset), size=count, replace=False))
    sample = train_dataset.with_format(None).select_columns([IMAGE]).select(indices)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = 0
    for batch in sample.iter(batch_size=256):
        for value in batch[IMAGE]:
            array = np.asarray(decode_image(value), dtype=np.float64).reshape(-1, 3) / 255.0
            total += array.sum(axis=0)
            total_sq += np.square(array).sum(axis=0)
            pixels += len(array)
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
    std[std < 1e-6] = 1.0  # a constant channel: centre it, do not divide by (almost) zero
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


class ImageClassificationTransform:
    """Batch transform for `Dataset.set_transform`: decode to RGB, apply `transform`; yields pixel_values, labels."""

    def __init__(self, transform: Transform):
        self.transform = transform

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixel_values = [self.transform(decode_image(value)) for value in batch["pixel_values"]]
        return {"pixel_values": pixel_values, "labels": batch[LABELS]}


def with_image_transforms(
    dataset: DatasetDict, train_transform: Transform, eval_transform: Transform
) -> DatasetDict:
    """The dataset with lazy transforms: `train_transform` on "train", `eval_transform` on every other split.

    The image column is renamed to the model's argument name (pixel_values), so that `Trainer`'s
    `remove_unused_columns` keeps it; it still holds the stored images until the transform runs.
    """
    return DatasetDict(
        {
            split: ds.rename_column(IMAGE, "pixel_values").with_transform(
                ImageClassificationTransform(train_transform if split == "train" else eval_transform)
            )
            for split, ds in dataset.items()
        }
    )


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch {"pixel_values": (B, C, H, W), "labels": (B,)}; a batch that a dataset
    gathered whole (`hf_zsharp.image_data.CachedImages`, one item holding every example) passes as it is."""
    if len(examples) == 1 and torch.is_tensor(labels := examples[0]["labels"]) and labels.ndim == 1:
        return {"pixel_values": examples[0]["pixel_values"], "labels": labels}
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }
