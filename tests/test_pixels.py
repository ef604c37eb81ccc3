"""Images of every PIL mode and bit depth reach the model as the rule of hf_zsharp.data's module docstring
says: one rule per dataset for images of more than 8 bits, fitted on its training split, the same for every
image and for the cached and the streamed paths; what it does not fit is counted in warnings."""

import io
import logging
import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from hf_zsharp.data import decode_image, load_image_dataset, normalization_stats
from hf_zsharp.image_data import paper_image_data, with_image_transforms

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RAMP = np.arange(256, dtype=np.float64).reshape(16, 16)  # 0..255, the content every image holds in some form
GREY = np.repeat(RAMP.astype(np.uint8)[..., None], 3, axis=-1)  # that content as the model's 8-bit RGB


@pytest.fixture
def load(tmp_path):
    def _load(name, **kwargs):
        return load_image_dataset(str(name), cache_dir=str(tmp_path / "cache"), **kwargs)

    return _load


def _imagefolder(root, train, test=None):
    """An imagefolder of {file name: array} per split (PNG or TIFF by the name), two classes."""
    for split, images in (("train", train), ("test", test or train)):
        for i, (name, array) in enumerate(images.items()):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(array).save(folder / name)
    return root


def _as_array(image):
    return np.asarray(image)


def _pixels(dataset, split="train"):
    """{image name: (16, 16, 3) uint8 pixels} of a split as the cached path stores them, after checking that
    the streamed path's per-image transform (what DataLoader workers run) decodes each image to the same."""
    cached = paper_image_data(dataset, MEAN, STD, 16)
    images = (cached.train if split == "train" else cached.eval).images.numpy()
    streamed = with_image_transforms(dataset, _as_array, _as_array)[split]
    for i, image in enumerate(images):
        np.testing.assert_array_equal(streamed[i]["pixel_values"], image)
    values = dataset[split].with_format(None)["image"]
    names = [os.path.basename(value["path"]) if value["path"] else f"#{i}" for i, value in enumerate(values)]
    return dict(zip(names, images))


def test_every_mode_and_bit_depth_reaches_the_model_as_its_8_bit_rgb(load, tmp_path):
    """A `datasets.Dataset` with an Image feature: 8-bit modes by PIL's conversion to RGB (alpha dropped), and
    the same 12-bit content as 16-bit (both byte orders) and 32-bit integer images, and as float in [0, 1],
    the same pixels: the ramp."""
    colour = np.stack([RAMP, 255 - RAMP, RAMP // 2], axis=-1).astype(np.uint8)
    modes = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK")
    eight_bit = {mode: PIL.Image.fromarray(colour).convert(mode) for mode in modes}
    twelve_bit = (RAMP * 16).astype(np.uint16)  # 0..4080
    deep = {
        "I;16": PIL.Image.fromarray(twelve_bit),
        "I;16B": PIL.Image.frombytes("I;16B", (16, 16), twelve_bit.astype(">u2").tobytes()),
        "I": PIL.Image.fromarray(twelve_bit.astype(np.int32)),
        "F": PIL.Image.fromarray((RAMP / 255).astype(np.float32)),
    }
    images = {**eight_bit, **deep}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict(
        {"image": list(images.values()), "label": [i % 2 for i in range(len(images))]}, features=features
    )
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "modes"))
    dataset = load(tmp_path / "modes")
    stored = [
        PIL.Image.open(io.BytesIO(value["bytes"])) for value in dataset["train"].with_format(None)["image"]
    ]
    assert [image.mode for image in stored] == list(images)
    for split_name in ("train", "eval"):
        pixels = list(_pixels(dataset, split_name).values())
        for mode, image, got in zip(images, stored, pixels):
            expected = GREY if mode in deep else np.asarray(image.convert("RGB"))
            np.testing.assert_array_equal(got, expected, err_msg=mode)


