"""hf_zsharp.data: loading the supported dataset kinds, clear errors, undecodable images, lazy transforms."""

import io
import logging
import shutil

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from fake_datasets import (
    CIFAR10_FEATURES,
    CIFAR10_LABELS,
    CIFAR100_COARSE_LABELS,
    CIFAR100_FEATURES,
    CIFAR100_FINE_LABELS,
    TINY_IMAGENET_FEATURES,
    cifar10_split,
    write_hub_layout,
)
from torch.utils.data import DataLoader
from transformers import ConvNextImageProcessor, ViTImageProcessor
from transformers.models.timm_wrapper import TimmWrapperImageProcessor

from hf_zsharp.catalog import DATASETS
from hf_zsharp.data import DataError, load_image_dataset, normalization_stats
from hf_zsharp.image_data import collate_fn, paper_transforms, processor_transforms, with_image_transforms


@pytest.fixture
def load(tmp_path):
    """load_image_dataset with a per-test datasets cache."""

    def _load(name, **kwargs):
        return load_image_dataset(str(name), cache_dir=str(tmp_path / "cache"), **kwargs)

    return _load


def _pixel_batch(dataset, size=32):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    transformed = with_image_transforms(dataset, *paper_transforms(mean, std, size))
    return collate_fn([transformed["eval"][i] for i in range(len(transformed["eval"]))])


def _labels(dataset):
    return dataset["train"].features["labels"].names


# ------------------------------------------------------------------------------------------------
# The generated datasets have the Hub schemas when read through datasets.load_dataset("parquet").


@pytest.mark.parametrize(
    ("fixture", "pattern", "features"),
    [
        ("cifar10_dir", "plain_text/{split}-*.parquet", CIFAR10_FEATURES),
        ("cifar100_dir", "cifar100/{split}-*.parquet", CIFAR100_FEATURES),
        ("tiny_imagenet_dir", "data/{split}-*.parquet", TINY_IMAGENET_FEATURES),
    ],
)
def test_generated_parquet_has_hub_schema(request, tmp_path, fixture, pattern, features):
    root = request.getfixturevalue(fixture)
    split = "valid" if fixture == "tiny_imagenet_dir" else "test"
    data_files = {s: str(root / pattern.format(split=s)) for s in ("train", split)}
    loaded = datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(tmp_path))
    assert set(loaded) == {"train", split}
    assert loaded["train"].features == features


# ------------------------------------------------------------------------------------------------
# Loading: Hub layouts, imagefolder, save_to_disk, digits


def test_cifar10_layout(load, cifar10_dir):
    dataset = load(cifar10_dir)  # columns img, label
    assert _labels(dataset) == CIFAR10_LABELS
    assert {split: len(ds) for split, ds in dataset.items()} == {"train": 40, "eval": 20}
    assert dataset["train"].column_names == ["image", "labels"]
    assert dataset["eval"].features == dataset["train"].features
    batch = _pixel_batch(dataset)
    assert batch["pixel_values"].shape == (20, 3, 32, 32)
    assert batch["labels"].dtype == torch.long


def test_cifar100_prefers_fine_label_and_accepts_override(load, cifar100_dir):
    dataset = load(cifar100_dir)
    assert _labels(dataset) == CIFAR100_FINE_LABELS
    assert dataset["eval"].column_names == ["image", "labels"]
    assert _labels(load(cifar100_dir, label_column="coarse_label")) == CIFAR100_COARSE_LABELS


def test_tiny_imagenet_valid_split_and_greyscale_become_rgb(load, tiny_imagenet_dir):
    dataset = load(tiny_imagenet_dir)
    assert len(_labels(dataset)) == 200
    assert len(dataset["eval"]) == 20  # the "valid" split
    modes = {PIL.Image.open(io.BytesIO(v["bytes"])).mode for v in dataset["eval"]["image"]}
    assert modes == {"L", "RGB"}
    batch = _pixel_batch(dataset, size=64)
    assert batch["pixel_values"].shape == (20, 3, 64, 64)


