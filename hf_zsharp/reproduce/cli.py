"""The `hf-zsharp-reproduce` command line: parse into a `Plan`, run what is not finished, rewrite the results."""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hf_zsharp.models import PAPER_MODELS
from hf_zsharp.reproduce import report
from hf_zsharp.reproduce.grid import (
    COMMAND,
    Plan,
    RunSpec,
    check_names,
    expand_grid,
    short_name,
    without_output_dir,
)
from hf_zsharp.reproduce.lock import LOCK, run_lock
from hf_zsharp.reproduce.presets import METHODS, PRESETS
from hf_zsharp.reproduce.records import code_version, load_record, write_record
from hf_zsharp.reproduce.runner import train_one
from hf_zsharp.run import parse_train_args

# Training flags the grid sets per run, and the reproduction option that sets them instead.
GRID_FLAGS = {
    "output_dir": "--output_dir",
    "seed": "--seeds",
    "model_name_or_path": "--models",
    "dataset_name": "--datasets",
    "num_train_epochs": "--epochs",
    "sam": "--methods",
    "sam_mask": "--methods",
    "sam_radius": "--methods",
    "sam_rho": "--rho",
    "zsharp_percentile": "--percentile",
}


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


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from error
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _rhos(text: str) -> list[float]:
    values = [_positive(v) for v in _names(text)]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct values, got {text!r}")
    return values


