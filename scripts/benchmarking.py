"""Measuring helpers shared by scripts/ and the tests: aten op counts and bytes, device syncs, peak memory, timm
parameter sets with gradients, synthetic images, and small image datasets written with the Hub's CIFAR-10 and
Tiny-ImageNet schemas and layouts.

An op counted by `OpCount` is one dispatch of an aten operator below autograd: on an accelerator at least one
kernel launch (~4-8 us of host time each), so a step's op count predicts its launch overhead.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, Features, Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hf_zsharp.data import LABELS, PIXELS

# Ops that read or write only the indexed entries: their bytes are the index and the moved values, not the tensor.
_GATHERS = {"take", "index_select", "gather"}
_SCATTERS = {"put_", "put", "index_put_", "index_add_", "index_copy_", "scatter_", "scatter_add_"}
_UNINITIALISED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class OpCount(TorchDispatchMode):
    """Count the aten ops run inside `with OpCount() as count:` (`count.ops` by name, `count.total`) and estimate
    the bytes they touch (`count.bytes`): every tensor argument read (except `out=`; tensors changed in place are
    read and written) plus every tensor written, whole for dense ops; for gathers and scatters the index and the
    moved entries; nothing for views and uninitialised allocations. An estimate: e.g. `copy_` counts its
    destination as read. Like every dispatch mode it sees only its own thread: count single-threaded code."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.bytes = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        self.bytes += _bytes_touched(func, name, args, kwargs or {}, out)
        return out


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def _bytes_touched(func: Any, name: str, args: tuple, kwargs: dict, out: Any) -> int:
    schema = func._schema
    if (
        any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        or name in _UNINITIALISED
    ):
        return 0  # a view, or memory handed out untouched
    given = dict(zip((a.name for a in schema.arguments), args)) | kwargs
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    inputs = [v for k, v in given.items() if k != "out"]  # tensors changed in place are read too
    if name in _GATHERS:
        return 2 * _nbytes(out) + sum(
            _nbytes(t) for t in tree_leaves(inputs[1:]) if isinstance(t, torch.Tensor)
        )
    if name in _SCATTERS:
        return 2 * sum(_nbytes(t) for t in tree_leaves(inputs[1:]) if isinstance(t, torch.Tensor))
    outputs = [given[k] for k in written] if written else out
    return _nbytes(inputs) + _nbytes(outputs)


def count_host_reads(run: Callable[[], Any]) -> list[str]:
    """The tensor-to-Python reads (a host-device sync each on an accelerator) hf_zsharp's code makes in `run()`."""
    reads: list[str] = []
    package = f"{os.sep}hf_zsharp{os.sep}"
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counted(name: str) -> Callable:
        def read(self: torch.Tensor, *args: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if package in caller:
                reads.append(name)
            return originals[name](self, *args)

        return read

    try:
        for name in names:
            setattr(torch.Tensor, name, counted(name))
        run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return reads


def held_bytes(optimizer: Any, params: list[torch.nn.Parameter]) -> int:
    """Bytes of every tensor storage reachable from `optimizer` (attributes, state) that is neither a parameter nor
    a gradient: what it holds, e.g. between `first_step` and `second_step`."""
    excluded = {t.untyped_storage().data_ptr() for p in params for t in (p, p.grad) if t is not None}
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = [optimizer]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in excluded and obj.numel() > 0:
                found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
            stack.extend(vars(obj).values())
    return sum(found.values())


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that host clocks time it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (e.g. "VmRSS", "VmHWM") in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory_reset(device: torch.device) -> int:
    """Reset the peak-memory mark; returns the current bytes (CUDA: allocated; CPU: resident)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_rss()
    return process_status_bytes("VmRSS")


def peak_memory(device: torch.device) -> int:
    """The peak bytes since `peak_memory_reset` (CUDA: allocated; CPU: resident)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else process_status_bytes("VmHWM")


def timm_params(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[torch.nn.Parameter]:
    """The parameters of timm model `name` (random init, no download) with standard normal gradients."""
    import timm

    torch.manual_seed(seed)
    params = list(timm.create_model(name, pretrained=False).to(device=device, dtype=dtype).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


class SyntheticImages(torch.utils.data.Dataset):
    """`count` random normal images (3 x size x size) and labels, fixed seed, on `device`, one example per index."""

    def __init__(
        self, count: int, size: int = 32, num_labels: int = 10, device: torch.device | str = "cpu"
    ) -> None:
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(count, 3, size, size, generator=generator).to(device)
        self.labels = torch.randint(num_labels, (count,), generator=generator).to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {PIXELS: self.pixels[i], LABELS: self.labels[i]}


class SyntheticBatches(SyntheticImages):
    """`SyntheticImages` fetched a whole batch at a time (`__getitems__`, as `CachedImages`), for
    `hf_zsharp.image_data.collate_fn`: synthetic data that costs the step almost nothing."""

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices, device=self.labels.device) % len(self.labels)
        return [{PIXELS: self.pixels[index], LABELS: self.labels[index]}]


@contextlib.contextmanager
def accelerator_code_path() -> Iterator[None]:
    """Run ZSharp's accelerator code path on any device (batched `topk` selection, no CPU prefilter): how the op
    counts of a GPU step are measured on CPU tensors."""
    from hf_zsharp.optim import selection

    row_by_row = selection.row_by_row
    selection.row_by_row = lambda device: False
    try:
        yield
    finally:
        selection.row_by_row = row_by_row


CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Tiny-ImageNet's labels are 200 WordNet ids; these stand-ins have the same form.
TINY_IMAGENET_LABELS = [f"n{1443537 + 1000 * i:08d}" for i in range(200)]

CIFAR10_FEATURES = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_LABELS)})
TINY_IMAGENET_FEATURES = Features({"image": Image(), "label": ClassLabel(names=TINY_IMAGENET_LABELS)})

