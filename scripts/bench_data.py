"""Images/s of the training data path, alone and end to end: old (each image decoded and transformed in DataLoader
workers, `hf_zsharp.image_data.with_image_transforms`, the streaming path) against new (decoded once into uint8
tensors and augmented per batch inside the model, `hf_zsharp.image_data` + `hf_zsharp.augment`).

Schemas, generated once into --data_dir with the Hub schemas of `scripts/benchmarking.py`: `cifar-paper` (32x32
PNG, the paper recipe), `cifar-processor` (32x32 PNG through a 224x224 ViT image processor: RandomResizedCrop)
and `tiny-imagenet` (64x64 JPEG, a quarter greyscale, the paper recipe at 64). Measures: `data` (the
DataLoader, plus the batch augmentation for new, on --device), `e2e` (a `ZSharpTrainer` training a tiny CNN
on it) and `model` (the same Trainer on preprocessed batches already in memory: the ceiling). Every run is a
fresh process; the rounds alternate old and new, and each figure is the median of the rounds.

    python scripts/bench_data.py --rounds 3
    python scripts/bench_data.py --schemas cifar-paper --measures data --device cuda --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchmarking import SyntheticBatches, cifar10_split, tiny_imagenet_split, write_hub_layout
from torch import nn

SCHEMAS = ("cifar-paper", "cifar-processor", "tiny-imagenet")
MEASURES = ("data", "e2e", "model")
PATHS = ("old", "new")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class TinyCNN(nn.Module):
    """A 4x4 patch embedding, global average pooling and a linear classifier: a model whose own step is cheap
    enough that the data path decides the throughput."""

    def __init__(self, num_labels: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 4, stride=4)
        self.head = nn.Linear(width, num_labels)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(torch.relu(self.conv(pixel_values)).mean(dim=(2, 3)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def write_data(root: Path, schema: str, count: int) -> Path:
    """The schema's dataset with `count` training and count / 5 test images, written once."""
    folder = root / f"{schema.split('-')[0]}-{count}"
    if (folder / "README.md").is_file():
        return folder
    if schema == "tiny-imagenet":
        splits = {"train": tiny_imagenet_split(count, 0), "valid": tiny_imagenet_split(count // 5, 1)}
        return write_hub_layout(folder, "default", "data", splits)
    splits = {"train": cifar10_split(count, 0), "test": cifar10_split(count // 5, 1)}
    return write_hub_layout(folder, "plain_text", "plain_text", splits)


def training_data(schema: str, path: str, folder: Path, cache_dir: str):
    """(train dataset, collator, batch augmentation or None) of the old or new path for a schema."""
    from transformers import ViTImageProcessor

    from hf_zsharp.data import load_image_dataset
    from hf_zsharp.image_data import (
        collate_fn,
        paper_image_data,
        paper_transforms,
        processor_image_data,
        processor_transforms,
    )
    from hf_zsharp.image_data import with_image_transforms as streamed

    dataset = load_image_dataset(str(folder), cache_dir=cache_dir)
    size = 64 if schema == "tiny-imagenet" else 32
    processor = ViTImageProcessor() if schema == "cifar-processor" else None  # 224 x 224
    if path == "old":
        transforms = processor_transforms(processor) if processor else paper_transforms(MEAN, STD, size)
        return streamed(dataset, *transforms)["train"], collate_fn, None
    data = (
        processor_image_data(dataset, processor) if processor else paper_image_data(dataset, MEAN, STD, size)
    )
    assert data.augment is not None, "the new path did not cache the training split"
    return data.train, data.collator, data.augment.train()


def measure_data(train, collator, augment, args: argparse.Namespace) -> float:
    """Images/s of DataLoader batches moved to the device (and augmented there on the new path)."""
    device = torch.device(args.device)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collator,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0,
    )

    def batches():
        while True:
            yield from loader

    stream = batches()
    for _ in range(args.warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(args.steps):
        pixels = next(stream)["pixel_values"].to(device, non_blocking=True)
        if augment is not None:
            pixels = augment(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def measure_training(train, collator, augment, args: argparse.Namespace) -> float:
    """Images/s of `ZSharpTrainer` steps (after the warm-up steps) on a `TinyCNN`."""
    from transformers import TrainerCallback

    from hf_zsharp.args import ZSharpTrainingArguments
    from hf_zsharp.augment import augment_inputs
    from hf_zsharp.trainer import ZSharpTrainer

    torch.manual_seed(0)
    model = TinyCNN()
    if augment is not None:
        augment_inputs(model, augment)
    training_args = ZSharpTrainingArguments(
        output_dir="/tmp/bench_data_trainer",
        sam=args.sam,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        dataloader_num_workers=args.num_workers,
        dataloader_persistent_workers=args.num_workers > 0,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
    )
    clock: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            if args.device != "cpu":
                torch.cuda.synchronize()
            clock.append(time.perf_counter())

    trainer = ZSharpTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
    trainer.add_callback(Clock())
    trainer.train()
    return args.steps * args.batch_size / (clock[-1] - clock[args.warmup - 1])


def run_child(schema: str, path: str, measure: str, args: argparse.Namespace) -> dict[str, float]:
    """One figure, in this process: images/s, and the seconds spent loading (and decoding) the data first."""
    from hf_zsharp.image_data import collate_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    args.num_workers = args.workers[0 if path == "old" else 1]
    start = time.perf_counter()
    if measure == "model":
        size = 224 if schema == "cifar-processor" else 64 if schema == "tiny-imagenet" else 32
        train, collator, augment = SyntheticBatches(min(args.images, 2048), size), collate_fn, None
    else:
        folder = write_data(Path(args.data_dir), schema, args.images)
        train, collator, augment = training_data(schema, path, folder, str(Path(args.data_dir) / "cache"))
    setup = time.perf_counter() - start
    measure_fn = measure_data if measure == "data" else measure_training
    return {"images_per_s": measure_fn(train, collator, augment, args), "setup_s": setup}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=SCHEMAS)
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--device", default="cpu", help="where batches are augmented and trained: cpu, cuda")
    parser.add_argument("--images", type=int, default=10000, help="training images generated per schema")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="default: 256 (64 for cifar-processor at 224 px)"
    )
    parser.add_argument(
        "--workers",
        nargs=2,
        type=int,
        default=[2, 0],
        metavar=("OLD", "NEW"),
        help="DataLoader worker processes of the old and the new path (the model measure: NEW)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="batches or steps before timing")
    parser.add_argument("--steps", type=int, default=40, help="timed batches or steps")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each figure, old and new alternating")
    parser.add_argument(
        "--sam", default="none", help="the e2e and model measures' method (none: plain steps)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data_dir", default="/tmp/hf_zsharp_bench_data")
    parser.add_argument("--child", nargs=3, metavar=("SCHEMA", "PATH", "MEASURE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_args(args: argparse.Namespace, schema: str) -> list[str]:
    """The options of a child run: this run's, with the schema's batch size."""
    batch = args.batch_size or (64 if schema == "cifar-processor" else 256)
    options = {"device": args.device, "images": args.images, "batch_size": batch, "warmup": args.warmup}
    options |= {"steps": args.steps, "sam": args.sam, "data_dir": args.data_dir, "threads": args.threads}
    flags = [f"--{name}={value}" for name, value in options.items() if value is not None]
    return [*flags, "--workers", *map(str, args.workers)]


def main(argv: list[str] | None = None) -> dict:
    """Run every (schema, measure, path) `--rounds` times, alternating; print and return the medians."""
    args = parse_args(argv)
    if args.child is not None:
        schema, path, measure = args.child
        args.batch_size = args.batch_size or (64 if schema == "cifar-processor" else 256)
        print(json.dumps(run_child(schema, path, measure, args)))
        return {}
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}, device {args.device}"
    )
    print(f"command: python scripts/bench_data.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    for schema in args.schemas:
        write_data(Path(args.data_dir), schema, args.images)
    results: dict[str, list[dict[str, float]]] = {}
    print("| schema | measure | path | images/s (median) | rounds | data set-up s (median) |")
    print("|---|---|---|---|---|---|")
    for schema in args.schemas:
        for measure in args.measures:
            paths = ["new"] if measure == "model" else args.paths  # the model measure: the new path's loader
            runs: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
            for r in range(args.rounds):
                for path in paths[r % len(paths) :] + paths[: r % len(paths)]:
                    child = ["--child", schema, path, measure, *child_args(args, schema)]
                    proc = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{schema}/{path}/{measure} failed:\n{proc.stderr[-4000:]}")
                    runs[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            for path, rounds in runs.items():
                rates = [run["images_per_s"] for run in rounds]
                setup = statistics.median(run["setup_s"] for run in rounds)
                shown = ", ".join(f"{rate:.0f}" for rate in rates)
                label = "-" if measure == "model" else path
                print(
                    f"| {schema} | {measure} | {label} | {statistics.median(rates):.0f} | {shown} | {setup:.1f} |"
                )
                results[f"{schema}/{measure}/{label}"] = rounds
    return results


if __name__ == "__main__":
    main()
