"""`hf-zsharp-reproduce`: the paper's optimizer comparison as one resumable command, with seeds and statistics.

A grid of methods x models x datasets x seeds runs one run after another through `hf_zsharp.run.run_training`
(the code behind `hf-zsharp-train`). Each run lives in `<output_dir>/<dataset>/<model>/<method>/seed-<n>` and
ends by writing `run.json` atomically; a folder with a `run.json` is a finished run and is not repeated, so a
crash loses at most the run in progress. After every run the results table (Markdown and CSV: mean ± std over
seeds, difference to SAM with a paired t-test, wall time, throughput, sharpness) and a figure are rewritten
from all finished runs under `output_dir`.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, set_seed

from hf_zsharp.models import PAPER_MODELS
from hf_zsharp.run import TrainingRun, parse_train_args, run_training

RUN_SUMMARY = "run.json"
BASELINE = "sam"

# The training flags of each method, with the paper's hyper-parameters. ASAM's eta (0.01) and Friendly-SAM's
# sigma (1) and lambda (0.9) are those optimizers' defaults. The controls keep the same share of entries
# (percentile 0.95) as ZSharp, chosen at random or by plain |g| instead of by |z-score|.
METHODS: dict[str, tuple[str, ...]] = {
    "none": ("--sam", "none"),
    "sam": ("--sam", "sam", "--sam_rho", "0.05"),
    "asam": ("--sam", "asam", "--sam_rho", "0.5"),
    "fsam": ("--sam", "fsam", "--sam_rho", "0.05"),
    "zsharp": ("--sam", "zsharp", "--sam_rho", "0.05", "--zsharp_percentile", "0.95"),
    "zsharp-random": ("--sam", "zsharp", "--sam_rho", "0.05", "--zsharp_percentile", "0.95", "--sam_mask", "random"),
    "zsharp-magnitude": (
        "--sam", "zsharp", "--sam_rho", "0.05", "--zsharp_percentile", "0.95", "--sam_mask", "magnitude",
    ),
}  # fmt: skip

# Flags the grid sets per run; on the command line they are replaced by the reproduction's own options.
GRID_FLAGS = {
    "output_dir": "--output_dir",
    "seed": "--seeds",
    "model_name_or_path": "--models",
    "dataset_name": "--datasets",
    "num_train_epochs": "--epochs",
    "sam": "--methods",
    "sam_rho": "--methods",
    "sam_mask": "--methods",
    "zsharp_percentile": "--methods",
}


@dataclass(frozen=True)
class SharpnessSettings:
    """How `--measure_sharpness` probes a trained model: fixed training batches with the evaluation transform."""

    batches: int = 4
    batch_size: int = 64
    rho: float = 0.05
    ascent_steps: int = 5
    power_iters: int = 20


@dataclass(frozen=True)
class Preset:
    """A reproduction grid and the training flags shared by its runs."""

    description: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    epochs: float
    train_args: tuple[str, ...]
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    paper_recipe: bool = False
    sharpness: SharpnessSettings = field(default_factory=SharpnessSettings)


# The paper's recipe (ZSHARP_ALGORITHM.md): batch 256, fp32, Adam(1e-3, 0.9/0.999, 1e-8) with coupled L2 5e-5
# and a 5-epoch warm-up then StepLR(30, 0.75). Adam and the schedule come from `paper_trainer_hooks`; the
# constant schedule below is what `PaperLRSchedule` reshapes.
PAPER_TRAIN_ARGS = (
    "--image_size", "32",
    "--per_device_train_batch_size", "256",
    "--per_device_eval_batch_size", "512",
    "--learning_rate", "1e-3",
    "--adam_beta1", "0.9",
    "--adam_beta2", "0.999",
    "--adam_epsilon", "1e-8",
    "--weight_decay", "5e-5",
    "--lr_scheduler_type", "constant",
    "--eval_strategy", "epoch",
    "--logging_strategy", "epoch",
    "--save_strategy", "no",
    "--report_to", "none",
    "--dataloader_num_workers", "4",
    "--remove_unused_columns", "false",
    "--overwrite_output_dir",
)  # fmt: skip
PAPER_MODELS_USED = ("resnet56", "resnet110", "vgg16", "vit-paper")

PRESETS: dict[str, Preset] = {
    "paper-cifar10": Preset(
        "CIFAR-10 with the paper's recipe (GPU, Hub)",
        ("uoft-cs/cifar10",),
        PAPER_MODELS_USED,
        200,
        PAPER_TRAIN_ARGS,
        paper_recipe=True,
    ),
    "paper-cifar100": Preset(
        "CIFAR-100 with the paper's recipe (GPU, Hub)",
        ("uoft-cs/cifar100",),
        PAPER_MODELS_USED,
        200,
        PAPER_TRAIN_ARGS,
        paper_recipe=True,
    ),
    "paper-tinyimagenet": Preset(
        "Tiny-ImageNet (64x64) with the paper's recipe (GPU, Hub)",
        ("zh-plus/tiny-imagenet",),
        PAPER_MODELS_USED,
        200,
        (*PAPER_TRAIN_ARGS, "--image_size", "64"),
        paper_recipe=True,
    ),
    # Offline on 2 CPU cores in about 15 minutes: the embedded default of `hf-zsharp-train` (ResNet-20 on
    # scikit-learn's digits at 16x16, batch 32, 10-step warm-up), 4 epochs: 21 runs fit the budget and the
    # models still reach ~90% accuracy.
    "digits": Preset(
        "ResNet-20 on scikit-learn's digits (offline, CPU)",
        ("digits",),
        ("resnet20",),
        4,
        (
            "--save_strategy", "no",
            "--overwrite_output_dir",
            "--use_cpu",
            "--remove_unused_columns", "false",
            "--disable_tqdm", "true",
        ),
        sharpness=SharpnessSettings(batches=1, batch_size=64, power_iters=10),
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# The paper's optimizer and learning-rate schedule


def paper_lr_factor(
    step: int, steps_per_epoch: int, warmup_epochs: int = 5, step_epochs: int = 30, gamma: float = 0.75
) -> float:
    """LR multiplier at optimizer step `step`: linear warm-up over `warmup_epochs`, then x`gamma` every `step_epochs`."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return gamma ** ((step - warmup_steps) // (step_epochs * steps_per_epoch))