def test_overrides_of_columns_and_splits(load, cifar10_dir):
    dataset = load(
        cifar10_dir, image_column="img", label_column="label", train_split="test", eval_split="train"
    )
    assert (len(dataset["train"]), len(dataset["eval"])) == (20, 40)
    dataset = load(cifar10_dir, train_val_split=0.25, seed=3)
    assert (len(dataset["train"]), len(dataset["eval"])) == (30, 10)
    # stratified: every class keeps examples on both sides
    assert len(set(dataset["eval"]["labels"])) == 10


def test_imagefolder(load, imagefolder_dir):
    dataset = load(imagefolder_dir)
    assert _labels(dataset) == ["cat", "dog", "fish"]
    assert (len(dataset["train"]), len(dataset["eval"])) == (12, 6)
    batch = _pixel_batch(dataset)  # RGBA and greyscale files included
    assert batch["pixel_values"].shape == (6, 3, 32, 32)


def test_saved_to_disk_needs_a_split_fraction(load, saved_to_disk_dir):
    files_before = sorted(saved_to_disk_dir.rglob("*"))
    with pytest.raises(DataError, match="no evaluation split.*--train_val_split"):
        load(saved_to_disk_dir)
    dataset = load(saved_to_disk_dir, train_val_split=0.2)
    assert (len(dataset["train"]), len(dataset["eval"]), _labels(dataset)) == (32, 8, CIFAR10_LABELS)
    assert sorted(saved_to_disk_dir.rglob("*")) == files_before  # no cache files left in the user's folder


def test_saved_single_dataset_is_the_train_split(load, tmp_path):
    cifar10_split(20).save_to_disk(str(tmp_path / "single"))
    dataset = load(tmp_path / "single", train_val_split=0.5)
    assert (len(dataset["train"]), len(dataset["eval"])) == (10, 10)


def test_plain_integer_and_string_labels(load, tmp_path):
    ints = datasets.Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", (8, 8))] * 6, "target": [0, 2, 1, 2, 0, 1]}
    )
    datasets.DatasetDict({"train": ints, "test": ints}).save_to_disk(str(tmp_path / "ints"))
    assert _labels(load(tmp_path / "ints", label_column="target")) == ["0", "1", "2"]

    strings = ints.map(lambda ex: {"label": ["cat", "dog", "eel"][ex["target"]]}).remove_columns("target")
    datasets.DatasetDict({"train": strings, "test": strings}).save_to_disk(str(tmp_path / "strings"))
    dataset = load(tmp_path / "strings")
    assert _labels(dataset) == ["cat", "dog", "eel"]
    assert isinstance(dataset["eval"].features["labels"], datasets.ClassLabel)


def _saved(path, splits, names=None):
    """save_to_disk a DatasetDict of 8x8 images whose labels are `splits[name]` (a ClassLabel when `names`)."""
    parts = {}
    for split, labels in splits.items():
        part = datasets.Dataset.from_dict(
            {"image": [PIL.Image.new("RGB", (8, 8))] * len(labels), "label": labels}
        )
        split_names = names[split] if isinstance(names, dict) else names
        parts[split] = (
            part if split_names is None else part.cast_column("label", datasets.ClassLabel(names=split_names))
        )
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path


def test_string_labels_are_encoded_with_one_mapping_for_every_split(load, tmp_path):
    root = _saved(tmp_path / "s", {"train": ["dog", "cat", "fox"], "test": ["cat", "fox", "fox"]})
    dataset = load(root)
    assert _labels(dataset) == ["cat", "dog", "fox"]
    assert dataset["eval"]["labels"][:] == [0, 2, 2]  # 'fox' is class 2 in both splits
    assert dataset["eval"].features["labels"] == dataset["train"].features["labels"]


def test_class_label_splits_with_different_names_are_aligned_by_name(load, tmp_path):
    names = {"train": ["cat", "dog", "fox"], "test": ["cat", "fox", "owl"]}
    root = _saved(tmp_path / "c", {"train": [0, 1, 2], "test": [0, 1, 2]}, names)
    files_before = sorted(root.rglob("*"))
    dataset = load(root)
    assert _labels(dataset) == ["cat", "dog", "fox", "owl"]
    assert (dataset["train"]["labels"][:], dataset["eval"]["labels"][:]) == ([0, 1, 2], [0, 2, 3])
    assert sorted(root.rglob("*")) == files_before  # no cache files written into the user's folder


