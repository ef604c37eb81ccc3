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


def _generated(writer: str, folder: str, doc: str):
    """A session fixture: the dataset fake_datasets.`writer` writes into a fresh `folder` (built once)."""

    def fixture(tmp_path_factory):
        import fake_datasets

        return getattr(fake_datasets, writer)(tmp_path_factory.mktemp("data") / folder)

    fixture.__doc__ = doc
    return pytest.fixture(scope="session", name=f"{writer.removeprefix('write_')}_dir")(fixture)


cifar10_dir = _generated(
    "write_cifar10", "cifar10", "uoft-cs/cifar10: img/label, splits train (40) and test (20)."
)
cifar100_dir = _generated(
    "write_cifar100",
    "cifar100",
    "uoft-cs/cifar100: img/fine_label/coarse_label, splits train (40) and test (20).",
)
tiny_imagenet_dir = _generated(
    "write_tiny_imagenet",
    "tiny-imagenet",
    "zh-plus/tiny-imagenet: image/label, 64x64 with greyscale images, train/valid.",
)
imagefolder_dir = _generated(
    "write_imagefolder",
    "imagefolder",
    "An imagefolder with train/test splits and three classes (cat, dog, fish).",
)
saved_to_disk_dir = _generated(
    "write_saved_to_disk",
    "saved",
    "A `save_to_disk` DatasetDict with only a train split (no evaluation split).",
)