class PaperLRSchedule(TrainerCallback):
    """Turns `Trainer`'s constant schedule (`lr_scheduler_type="constant"`) into `paper_lr_factor`."""

    def __init__(self, warmup_epochs: int = 5, step_epochs: int = 30, gamma: float = 0.75) -> None:
        self.warmup_epochs = warmup_epochs
        self.step_epochs = step_epochs
        self.gamma = gamma

    def on_train_begin(
        self, args, state, control, lr_scheduler=None, train_dataloader=None, **kwargs
    ) -> None:
        # Accelerate may wrap the scheduler (AcceleratedScheduler keeps it as `.scheduler`).
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(
                f"PaperLRSchedule needs lr_scheduler_type='constant' (a LambdaLR); got {type(scheduler).__name__}."
            )
        batches = len(train_dataloader)
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)

        def factor(step: int) -> float:
            return paper_lr_factor(step, steps_per_epoch, self.warmup_epochs, self.step_epochs, self.gamma)

        scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
        for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        # What `get_last_lr()` (and so Trainer's "learning_rate" log) reports until the scheduler's next step.
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def paper_trainer_hooks(training_args: Any) -> dict[str, Any]:
    """`run_training` extras for the paper's recipe: torch.optim.Adam (coupled L2) and `PaperLRSchedule`."""
    adam = {
        "lr": training_args.learning_rate,
        "betas": (training_args.adam_beta1, training_args.adam_beta2),
        "eps": training_args.adam_epsilon,
    }
    return {"optimizer_cls_and_kwargs": (torch.optim.Adam, adam), "callbacks": [PaperLRSchedule()]}


