"""Batched image augmentation on uint8 tensors, on whichever device the batch is: the paper's padded random crop
and flip, RandomResizedCrop and flip for fine-tunes, and normalisation.

`augment_inputs` runs a `BatchAugment` on uint8 `pixel_values` at the start of the model's forward, after
`Trainer` (or Accelerate) moved the batch to the device. Its random draws come from the device's global
generator, which the two-pass step replays, so both passes of a sharpness-aware step see the same batch.
Each operation draws from the distributions of the torchvision transform it replaces
(`hf_zsharp.image_data.paper_transforms`, `processor_transforms`), one draw per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hf_zsharp.data import PIXELS

# torchvision's RandomResizedCrop defaults: the crop's area fraction and aspect ratio ranges, and its tries.
SCALE, RATIO, ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10


def random_flips(batch_size: int, device: torch.device) -> torch.Tensor:
    """Which images to flip horizontally, each with probability 1/2 (RandomHorizontalFlip)."""
    return torch.rand(batch_size, device=device) < 0.5


def pad_crop_flip(
    images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Per image, the (H, W) window at (`top`, `left`) of the image zero-padded by `padding`, mirrored where `flip`.

    Works on any dtype and keeps it; indices only, so uint8 in gives exactly RandomCrop(padding) + flip's pixels.
    The result has channels-last strides: the pixels are gathered as rows of C values, in one `index_select`.
    """
    batch, channels, height, width = images.shape
    padded = nn.functional.pad(images.permute(0, 2, 3, 1), (0, 0, padding, padding, padding, padding))
    columns = torch.arange(width, device=images.device)
    columns = torch.where(flip[:, None], width - 1 - columns, columns) + left[:, None]
    rows = top[:, None] + torch.arange(height, device=images.device)
    first_row = torch.arange(batch, device=images.device)[:, None, None] * padded.shape[1]
    pixel = ((first_row + rows[:, :, None]) * padded.shape[2] + columns[:, None, :]).view(-1)
    picked = padded.reshape(-1, channels).index_select(0, pixel)
    return picked.view(batch, height, width, channels).permute(0, 3, 1, 2)


def random_pad_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip on a batch: offsets uniform on 0..2 * padding."""
    batch, device = images.shape[0], images.device
    top = torch.randint(0, 2 * padding + 1, (batch,), device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), device=device)
    return pad_crop_flip(images, padding, top, left, random_flips(batch, device))


def random_resized_boxes(
    batch: int,
    height: int,
    width: int,
    device: torch.device,
    scale: Sequence[float] = SCALE,
    ratio: Sequence[float] = RATIO,
) -> torch.Tensor:
    """(top, left, height, width) per image, drawn as torchvision's `RandomResizedCrop.get_params` draws them.

    Each image takes its first of `ATTEMPTS` (area, log-aspect) draws whose box fits, at a uniform position;
    images with none fall back to the central crop clamped to the ratio range.
    """
    area = torch.empty(batch, ATTEMPTS, dtype=torch.float64, device=device).uniform_(*scale) * (
        height * width
    )
    log_ratio = torch.empty(batch, ATTEMPTS, dtype=torch.float64, device=device)
    aspect = log_ratio.uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (area * aspect).sqrt().round()
    h = (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback = (round(width / min(ratio)), width)
    elif in_ratio > max(ratio):
        fallback = (height, round(height * max(ratio)))
    else:
        fallback = (height, width)
    h = torch.where(found, h, float(fallback[0])).long()
    w = torch.where(found, w, float(fallback[1])).long()
    uniform = torch.rand(batch, 2, dtype=torch.float64, device=device)
    top = torch.where(found, (uniform[:, 0] * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(found, (uniform[:, 1] * (width - w + 1)).floor().long(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, out: int) -> torch.Tensor:
    """(B, out, size) matrices resampling [start, start + length) of an axis to `out` entries: the antialiased
    bilinear filter of torchvision's resize (`antialias=True`, as PIL's), restricted to the crop."""
    scale = length.double()[:, None] / out  # input entries per output entry
    support = scale.clamp(min=1.0)  # the triangle filter widens when downscaling
    center = (torch.arange(out, device=start.device, dtype=torch.float64) + 0.5) * scale
    position = torch.arange(size, device=start.device, dtype=torch.float64) - start.double()[:, None]
    inside = (position >= 0) & (position < length[:, None])
    weights = (1 - ((position[:, None, :] + 0.5 - center[:, :, None]) / support[:, :, None]).abs()).clamp(
        min=0
    )
    weights = weights * inside[:, None, :]
    return (weights / weights.sum(dim=2, keepdim=True)).float()


def resized_crop_flip(
    images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Each image's (top, left, height, width) box resized to `size` (bilinear, antialiased), mirrored where
    `flip`; float32 (B, C, *size), as two batched matrix products: columns, then rows."""
    batch, channels, height, width = images.shape
    rows = _resize_weights(boxes[:, 0], boxes[:, 2], height, size[0])
    columns = _resize_weights(boxes[:, 1], boxes[:, 3], width, size[1])
    columns = torch.where(flip[:, None, None], columns.flip(1), columns)
    resized_columns = images.float().reshape(batch, channels * height, width) @ columns.transpose(1, 2)
    return rows[:, None] @ resized_columns.view(batch, channels, height, size[1])


