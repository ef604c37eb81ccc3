"""Benchmark the ascent step (first_step) of hf_zsharp's ZSharp and SAM against the paper's code style and the
per-tensor SAM most people use.

Ops: per two-pass step (`first_step` + `second_step`, `torch.optim.AdamW(fused=True)` as the base, ZSharp on its
accelerator code path) of SAM, ASAM, Friendly-SAM and ZSharp on timm ViT-B/16 and ResNet-50 parameter sets, the
aten ops (each a kernel launch on an accelerator) and the bytes they touch (`benchmarking.OpCount`, scripts/benchmarking.py).
Speed: median wall time of `first_step` on the parameter sets of timm models (random init, random
gradients); the restore runs outside the timed region. `yardstick` is the standard per-tensor SAM ascent (as
davda54/sam writes it, in our own words): a fixed reference that does not move when hf_zsharp's SAM gets faster. Second step: median wall time of `second_step`
(restore, non-finite gradient check, AdamW step) of SAM and ZSharp against the AdamW step alone and the
check alone, with AdamW's foreach and fused implementations; and the host reads (device syncs) each step
makes per method and base optimizer. Memory: on a ~50M-parameter stack of Linear
layers, the bytes an optimizer holds between first_step and second_step (tensors reachable from it that
appeared during first_step) and the process RSS growth around first_step (CPU, one fresh process per
method) or the CUDA allocator's growth and peak (GPU), each as a ratio to the parameters' bytes.

    python scripts/bench_optimizer.py                       # CPU, plus CUDA when available
    python scripts/bench_optimizer.py --models vit_small_patch16_224 --repeats 7 --device cpu
    python scripts/bench_optimizer.py --models vit_small_patch16_224 --skip-speed --skip-memory  # second step
    python scripts/bench_optimizer.py --skip-speed --skip-second-step --skip-memory                # ops only
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable

import torch
from benchmarking import (
    OpCount,
    accelerator_code_path,
    count_host_reads,
    held_bytes,
    process_status_bytes,
    reset_peak_rss,
    synchronize,
    timm_params,
)

from hf_zsharp import SAM, ZSharp, create_sam_optimizer
from hf_zsharp.optim.sam import non_finite

MODELS = ("resnet18", "vit_small_patch16_224", "vit_base_patch16_224")
OPS_MODELS = ("vit_base_patch16_224", "resnet50")
METHODS = ("zsharp", "sam", "yardstick", "naive")
# Speed runs use a steady-state glibc heap: freed blocks up to 32 MiB are reused rather than unmapped, as in
# a training loop after its first steps; otherwise fresh page faults land on whichever method runs first.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Base optimizers for the second step, in torch's default implementation (foreach on GPUs, a per-tensor loop on
# the CPU: the second step's check is read on the host) and the fused one (it skips on the device flag).
BASES = {
    "adamw": (torch.optim.AdamW, {}),
    "adamw-fused": (torch.optim.AdamW, {"fused": True}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "sgd-fused": (torch.optim.SGD, {"momentum": 0.9, "fused": True}),
}
SECOND_STEP_BASES = ("adamw", "adamw-fused")


class NaiveZSharp:
    """The paper's code style: per-tensor torch.quantile, a Python `if` per tensor, a full copy of every param."""

    def __init__(self, params: Iterable[torch.nn.Parameter], rho: float = 0.05, percentile: float = 0.95):
        self.params = list(params)
        self.rho, self.percentile = rho, percentile
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def first_step(self) -> None:
        grad_norm = torch.norm(
            torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2
        )
        for p in self.params:
            if p.grad is None:
                continue
            self.state[p] = {"old_p": p.data.clone()}
            g = p.grad
            if g.ndim > 1:
                # torch.quantile refuses half precision: the paper's code only ever ran in float32.
                g32 = g.float()
                z = (g32 - g32.mean()) / (g32.std() + 1e-12)
                threshold = torch.quantile(z.abs().flatten(), self.percentile)
                mask = (z.abs() > threshold).to(g32.dtype)
                filtered = g32 * mask
                norm = filtered.norm(p=2)
                # `if norm > 0` on a tensor: one host sync per tensor, as in the paper's code.
                e = self.rho * filtered / (norm + 1e-12) if norm > 0 else self.rho * g32 / (grad_norm + 1e-12)
            else:
                e = self.rho * g / (grad_norm + 1e-12)
            p.add_(e.to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in self.state.items():
            p.data.copy_(saved["old_p"])
        self.state.clear()


class PerTensorSAM:
    """The SAM ascent as most SAM code writes it (davda54/sam's `first_step`, in our words): the global norm from
    per-tensor norms, then for each weight a saved copy and an in-place add of rho * g / norm."""

    def __init__(self, params: Iterable[torch.nn.Parameter], rho: float = 0.05):
        self.params, self.rho = list(params), rho
        self.saved: dict[torch.nn.Parameter, torch.Tensor] = {}

    @torch.no_grad()
    def first_step(self) -> None:
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.saved[p] = p.data.clone()
            p.add_(p.grad * scale.to(p))

    @torch.no_grad()
    def restore(self) -> None:
        for p, old in self.saved.items():
            p.data.copy_(old)
        self.saved.clear()


def build_optimizer(method: str, params: list[torch.nn.Parameter]):
    if method == "zsharp":
        return ZSharp(params, base_optimizer=torch.optim.SGD, lr=0.1)
    if method == "sam":
        return SAM(params, base_optimizer=torch.optim.SGD, lr=0.1)
    if method == "yardstick":
        return PerTensorSAM(params)
    return NaiveZSharp(params)


def linear_stack_params(n_params: float, device: str, dtype: torch.dtype, width: int = 2048) -> list:
    """A stack of square Linear layers with about n_params parameters, with random gradients."""
    torch.manual_seed(0)
    depth = max(1, round(n_params / (width * width + width)))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(depth))).to(device, dtype)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def time_ascents(optimizers: dict, device: str, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each optimizer's first_step, the methods interleaved round by round so that a shared
    machine's changing load hits them alike; restore() runs outside the timed region."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for i in range(warmup + repeats):
        for name, optimizer in optimizers.items():
            synchronize(device)
            start = time.perf_counter()
            optimizer.first_step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            optimizer.restore()
            if i >= warmup:
                times[name].append(elapsed)
    return times


def time_second_steps(
    params: list[torch.nn.Parameter], base: str, device: str, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of the base optimizer's step alone, of the non-finite check alone, and of SAM's and ZSharp's
    `second_step` (restore + check + the same base step; their first_step untimed), interleaved by round."""
    base_cls, kwargs = BASES[base]
    kwargs = {"lr": 1e-6, **kwargs}
    optimizers = {
        "zsharp": ZSharp(params, base_cls, **kwargs),
        "sam": SAM(params, base_cls, **kwargs),
        "base": base_cls(params, **kwargs),
    }
    grads = [p.grad for p in params]
    times: dict[str, list[float]] = {name: [] for name in (*optimizers, "check")}
    for i in range(warmup + repeats):
        for name, optimizer in optimizers.items():
            if name != "base":
                optimizer.first_step()
            step = optimizer.step if name == "base" else optimizer.second_step
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
        start = time.perf_counter()
        non_finite(grads)
        synchronize(device)
        if i >= warmup:
            times["check"].append(time.perf_counter() - start)
    return times


def host_reads_per_step(method: str, base: str) -> tuple[int, int]:
    """Host reads of `first_step` and of `second_step`, after one warm-up step (fused SGD then has its buffers)."""
    params = linear_stack_params(2e5, "cpu", torch.float32, width=64)
    base_cls, kwargs = BASES[base]
    optimizer = create_sam_optimizer(method, params, base_cls, lr=1e-3, **kwargs)
    optimizer.first_step()
    optimizer.second_step()
    return len(count_host_reads(optimizer.first_step)), len(count_host_reads(optimizer.second_step))


def rss_bytes() -> int:
    """Resident set size after returning freed heap pages to the OS (glibc), so it counts live memory."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_of(method: str, n_params: float, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Held bytes, growth and peak growth across `first_step`: on the CPU the process RSS (run it in a fresh process,
    so that the allocator is not warmed by another method), on CUDA the allocator's counts."""
    cuda = device.startswith("cuda")
    params = linear_stack_params(n_params, device, dtype)
    optimizer = build_optimizer(method, params)
    # One untimed ascent + restore first: lazily created state and allocator caches are not counted as growth.
    optimizer.first_step()
    optimizer.restore()
    synchronize(device)
    before = torch.cuda.memory_allocated(device) if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    peak_known = cuda or reset_peak_rss()
    optimizer.first_step()
    held = held_bytes(optimizer, params)
    synchronize(device)
    if cuda:
        after, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    else:
        peak = process_status_bytes("VmHWM") if peak_known else float("nan")
        after = rss_bytes()
    optimizer.restore()
    return {
        "method": method,
        "n_params": sum(p.numel() for p in params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "held_bytes": held,
        "growth_bytes": after - before,
        "peak_growth_bytes": peak - before,
    }


def run_ops(models: list[str]) -> None:
    """Ops and bytes touched per two-pass step of each method on the accelerator code path (CPU tensors)."""
    print(
        "\n## Ops per two-pass step (first_step + second_step), AdamW(fused=True) base, accelerator code path"
    )
    print(
        f"{'model':22} {'tensors':>7} {'method':8} {'ops':>6} {'ops/tensor':>10} {'MB touched':>10} {'/ params':>8}"
    )
    for name in models:
        params = timm_params(name)
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        for method in ("sam", "asam", "fsam", "zsharp"):
            optimizer = create_sam_optimizer(method, params, torch.optim.AdamW, lr=1e-6, fused=True)
            with accelerator_code_path():
                for _ in range(2):  # the base optimizer's state, Friendly-SAM's momentum
                    optimizer.first_step()
                    optimizer.second_step()
                with OpCount() as count:
                    optimizer.first_step()
                    optimizer.second_step()
            print(
                f"{name:22} {len(params):7} {method:8} {count.total:6} {count.total / len(params):10.2f} "
                f"{count.bytes / 1e6:10.0f} {count.bytes / param_bytes:8.2f}",
                flush=True,
            )
        del params
        gc.collect()


def run_speed(
    models: list[str], devices: list[str], dtype: torch.dtype, repeats: int, warmup: int, methods: list[str]
) -> None:
    print(
        f"\n## Ascent step (first_step) in ms: median (min) of {repeats} after {warmup} warm-up, dtype {dtype}"
    )
    ratios = [("zsharp", "sam"), ("zsharp", "yardstick"), ("naive", "zsharp")]
    ratios = [(a, b) for a, b in ratios if a in methods and b in methods]
    print(
        f"{'device':6} {'model':22} {'params':>7} "
        + " ".join(f"{m:>15}" for m in methods)
        + " "
        + " ".join(f"{a + '/' + b:>16}" for a, b in ratios)
    )
    for device in devices:
        for name in models:
            params = timm_params(name, device, dtype)
            optimizers = {method: build_optimizer(method, params) for method in methods}
            times = time_ascents(optimizers, device, repeats, warmup)
            med = {m: 1e3 * statistics.median(t) for m, t in times.items()}
            low = {m: 1e3 * min(t) for m, t in times.items()}
            cells = " ".join(f"{f'{med[m]:.0f} ({low[m]:.0f})':>15}" for m in methods)
            n = sum(p.numel() for p in params)
            print(
                f"{device:6} {name:22} {n / 1e6:6.1f}M {cells} "
                + " ".join(f"{med[a] / med[b]:16.2f}" for a, b in ratios),
                flush=True,
            )
            del optimizers, params
            gc.collect()


def run_second_step(
    models: list[str], devices: list[str], dtype: torch.dtype, repeats: int, warmup: int
) -> None:
    print(f"\n## Second step in ms: median (min) of {repeats} after {warmup} warm-up, dtype {dtype}")
    print(
        f"{'device':6} {'model':22} {'base':12} {'base step':>12} {'check':>12} {'sam':>12} {'zsharp':>12} "
        f"{'sam-base':>9} {'zsharp-base':>11}"
    )
    for device in devices:
        for name in models:
            for base in SECOND_STEP_BASES:
                params = timm_params(name, device, dtype)
                times = time_second_steps(params, base, device, repeats, warmup)
                med = {m: 1e3 * statistics.median(t) for m, t in times.items()}
                low = {m: 1e3 * min(t) for m, t in times.items()}
                cells = " ".join(
                    f"{f'{med[m]:.1f} ({low[m]:.1f})':>12}" for m in ("base", "check", "sam", "zsharp")
                )
                print(
                    f"{device:6} {name:22} {base:12} {cells} {med['sam'] - med['base']:9.1f} "
                    f"{med['zsharp'] - med['base']:11.1f}",
                    flush=True,
                )
                del params, times
                gc.collect()
    print("\n## Host reads (host-device syncs on an accelerator) per step: first_step + second_step")
    print(f"{'method':8} " + " ".join(f"{base:>12}" for base in BASES))
    for method in ("zsharp", "sam", "asam", "fsam"):
        counts = [host_reads_per_step(method, base) for base in BASES]
        print(f"{method:8} " + " ".join(f"{f'{a} + {b}':>12}" for a, b in counts), flush=True)


def run_memory(devices: list[str], dtype_name: str, n_params: float) -> None:
    dtype = DTYPES[dtype_name]
    print(
        f"\n## Memory between first_step and second_step (~{n_params / 1e6:.0f}M-parameter Linear stack, {dtype})"
    )
    for device in devices:
        rows = []
        for method in ("zsharp", "sam", "naive"):
            if device == "cpu":
                child = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--memory-child",
                        method,
                        "--memory-params",
                        str(n_params),
                        "--dtype",
                        dtype_name,
                    ],
                    check=True,
                    capture_output=True,
                    # A fixed mmap threshold makes glibc hand every freed block >= 64 KiB back at once, so
                    # the peak RSS counts live temporaries rather than the allocator's cached free memory.
                    env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                    text=True,
                )
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            else:
                rows.append(memory_of(method, n_params, dtype, device))
                gc.collect()
                torch.cuda.empty_cache()
        growth_name = "RSS growth" if device == "cpu" else "allocated growth"
        header = f"{'device':6} {'method':8} {'param MB':>9} {'held MB':>8} {'held/param':>10} {growth_name + ' MB':>20} {'ratio':>6}"
        header += f" {'peak MB':>8} {'peak ratio':>10}"
        print(header)
        for row in rows:
            pb = row["param_bytes"]
            line = (
                f"{device:6} {row['method']:8} {pb / 2**20:9.1f} {row['held_bytes'] / 2**20:8.1f} "
                f"{row['held_bytes'] / pb:10.4f} {row['growth_bytes'] / 2**20:20.1f} {row['growth_bytes'] / pb:6.3f}"
            )
            line += f" {row['peak_growth_bytes'] / 2**20:8.1f} {row['peak_growth_bytes'] / pb:10.3f}"
            print(line, flush=True)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(line for line in f if line.startswith("model name")).split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats before timing")
    parser.add_argument(
        "--device", nargs="+", default=None, help="devices (default: cpu, plus cuda when available)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="parameter and gradient dtype"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--memory-params", type=float, default=50e6, help="size of the memory-test model")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods of the speed runs"
    )
    parser.add_argument(
        "--ops-models", nargs="+", default=list(OPS_MODELS), help="timm models of the op counts"
    )
    parser.add_argument("--skip-ops", action="store_true", help="no op counts")
    parser.add_argument("--skip-speed", action="store_true", help="no ascent-speed measurement")
    parser.add_argument("--skip-memory", action="store_true", help="no memory measurement")
    parser.add_argument("--skip-second-step", action="store_true", help="no second-step measurement")
    parser.add_argument("--memory-child", choices=("zsharp", "sam", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device is None:
        args.device = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in args.device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {device}: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_of(args.memory_child, args.memory_params, DTYPES[args.dtype])))
        return
    timed = not (args.skip_speed and args.skip_second_step)
    if timed and "cpu" in args.device and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **STEADY_MALLOC})
    import numpy
    import timm

    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
        f"timm {timm.__version__}, NumPy {numpy.__version__}, Python {platform.python_version()}; "
        f"threads {torch.get_num_threads()}, devices {args.device}"
    )
    if not args.skip_ops:
        run_ops(args.ops_models)
    if not args.skip_speed:
        run_speed(args.models, args.device, DTYPES[args.dtype], args.repeats, args.warmup, args.methods)
    if not args.skip_second_step:
        run_second_step(args.models, args.device, DTYPES[args.dtype], args.repeats, args.warmup)
    if not args.skip_memory:
        run_memory(args.device, args.dtype, args.memory_params)


if __name__ == "__main__":
    main()