# --------------------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    dataset: str
    model: str
    method: str
    seed: int

    def folder(self, output_dir: str | Path) -> Path:
        """`<output_dir>/<dataset>/<model>/<method>/seed-<n>`, with datasets and models by their short names."""
        return Path(
            output_dir, short_name(self.dataset), short_name(self.model), self.method, f"seed-{self.seed}"
        )


def short_name(name: str) -> str:
    """The last component of a Hub id or local path: `uoft-cs/cifar10` -> `cifar10`."""
    return Path(name.rstrip("/\\")).name or name


def expand_grid(
    datasets: Sequence[str], models: Sequence[str], methods: Sequence[str], seeds: Sequence[int]
) -> list[RunSpec]:
    """All runs, in the order they run: per dataset and model, seed by seed, every method of a seed in turn.

    So the first seed gives a complete comparison early, and later seeds add the spread.
    """
    for kind, names in (("dataset", datasets), ("model", models)):
        shorts = [short_name(n) for n in names]
        clashes = sorted({s for s in shorts if shorts.count(s) > 1})
        if clashes:
            raise ValueError(
                f"Two {kind}s share the folder name {clashes[0]!r}; give them distinct last names."
            )
    return [
        RunSpec(dataset, model, method, seed)
        for dataset in datasets
        for model in models
        for seed in seeds
        for method in methods
    ]


def run_flags(
    preset: Preset, spec: RunSpec, epochs: float, output_dir: str | Path, extra: Sequence[str]
) -> list[str]:
    """The `hf-zsharp-train` flags of one run (later flags win): preset, method, user extras, then the grid's."""
    return [
        *preset.train_args,
        *METHODS[spec.method],
        *extra,
        "--model_name_or_path", spec.model,
        "--dataset_name", spec.dataset,
        "--seed", str(spec.seed),
        "--num_train_epochs", f"{epochs:g}",
        "--output_dir", str(spec.folder(output_dir)),
    ]  # fmt: skip


def load_summary(folder: Path) -> dict[str, Any] | None:
    """The finished run's `run.json`, or None when the run has not finished (no or unreadable summary)."""
    path = folder / RUN_SUMMARY
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# One run


def epoch_accuracies(log_history: Iterable[Mapping[str, Any]]) -> list[list[float]]:
    """[[epoch, eval accuracy], ...] from a Trainer log history, one point per epoch (the last one logged)."""
    points: dict[float, float] = {}
    for entry in log_history:
        if isinstance(entry.get("eval_accuracy"), (int, float)) and "epoch" in entry:
            points[round(float(entry["epoch"]), 4)] = float(entry["eval_accuracy"])
    return [[epoch, points[epoch]] for epoch in sorted(points)]


def sharpness_batches(training: TrainingRun, settings: SharpnessSettings, seed: int = 0) -> list[dict]:
    """Fixed training batches (same images for every run) with the evaluation transform: no augmentation."""
    trainer = training.trainer
    eval_transform = trainer.eval_dataset.format["format_kwargs"]["transform"]
    data = trainer.train_dataset.with_transform(eval_transform)
    count = min(settings.batches * settings.batch_size, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return [
        trainer.data_collator([data[i] for i in order[start : start + settings.batch_size]])
        for start in range(0, count, settings.batch_size)
    ]


def measure(training: TrainingRun, settings: SharpnessSettings) -> dict[str, float]:
    """`hf_zsharp.sharpness.measure_sharpness` of the trained model, plus the seconds it took."""
    from hf_zsharp.sharpness import measure_sharpness

    start = time.perf_counter()
    result = measure_sharpness(
        training.trainer.model,
        sharpness_batches(training, settings),
        rho=settings.rho,
        ascent_steps=settings.ascent_steps,
        power_iters=settings.power_iters,
    )
    return {**result, "seconds": time.perf_counter() - start}


def environment() -> dict[str, str]:
    """Device and library versions, recorded with every run."""
    import transformers

    import hf_zsharp

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_zsharp": hf_zsharp.__version__,
    }


