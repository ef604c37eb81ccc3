"""The image data a Trainer trains on: splits decoded once into uint8 tensors and augmented per batch on the
device, or, for splits too large to cache (or of mixed image sizes), streamed through per-image transforms.

A cached split holds every image decoded (and resized to what the model takes) as one uint8 tensor in memory:
a batch is one gather, and `hf_zsharp.augment.BatchAugment`, run inside the model's forward by
`augment_inputs`, crops, flips and normalises it on the device. A streamed split decodes and transforms each
image in the DataLoader workers (`with_image_transforms`, the per-image transforms below, which the cached path
reproduces) and yields float batches, which the augmentation leaves alone; the two kinds of split can be mixed.
Both read images of more than 8 bits by the dataset's one `PixelRule` (see `hf_zsharp.data`), so that a cached
and a streamed split of the same images hold the same pixels.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from datasets import Dataset, DatasetDict
from torchvision.transforms import v2
from transformers import ViTImageProcessor

from hf_zsharp.augment import BatchAugment
from hf_zsharp.data import (
    CHUNK,
    IMAGE,
    LABELS,
    PIXELS,
    PixelRule,
    dataset_pixel_rule,
    decode_image,
    decoding_threads,
)

logger = logging.getLogger(__name__)

Geometry = Callable[[PIL.Image.Image], PIL.Image.Image]


@dataclass
class ImageData:
    """What `Trainer` takes for images: the two splits and the collator, and the augmentation to run inside the
    model (`augment_inputs`) on the uint8 batches of cached splits; None when both splits stream."""

    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    augment: BatchAugment | None


class CachedImages(torch.utils.data.Dataset):
    """Decoded images (N, H, W, C) uint8 and their labels; yields `pixel_values` (C, H, W) and `labels`.

    `__getitems__` gathers a DataLoader batch with one indexing operation and hands it to the collator as a
    single item (`collate_fn` passes it through).
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[int]) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {PIXELS: self.images[index].permute(2, 0, 1), LABELS: self.labels[index]}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [{PIXELS: self.images[index].permute(0, 3, 1, 2), LABELS: self.labels[index]}]


