"""Image-classification data for training: load (Hub, local folders, embedded digits), check, decode.

`load_image_dataset` returns a `DatasetDict` with "train" and "eval" splits holding two columns: "image"
(undecoded, `datasets.Image(decode=False)`) and "labels" (a `ClassLabel`, whose names are the classes).
`hf_zsharp.image_data` turns them into what a model trains on.

Every image reaches the model as 8-bit RGB. Images of 8 bits per channel (modes 1, L, LA, P, RGB, RGBA, CMYK,
...) are converted by PIL (alpha dropped). Greyscale images of more than 8 bits, integer (16-bit "I;16",
"I;16B", 32-bit "I") or float ("F"), are mapped by one linear rule per dataset (`PixelRule`), the same for
every image of every split, whether the split is decoded once into a cache or streamed: a value v becomes
round(v * 255 / top), clipped to 0..255 (NaN becomes 0), with one top for the integer images and one for the
float images, fitted on the training split (`dataset_pixel_rule`): its highest integer value, but at least
255, and its highest float value, but at least 1. So a 16-bit dataset whose values are 0..255 keeps them, a
12-bit one maps 4095 to 255, floats in [0, 1] are multiplied by 255 and floats in [0, 255] kept; the same
content gives the same pixels in any of these modes, and one brighter pixel does not change the others. The
images of each split that the rule does not fit are counted in warnings: values below 0, above the top (an
evaluation image brighter than the training split) or not finite, all clipped, and images that come out with
under 16 grey levels. An image decoded on its own, with no dataset to fit a rule on, is read by its dtype's
range (`FIXED_RULE`: integers by 65535, floats by 1).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features

from hf_zsharp.catalog import DIGITS, dataset_facts

logger = logging.getLogger(__name__)

IMAGE, LABELS = "image", "labels"  # the columns of a loaded dataset
PIXELS = "pixel_values"  # the model input that a batch of images is passed as
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "val")
IMAGE_COLUMN_NAMES = ("img", "image")
LABEL_COLUMN_NAMES = ("label", "fine_label", "labels", "coarse_label")

CHUNK = 256  # images read per task of the decoding threads

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
    kept = _choose_splits(raw, dataset_name, train_split, eval_split, train_val_split)
    dataset, (image_column, label_column) = _normalize_columns(
        raw, kept, dataset_name, image_column, label_column
    )
    eval_split = kept[1] if len(kept) > 1 else None

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
    warn_empty_classes(dataset["train"])
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


def _choose_splits(
    raw: DatasetDict,
    dataset_name: str,
    train_split: str,
    eval_split: str | None,
    train_val_split: float | None,
) -> list[str]:
    """The training split and, unless a fraction of it is held out, the evaluation split: named, else the known
    dataset's (`catalog`), else the first of EVAL_SPLIT_NAMES; each must exist and hold examples."""
    splits = list(raw)
    for name in (train_split, eval_split):
        if name is not None and name not in raw:
            raise DataError(f"Dataset {dataset_name!r} has no split {name!r}; its splits are {splits}.")
    if eval_split is None and train_val_split is None:
        facts = dataset_facts(dataset_name)
        candidates = EVAL_SPLIT_NAMES if facts is None else (facts.eval_split, *EVAL_SPLIT_NAMES)
        eval_split = next((name for name in candidates if name in raw and name != train_split), None)
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
    return kept


def _normalize_columns(
    raw: DatasetDict, kept: list[str], dataset_name: str, image_column: str | None, label_column: str | None
) -> tuple[DatasetDict, tuple[str, str]]:
    """The `kept` splits with two columns, "image" (undecoded) and "labels" (one `ClassLabel`), and the names the
    image and label columns had (detected in the first split unless given)."""
    features = raw[kept[0]].features
    image_column = _resolve_column(
        features, image_column, "image", datasets.Image, IMAGE_COLUMN_NAMES, dataset_name
    )
    label_column = _resolve_column(
        features, label_column, "label", ClassLabel, LABEL_COLUMN_NAMES, dataset_name
    )
    if image_column == label_column:
        raise DataError(f"The image and label columns are both {image_column!r}; name them separately.")
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
    renames = {old: new for old, new in ((image_column, IMAGE), (label_column, LABELS)) if old != new}
    return dataset.rename_columns(renames), (image_column, label_column)


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