def train_one(
    spec: RunSpec, flags: list[str], paper_recipe: bool, sharpness: SharpnessSettings | None
) -> dict[str, Any] | None:
    """Train one run through `run_training` and return its summary (None on processes other than the main one)."""
    model_args, data_args, training_args = parse_train_args(flags)
    hooks = paper_trainer_hooks(training_args) if paper_recipe else {}
    set_seed(training_args.seed)  # the model is built before the Trainer seeds: seed its initialisation too
    start = time.perf_counter()
    training = run_training(model_args, data_args, training_args, **hooks)
    wall_time = time.perf_counter() - start
    if not training.trainer.is_world_process_zero():
        return None
    curve = epoch_accuracies(training.log_history)
    metrics = training.metrics
    summary = {
        "dataset": spec.dataset,
        "model": spec.model,
        "method": spec.method,
        "seed": spec.seed,
        "final_accuracy": float(metrics["eval_accuracy"]),
        "best_accuracy": max([float(metrics["eval_accuracy"]), *(acc for _, acc in curve)]),
        "epoch_accuracy": curve,
        "wall_time_s": wall_time,
        "train_runtime_s": float(metrics["train_runtime"]),
        "train_samples_per_second": float(metrics["train_samples_per_second"]),
        "sharpness": measure(training, sharpness) if sharpness else None,
        "argv": flags,
        "environment": environment(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del training
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


# --------------------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined: no values, or one for the std)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_test(
    values: Mapping[int, float], baseline: Mapping[int, float]
) -> tuple[float | None, float | None, int]:
    """Mean difference over the seeds both have, the paired t-test p-value (None below 2 pairs), the pair count."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None, None, 0
    a = [values[s] for s in seeds]
    b = [baseline[s] for s in seeds]
    differences = [x - y for x, y in zip(a, b)]
    delta = statistics.fmean(differences)
    # With fewer than two pairs, or all differences equal (up to rounding), the t statistic is undefined.
    if len(seeds) < 2 or statistics.pstdev(differences) <= 1e-12 * max(1.0, abs(delta)):
        return delta, None, len(seeds)
    return delta, float(ttest_rel(a, b).pvalue), len(seeds)


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, model, method): seeds, mean ± std of the accuracies, the paired comparison to SAM,
    mean wall time and throughput, and mean ± std of the sharpness measures when measured."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for run in sorted(runs, key=_run_order):
        groups.setdefault((run["dataset"], run["model"], run["method"]), []).append(run)
    rows = []
    for (dataset, model, method), group in groups.items():
        finals = {r["seed"]: r["final_accuracy"] for r in group}
        baseline_runs = groups.get((dataset, model, BASELINE), [])
        baseline = {r["seed"]: r["final_accuracy"] for r in baseline_runs}
        delta, p_value, pairs = (None, None, 0) if method == BASELINE else paired_test(finals, baseline)
        row = {
            "dataset": short_name(dataset),
            "model": short_name(model),
            "method": method,
            "seeds": len(group),
            **_stat("final_accuracy", [r["final_accuracy"] for r in group]),
            **_stat("best_accuracy", [r["best_accuracy"] for r in group]),
            "delta_vs_sam": delta,
            "p_vs_sam": p_value,
            "pairs_vs_sam": pairs,
            "wall_time_s": statistics.fmean(r["wall_time_s"] for r in group),
            "train_samples_per_second": statistics.fmean(r["train_samples_per_second"] for r in group),
        }
        measured = [r["sharpness"] for r in group if r.get("sharpness")]
        row.update(_stat("sharpness", [m["sharpness"] for m in measured]))
        row.update(_stat("hessian_max_eig", [m["hessian_max_eig"] for m in measured]))
        rows.append(row)
    return rows


def _stat(name: str, values: Sequence[float]) -> dict[str, float | None]:
    mean, std = mean_std(values)
    return {f"{name}_mean": mean, f"{name}_std": std}


def _run_order(run: Mapping[str, Any]) -> tuple:
    method = run["method"]
    rank = list(METHODS).index(method) if method in METHODS else len(METHODS)
    return run["dataset"], run["model"], rank, method, run["seed"]


# --------------------------------------------------------------------------------------------------------
# Table and figure

CSV_COLUMNS = (
    "dataset", "model", "method", "seeds",
    "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean", "best_accuracy_std",
    "delta_vs_sam", "p_vs_sam", "pairs_vs_sam", "wall_time_s", "train_samples_per_second",
    "sharpness_mean", "sharpness_std", "hessian_max_eig_mean", "hessian_max_eig_std",
)  # fmt: skip


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV (accuracies as fractions; empty cells where a value is undefined)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue()


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _sci(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3g}" if std is None else f"{mean:.3g} ± {std:.2g}"


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table: accuracies in %, differences to SAM in percentage points."""
    header = [
        "Dataset", "Model", "Method", "Seeds", "Final acc. (%)", "Best acc. (%)",
        "Δ final vs SAM (pp)", "p (paired t)", "Wall time / run (s)", "Train samples/s",
    ]  # fmt: skip
    sharp = any(row.get("sharpness_mean") is not None for row in rows)
    if sharp:
        header += ["Sharpness (ρ=0.05)", "Hessian λmax"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        delta = row["delta_vs_sam"]
        cells = [
            row["dataset"],
            row["model"],
            row["method"],
            str(row["seeds"]),
            _pm(row["final_accuracy_mean"], row["final_accuracy_std"], 100),
            _pm(row["best_accuracy_mean"], row["best_accuracy_std"], 100),
            "—" if row["method"] == BASELINE else "n/a" if delta is None else f"{100 * delta:+.2f}",
            "—" if row["method"] == BASELINE else _number(row["p_vs_sam"], ".3f"),
            _number(row["wall_time_s"], ".0f"),
            _number(row["train_samples_per_second"], ".1f"),
        ]
        if sharp:
            cells += [
                _sci(row["sharpness_mean"], row["sharpness_std"]),
                _sci(row["hessian_max_eig_mean"], row["hessian_max_eig_std"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """PNG: per (dataset, model), final accuracy per method (mean ± std, seeds as dots) and mean accuracy curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("No finished runs to plot.")
    panels: dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]] = {}
    for run in sorted(runs, key=_run_order):
        key = (short_name(run["dataset"]), short_name(run["model"]))
        panels.setdefault(key, {}).setdefault(run["method"], []).append(run)
    figure = Figure(figsize=(11, 3.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes_grid = figure.subplots(len(panels), 2, squeeze=False)
    colours = {method: f"C{i}" for i, method in enumerate(METHODS)}
    for (bars, curves), ((dataset, model), methods) in zip(axes_grid, panels.items()):
        for x, (method, group) in enumerate(methods.items()):
            colour = colours.get(method, "k")
            finals = [100 * r["final_accuracy"] for r in group]
            mean, std = mean_std(finals)
            bars.errorbar(x, mean, yerr=std or 0, fmt="o", color=colour, capsize=5, markersize=8)
            bars.scatter([x + 0.15] * len(finals), finals, color=colour, s=12, alpha=0.5)
            epochs, accuracy = _mean_curve(group)
            curves.plot(
                epochs, accuracy, color=colour, label=method, marker="." if len(epochs) < 30 else None
            )
        bars.set_xticks(range(len(methods)), list(methods), rotation=30, ha="right")
        bars.set(title=f"{dataset} / {model}: final test accuracy (mean ± std)", ylabel="accuracy (%)")
        bars.grid(axis="y", alpha=0.3)
        curves.set(
            title=f"{dataset} / {model}: test accuracy per epoch (seed mean)",
            xlabel="epoch",
            ylabel="accuracy (%)",
        )
        curves.grid(alpha=0.3)
        curves.legend(fontsize="small")
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    write_atomic(path, buffer.getvalue())
    return path


def _mean_curve(group: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Mean accuracy (%) per epoch over the runs that logged that epoch."""
    per_epoch: dict[float, list[float]] = {}
    for run in group:
        for epoch, accuracy in run["epoch_accuracy"]:
            per_epoch.setdefault(epoch, []).append(100 * accuracy)
    epochs = sorted(per_epoch)
    return epochs, [statistics.fmean(per_epoch[e]) for e in epochs]


def finished_runs(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished run under `output_dir` (all grids written there, not only the current one)."""
    runs = []
    for path in sorted(Path(output_dir).glob(f"*/*/*/seed-*/{RUN_SUMMARY}")):
        summary = load_summary(path.parent)
        if summary is not None:
            runs.append(summary)
    return runs


def write_results(output_dir: str | Path, command: str | None = None) -> dict[str, Path]:
    """Rewrite results.md, results.csv and results.png in `output_dir` from all its finished runs."""
    output_dir = Path(output_dir)
    runs = finished_runs(output_dir)
    rows = summarize(runs)
    paths = {
        "csv": output_dir / "results.csv",
        "markdown": output_dir / "results.md",
        "figure": output_dir / "results.png",
    }
    write_atomic(paths["csv"], table_csv(rows))
    notes = [
        "# Reproduction results",
        "",
        f"{len(runs)} finished runs. Accuracy on the evaluation split: final (last epoch) and best epoch, mean ± "
        "sample std over seeds. Δ vs SAM: mean paired difference of final accuracy over the seeds both methods "
        "ran; p: paired t-test (scipy.stats.ttest_rel), n/a below two pairs.",
        "",
    ]
    if command:
        notes[2:2] = [f"Command: `{command}`", ""]
    figure_line = ["", f"![results]({paths['figure'].name})", ""] if runs else []
    write_atomic(paths["markdown"], "\n".join(notes) + "\n" + table_markdown(rows) + "\n".join(figure_line))
    if runs:
        plot_results(runs, paths["figure"])
    return paths


# --------------------------------------------------------------------------------------------------------
# Command line


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name (comma-separated)")
    return names


def _seeds(text: str) -> list[int]:
    """'3' -> seeds 0, 1, 2 (a count); '0,5,7' or '5,' -> those seeds."""
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise argparse.ArgumentTypeError(f"the seed count must be >= 1, got {count}")
            return list(range(count))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected a count or a comma-separated list of integers, got {text!r}"
        ) from error
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def _epochs(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number of epochs, got {text!r}") from error
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"the number of epochs must be > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The reproduction's own options; every other flag goes to each run's `hf-zsharp-train` arguments."""
    presets = "\n".join(f"  {name}: {preset.description}" for name, preset in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="hf-zsharp-reproduce",
        usage="%(prog)s [PRESET] [--methods ...] [--models ...] [--datasets ...] [--seeds ...] [--epochs N] "
        "[--output_dir DIR] [--measure_sharpness] [--dry_run] [hf-zsharp-train flags ...]",
        description="Run the ZSharp paper's method comparison (methods x models x datasets x seeds), resumable, "
        "and write a results table (Markdown, CSV) and figure.",
        epilog=f"presets:\n{presets}\n\nAny other flag is passed to every run as an hf-zsharp-train flag "
        "(e.g. --max_train_samples 512 --bf16 --dataloader_num_workers 8).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("preset", nargs="?", default="digits", choices=list(PRESETS), help="default: digits")
    parser.add_argument("--methods", type=_names, help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument(
        "--models", type=_names, help=f"comma-separated models (paper models: {', '.join(PAPER_MODELS)})"
    )
    parser.add_argument(
        "--datasets", type=_names, help="comma-separated Hub dataset ids or local dataset folders"
    )
    parser.add_argument(
        "--seeds", type=_seeds, help="a count (3: seeds 0,1,2) or a comma-separated list (0,5,7)"
    )
    parser.add_argument("--epochs", type=_epochs, help="training epochs of every run (default: the preset's)")
    parser.add_argument("--output_dir", help="where runs and results go (default: reproduce-<preset>)")
    parser.add_argument(
        "--measure_sharpness",
        action="store_true",
        help="measure each trained model's sharpness (hf_zsharp.sharpness)",
    )
    parser.add_argument("--dry_run", action="store_true", help="list the runs (done / to run) and exit")
    return parser


def check_extra_flags(extra: Sequence[str]) -> None:
    """Refuse pass-through flags that the grid sets per run, naming the option to use instead."""
    for token in extra:
        if token in PRESETS:
            raise ValueError(f"Name the preset first: hf-zsharp-reproduce {token} [options].")
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name in GRID_FLAGS:
            raise ValueError(
                f"--{name} is set per run by the reproduction grid; use {GRID_FLAGS[name]} instead."
            )


def check_names(methods: Sequence[str], models: Sequence[str], datasets: Sequence[str]) -> None:
    """Catch typos before hours of training: unknown methods, and models/datasets that cannot be found."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    for kind, names, builtin in (("model", models, PAPER_MODELS), ("dataset", datasets, ("digits",))):
        for name in names:
            if name.lower() in builtin or Path(name).expanduser().exists():
                continue
            if name.startswith((".", "/", "~")) or name.count("/") != 1:
                raise ValueError(
                    f"Unknown {kind} {name!r}: not one of {', '.join(builtin)}, not an existing local path, and not "
                    "a Hub id of the form owner/name."
                )


@dataclass
class Plan:
    """The resolved grid: preset narrowed by the command line, and per-run training flags."""

    preset: Preset
    specs: list[RunSpec]
    epochs: float
    output_dir: Path
    extra: list[str]
    measure_sharpness: bool

    def flags(self, spec: RunSpec) -> list[str]:
        return run_flags(self.preset, spec, self.epochs, self.output_dir, self.extra)


def make_plan(argv: Sequence[str]) -> tuple[Plan, argparse.Namespace]:
    """Parse the command line into a plan; every problem is raised here, before any training."""
    if not argv or argv[0].startswith("-"):  # no preset: the default one, named first so that the values of
        argv = ["digits", *argv]  # pass-through flags are never taken for it
    args, extra = build_parser().parse_known_args(argv)
    check_extra_flags(extra)
    preset = PRESETS[args.preset]
    preset = replace(
        preset,
        methods=tuple(args.methods or preset.methods),
        models=tuple(args.models or preset.models),
        datasets=tuple(args.datasets or preset.datasets),
        seeds=tuple(args.seeds if args.seeds is not None else preset.seeds),
    )
    check_names(preset.methods, preset.models, preset.datasets)
    specs = expand_grid(preset.datasets, preset.models, preset.methods, preset.seeds)
    plan = Plan(
        preset=preset,
        specs=specs,
        epochs=args.epochs if args.epochs is not None else preset.epochs,
        output_dir=Path(args.output_dir or f"reproduce-{args.preset}"),
        extra=list(extra),
        measure_sharpness=args.measure_sharpness,
    )
    for method in preset.methods:  # each method's flags parse (bad extra flags fail here, not after hours)
        spec = next(s for s in specs if s.method == method)
        parse_train_args(plan.flags(spec))
    return plan, args


def check_finished(plan: Plan) -> dict[RunSpec, dict[str, Any]]:
    """Finished runs of the plan; one trained with other flags is refused rather than silently reused."""
    done = {}
    for spec in plan.specs:
        summary = load_summary(spec.folder(plan.output_dir))
        if summary is None:
            continue
        if summary.get("argv") != plan.flags(spec):
            raise ValueError(
                f"{spec.folder(plan.output_dir)} holds a finished run trained with other flags:\n  "
                f"{shlex.join(summary.get('argv') or [])}\nnot\n  {shlex.join(plan.flags(spec))}\n"
                "Use another --output_dir (or the same flags) so that results stay comparable."
            )
        done[spec] = summary
    return done


class Progress:
    """A line per run: k/N, what runs, and an ETA from this session's mean time per method."""

    def __init__(
        self, specs: Sequence[RunSpec], done: Iterable[RunSpec], write: Callable[[str], None] = print
    ):
        self.specs = list(specs)
        finished = set(done)
        self.todo = [s for s in self.specs if s not in finished]
        self.times: dict[str, list[float]] = {}
        self.write = write

    def start(self, spec: RunSpec) -> None:
        k = self.specs.index(spec) + 1
        self.write(
            f"[{k}/{len(self.specs)}] {short_name(spec.dataset)} {short_name(spec.model)} {spec.method} seed {spec.seed}"
            f" ... (ETA {self.eta()})"
        )

    def finish(self, spec: RunSpec, seconds: float, accuracy: float | None) -> None:
        self.times.setdefault(spec.method, []).append(seconds)
        self.todo.remove(spec)
        result = "" if accuracy is None else f", accuracy {100 * accuracy:.2f}%"
        self.write(f"    done in {seconds:.0f} s{result}; {len(self.todo)} left, ETA {self.eta()}")

    def eta(self) -> str:
        if not self.times:
            return "unknown until a run finishes"
        overall = statistics.fmean(t for times in self.times.values() for t in times)
        seconds = sum(
            statistics.fmean(self.times[s.method]) if s.method in self.times else overall for s in self.todo
        )
        return (
            time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 3600:.0f} h"
        )


def main(argv: list[str]) -> None:
    """Run the grid (resuming finished runs), rewriting the results after every run; print the table at the end."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        plan, args = make_plan(argv)
        done = check_finished(plan)
    except ValueError as error:
        sys.exit(f"error: {error}")
    command = shlex.join(["hf-zsharp-reproduce", *argv])
    print(
        f"{len(plan.specs)} runs ({len(done)} already finished) of preset {args.preset}: "
        f"{len(plan.preset.datasets)} dataset(s) x {len(plan.preset.models)} model(s) x "
        f"{len(plan.preset.methods)} method(s) x {len(plan.preset.seeds)} seed(s), {plan.epochs:g} epochs, into "
        f"{plan.output_dir}"
    )
    if args.dry_run:
        for spec in plan.specs:
            print(f"  {'done ' if spec in done else 'to run'} {spec.folder(plan.output_dir)}")
        return
    progress = Progress(plan.specs, done)
    sharpness = plan.preset.sharpness if plan.measure_sharpness else None
    for spec in plan.specs:
        if spec in done:
            continue
        progress.start(spec)
        start = time.perf_counter()
        try:
            summary = train_one(spec, plan.flags(spec), plan.preset.paper_recipe, sharpness)
        except ValueError as error:
            sys.exit(f"error in {spec.folder(plan.output_dir)}: {error}")
        progress.finish(spec, time.perf_counter() - start, summary and summary["final_accuracy"])
        if summary is not None:
            write_atomic(spec.folder(plan.output_dir) / RUN_SUMMARY, json.dumps(summary, indent=2) + "\n")
            write_results(plan.output_dir, command)
    paths = write_results(plan.output_dir, command)
    print(table_markdown(summarize(finished_runs(plan.output_dir))))
    print(f"Results: {paths['markdown']}, {paths['csv']}, {paths['figure']}")
