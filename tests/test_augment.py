"""hf_zsharp.augment: the batched augmentations reproduce the per-image torchvision transforms they replace
(same pixels for the same draw, same distributions of draws), and run inside the model's forward."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from hf_zsharp.augment import (
    BatchAugment,
    augment_inputs,
    pad_crop_flip,
    random_pad_crop_flip,
    random_resized_boxes,
    resized_crop_flip,
)
from hf_zsharp.image_data import paper_transforms

EPS = 2.0**-24  # float32's unit roundoff


def _images(count, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=generator)


def _pil(image):
    return PIL.Image.fromarray(image.permute(1, 2, 0).numpy())


def _tensor(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


def test_pad_crop_flip_gives_torchvision_pixels_for_every_offset_and_flip():
    image = _images(1, 12, 10)[0]
    offsets = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)]
    top, left, flip = (torch.tensor(column) for column in zip(*offsets))
    batch = pad_crop_flip(image.expand(len(offsets), -1, -1, -1), 4, top, left, flip)
    padded = F.pad(_pil(image), [4])
    for out, (t, le, f) in zip(batch, offsets):
        expected = F.crop(padded, t, le, 12, 10)
        assert torch.equal(out, _tensor(F.horizontal_flip(expected) if f else expected))


def _draws(out):
    """(top, left, flip) of each crop of the 8x8 image holding 1 + 8 row + column, padded by 4."""
    count = len(out)
    pixels = out[:, 0].long()
    first_row = (pixels > 0).any(dim=2).int().argmax(dim=1)
    row = pixels[torch.arange(count), first_row]
    first, last = (row > 0).int().argmax(dim=1), 7 - (row > 0).flip(1).int().argmax(dim=1)
    low, high = row[torch.arange(count), first], row[torch.arange(count), last]
    flip = low > high
    top = (low - 1) // 8 - first_row + 4
    left = torch.where(flip, (high - 1) % 8 - (7 - last), (low - 1) % 8 - first) + 4
    return top, left, flip


def test_random_pad_crop_flip_draws_offsets_and_flips_uniformly():
    count = 40_000
    image = (1 + torch.arange(64, dtype=torch.uint8)).view(1, 1, 8, 8).expand(count, 3, 8, 8)
    torch.manual_seed(0)
    out = random_pad_crop_flip(image, 4)
    top, left, flip = _draws(out)
    assert torch.equal(pad_crop_flip(image, 4, top, left, flip), out)  # the draws are read back right
    # Each of the 81 offsets has probability 1/81 (RandomCrop: top and left uniform on 0..8), a flip 1/2:
    # binomial counts within 5 standard deviations.
    cells = torch.bincount(top * 9 + left, minlength=81).double()
    p = 1 / 81
    assert ((cells - count * p).abs() <= 5 * math.sqrt(count * p * (1 - p))).all()
    assert abs(flip.sum().item() - count / 2) <= 5 * math.sqrt(count / 4)
    both = torch.bincount(flip.long() * 81 + top * 9 + left, minlength=162).double()  # independent
    assert ((both - count * p / 2).abs() <= 5 * math.sqrt(count * p / 2)).all()


@pytest.mark.parametrize(("height", "width"), [(48, 64), (32, 32), (8, 64)])  # (8, 64): many fallbacks
def test_random_resized_boxes_follow_torchvision_get_params(height, width):
    count = 10_000
    torch.manual_seed(0)
    ours = random_resized_boxes(count, height, width, torch.device("cpu")).double()
    image = torch.zeros(3, height, width)
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(count)]
    ).double()
    assert ((ours[:, 2:] >= 1) & (ours[:, :2] >= 0)).all()
    assert ((ours[:, 0] + ours[:, 2] <= height) & (ours[:, 1] + ours[:, 3] <= width)).all()
    # Means of top, left, height, width and area: two independent samples, within 5 standard errors.
    for values_a, values_b in ((ours, theirs), (ours[:, 2:].prod(1, True), theirs[:, 2:].prod(1, True))):
        spread = 5 * torch.sqrt((values_a.var(0) + values_b.var(0)) / count)
        assert ((values_a.mean(0) - values_b.mean(0)).abs() <= spread + 1e-9).all()
    if (height, width) == (8, 64):  # all ten tries fail about 28 % of the time: the central 8 x 11 crop
        a, b = (
            (boxes == torch.tensor([0.0, 26, 8, 11])).all(1).double().mean().item()
            for boxes in (ours, theirs)
        )
        assert a > 0.2 and abs(a - b) <= 5 * math.sqrt(2 * a * (1 - a) / count)


@pytest.mark.parametrize(
    ("box", "size"),
    [
        ((5, 7, 20, 30), (56, 56)),
        ((0, 0, 48, 64), (24, 40)),
        ((10, 3, 37, 50), (30, 30)),
        ((1, 2, 3, 4), (64, 48)),
    ],
)
def test_resized_crop_flip_is_torchvision_antialiased_bilinear(box, size):
    images = _images(2, 48, 64)
    out = resized_crop_flip(images, torch.tensor([box, box]), torch.tensor([False, True]), size)
    expected = F.resized_crop(images.float(), *box, list(size), antialias=True)
    # Each output is a convex combination of <= 4 taps per axis (scale <= 2 here) of values <= 255; both sides
    # round the weights and each of the two separable passes' products and sums: 2 sides x 2 axes x 4 taps x
    # 4 roundings of a float32 value <= 255.
    atol = 255 * EPS * 64
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=atol)
    torch.testing.assert_close(out[1], expected[1].flip(-1), rtol=0, atol=atol)
    # The old per-image path (PIL) rounds to uint8 after each of its two passes: at most 1/2 + 1/2 apart, plus
    # its 22-bit fixed-point weights.
    pil = _tensor(F.resized_crop(_pil(images[0]), *box, list(size), antialias=True)).float()
    torch.testing.assert_close(out[0], pil, rtol=0, atol=1 + 255 * 8 * 2.0**-22)


def test_evaluation_mode_is_the_old_evaluation_transform_bit_for_bit():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    images = _images(16, 32, 32)
    channels_last = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    evaluation = paper_transforms(mean, std, 32)[1]
    expected = torch.stack([evaluation(_pil(image)) for image in images])
    for images_in in (images, channels_last):  # as collated, and as gathered from a cache
        out = BatchAugment(mean, std).eval()(images_in)
        assert torch.equal(out, expected) and out.is_contiguous()
    assert torch.equal(BatchAugment(None, None).eval()(images), v2.ToDtype(torch.float32, scale=True)(images))


def test_training_mode_is_the_old_training_transform_for_the_same_draws():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = _images(64, 32, 32)
    torch.manual_seed(1)
    out = BatchAugment(mean, std).train()(images)
    torch.manual_seed(1)
    top, left = (torch.randint(0, 9, (64,)) for _ in range(2))
    flip = torch.rand(64) < 0.5
    crops = pad_crop_flip(images, 4, top, left, flip)
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    assert torch.equal(out, torch.stack([to_tensor(_pil(crop)) for crop in crops]))
    torch.manual_seed(2)
    resized = BatchAugment(mean, std, crop=(20, 24)).train()(images)
    torch.manual_seed(2)
    boxes = random_resized_boxes(64, 32, 32, torch.device("cpu"))
    crops = resized_crop_flip(images, boxes, torch.rand(64) < 0.5, (20, 24))
    expected = to_tensor(crops / 255)  # resized in [0, 255] as the old path did, then scaled and normalised
    # Normalising first (on the smaller stored images) only reorders roundings: of values <= 1 / 0.2 = 5, each
    # output being a convex combination (as in test_resized_crop_flip_is_torchvision_antialiased_bilinear).
    torch.testing.assert_close(resized, expected, rtol=0, atol=5 * EPS * 64)


class Recorder(torch.nn.Module):
    """Records the pixel values it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, pixel_values, labels=None):
        self.seen.append(pixel_values)


