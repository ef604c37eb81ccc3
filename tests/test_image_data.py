"""hf_zsharp.image_data: splits decoded once and augmented per batch in the model, or streamed when they do not
fit; what a Trainer gets from either is the preprocessing of the per-image transforms."""

import shutil

import datasets
import PIL.Image
import pytest
import torch
from transformers import ViTImageProcessor
from transformers.models.timm_wrapper import TimmWrapperImageProcessor

from hf_zsharp.augment import augment_inputs
from hf_zsharp.data import FIXED_RULE, DataError, load_image_dataset
from hf_zsharp.image_data import (
    CachedImages,
    collate_fn,
    decode_split,
    paper_image_data,
    paper_transforms,
    processor_image_data,
    processor_transforms,
    with_image_transforms,
)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture
def load(tmp_path):
    def _load(name, **kwargs):
        return load_image_dataset(str(name), cache_dir=str(tmp_path / "cache"), **kwargs)

    return _load


def _whole(split):
    """Every example of a dataset as one collated batch."""
    if isinstance(split, CachedImages):
        return collate_fn(split.__getitems__(list(range(len(split)))))
    return collate_fn([split[i] for i in range(len(split))])


def _evaluated(data, split):
    """The evaluation preprocessing the model sees: the batch augmentation in evaluation mode, if any."""
    batch = _whole(split)
    pixels = batch["pixel_values"]
    return (pixels if data.augment is None else data.augment.eval()(pixels)), batch["labels"]


def test_paper_data_is_cached_and_evaluates_exactly_as_the_per_image_transform(load, tiny_imagenet_dir):
    dataset = load(tiny_imagenet_dir)  # 64x64 JPEGs, a quarter greyscale
    data = paper_image_data(dataset, MEAN, STD, 32)  # resized once to 32
    assert isinstance(data.train, CachedImages) and isinstance(data.eval, CachedImages)
    assert data.train.images.shape == (40, 32, 32, 3) and data.train.images.dtype == torch.uint8
    evaluation = paper_transforms(MEAN, STD, 32)[1]
    old = with_image_transforms(dataset, evaluation, evaluation)  # both splits, as evaluated
    for split in ("train", "eval"):
        pixels, labels = _evaluated(data, getattr(data, split))
        expected = _whole(old[split])
        assert torch.equal(pixels, expected["pixel_values"]) and torch.equal(labels, expected["labels"])
    batch = collate_fn(data.train.__getitems__([3, 1, 4]))
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8
    assert torch.equal(batch["pixel_values"][1], data.train[1]["pixel_values"])
    assert data.augment.train()(batch["pixel_values"]).shape == (3, 3, 32, 32)


def test_splits_over_the_memory_budget_stream_through_the_per_image_transforms(load, cifar10_dir):
    dataset = load(cifar10_dir)
    streamed = paper_image_data(dataset, MEAN, STD, 32, budget=0)
    assert streamed.augment is None and not isinstance(streamed.train, CachedImages)
    assert streamed.train[0]["pixel_values"].dtype == torch.float32
    # Room for the 20 evaluation images only (the training split is decoded first and does not fit).
    mixed = paper_image_data(dataset, MEAN, STD, 32, budget=20 * 32 * 32 * 3)
    assert not isinstance(mixed.train, CachedImages) and isinstance(mixed.eval, CachedImages)
    assert torch.equal(_evaluated(mixed, mixed.eval)[0], _evaluated(streamed, streamed.eval)[0])


def test_processor_data_caches_training_images_as_decoded_and_evaluation_images_cropped(load, cifar10_dir):
    dataset = load(cifar10_dir)
    processor = ViTImageProcessor(size={"height": 24, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    data = processor_image_data(dataset, processor)
    assert data.train.images.shape == (40, 32, 32, 3)  # RandomResizedCrop draws from the whole image
    assert data.eval.images.shape == (20, 24, 28, 3)  # resized once
    old = with_image_transforms(dataset, *processor_transforms(processor))
    assert torch.equal(_evaluated(data, data.eval)[0], _whole(old["eval"])["pixel_values"])
    assert data.augment.train()(_whole(data.train)["pixel_values"]).shape == (40, 3, 24, 28)


def test_training_images_of_mixed_sizes_stream_and_timm_processors_use_timm(load, tmp_path):
    images = [PIL.Image.new("RGB", (16 + 4 * i, 16), (40 * i, 0, 0)) for i in range(4)]
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]})
            for split in ("train", "test")
        }
    ).save_to_disk(str(tmp_path / "mixed"))
    dataset = load(tmp_path / "mixed")
    data = processor_image_data(dataset, ViTImageProcessor(size={"height": 16, "width": 16}))
    assert not isinstance(data.train, CachedImages) and isinstance(data.eval, CachedImages)
    assert data.augment is not None
    assert decode_split(dataset["train"], None, 2**30, FIXED_RULE) is None

    timm = TimmWrapperImageProcessor(
        pretrained_cfg={"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9}
    )
    data = processor_image_data(dataset, timm)
    assert data.augment is None and data.eval[0]["pixel_values"].shape == (3, 16, 16)


def test_an_undecodable_image_stops_the_cache_with_its_file_name(load, tmp_path, imagefolder_dir):
    root = tmp_path / "folder"
    shutil.copytree(imagefolder_dir, root)
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG truncated")
    dataset = load(root, verify_images=False)
    with pytest.raises(DataError, match="Could not decode image broken.png"):
        paper_image_data(dataset, MEAN, STD, 32)


def test_trainer_trains_and_evaluates_on_cached_batches_with_the_augmentation_in_the_model(
    load, cifar10_dir, tmp_path
):
    """Trainer's defaults (remove_unused_columns, pinned memory, workers) take the gathered batches as they are."""
    from hf_zsharp.args import ZSharpTrainingArguments
    from hf_zsharp.metrics import compute_metrics
    from hf_zsharp.models import build_model
    from hf_zsharp.trainer import ZSharpTrainer

    dataset = load(cifar10_dir)
    data = paper_image_data(dataset, MEAN, STD, 32)
    model = build_model("resnet20", 10)
    augment_inputs(model, data.augment)
    args = ZSharpTrainingArguments(
        str(tmp_path / "out"),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        max_steps=2,
        dataloader_num_workers=2,
        report_to=[],
        use_cpu=True,
    )
    trainer = ZSharpTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_samples_per_second"] > 0 and 0 <= metrics["eval_accuracy"] <= 1
    # Evaluation saw the old evaluation transform's pixels: the same predictions from them.
    model.eval()
    pixels, _ = _evaluated(data, data.eval)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        cached = model(pixel_values=_whole(data.eval)["pixel_values"]).logits
    torch.testing.assert_close(cached, logits, rtol=0, atol=0)