def _percentiles(text: str) -> list[float]:
    values = _rhos(text)
    if any(v >= 1 for v in values):
        raise argparse.ArgumentTypeError(f"percentiles lie in (0, 1), got {text!r}")
    return values


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a thread count, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"the thread count must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The reproduction's own options; every other flag goes to each run's `hf-zsharp-train` arguments."""
    presets = "\n".join(f"  {name}: {preset.description}" for name, preset in PRESETS.items())
    methods = "\n".join(f"  {name}: {method.description}" for name, method in METHODS.items())
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        usage="%(prog)s [PRESET] [--methods ...] [--models ...] [--datasets ...] [--seeds ...] [--epochs N] "
        "[--rho R,...] [--percentile Q,...] [--threads N] [--output_dir DIR] [--measure_sharpness] [--dry_run] "
        "[hf-zsharp-train flags ...]",
        description="Run the ZSharp paper's method comparison (methods x rho x percentile x models x datasets x "
        "seeds), resumable, with one record per run, and write results tables (Markdown, CSV) and figures.",
        epilog=f"presets:\n{presets}\n\nmethods:\n{methods}\n\nAny other flag is passed to every run as an "
        "hf-zsharp-train flag (e.g. --max_train_samples 512 --bf16 --dataloader_num_workers 8).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("preset", nargs="?", default="digits", choices=list(PRESETS), help="default: digits")
    parser.add_argument("--methods", type=_names, help="comma-separated subset of the methods below")
    parser.add_argument(
        "--models", type=_names, help=f"comma-separated models (paper models: {', '.join(PAPER_MODELS)})"
    )
    parser.add_argument(
        "--datasets", type=_names, help="comma-separated Hub dataset ids or local dataset folders"
    )
    parser.add_argument(
        "--seeds",
        type=_seeds,
        help="a count (3: seeds 0,1,2) or a comma-separated list (0,5,7; one seed: 5,)",
    )
    parser.add_argument(
        "--epochs", type=_positive, help="training epochs of every run (default: the preset's)"
    )
    parser.add_argument(
        "--rho", type=_rhos, help="a grid axis: comma-separated radii for every method with an ascent "
        "(default: each method's own; sam-matched scales it by sqrt(L))",
    )  # fmt: skip
    parser.add_argument(
        "--percentile", type=_percentiles, help="a grid axis: comma-separated ZSharp filter percentiles "
        "(zsharp* methods; default 0.95)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=_threads, help="torch threads (default: the preset's; digits: 1, bit-reproducible)"
    )
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
            raise ValueError(f"Name the preset first: {COMMAND} {token} [options].")
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name in GRID_FLAGS:
            raise ValueError(
                f"--{name} is set per run by the reproduction grid; use {GRID_FLAGS[name]} instead."
            )


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
    specs = expand_grid(
        preset.datasets,
        preset.models,
        preset.methods,
        preset.seeds,
        args.rho or (None,),
        args.percentile or (None,),
    )
    plan = Plan(
        preset_name=args.preset,
        preset=preset,
        specs=specs,
        epochs=args.epochs if args.epochs is not None else preset.epochs,
        output_dir=Path(args.output_dir or f"reproduce-{args.preset}"),
        extra=list(extra),
        measure_sharpness=args.measure_sharpness,
        threads=args.threads if args.threads is not None else preset.threads,
    )
    for variant in dict.fromkeys(
        s.variant for s in specs
    ):  # each variant's flags parse: bad extra flags fail
        parse_train_args(plan.flags(next(s for s in specs if s.variant == variant)))  # here, not after hours
    return plan, args


def finished(plan: Plan, spec: RunSpec) -> dict[str, Any] | None:
    """The run's record if it finished; one made by another command or with other flags is refused, not reused.
    The output folder is no part of the comparison, so a grid moved elsewhere resumes."""
    folder = spec.folder(plan.output_dir)
    record = load_record(folder)
    if record is None:
        return None
    argv = record.get("argv") or []
    if (record.get("command"), without_output_dir(argv)) != (
        plan.command(spec),
        without_output_dir(plan.flags(spec)),
    ):
        raise ValueError(
            f"{folder} holds a finished run made by another command or with other flags:\n  "
            f"{record.get('command')}\n  {shlex.join(argv)}\nnot\n  {plan.command(spec)}\n  "
            f"{shlex.join(plan.flags(spec))}\nUse another --output_dir (or the same options) so that results "
            "stay comparable."
        )
    return record


def check_finished(plan: Plan) -> dict[RunSpec, dict[str, Any]]:
    """Finished runs of the plan (see `finished`)."""
    return {spec: record for spec in plan.specs if (record := finished(plan, spec)) is not None}


class Progress:
    """A line per run: k/N, what runs, and an ETA from this session's mean time per method."""

    def __init__(
        self, specs: Sequence[RunSpec], done: Iterable[RunSpec], write: Callable[[str], None] = print
    ) -> None:
        self.specs = list(specs)
        finished = set(done)
        self.todo = [s for s in self.specs if s not in finished]
        self.times: dict[str, list[float]] = {}
        self.write = write

    def start(self, spec: RunSpec) -> None:
        k = self.specs.index(spec) + 1
        self.write(
            f"[{k}/{len(self.specs)}] {short_name(spec.dataset)} {short_name(spec.model)} {spec.variant} "
            f"seed {spec.seed} ... (ETA {self.eta()})"
        )

    def skip(self, spec: RunSpec, reason: str) -> None:
        self.todo.remove(spec)
        self.write(f"    skipped: {reason}")

    def finish(self, spec: RunSpec, seconds: float, accuracy: float | None) -> None:
        self.times.setdefault(spec.method, []).append(seconds)
        self.todo.remove(spec)
        result = "" if accuracy is None else f", test accuracy {100 * accuracy:.2f}%"
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
    command = shlex.join([COMMAND, *argv])
    print(
        f"{len(plan.specs)} runs ({len(done)} already finished) of preset {args.preset}: "
        f"{len(plan.preset.datasets)} dataset(s) x {len(plan.preset.models)} model(s) x "
        f"{len({s.variant for s in plan.specs})} method variant(s) x {len(plan.preset.seeds)} seed(s), "
        f"{plan.epochs:g} epochs, into {plan.output_dir}"
    )
    if args.dry_run:
        for spec in plan.specs:
            print(f"  {'done ' if spec in done else 'to run'} {spec.folder(plan.output_dir)}")
        return
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    code_version()  # hash the source now: it is the code this process runs, even if the files change later
    progress = Progress(plan.specs, done)
    for spec in plan.specs:
        if spec in done:
            continue
        progress.start(spec)
        folder = spec.folder(plan.output_dir)
        with run_lock(folder) as held:
            try:
                if not held:
                    progress.skip(spec, f"another process is running it ({folder / LOCK} is locked)")
                    continue
                if finished(plan, spec) is not None:  # another process finished it since the start
                    progress.skip(spec, "another process finished it")
                    continue
                start = time.perf_counter()
                record = train_one(plan, spec)
            except ValueError as error:
                sys.exit(f"error in {folder}: {error}")
            progress.finish(spec, time.perf_counter() - start, record and record["metrics"]["test_accuracy"])
            if record is not None:
                write_record(folder, record)
                report.write_results(plan.output_dir, command)
    paths = report.write_results(plan.output_dir, command)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"Results: {paths['markdown']}, {paths['csv']} and figures in {plan.output_dir}")