def cache_budget() -> int:
    """Bytes of decoded images one process may cache: a quarter of the machine's memory, shared by its
    processes (LOCAL_WORLD_SIZE under torchrun)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        memory = 8 * 2**30
    return memory // (4 * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


MAX_IMAGE_SIZE = (
    4096  # pixels a side: 16x the largest input of the paper's models (Tiny-ImageNet's 64 up to 256)
)


def check_image_size(image_size: int, batch_size: int, budget: int | None = None) -> None:
    """Refuse, before any image is decoded, an `image_size` outside 1..MAX_IMAGE_SIZE, or one whose float32 batch
    of `batch_size` images would not fit in `budget` bytes (default: `cache_budget()`)."""
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image_size must lie between 1 and {MAX_IMAGE_SIZE} pixels; got {image_size}.")
    batch_bytes = batch_size * 3 * image_size**2 * 4
    budget = cache_budget() if budget is None else budget
    if batch_bytes > budget:
        raise ValueError(
            f"--image_size {image_size}: a batch of {batch_size} such images takes {batch_bytes / 2**30:.1f} GiB as "
            f"float32 pixels, more than the {budget / 2**30:.1f} GiB this process may use for images; choose a "
            "smaller --image_size or --per_device_train_batch_size."
        )


def decode_split(
    split: Dataset, geometry: Geometry | None, budget: int, rule: PixelRule
) -> torch.Tensor | None:
    """Every image of `split` (decoded to RGB by `rule`, then `geometry`) in one (N, H, W, 3) uint8 tensor.

    None when the images come out in different sizes or would take more than `budget` bytes. The decoding runs
    on as many threads as the process has cores (PIL releases the GIL while it decodes and resizes).
    """
    images = split.with_format(None).select_columns([IMAGE])

    def pixels(value: Any) -> np.ndarray:
        image = decode_image(value, rule=rule)
        return np.asarray(image if geometry is None else geometry(image))

    first = pixels(images[0][IMAGE])
    if len(split) * first.nbytes > budget:
        return None
    cache = torch.empty((len(split), *first.shape), dtype=torch.uint8)
    arrays = cache.numpy()  # a view: NumPy copies PIL's read-only arrays in without a warning
    mixed = threading.Event()  # an image of another size: the other threads stop too

    def decode_chunk(start: int) -> None:
        for offset, value in enumerate(images[start : start + CHUNK][IMAGE]):
            array = pixels(value)
            if mixed.is_set() or array.shape != first.shape:
                mixed.set()
                return
            arrays[start + offset] = array

    with ThreadPoolExecutor(max_workers=decoding_threads()) as pool:
        list(pool.map(decode_chunk, range(0, len(split), CHUNK)))  # list(): re-raises a decoding error
    return None if mixed.is_set() else cache


def _image_data(
    dataset: DatasetDict,
    geometries: dict[str, Geometry | None],
    transforms: tuple[Callable, Callable],
    augment: BatchAugment,
    budget: int | None,
    rule: PixelRule | None,
) -> ImageData:
    """Cache each split that fits (in order, from one budget); stream the others through `transforms`; both by
    the pixel `rule` (default: the dataset's own)."""
    rule = dataset_pixel_rule(dataset) if rule is None else rule
    remaining = cache_budget() if budget is None else budget
    splits: dict[str, torch.utils.data.Dataset] = {}
    for name, geometry in geometries.items():
        images = decode_split(dataset[name], geometry, remaining, rule)
        if images is None:
            logger.info(
                "The %s split streams (too large for the %d MB left to cache, or images of several sizes): each "
                "image is decoded when read, best in DataLoader workers (--dataloader_num_workers).",
                name,
                remaining // 2**20,
            )
            continue
        remaining -= images.nbytes
        splits[name] = CachedImages(images, dataset[name][LABELS][:])
        logger.info(
            "Decoded the %s split once: %s uint8, %d MB.", name, tuple(images.shape), images.nbytes // 2**20
        )
    streamed = with_image_transforms(dataset, *transforms, rule=rule)
    splits = {name: splits.get(name, streamed[name]) for name in ("train", "eval")}
    cached = any(isinstance(split, CachedImages) for split in splits.values())
    return ImageData(splits["train"], splits["eval"], collate_fn, augment if cached else None)


def paper_image_data(
    dataset: DatasetDict,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 32,
    padding: int = 4,
    *,
    budget: int | None = None,
    rule: PixelRule | None = None,
) -> ImageData:
    """The paper's recipe (`paper_transforms`): images resized to `image_size` once; RandomCrop(padding) + flip
    and normalisation per batch. `budget`: bytes the caches may take (default: `cache_budget()`); `rule`: how
    images over 8 bits are read (default: fitted on `dataset`'s training split)."""
    resize = ResizeTo(image_size)
    return _image_data(
        dataset,
        {"train": resize, "eval": resize},
        paper_transforms(mean, std, image_size, padding),
        BatchAugment(mean, std, "pad", padding),
        budget,
        rule,
    )


def processor_image_data(
    dataset: DatasetDict, image_processor: Any, *, budget: int | None = None, rule: PixelRule | None = None
) -> ImageData:
    """A pretrained model's preprocessing (`processor_transforms`): training images cached as decoded (when they
    share one size) for RandomResizedCrop + flip per batch; evaluation images resized and center-cropped once.
    `budget` and `rule` as in `paper_image_data`.

    timm processors stream through timm's own transforms.
    """
    if hasattr(image_processor, "data_config"):
        streamed = with_image_transforms(dataset, *processor_transforms(image_processor), rule=rule)
        return ImageData(streamed["train"], streamed["eval"], collate_fn, None)
    recipe = processor_recipe(image_processor)
    return _image_data(
        dataset,
        {"train": None, "eval": recipe.eval_geometry()},
        processor_transforms(image_processor),
        BatchAugment(recipe.mean, recipe.std, recipe.crop),
        budget,
        rule,
    )


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


class ImageClassificationTransform:
    """Batch transform for `Dataset.set_transform`: decode to RGB by the dataset's pixel `rule`, apply
    `transform`; yields pixel_values, labels."""

    def __init__(self, transform: Transform, rule: PixelRule):
        self.transform = transform
        self.rule = rule

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixel_values = [self.transform(decode_image(value, rule=self.rule)) for value in batch[PIXELS]]
        return {PIXELS: pixel_values, LABELS: batch[LABELS]}


def with_image_transforms(
    dataset: DatasetDict,
    train_transform: Transform,
    eval_transform: Transform,
    *,
    rule: PixelRule | None = None,
) -> DatasetDict:
    """The dataset with lazy transforms: `train_transform` on "train", `eval_transform` on every other split.

    Images are decoded by the pixel `rule` (default: `dataset_pixel_rule(dataset)`). The image column is
    renamed to the model's argument name (pixel_values), so that `Trainer`'s `remove_unused_columns` keeps it;
    it still holds the stored images until the transform runs.
    """
    rule = dataset_pixel_rule(dataset) if rule is None else rule
    return DatasetDict(
        {
            split: ds.rename_column(IMAGE, PIXELS).with_transform(
                ImageClassificationTransform(train_transform if split == "train" else eval_transform, rule)
            )
            for split, ds in dataset.items()
        }
    )


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch {"pixel_values": (B, C, H, W), "labels": (B,)}; a batch that a dataset
    gathered whole (`hf_zsharp.image_data.CachedImages`, one item holding every example) passes as it is."""
    if len(examples) == 1 and torch.is_tensor(labels := examples[0][LABELS]) and labels.ndim == 1:
        return {PIXELS: examples[0][PIXELS], LABELS: labels}
    return {
        PIXELS: torch.stack([example[PIXELS] for example in examples]),
        LABELS: torch.tensor([example[LABELS] for example in examples], dtype=torch.long),
    }


def paper_image_processor(
    image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> ViTImageProcessor:
    """An image processor with the evaluation preprocessing of the paper models (bilinear resize, scale to
    [0, 1], normalise), saved with them so that `from_pretrained` users and pipelines preprocess alike."""
    return ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=PIL.Image.Resampling.BILINEAR,
        image_mean=list(mean),
        image_std=list(std),
    )