def test_a_class_with_a_single_example_is_held_out_unstratified_in_memory(load, tmp_path):
    labels = [0, 0, 0, 1, 1, 1, 2, 0, 1, 1]  # class "c" has a single example: no stratified split exists
    root = _saved(tmp_path / "single", {"train": labels}, ["a", "b", "c"])
    files_before = sorted(root.rglob("*"))
    dataset = load(root, train_val_split=0.3, seed=1)
    assert (len(dataset["train"]), len(dataset["eval"])) == (7, 3)
    assert sorted(dataset["train"]["labels"][:] + dataset["eval"]["labels"][:]) == sorted(labels)
    assert sorted(root.rglob("*")) == files_before  # no index files in the user's folder


@pytest.mark.parametrize("bad", [7, -1])
def test_class_labels_out_of_range_are_refused_before_training(load, tmp_path, bad):
    root = _saved(tmp_path / "r", {"train": [0, 1, 2], "test": [0, bad, 2, bad]}, ["a", "b", "c"])
    with pytest.raises(
        DataError, match=rf"'label'.*split 'test'.*outside 0..2.*: {bad} .*another evaluation"
    ):
        load(root)


@pytest.mark.parametrize("names", [None, ["a", "b", "c"]])
def test_unlabelled_training_examples_are_refused_with_advice_for_the_training_split(load, tmp_path, names):
    root = _saved(tmp_path / "t", {"train": [0, -1, 2, 1], "test": [0, 1, 2]}, names)
    with pytest.raises(DataError, match=r"split 'train'.*: -1 .*remove those examples"):
        load(root)


@pytest.mark.parametrize("labels", [[0, None, 1], ["cat", None, "dog"]])
def test_missing_labels_name_the_column_and_split(load, tmp_path, labels):
    root = _saved(tmp_path / "n", {"train": labels, "test": labels[:1]})
    with pytest.raises(
        DataError, match=r"Column 'label' of .* \(split 'train'\) has examples without a label"
    ):
        load(root)


def test_classes_without_training_images_are_named_in_a_warning(load, tmp_path, caplog):
    root = _saved(tmp_path / "g", {"train": [0, 0, 3, 3], "test": [0, 3, 1]})  # integer labels with gaps
    with caplog.at_level(logging.WARNING, logger="hf_zsharp.data"):
        dataset = load(root)
    assert dataset["train"].features["labels"].names == ["0", "1", "2", "3"]
    assert "2 of 4 classes have no training image: 1, 2." in caplog.text


def test_an_empty_saved_split_is_a_clear_error(load, tmp_path):
    root = _saved(tmp_path / "e", {"train": [0, 1, 2], "test": []}, ["a", "b", "c"])
    # datasets 4.0 saves an empty split with a data file (it loads, and is refused as empty); newer releases
    # save none (load_from_disk would fail on it, so it is refused before loading)
    with pytest.raises(DataError, match="(?i)split 'test' of (saved dataset .* holds no rows|.* is empty)"):
        load(root)


def test_digits_is_embedded_and_deterministic(load):
    dataset = load("digits")
    assert _labels(dataset) == [str(d) for d in range(10)]
    assert (len(dataset["train"]), len(dataset["eval"])) == (1437, 360)
    assert np.bincount(dataset["eval"]["labels"][:]).min() >= 35  # stratified: ~36 per class
    from sklearn.datasets import load_digits

    first = PIL.Image.open(io.BytesIO(dataset["train"][0]["image"]["bytes"]))
    assert (first.size, first.mode) == ((32, 32), "RGB")
    # The split is fixed: the evaluation images are the same whatever the seed.
    again = load("digits", seed=123)
    assert again["eval"][:50]["image"] == dataset["eval"][:50]["image"]
    counts = np.bincount(dataset["train"]["labels"][:]) + np.bincount(dataset["eval"]["labels"][:])
    assert counts.tolist() == np.bincount(load_digits().target).tolist()
    mean, std = normalization_stats("digits", dataset["train"])
    assert len(mean) == 3 and 0.1 < mean[0] < 0.5 and 0.1 < std[0] < 0.5