def _resolve_column(
    features: Features,
    requested: str | None,
    kind: str,
    feature_type: type,
    names: Sequence[str],
    dataset_name: str,
) -> str:
    """The `kind` ("image" or "label") column: the one the user named, else the first of `names` holding a
    `feature_type` feature, else the first `feature_type` feature, else the first of `names` present."""
    if requested is not None:
        if requested not in features:
            raise DataError(
                f"{kind.capitalize()} column {requested!r} not found in {dataset_name!r}; its columns are "
                f"{list(features)}."
            )
        return requested
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    found = next((name for name in names if name in typed), None) or next(iter(typed), None)
    found = found or next((name for name in names if name in features), None)
    if found is None:
        raise DataError(
            f"No {kind} column found in {dataset_name!r} (no {feature_type.__name__} feature, no column named "
            f"{' or '.join(names)}); its columns are {list(features)}. Name it with --{kind}_column_name."
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
            _check_labels(dataset, split, label_column, feature.num_classes, dataset_name)
            if list(feature.names) != names:
                dataset[split] = _renumber_labels(dataset[split], label_column, feature.names, names)
        return dataset
    dtypes = {getattr(feature, "dtype", None) for feature in features}
    if not (
        dtypes <= {"string", "large_string"}
        or all(dtype is not None and re.fullmatch(r"u?int\d+", dtype) for dtype in dtypes)
    ):
        raise DataError(
            f"Column {label_column!r} of {dataset_name!r} holds {features[0]}, not class labels; name the label "
            "column with --label_column_name."
        )
    for split in dataset:
        _check_labels(dataset, split, label_column, None, dataset_name)
    values = sorted({v for split in dataset.values() for v in split.unique(label_column)})
    names = (
        [str(v) for v in values]
        if dtypes <= {"string", "large_string"}
        else [str(i) for i in range(values[-1] + 1)]
    )
    return dataset.cast_column(label_column, ClassLabel(names=names))


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


def _check_labels(
    dataset: DatasetDict, split: str, label_column: str, num_classes: int | None, dataset_name: str
) -> None:
    """Refuse missing labels, and integer labels outside 0..num_classes-1 (no upper bound when None; e.g. -1 for
    unlabelled examples), before training; the advice depends on whether `split` trains (the first split)."""
    values = dataset[split].unique(label_column)
    where = f"Column {label_column!r} of {dataset_name!r} (split {split!r})"
    if None in values:
        raise DataError(f"{where} has examples without a label (None); remove them or fill them in.")
    bad = sorted(v for v in values if isinstance(v, int) and not 0 <= v < (num_classes or math.inf))
    if not bad:
        return
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    classes = f"0..{num_classes - 1} ({num_classes} class names)" if num_classes else "0 and above"
    fix = (
        "remove those examples (e.g. with Dataset.filter) before training"
        if split == next(iter(dataset))
        else "fix the data, or choose another evaluation split with --eval_split or --train_val_split"
    )
    raise DataError(
        f"{where} holds labels outside {classes}: {shown} (-1 usually marks unlabelled examples); {fix}."
    )


def warn_empty_classes(train: Dataset) -> None:
    """Warn, naming them, about classes without a training image (e.g. from gaps in integer labels)."""
    names = train.features[LABELS].names
    counts = np.bincount(np.asarray(train[LABELS][:], dtype=np.int64), minlength=len(names))
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        logger.warning(
            "%d of %d classes have no training image: %s%s. The model still gets an output for each.",
            len(empty),
            len(names),
            ", ".join(empty[:10]),
            ", ..." if len(empty) > 10 else "",
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


def decoding_threads() -> int:
    """Threads to decode images on: one per core of the process (PIL releases the GIL while it decodes)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def deep_kind(mode: str) -> str | None:
    """The kind of a greyscale mode of more than 8 bits, "integer" (16 or 32 bits) or "float"; else None."""
    if mode == "I" or mode.startswith("I;16"):
        return "integer"
    return "float" if mode == "F" else None


@dataclass(frozen=True)
class PixelRule:
    """How greyscale images of more than 8 bits become 8-bit: a value v of an integer image becomes
    round(v * 255 / integer_top), of a float image round(v * 255 / float_top), clipped to 0..255 (NaN: 0)."""

    integer_top: float
    float_top: float

    def top(self, kind: str) -> float:
        """The value shown as 255 in images of `kind` ("integer" or "float")."""
        return self.integer_top if kind == "integer" else self.float_top


FIXED_RULE = PixelRule(integer_top=65535.0, float_top=1.0)  # each dtype's range, for an image decoded alone
LEVELS = 16  # an image whose brightest pixel comes out below this many grey levels is warned about


def decode_image(
    value: dict[str, Any] | PIL.Image.Image, index: int | None = None, rule: PixelRule = FIXED_RULE
) -> PIL.Image.Image:
    """Decode one stored image ({"bytes", "path"} or already a PIL image) to 8-bit RGB: greyscale images of
    more than 8 bits by `rule` (`to_8_bits`), the others by PIL's conversion."""
    try:
        image = _DECODER.decode_example(value)
        if deep_kind(image.mode) is not None:
            image = to_8_bits(image, rule)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, ValueError, DecompressionBombError, ...)
        raise DataError(f"Could not decode image {_image_name(value, index)}: {err}") from err


def to_8_bits(image: PIL.Image.Image, rule: PixelRule) -> PIL.Image.Image:
    """A greyscale image of more than 8 bits as 8-bit greyscale ("L") by `rule`; PIL's own conversion would
    clip its values to 0..255 (a 16-bit ramp turns almost all white)."""
    top = rule.top(deep_kind(image.mode))
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=top, neginf=0.0)
    return PIL.Image.fromarray(np.clip(np.rint(pixels * (255 / top)), 0, 255).astype(np.uint8))


