"""Measuring helpers shared by scripts/ and the tests: aten op counts and bytes, device syncs, peak memory, timm
parameter sets with gradients, synthetic images.

An op counted by `OpCount` is one dispatch of an aten operator below autograd: on an accelerator at least one
kernel launch (~4-8 us of host time each), so a step's op count predicts its launch overhead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
            if package in caller and not caller.endswith("benchmarking.py"):
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
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class SyntheticBatches(SyntheticImages):
    """`SyntheticImages` fetched a whole batch at a time (`__getitems__`, as `CachedImages`), for
    `hf_zsharp.image_data.collate_fn`: synthetic data that costs the step almost nothing."""

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices, device=self.labels.device) % len(self.labels)
        return [{"pixel_values": self.pixels[index], "labels": self.labels[index]}]


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