class BatchAugment(nn.Module):
    """uint8 image batches (B, C, H, W) to normalised float32: augmented (`crop`, then a flip) in training mode,
    only converted in evaluation mode, with the arithmetic of torchvision's ToDtype(scale=True) + Normalize.

    `crop` is "pad" (the paper's RandomCrop with `padding`), a (height, width) size for RandomResizedCrop, or
    None (no augmentation). The output is contiguous (NCHW), whatever the input's strides.
    """

    def __init__(
        self,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        crop: str | tuple[int, int] | None = "pad",
        padding: int = 4,
    ) -> None:
        super().__init__()
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.crop, self.padding = crop, padding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The batch, augmented with one draw per image in training mode, normalised."""
        if not self.training or self.crop is None:
            return self._normalize(images)
        if self.crop == "pad":
            return self._normalize(random_pad_crop_flip(images, self.padding))
        # Resampling averages with weights summing to 1, so it commutes with the per-channel normalisation: that
        # runs first, on the (smaller) stored images.
        batch, _, height, width = images.shape
        boxes = random_resized_boxes(batch, height, width, images.device)
        return resized_crop_flip(
            self._normalize(images), boxes, random_flips(batch, images.device), self.crop
        )

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 to float32 in [0, 1], then (x - mean) / std per channel, in torchvision's order of operations."""
        pixels = images.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)
        if self.mean is None or self.std is None:
            return pixels
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
        return pixels.sub(mean).div_(std)


def augment_inputs(model: nn.Module, augment: BatchAugment) -> RemovableHandle:
    """Run `augment` on uint8 `pixel_values` when `model`'s forward starts, in the model's train/eval mode.

    Float `pixel_values` (already preprocessed, e.g. by a pipeline) pass unchanged. The augmentation runs in
    float32 under autocast, and eagerly under `torch.compile`, so compiled and eager training draw the same
    crops.
    """

    @torch.compiler.disable
    def transform(images: torch.Tensor, training: bool) -> torch.Tensor:
        augment.train(training)
        with torch.autocast(images.device.type, enabled=False):  # float32 images under --bf16 / --fp16 too
            return augment(images)

    def augmented(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        # In the parameters' dtype: float32 normally (autocast casts later), bf16 under FSDP2's mixed precision,
        # whose own input cast may already have run.
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        return transform(images, module.training).to(dtype)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args and torch.is_tensor(args[0]) and args[0].dtype == torch.uint8:
            return (augmented(module, args[0]), *args[1:]), kwargs
        images = kwargs.get(PIXELS)
        if images is None or images.dtype != torch.uint8:
            return None
        return args, {**kwargs, PIXELS: augmented(module, images)}

    return model.register_forward_pre_hook(hook, with_kwargs=True)