def test_a_16_bit_dataset_holding_8_bit_values_keeps_them(load, tmp_path):
    """16-bit PNGs whose values are 0..255 (the brightest of the split is 255) reach the model as those
    values, not divided by 257 into 0/1; a darker image of the dataset keeps its own values too."""
    root = _imagefolder(
        tmp_path / "deep8",
        {"ramp.png": RAMP.astype(np.uint16), "dark.png": (RAMP // 2).astype(np.uint16)},
    )
    dataset = load(root)
    pixels = _pixels(dataset)
    np.testing.assert_array_equal(pixels["ramp.png"], GREY)
    np.testing.assert_array_equal(pixels["dark.png"][..., 0], RAMP // 2)
    assert normalization_stats("deep8", dataset["train"])[0] == pytest.approx(
        ((RAMP.mean() + (RAMP // 2).mean()) / 2 / 255,) * 3, abs=1e-4
    )


def test_a_12_bit_dataset_maps_4095_to_255_for_every_image_alike(load, tmp_path):
    twelve_bit = np.rint(RAMP * 4095 / 255).astype(np.uint16)  # 0..4095
    root = _imagefolder(
        tmp_path / "deep12", {"full.png": twelve_bit, "half.png": (twelve_bit // 2).astype(np.uint16)}
    )
    pixels = _pixels(load(root))
    np.testing.assert_array_equal(pixels["full.png"], GREY)
    np.testing.assert_array_equal(pixels["half.png"][..., 0], np.rint((twelve_bit // 2) / 4095 * 255))


@pytest.mark.parametrize(
    ("content", "dtype", "brighter"),
    [
        (RAMP * 250 / 255, np.int32, 260),  # 32-bit integer, max 250, and the same with one pixel at 260
        (RAMP / 255, np.float32, 1.001),  # float in [0, 1], and the same with one pixel at 1.001
    ],
)
def test_one_brighter_pixel_changes_no_other_pixel(load, tmp_path, content, dtype, brighter):
    """The same content gives the same pixels whatever one pixel of one image holds: one rule for the dataset,
    from its brightest value, not one per image (which put the middle of a 0..260 ramp at 1, not 126)."""
    plain = np.rint(content).astype(dtype) if dtype == np.int32 else content.astype(dtype)
    bright = plain.copy()
    bright[0, 0] = brighter
    pixels = _pixels(load(_imagefolder(tmp_path / "bright", {"plain.tif": plain, "bright.tif": bright})))
    np.testing.assert_array_equal(pixels["plain.tif"][1:], pixels["bright.tif"][1:])
    assert (
        pixels["bright.tif"][0, 0, 0] == 255 and pixels["plain.tif"][8, 0, 0] > 120
    )  # the middle of the ramp
    top = float(bright.max())
    np.testing.assert_array_equal(pixels["plain.tif"][..., 0], np.rint(plain.astype(np.float64) * 255 / top))


def test_a_float_dataset_in_0_255_keeps_a_dark_image_dark(load, tmp_path):
    """Float images are multiplied by 255 only in a dataset whose values lie in [0, 1]: in a [0, 255] dataset
    an image whose maximum is 0.9 stays at most 1."""
    root = _imagefolder(
        tmp_path / "float255",
        {"bright.tif": RAMP.astype(np.float32), "dark.tif": (RAMP * 0.9 / 255).astype(np.float32)},
    )
    pixels = _pixels(load(root))
    np.testing.assert_array_equal(pixels["bright.tif"], GREY)
    assert pixels["dark.tif"].max() == 1


def test_the_streamed_paper_transforms_see_what_the_cache_holds(load, tmp_path):
    root = _imagefolder(
        tmp_path / "stream",
        {"a.png": (RAMP * 16).astype(np.uint16), "b.tif": (RAMP / 255).astype(np.float32)},
    )
    dataset = load(root)
    cached = paper_image_data(dataset, MEAN, STD, 16)
    streamed = paper_image_data(dataset, MEAN, STD, 16, budget=0)
    assert streamed.augment is None
    pixels = torch.stack([streamed.eval[i]["pixel_values"] for i in range(len(streamed.eval))])
    evaluated = cached.augment.eval()(cached.eval.images.permute(0, 3, 1, 2))
    torch.testing.assert_close(pixels, evaluated, rtol=0, atol=1e-6)


def test_images_the_rule_does_not_fit_are_counted_in_warnings(load, tmp_path, caplog):
    """Negative and non-finite values, evaluation values above the training split's maximum (all clipped), and
    images left with under 16 grey levels (8-bit values in a 16-bit dataset) are warned about, with counts."""
    twelve_bit = (RAMP * 16).astype(np.uint16)
    odd = (RAMP / 255 - 0.5).astype(np.float32)
    odd[0, 0] = np.nan
    train = {
        "a.png": twelve_bit,
        "b.png": twelve_bit,
        "small.png": (RAMP // 32).astype(np.uint16),
        "odd.tif": odd,
    }
    brighter = twelve_bit.copy()
    brighter[0, 0] = 5000
    test = {**train, "a.png": brighter}
    dataset = load(_imagefolder(tmp_path / "misfits", train, test))
    with caplog.at_level(logging.WARNING, logger="hf_zsharp.data"):
        pixels = _pixels(dataset, "eval")
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "1 of 4 train images of more than 8 bits hold values below 0" in warnings
    assert "1 of 4 train images of more than 8 bits hold NaN or infinite values" in warnings
    assert "1 of 4 train images of more than 8 bits come out with under 16 grey levels" in warnings
    assert "1 of 4 eval images of more than 8 bits hold values above" in warnings
    assert pixels["a.png"][0, 0, 0] == 255 and pixels["odd.tif"][0, 0, 0] == 0


def test_an_image_decoded_on_its_own_is_read_by_its_dtype_range():
    """Without a dataset to fit a rule on (e.g. one image given to a pipeline): 16-bit and 32-bit integers by
    65535, floats by 1, clipped."""
    for array in (
        (RAMP * 257).astype(np.uint16),
        (RAMP * 257).astype(np.int32),
        (RAMP / 255).astype(np.float32),
    ):
        buffer = io.BytesIO()
        PIL.Image.fromarray(array).save(buffer, format="TIFF")
        decoded = decode_image({"bytes": buffer.getvalue(), "path": None})
        np.testing.assert_array_equal(np.asarray(decoded), GREY)