# ------------------------------------------------------------------------------------------------
# Errors, raised before any training


def test_unknown_hub_id_offline_says_so(load):
    with pytest.raises(DataError, match="cannot be reached.*HF_HUB_OFFLINE.*local path"):
        load("nobody-here/no-such-dataset")


def test_missing_local_path(load, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(str(tmp_path / "nothing"))


def test_missing_columns_list_the_existing_ones(load, cifar10_dir, cifar100_dir, tmp_path):
    with pytest.raises(DataError, match=r"Image column 'pixels' not found.*\['img', 'label'\]"):
        load(cifar10_dir, image_column="pixels")
    with pytest.raises(DataError, match=r"Label column 'class' not found.*\['img', 'label'\]"):
        load(cifar10_dir, label_column="class")
    unlabeled = datasets.Dataset.from_dict({"img": [PIL.Image.new("RGB", (8, 8))] * 2, "caption": ["a", "b"]})
    unlabeled.save_to_disk(str(tmp_path / "unlabeled"))
    with pytest.raises(DataError, match=r"No label column found.*\['img', 'caption'\]"):
        load(tmp_path / "unlabeled", train_val_split=0.5)
    with pytest.raises(DataError, match=r"Column 'coarse_label' .* does not hold images"):
        load(cifar100_dir, image_column="coarse_label")
    with pytest.raises(DataError, match=r"both 'label'"):
        load(cifar10_dir, image_column="label")


def test_bad_split_arguments(load, cifar10_dir):
    with pytest.raises(DataError, match=r"no split 'validation'.*\['train', 'test'\]"):
        load(cifar10_dir, eval_split="validation")
    with pytest.raises(DataError, match=r"no split 'training'"):
        load(cifar10_dir, train_split="training")
    with pytest.raises(DataError, match="either"):
        load(cifar10_dir, eval_split="test", train_val_split=0.1)
    with pytest.raises(DataError, match="between 0 and 1"):
        load(cifar10_dir, train_val_split=1.5)


# ------------------------------------------------------------------------------------------------
# Images that fail to decode: skipped and counted, or a message naming the file


def test_undecodable_images_are_skipped_and_counted(load, tmp_path, caplog):
    splits = {"train": cifar10_split(12, corrupt=3), "test": cifar10_split(6, seed=1)}
    root = write_hub_layout(tmp_path / "cifar10", "plain_text", "plain_text", splits)
    with caplog.at_level(logging.WARNING, logger="hf_zsharp.data"):
        dataset = load(root)
    assert len(dataset["train"]) == 9
    assert "Skipped 3 of 12 train images" in caplog.text and "corrupt_0.png" in caplog.text
    transformed = with_image_transforms(dataset, *paper_transforms((0.5,) * 3, (0.5,) * 3))
    assert len([transformed["train"][i] for i in range(9)]) == 9


def test_all_images_undecodable_is_an_error(load, tmp_path):
    root = write_hub_layout(
        tmp_path / "bad",
        "plain_text",
        "plain_text",
        {"train": cifar10_split(4, corrupt=4), "test": cifar10_split(4)},
    )
    with pytest.raises(DataError, match="None of the 4 images of the train split"):
        load(root)


def test_unverified_bad_image_stops_with_its_file_name(load, tmp_path, imagefolder_dir):
    root = tmp_path / "folder"
    shutil.copytree(imagefolder_dir, root)
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG truncated")
    dataset = load(root, verify_images=False)
    with pytest.raises(
        DataError, match="Could not decode image broken.png"
    ):  # the pixel rule's scan opens it
        with_image_transforms(dataset, *paper_transforms((0.5,) * 3, (0.5,) * 3))


# ------------------------------------------------------------------------------------------------
# Transforms


def test_paper_transforms_crop_flip_and_normalise():
    train, evaluation = paper_transforms(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), image_size=32)
    image = PIL.Image.new("RGB", (32, 32), (255, 255, 255))
    out = evaluation(image)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor([1.0, 3.0, 1.0]))
    torch.manual_seed(0)
    padded = [train(image) for _ in range(20)]
    # padding 4 + random crop: zero-padded border pixels (value (0 - mean) / std) appear in some crops
    assert any((t[0] == -1.0).any() for t in padded)
    assert all(t.shape == (3, 32, 32) for t in padded)
    assert evaluation(PIL.Image.new("RGB", (8, 8))).shape == (3, 32, 32)  # other sizes are resized