class DeepRange(NamedTuple):
    """The values of one image of more than 8 bits: its kind, its lowest and highest finite value, and whether
    it holds NaN or infinite values."""

    kind: str
    low: float
    high: float
    nonfinite: bool


# The splits scanned so far: normalization_stats and the image data read the same training split.
_SCANNED: weakref.WeakKeyDictionary[Dataset, tuple[DeepRange, ...]] = weakref.WeakKeyDictionary()


def scan_deep_images(split: Dataset) -> tuple[DeepRange, ...]:
    """The value range of every image of more than 8 bits in `split`; the other images are only opened (their
    mode is in the header), not decoded. Read on `decoding_threads()` threads, once per split."""
    if split not in _SCANNED:
        values = split.with_format(None).select_columns([IMAGE])

        def scan_chunk(start: int) -> list[DeepRange]:
            chunk = values[start : start + CHUNK][IMAGE]
            ranges = (_deep_range(value, start + offset) for offset, value in enumerate(chunk))
            return [found for found in ranges if found is not None]

        with ThreadPoolExecutor(max_workers=decoding_threads()) as pool:
            chunks = pool.map(scan_chunk, range(0, len(values), CHUNK))
            _SCANNED[split] = tuple(found for chunk in chunks for found in chunk)
    return _SCANNED[split]