def test_augment_inputs_runs_on_uint8_pixel_values_only_in_the_models_mode():
    model, augment = Recorder(), BatchAugment((0.5,) * 3, (0.25,) * 3)
    handle = augment_inputs(model, augment)
    images = _images(8, 32, 32)
    model.eval()
    model(pixel_values=images)
    model(images)  # positional
    assert torch.equal(model.seen[0], augment.eval()(images)) and torch.equal(model.seen[1], model.seen[0])
    model.train()
    torch.manual_seed(0)
    model(pixel_values=images)
    torch.manual_seed(0)
    assert torch.equal(model.seen[2], augment.train()(images))
    floats = torch.rand(2, 3, 32, 32)
    model(pixel_values=floats)  # already preprocessed (a pipeline): untouched
    assert model.seen[3] is floats
    augment = BatchAugment((0.5,) * 3, (0.25,) * 3, crop=(24, 24))  # its resampling is a matrix product
    augment_inputs(model, augment)
    for autocast in (False, True):  # --bf16 autocasts the forward: the augmentation stays in float32
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(pixel_values=images)
    assert model.seen[5].dtype == torch.float32 and torch.equal(model.seen[5], model.seen[4])
    handle.remove()
    model.eval()
    model(pixel_values=images)
    assert torch.equal(model.seen[6], augment.eval()(images))  # the second hook only


def test_augmented_batches_come_in_the_dtype_of_the_parameters():
    """bf16 parameters (FSDP2's mixed precision unshards them so) get a bf16 batch: the float32 result, rounded."""
    model, augment = Recorder(), BatchAugment((0.5,) * 3, (0.25,) * 3)
    model.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
    augment_inputs(model, augment)
    images = _images(4, 32, 32)
    model.eval()
    model(pixel_values=images)
    assert torch.equal(model.seen[0], augment.eval()(images).to(torch.bfloat16))