def test_processor_transforms_follow_the_image_processor():
    vit = ViTImageProcessor(size={"height": 48, "width": 40}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    train, evaluation = processor_transforms(vit)
    image = PIL.Image.new("RGB", (64, 50), (255, 0, 0))
    assert train(image).shape == evaluation(image).shape == (3, 48, 40)
    torch.testing.assert_close(evaluation(image)[:, 10, 10], torch.tensor([1.0, -1.0, -1.0]))

    convnext = ConvNextImageProcessor(size={"shortest_edge": 56}, crop_pct=0.875)
    train, evaluation = processor_transforms(convnext)
    assert evaluation(image).shape == train(image).shape == (3, 56, 56)

    timm_processor = TimmWrapperImageProcessor(
        pretrained_cfg={"input_size": (3, 40, 40), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9}
    )
    train, evaluation = processor_transforms(timm_processor)
    assert train(image).shape == evaluation(image).shape == (3, 40, 40)


def test_normalization_stats_known_and_computed():
    for name in ("uoft-cs/cifar10", "uoft-cs/cifar100", "zh-plus/tiny-imagenet"):
        facts = next(f for f in DATASETS.values() if f.hub_id == name)
        assert normalization_stats(name) == (facts.mean, facts.std)
    halves = [PIL.Image.new("RGB", (4, 4), (0, 51, 255)), PIL.Image.new("RGB", (4, 4), (255, 51, 255))]
    dataset = datasets.Dataset.from_dict({"image": halves}).cast_column("image", datasets.Image(decode=False))
    mean, std = normalization_stats("my-data", dataset)
    assert mean == (0.5, 0.2, 1.0) and std == (0.5, 1.0, 1.0)  # constant channels: std 1
    with pytest.raises(ValueError, match="No known normalisation statistics"):
        normalization_stats("my-data")


def test_dataloader_with_workers(load, cifar10_dir):
    dataset = load(cifar10_dir)
    transformed = with_image_transforms(dataset, *paper_transforms(*normalization_stats(str(cifar10_dir))))
    loader = DataLoader(transformed["train"], batch_size=16, collate_fn=collate_fn, num_workers=2)
    shapes = [tuple(batch["pixel_values"].shape) for batch in loader]
    assert shapes == [(16, 3, 32, 32), (16, 3, 32, 32), (8, 3, 32, 32)]


def test_trainer_consumes_transformed_dataset_with_default_arguments(load, cifar10_dir, tmp_path):
    """Trainer's remove_unused_columns (on by default) keeps the renamed columns; metrics come from evaluate."""
    from transformers import Trainer, TrainingArguments

    from hf_zsharp.metrics import compute_metrics
    from hf_zsharp.models import build_model

    dataset = load(cifar10_dir)
    transformed = with_image_transforms(dataset, *paper_transforms(*normalization_stats(str(cifar10_dir))))
    args = TrainingArguments(
        str(tmp_path / "out"),
        per_device_train_batch_size=20,
        per_device_eval_batch_size=20,
        max_steps=1,
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(
        model=build_model("resnet20", len(_labels(dataset))),
        args=args,
        train_dataset=transformed["train"],
        eval_dataset=transformed["eval"],
        data_collator=collate_fn,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= metrics["eval_top5_accuracy"] <= 1.0