def _deep_range(value: dict[str, Any], index: int) -> DeepRange | None:
    """The value range of a stored image of more than 8 bits; None for an 8-bit image, whose pixels are not
    read (opened from its bytes or local file; a remote file is decoded whole)."""
    try:
        if value.get("bytes") is not None:
            opened = PIL.Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path") and os.path.isfile(value["path"]):
            opened = PIL.Image.open(value["path"])
        else:
            opened = _DECODER.decode_example(value)
        with opened as image:
            kind = deep_kind(image.mode)
            pixels = None if kind is None else np.asarray(image, dtype=np.float64)
    except Exception as err:  # PIL raises many types (OSError, ValueError, DecompressionBombError, ...)
        raise DataError(f"Could not decode image {_image_name(value, index)}: {err}") from err
    if pixels is None:
        return None
    finite = pixels[np.isfinite(pixels)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return DeepRange(kind, low, high, finite.size < pixels.size)


def fit_pixel_rule(ranges: Iterable[DeepRange]) -> PixelRule:
    """The rule for a dataset whose training split holds images of `ranges`: the highest integer value shown
    as 255, but at least 255 (8-bit values in a 16-bit file are kept), the highest float value likewise, but
    at least 1 (floats in [0, 1] are multiplied by 255). It changes smoothly with the data: no one pixel
    switches the reading of a whole dataset."""
    tops = {"integer": 255.0, "float": 1.0}
    for found in ranges:
        tops[found.kind] = max(tops[found.kind], found.high)
    return PixelRule(integer_top=tops["integer"], float_top=tops["float"])


def dataset_pixel_rule(dataset: DatasetDict) -> PixelRule:
    """The rule for every image of `dataset` (splits "train" and "eval"), fitted on its training split; logged
    when the dataset has images of more than 8 bits, with warnings counting, per split, the images it does not
    fit (`warn_misfits`)."""
    rule = fit_pixel_rule(scan_deep_images(dataset["train"]))
    scans = {name: scan_deep_images(split) for name, split in dataset.items()}
    if any(scans.values()):
        logger.info(
            "Images of more than 8 bits: integer values 0..%g and float values 0..%g (the training split's "
            "highest) are shown as 0..255, the same for every image.",
            rule.integer_top,
            rule.float_top,
        )
    for name, ranges in scans.items():
        warn_misfits(name, ranges, rule)
    return rule


def warn_misfits(split: str, ranges: Sequence[DeepRange], rule: PixelRule) -> None:
    """Warn, with counts, about the images of more than 8 bits of `split` that `rule` does not map whole into
    0..255 (what it clips), or maps to under LEVELS grey levels (e.g. 8-bit values in a 16-bit dataset)."""
    counts: Counter[str] = Counter()
    for found in ranges:
        top = rule.top(found.kind)
        counts["hold values below 0, shown as 0"] += found.low < 0
        counts[f"hold values above {top:g}, shown as 255"] += found.high > top
        counts["hold NaN or infinite values, shown as 0 (NaN) or clipped"] += found.nonfinite
        counts[f"come out with under {LEVELS} grey levels (values far below {top:g})"] += (
            found.high > 0 and round(found.high * 255 / top) < LEVELS
        )
    for problem, count in counts.items():
        if count:
            logger.warning("%d of %d %s images of more than 8 bits %s.", count, len(ranges), split, problem)


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


def normalization_stats(
    dataset_name: str, train_dataset: Dataset | None = None, max_images: int = 5000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std for `dataset_name`: a known dataset's (`catalog`: CIFAR-10/100, Tiny-ImageNet), else
    computed from up to `max_images` training images (decoded to RGB by the dataset's `PixelRule`, pixels in
    [0, 1])."""
    facts = dataset_facts(dataset_name)
    if facts is not None and facts.mean is not None:
        return facts.mean, facts.std
    if train_dataset is None:
        raise ValueError(
            f"No known normalisation statistics for {dataset_name!r}; pass the training split to compute them."
        )
    rule = fit_pixel_rule(scan_deep_images(train_dataset))  # the rule the image data reads the dataset by
    rng = np.random.default_rng(0)
    count = min(max_images, len(train_dataset))
    indices = np.sort(rng.choice(len(train_dataset), size=count, replace=False))
    sample = train_dataset.with_format(None).select_columns([IMAGE]).select(indices)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = 0
    for batch in sample.iter(batch_size=256):
        for value in batch[IMAGE]:
            array = np.asarray(decode_image(value, rule=rule), dtype=np.float64).reshape(-1, 3) / 255.0
            total += array.sum(axis=0)
            total_sq += np.square(array).sum(axis=0)
            pixels += len(array)
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
    std[std < 1e-6] = 1.0  # a constant channel: centre it, do not divide by (almost) zero
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)
