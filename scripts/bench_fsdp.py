"""Benchmark the sharpness-aware ascent under FSDP2 against the step's own FSDP traffic and one process.

Run under torchrun (gloo on the CPU, NCCL on GPUs). Each rank trains a timm model sharded with `fully_shard` (one
unit per block, then the root) on random images, two-pass steps with the chosen methods, and counts every
collective by phase: the ascent's (`first_step`), the second step's check, and FSDP's own (all-gathers and
reduce-scatters of both passes). Bytes are what a ring algorithm sends per rank: (w - 1) / w of an all-gather's
output or a reduce-scatter's input, twice that of an all-reduce's tensor. It also times `first_step` (median) and
the peak memory it adds on the rank, and, on rank 0 after the sharded runs, the same method's ascent on one
process holding the whole model (same gradients' shapes, random values).

    torchrun --nproc_per_node 2 scripts/bench_fsdp.py --model vit_small_patch16_224           # CPU, gloo
    torchrun --nproc_per_node 8 scripts/bench_fsdp.py --model vit_large_patch16_224 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from benchmarking import peak_memory, peak_memory_reset, synchronize
from torch.distributed.fsdp import fully_shard

from hf_zsharp import create_sam_optimizer

# The collectives counted, with the argument whose size a ring algorithm sends (w - 1) / w of per rank (twice
# for an all-reduce).
SIZED_BY = {"all_reduce": "tensor", "all_gather_single": "output_tensor", "reduce_scatter_single": "input"}
PHASE = {"name": "fsdp"}  # the phase the counted collectives belong to


def count_collectives(world: int) -> dict[str, dict[str, float]]:
    """Patch torch.distributed so that each collective adds its calls and ring bytes to the current phase."""
    totals: dict[str, dict[str, float]] = {}

    def counted(name, original):
        signature = inspect.signature(original)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            tensor = bound[SIZED_BY[name]]
            share = (world - 1) / world * (2 if name == "all_reduce" else 1)
            entry = totals.setdefault(PHASE["name"], {"calls": 0, "bytes": 0.0})
            entry["calls"] += 1
            entry["bytes"] += share * tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)

        return call

    for name in SIZED_BY:
        setattr(dist, name, counted(name, getattr(dist, name)))
    return totals


@contextlib.contextmanager
def phase(name: str):
    previous, PHASE["name"] = PHASE["name"], name
    try:
        yield
    finally:
        PHASE["name"] = previous


def build(args, device: torch.device, shard: bool) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    size = {"img_size": args.image_size} if args.model.startswith("vit") else {}  # ViTs: position embeddings
    model = timm.create_model(args.model, num_classes=100, **size).to(device)
    if shard:
        for block in getattr(model, "blocks", getattr(model, "layers", [])):
            fully_shard(block)
        fully_shard(model)
    return model


def batch(args, device: torch.device, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    return images.to(device), torch.randint(100, (args.batch,), generator=g).to(device)


def run_method(args, method: str, device: torch.device, totals: dict) -> dict:
    """Two-pass steps under FSDP2; per step the collectives and bytes by phase, the ascent's time and memory."""
    model = build(args, device, shard=True)
    optimizer = create_sam_optimizer(method, model.parameters(), torch.optim.SGD, lr=1e-3)
    times, memory = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            totals.clear()
        images, labels = batch(args, device, step)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        synchronize(device)
        before = peak_memory_reset(device)
        start = time.perf_counter()
        with phase("ascent"):
            optimizer.first_step(zero_grad=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
        memory.append(peak_memory(device) - before)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        with phase("second_step"):
            optimizer.second_step(zero_grad=True)
    per_step = {k: {kk: v / args.steps for kk, v in entry.items()} for k, entry in totals.items()}
    return {
        "method": method,
        "collectives": per_step,
        "ascent_ms": 1e3 * statistics.median(times[args.warmup :]),
        "ascent_peak_mb": max(memory[args.warmup :]) / 2**20,
        "param_mb_per_rank": sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


def one_process_ascent_ms(args, method: str, device: torch.device) -> float:
    """The method's ascent on one process holding the whole (unsharded) model, random gradients: median ms."""
    model = build(args, device, shard=False)
    params = list(model.parameters())
    optimizer = create_sam_optimizer(method, params, torch.optim.SGD, lr=1e-3)
    times = []
    for step in range(args.warmup + args.steps):
        g = torch.Generator(device).manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, device=device)
        synchronize(device)
        start = time.perf_counter()
        optimizer.first_step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        optimizer.restore()
    return 1e3 * statistics.median(times[args.warmup :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    parser.add_argument("--methods", nargs="+", default=["zsharp", "sam"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    parser.add_argument("--json", help="also write the results to this file (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    totals = count_collectives(world)
    results = [run_method(args, method, device, totals) for method in args.methods]
    dist.barrier()
    if rank == 0:
        for result in results:
            result["one_process_ascent_ms"] = one_process_ascent_ms(args, result["method"], device)
        print_table(args, world, device, results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "world": world, "results": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def print_table(args, world: int, device: torch.device, results: list[dict]) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {world} ranks on {name}, {args.model}, batch {args.batch}/rank, {args.threads} threads"
    )
    header = (
        "| method | ascent collectives | ascent MB/rank | 2nd-step collectives | FSDP collectives | FSDP MB/rank "
        "| ascent / FSDP bytes | ascent ms (sharded) | ascent ms (1 process) | ascent peak MB/rank | params MB/rank |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        c = r["collectives"]
        ascent, second, fsdp = (c.get(k, {"calls": 0, "bytes": 0}) for k in ("ascent", "second_step", "fsdp"))
        print(
            f"| {r['method']} | {ascent['calls']:.0f} | {ascent['bytes'] / 2**20:.3f} | {second['calls']:.0f} "
            f"| {fsdp['calls']:.0f} | {fsdp['bytes'] / 2**20:.1f} | {100 * ascent['bytes'] / fsdp['bytes']:.2f} % "
            f"| {r['ascent_ms']:.1f} | {r['one_process_ascent_ms']:.1f} | {r['ascent_peak_mb']:.1f} "
            f"| {r['param_mb_per_rank']:.1f} |"
        )


if __name__ == "__main__":
    main()