CORRUPT_IMAGE_BYTES = b"this is not an image"


def class_image(label: int, size: int, rng: np.random.Generator, mode: str = "RGB") -> PIL.Image.Image:
    """A noisy image whose mean colour depends on the label, so that a model can learn something in a few steps."""
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256], dtype=np.float64)
    pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    image = PIL.Image.fromarray(pixels)
    return image if mode == "RGB" else image.convert(mode)


def encode(image: PIL.Image.Image, fmt: str) -> bytes:
    """The image's file bytes in format `fmt` (e.g. "PNG", "JPEG")."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def cycled_labels(num_examples: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    """The first classes in turn, shuffled: every split holds several examples of each class used."""
    return [int(i % num_classes) for i in rng.permutation(num_examples)]


def cifar10_split(num_examples: int, seed: int = 0, corrupt: int = 0) -> Dataset:
    """A CIFAR-10 split (PNG-encoded 32x32 RGB images, 10 classes); the first `corrupt` images are undecodable."""
    rng = np.random.default_rng(seed)
    labels = cycled_labels(num_examples, 10, rng)
    images = [{"bytes": encode(class_image(y, 32, rng), "PNG"), "path": None} for y in labels]
    for i in range(corrupt):
        images[i] = {"bytes": CORRUPT_IMAGE_BYTES, "path": f"corrupt_{i}.png"}
    return Dataset.from_dict({"img": images, "label": labels}, features=CIFAR10_FEATURES)


def tiny_imagenet_split(
    num_examples: int, seed: int = 0, num_classes: int = 10, greyscale_every: int = 4
) -> Dataset:
    """A Tiny-ImageNet split: 64x64 JPEGs, every `greyscale_every`-th one greyscale (mode "L"), as on the Hub."""
    rng = np.random.default_rng(seed)
    labels = cycled_labels(num_examples, num_classes, rng)
    images = []
    for i, y in enumerate(labels):
        mode = "L" if i % greyscale_every == 0 else "RGB"
        images.append({"bytes": encode(class_image(y, 64, rng, mode), "JPEG"), "path": None})
    return Dataset.from_dict({"image": images, "label": labels}, features=TINY_IMAGENET_FEATURES)


def _readme(config_name: str, files: dict[str, str]) -> str:
    lines = ["---", "configs:", f"- config_name: {config_name}", "  data_files:"]
    for split, pattern in files.items():
        lines += [f"  - split: {split}", f"    path: {pattern}"]
    lines += ["  default: true", "---", ""]
    return "\n".join(lines)


def write_hub_layout(
    root: Path, config_name: str, folder: str, splits: dict[str, Dataset], suffix: str = ""
) -> Path:
    """Write `splits` as `<root>/<folder>/<split>-00000-of-00001<suffix>.parquet` plus the Hub README's configs,
    so that `datasets.load_dataset(<root>)` reads them as it reads the Hub repository."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    for split, dataset in splits.items():
        dataset.to_parquet(str(root / folder / f"{split}-00000-of-00001{suffix}.parquet"))
    files = {split: f"{folder}/{split}-*" for split in splits}
    (root / "README.md").write_text(_readme(config_name, files))
    return root
