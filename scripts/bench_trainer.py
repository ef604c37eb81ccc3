"""Throughput and peak memory of ZSharpTrainer against a stock Trainer + AdamW, on synthetic 32x32 images.

Each (model, configuration) trains in a fresh process, `--rounds` times interleaved: `Trainer`+AdamW,
`ZSharpTrainer` with sam=sam, sam=zsharp, and sam=zsharp with sam_interval=5. Throughput is the median samples/s of several timed windows
of optimizer steps after a warm-up; peak memory is the growth of the peak RSS (CPU) or the peak of
`torch.cuda.max_memory_allocated` (GPU) from just before the model is built. The ratios are checked against
the targets in `TARGETS`.

    python scripts/bench_trainer.py                        # CPU fp32, plus CUDA bf16 when available
    python scripts/bench_trainer.py --models resnet20 --devices cpu --threads 1 --rounds 3
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from benchmarking import SyntheticImages, process_status_bytes, reset_peak_rss

CONFIGS = {
    "adamw": {},
    "sam": {"sam": "sam"},
    "zsharp": {"sam": "zsharp"},
    "zsharp_interval5": {"sam": "zsharp", "sam_interval": 5},
}
# Issue 3's targets: (numerator, denominator, minimum throughput ratio).
TARGETS = [("zsharp", "sam", 0.97), ("zsharp", "adamw", 0.48), ("zsharp_interval5", "adamw", 0.80)]
MEMORY_TARGET = 0.15  # zsharp's peak <= AdamW's + 0.15 x parameter bytes


def run_one(
    model_name: str, config: str, device: str, batch_size: int, warmup: int, window: int, windows: int
) -> dict:
    """Train one configuration in this process and return its throughput windows and peak memory."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_zsharp.args import ZSharpTrainingArguments
    from hf_zsharp.models import build_model
    from hf_zsharp.trainer import ZSharpTrainer

    cuda = device == "cuda"
    steps = warmup + window * windows
    dataset = SyntheticImages(steps * batch_size)
    common = {
        "output_dir": "/tmp/bench_trainer",
        "per_device_train_batch_size": batch_size,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 10**6,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": not cuda,
        "bf16": cuda,
        "seed": 0,
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base_memory = process_status_bytes("VmRSS")
    model = build_model(model_name, num_labels=10)
    n_params = sum(p.numel() for p in model.parameters())
    if config == "adamw":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset)
    else:
        args = ZSharpTrainingArguments(**common, **CONFIGS[config])
        trainer = ZSharpTrainer(model=model, args=args, train_dataset=dataset)

    times: list[float] = []
    cpu_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            cpu_times.append(time.process_time())

    trainer.add_callback(Clock())
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else process_status_bytes("VmHWM")

    def median_rate(clock: list[float]) -> float:
        ends = [clock[warmup - 1 + i * window] for i in range(windows + 1)]
        return statistics.median(window * batch_size / (b - a) for a, b in zip(ends, ends[1:]))

    return {
        "samples_per_s": median_rate(times),
        "samples_per_cpu_s": median_rate(cpu_times),
        "peak_growth_bytes": peak - base_memory,
        "param_bytes": n_params * 4,
        "params": n_params,
    }


def run_isolated(model_name: str, config: str, device: str, args: argparse.Namespace) -> dict:
    """`run_one` in a fresh Python process, so that no configuration inherits another's allocations."""
    cmd = [sys.executable, __file__, "--child", model_name, config, device]
    cmd += ["--batch_size", str(args.batch_size), "--warmup", str(args.warmup)]
    cmd += ["--window", str(args.window), "--windows", str(args.windows)]
    cmd += [] if args.threads is None else ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{model_name}/{config}/{device} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_rounds(model_name: str, device: str, args: argparse.Namespace) -> dict[str, dict]:
    """Each configuration `args.rounds` times, the order rotating every round; per figure, the median of rounds.

    On a shared machine the other jobs' load drifts over minutes: interleaving the configurations spreads it.
    """
    configs = list(CONFIGS)
    runs: dict[str, list[dict]] = {config: [] for config in configs}
    for r in range(args.rounds):
        for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
            runs[config].append(run_isolated(model_name, config, device, args))
    return {
        config: {key: statistics.median(run[key] for run in rounds) for key in rounds[0]}
        for config, rounds in runs.items()
    }


def report(results: dict, model_name: str, device: str) -> list[str]:
    """Markdown rows for one model and device, and the target checks.

    On the CPU, throughput per CPU-second of the process is shown too: on a shared machine it is much less
    disturbed by other processes than wall-clock throughput.
    """
    adamw = results["adamw"]
    keys = [("samples_per_s", "samples/s")] + (
        [("samples_per_cpu_s", "samples/CPU-s")] if device == "cpu" else []
    )
    header = " | ".join(f"{name} | vs AdamW" for _, name in keys)
    lines = [
        f"\n### {model_name} on {device}, {'bf16' if device == 'cuda' else 'fp32'} "
        f"({adamw['params'] / 1e6:.2f} M parameters)\n",
        f"| configuration | {header} | peak memory growth (MiB) |",
        "|---|" + "---|---|" * len(keys) + "---|",
    ]
    for config, r in results.items():
        cells = " | ".join(f"{r[key]:.1f} | {r[key] / adamw[key]:.3f}" for key, _ in keys)
        lines.append(f"| {config} | {cells} | {r['peak_growth_bytes'] / 2**20:.1f} |")
    lines.append("")
    for num, den, target in TARGETS:
        ratios = ", ".join(f"{results[num][key] / results[den][key]:.3f} ({name})" for key, name in keys)
        lines.append(f"- {num}/{den} throughput: {ratios}; target >= {target}")
    extra = (results["zsharp"]["peak_growth_bytes"] - adamw["peak_growth_bytes"]) / adamw["param_bytes"]
    lines.append(f"- zsharp peak memory - AdamW's = {extra:.3f} x parameter bytes; target <= {MEMORY_TARGET}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["resnet20", "vit-paper"], help="hf_zsharp.models names"
    )
    parser.add_argument(
        "--devices", nargs="+", default=None, choices=["cpu", "cuda"], help="default: cpu (+cuda)"
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing")
    parser.add_argument(
        "--window",
        type=int,
        default=5,
        help="optimizer steps per timed window (a multiple of 5, the interval)",
    )
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every configuration, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "CONFIG", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "warmup", "window", "windows", "threads", "rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.window % 5:
        parser.error(
            "--window must be a multiple of 5: each window of zsharp_interval5 then has one two-pass step"
        )
    if args.devices is not None and "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        model_name, config, device = args.child
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        print(
            json.dumps(
                run_one(model_name, config, device, args.batch_size, args.warmup, args.window, args.windows)
            )
        )
        return
    import transformers

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}"
        + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else "")
    )
    print(f"torch CPU threads: {args.threads or torch.get_num_threads()}")
    print(f"command: python scripts/bench_trainer.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    for device in devices:
        for model_name in args.models:
            results = run_rounds(model_name, device, args)
            print("\n".join(report(results, model_name, device)))


if __name__ == "__main__":
    main()
