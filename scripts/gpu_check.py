"""The GPU figures BENCHMARKS.md lacks, in one run (a few minutes on one GPU; the goal is under 8):

0. two-pass step (issue 19): for CIFAR ResNet-56 at batch 128 and ViT-B/16 at batch 64, bf16 autocast, with
   `torch.optim.AdamW(fused=True)` (alone, and as the base of SAM and ZSharp): the step time (CUDA events), the
   optimizer's share of it (its own events around `step` / `first_step` + `second_step`), the kernels per step
   and per optimizer part (profiler), the peak memory and the host syncs per step (hf_zsharp's tensor-to-host
   reads, and on CUDA every sync torch's sync debug mode reports). BENCHMARKS.md predicts these from op counts;
   this run tests the prediction;
1. ascent: the median time of ZSharp's and SAM's `first_step` on the parameter sets of ViT-B/16 and
   ResNet-50 (timm, random init and gradients), fp32 and bf16; goal ZSharp <= 1.5x SAM;
2. memory: what each optimizer holds between `first_step` and `second_step` (tensors reachable from it) and,
   on CUDA, the allocator's peak during `first_step`, as multiples of the parameter bytes, on a base SGD that
   keeps no state; goal ZSharp <= 0.15x more than the base optimizer, SAM 1x;
3. trainer: `ZSharpTrainer` steps/s, bf16, on a ViT-B/16-sized transformers ViT (random init, synthetic
   224 px batches): zsharp and sam against AdamW alone (`sam="none"`);
4. data: images/s of the cached data path on the device: uint8 batches gathered from memory, copied to the
   device and augmented there (`hf_zsharp.augment.BatchAugment`): the paper's 32 px crop, and
   RandomResizedCrop from 32 px to 224 px (a ViT fine-tune).

Prints Markdown tables (and writes them as JSON with --json); exits non-zero if any figure is missing.

    python scripts/gpu_check.py                                   # on cuda
    python scripts/gpu_check.py --device cpu --small              # the CPU test's settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from functools import partial

import torch
from benchmarking import (
    SyntheticBatches,
    count_host_reads,
    held_bytes,
    synchronize,
    timm_params,
)
from transformers import TrainerCallback

from hf_zsharp import SAM, ZSharp
from hf_zsharp.args import ZSharpTrainingArguments
from hf_zsharp.augment import BatchAugment
from hf_zsharp.image_data import CachedImages, collate_fn
from hf_zsharp.models import build_model
from hf_zsharp.trainer import ZSharpTrainer

ASCENT_GOAL, MEMORY_GOAL = 1.5, 0.15
OPTIMIZERS = {"zsharp": ZSharp, "sam": SAM}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


STEP_METHODS = ("adamw", "sam", "zsharp")


def step_models(small: bool) -> list[tuple[str, torch.nn.Module, int, int]]:
    """(name, model, batch, image size): CIFAR ResNet-56 at batch 128 and ViT-B/16 at batch 64 (--small: tiny)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if small:
        vit = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, num_labels=10)  # fmt: skip
        return [
            ("resnet20", build_model("resnet20", 10), 8, 32),
            ("vit_tiny", ViTForImageClassification(vit), 8, 32),
        ]
    vit = ViTConfig(num_labels=10)  # ViT-B/16: 224 px, 12 layers of width 768
    return [
        ("resnet56", build_model("resnet56", 10), 128, 32),
        ("vit_b16", ViTForImageClassification(vit), 64, 224),
    ]


class Timer:
    """Elapsed ms between two marks: CUDA events on CUDA (no sync inside the step), the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> object:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: object, end: object) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end)
        return (end - start) * 1e3


def two_pass_step(model, optimizer, method: str, batch: dict, device: torch.device, timer: Timer) -> tuple:
    """One optimizer step (two passes for SAM and ZSharp) in bf16 autocast; the marks around it and its optimizer."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    start = timer.mark()
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    if method == "adamw":
        opt_start = timer.mark()
        optimizer.step()
        opt_end = timer.mark()
        optimizer.zero_grad(set_to_none=True)
        return start, opt_start, opt_end, opt_end
    opt_start = timer.mark()
    optimizer.first_step(zero_grad=True)
    opt_mid = timer.mark()
    with autocast:
        model(**batch).loss.backward()
    opt_resume = timer.mark()
    optimizer.second_step(zero_grad=True)
    end = timer.mark()
    return start, opt_start, end, (opt_mid, opt_resume)


