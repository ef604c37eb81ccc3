"""Shared fixtures. The Hub is unreachable here: everything runs offline on generated data."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The measuring helpers shared with the benchmarks (scripts/benchmarking.py): development code, not in the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import pytest  # noqa: E402

# Generated datasets (session-scoped: built once, treat as read-only). Each is a directory named like the Hub
# dataset it imitates, which `hf_zsharp.data.load_image_dataset` and the CLI's --dataset_name accept. The
# builders live in fake_datasets.py (imported lazily: tests that need no data do not pay for `datasets`).


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory):
    """uoft-cs/cifar10 schema and layout: img/label, splits train (40) and test (20)."""
    from fake_datasets import write_cifar10

    return write_cifar10(tmp_path_factory.mktemp("data") / "cifar10")


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory):
    """uoft-cs/cifar100 schema and layout: img/fine_label/coarse_label, splits train (40) and test (20)."""
    from fake_datasets import write_cifar100

    return write_cifar100(tmp_path_factory.mktemp("data") / "cifar100")


@pytest.fixture(scope="session")
def tiny_imagenet_dir(tmp_path_factory):
    """zh-plus/tiny-imagenet schema and layout: image/label, 64x64 with greyscale images, splits train/valid."""
    from fake_datasets import write_tiny_imagenet

    return write_tiny_imagenet(tmp_path_factory.mktemp("data") / "tiny-imagenet")


@pytest.fixture(scope="session")
def imagefolder_dir(tmp_path_factory):
    """An imagefolder directory with train/test splits and three classes (cat, dog, fish)."""
    from fake_datasets import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("data") / "imagefolder")


@pytest.fixture(scope="session")
def saved_to_disk_dir(tmp_path_factory):
    """A `save_to_disk` DatasetDict with only a train split (no evaluation split)."""
    from fake_datasets import write_saved_to_disk

    return write_saved_to_disk(tmp_path_factory.mktemp("data") / "saved")