def kernels_in(profile) -> int:
    """Device kernels in a profile (CUDA); on the CPU, the top-level aten ops (each would be a kernel on a GPU)."""
    events = profile.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:
        return len(kernels)
    return sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def check_two_pass(device: torch.device, small: bool, steps: int) -> list[dict]:
    """Step ms, the optimizer's share, kernels per step and per optimizer part, peak memory and host syncs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = []
    for name, model, batch_size, size in step_models(small):
        model.to(device)
        generator = torch.Generator().manual_seed(0)
        batch = {
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(device),
            "labels": torch.randint(10, (batch_size,), generator=generator).to(device),
        }
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        for method in STEP_METHODS:
            model.load_state_dict(initial)
            kwargs = {"lr": 1e-4, "fused": True}
            optimizer = (
                torch.optim.AdamW(model.parameters(), **kwargs)
                if method == "adamw"
                else {"sam": SAM, "zsharp": ZSharp}[method](model.parameters(), torch.optim.AdamW, **kwargs)
            )
            timer = Timer(device)
            for _ in range(3):  # warm-up: allocator, cuDNN choices, optimizer state
                two_pass_step(model, optimizer, method, batch, device, timer)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step_ms, opt_ms = [], []
            for _ in range(steps):
                start, opt_start, end, middle = two_pass_step(model, optimizer, method, batch, device, timer)
                step_ms.append(timer.ms(start, end))
                if method == "adamw":
                    opt_ms.append(timer.ms(opt_start, middle))
                else:  # first_step, and second_step after the second pass
                    opt_ms.append(timer.ms(opt_start, middle[0]) + timer.ms(middle[1], end))
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            synchronize(device)
            with profile(activities=activities) as whole:
                two_pass_step(model, optimizer, method, batch, device, timer)
                synchronize(device)
            step = partial(two_pass_step, model, optimizer, method, batch, device, timer)
            reads, syncs = host_syncs(step, device)
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "step_ms": statistics.median(step_ms),
                    "optimizer_ms": statistics.median(opt_ms),
                    "optimizer_share": statistics.median(opt_ms) / statistics.median(step_ms),
                    "kernels_per_step": kernels_in(whole),
                    "optimizer_kernels": optimizer_kernels(
                        model, optimizer, method, batch, device, activities
                    ),
                    "peak_GiB": peak if device.type == "cuda" else 0.0,
                    "host_reads": reads,
                    "cuda_syncs": syncs,
                }
            )
            del optimizer
        model.cpu()
    return rows


def optimizer_kernels(
    model, optimizer, method: str, batch: dict, device: torch.device, activities: list
) -> int:
    """Kernels of the optimizer part of one step alone (`step`, or `first_step` + `second_step`)."""
    from torch.profiler import profile

    with torch.autocast(device.type, dtype=torch.bfloat16):
        model(**batch).loss.backward()
    synchronize(device)
    with profile(activities=activities) as part:
        if method == "adamw":
            optimizer.step()
        else:
            optimizer.first_step()
            optimizer.second_step()
        synchronize(device)
    optimizer.zero_grad(set_to_none=True)
    return kernels_in(part)


def host_syncs(step, device: torch.device) -> tuple[int, int | None]:
    """hf_zsharp's tensor-to-host reads in `step()`, and on CUDA every sync the sync debug mode warns about."""
    if device.type != "cuda":
        return len(count_host_reads(step)), 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reads = count_host_reads(step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return len(reads), sum("synchroniz" in str(w.message) for w in caught)


def check_ascent(models: list[str], device: torch.device, repeats: int) -> list[dict]:
    """Median `first_step` ms of ZSharp and SAM (interleaved), and their memory, per model and dtype."""
    rows = []
    for model in models:
        for dtype_name, dtype in DTYPES.items():
            params = timm_params(model, device, dtype)
            param_bytes = sum(p.numel() * p.element_size() for p in params)
            optimizers = {
                name: cls(params, base_optimizer=torch.optim.SGD, lr=0.1) for name, cls in OPTIMIZERS.items()
            }
            times: dict[str, list[float]] = {name: [] for name in optimizers}
            memory = {}
            for repeat in range(repeats + 1):
                for name, optimizer in optimizers.items():
                    synchronize(device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                    start = time.perf_counter()
                    optimizer.first_step()
                    synchronize(device)
                    if repeat:  # the first round warms up
                        times[name].append(time.perf_counter() - start)
                    if repeat == 1:
                        peak = (
                            torch.cuda.max_memory_allocated(device) - before
                            if device.type == "cuda"
                            else None
                        )
                        memory[name] = (
                            held_bytes(optimizer, params) / param_bytes,
                            peak and peak / param_bytes,
                        )
                    optimizer.restore()
            zsharp, sam = (statistics.median(times[name]) * 1e3 for name in ("zsharp", "sam"))
            rows.append(
                {
                    "model": model,
                    "dtype": dtype_name,
                    "params_M": sum(p.numel() for p in params) / 1e6,
                    "zsharp_ms": zsharp,
                    "sam_ms": sam,
                    "zsharp_over_sam": zsharp / sam,
                    "zsharp_held": memory["zsharp"][0],
                    "sam_held": memory["sam"][0],
                    "zsharp_peak": memory["zsharp"][1],
                    "sam_peak": memory["sam"][1],
                }
            )
            del params, optimizers
    return rows


class Clock(TrainerCallback):
    """The time at the end of every optimizer step (after the device finished it)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def on_step_end(self, *_, **__) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())


def check_trainer(device: torch.device, small: bool, batch: int, steps: int, warmup: int) -> list[dict]:
    """Steps/s of ZSharpTrainer with sam none (AdamW), sam and zsharp on a ViT-B/16-sized model, bf16 on CUDA."""
    from transformers import ViTConfig, ViTForImageClassification

    config = (
        ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, num_labels=10)
        if small
        else ViTConfig(num_labels=10)  # ViT-B/16: 224 px, 12 layers of width 768
    )  # fmt: skip
    rows = []
    for sam in ("none", "sam", "zsharp"):
        torch.manual_seed(0)
        model = ViTForImageClassification(config)
        args = ZSharpTrainingArguments(
            output_dir="/tmp/gpu_check_trainer",
            sam=sam,
            per_device_train_batch_size=batch,
            max_steps=warmup + steps,
            bf16=device.type == "cuda",
            dataloader_pin_memory=False,  # the batch is on the device already
            use_cpu=device.type == "cpu",
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
        )
        dataset = SyntheticBatches(batch, config.image_size, device=device)
        trainer = ZSharpTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_fn)
        clock = Clock(device)
        trainer.add_callback(clock)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
        images_per_s = steps * batch / (clock.times[-1] - clock.times[warmup - 1])
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"sam": sam, "images_per_s": images_per_s, "peak_GiB": peak})
        del trainer, model
    adamw = rows[0]["images_per_s"]
    for row in rows:
        row["vs_adamw"] = row["images_per_s"] / adamw
    return rows


def check_data(device: torch.device, count: int, steps: int) -> list[dict]:
    """Images/s of uint8 batches gathered from memory, moved to the device and augmented there."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    cached = CachedImages(images, torch.zeros(count, dtype=torch.long))
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    rows = []
    for name, augment, batch in (
        ("paper crop 32 px", BatchAugment(mean, std), 256),
        ("RandomResizedCrop 32 -> 224 px", BatchAugment(mean, std, crop=(224, 224)), 64),
    ):
        loader = torch.utils.data.DataLoader(
            cached, batch_size=batch, shuffle=True, collate_fn=collate_fn, pin_memory=device.type == "cuda"
        )
        augment.train()
        done, start = 0, None
        while done < steps + 3:
            for step in loader:
                augment(step["pixel_values"].to(device, non_blocking=True))
                done += 1
                if done == 3:  # warmed up
                    synchronize(device)
                    start = time.perf_counter()
                if done == steps + 3:
                    break
        synchronize(device)
        rows.append(
            {"path": name, "batch": batch, "images_per_s": steps * batch / (time.perf_counter() - start)}
        )
    return rows


def markdown(title: str, rows: list[dict]) -> str:
    def cell(value: object) -> str:
        return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = [f"\n### {title}\n", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small models and few steps (the CPU test)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the four checks; print them as Markdown with the goals, and return them."""
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"{name}; torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs")
    models = ["test_vit", "test_resnet"] if args.small else ["vit_base_patch16_224", "resnet50"]
    start = time.perf_counter()
    results = {
        "two_pass": check_two_pass(device, args.small, 3 if args.small else 20),
        "ascent": check_ascent(models, device, repeats=2 if args.small else 10),
        "trainer": check_trainer(device, args.small, 8 if args.small else 64, 2 if args.small else 20, 2),
        "data": check_data(device, 512 if args.small else 20_000, 2 if args.small else 50),
    }
    print(markdown("Two-pass step, bf16 autocast, AdamW(fused=True) base", results["two_pass"]))
    print(
        markdown(
            "Ascent (first_step) and held / peak memory as multiples of the parameter bytes",
            results["ascent"],
        )
    )
    worst = max(row["zsharp_over_sam"] for row in results["ascent"])
    held = max(row["zsharp_held"] for row in results["ascent"])
    print(f"\n- ZSharp / SAM ascent time: worst {worst:.2f}; goal <= {ASCENT_GOAL}: {worst <= ASCENT_GOAL}")
    print(
        f"- ZSharp holds at most {held:.3f}x the parameter bytes; goal <= {MEMORY_GOAL}: {held <= MEMORY_GOAL}"
    )
    print(markdown("ZSharpTrainer throughput (ViT-B/16-sized, synthetic data)", results["trainer"]))
    print(markdown("Data path on the device", results["data"]))
    print(f"\nTotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=1)
    missing = [
        f"{section}: {key}"
        for section, rows in results.items()
        for row in rows
        for key, v in row.items()
        if v is None
    ]
    missing = [
        m for m in missing if device.type == "cuda" or "peak" not in m
    ]  # the CPU has no allocator peak
    if missing:
        print(f"\nMissing figures: {', '.join(sorted(set(missing)))}", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
