"""The `hf-zsharp-reproduce` command line: parse into a `Plan`, run what is not finished, rewrite the results.

Runs skipped because another process held their lock are tried again at the end of the grid; any still locked
then make the command exit non-zero, naming them."""

from __future__ import annotations

import logging
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hf_zsharp.args import parse_train_args
from hf_zsharp.reproduce import report
from hf_zsharp.reproduce.args import ReproduceArguments, parse_reproduce_args
from hf_zsharp.reproduce.grid import (
    COMMAND,
    Plan,
    RunSpec,
    check_calibrated_settings,
    check_names,
    expand_grid,
    short_name,
    without_flags,
)
from hf_zsharp.reproduce.lock import LOCK, run_lock
from hf_zsharp.reproduce.presets import PERCENTILE, PRESETS, VARIANTS
from hf_zsharp.reproduce.records import check_poolable, code_version, load_record, read_records, write_record
from hf_zsharp.reproduce.runner import train_one

# Training flags the grid sets per run, and the reproduction option that sets them instead: the run's place, and
# every flag of the methods' variants (the method and the options they set), less the radius and percentile axes.
GRID_FLAGS = {
    "output_dir": "--output_dir",
    "seed": "--seeds",
    "model_name_or_path": "--models",
    "dataset_name": "--datasets",
    "num_train_epochs": "--epochs",
    **{flag[2:]: "--methods" for method in VARIANTS.values() for flag in method.flags[::2]},
    "sam_rho": "--rho",
    PERCENTILE.field: "--percentile",
}


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


def make_plan(argv: Sequence[str]) -> tuple[Plan, ReproduceArguments]:
    """Parse the command line into a plan; every problem is raised here, before any training."""
    args, extra = parse_reproduce_args(list(argv))
    check_extra_flags(extra)
    preset = PRESETS[args.preset]
    preset = replace(
        preset,
        methods=args.method_names or preset.methods,
        models=args.model_names or preset.models,
        datasets=args.dataset_names or preset.datasets,
        seeds=args.seed_list if args.seed_list is not None else preset.seeds,
    )
    check_names(preset.methods, preset.models, preset.datasets)
    specs = expand_grid(
        preset.datasets,
        preset.models,
        preset.methods,
        preset.seeds,
        args.rho_values or (None,),
        args.percentile_values or (None,),
    )
    epochs = args.epochs if args.epochs is not None else preset.epochs
    check_calibrated_settings(preset, epochs)
    plan = Plan(
        preset_name=args.preset,
        preset=preset,
        specs=specs,
        epochs=epochs,
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
    if (record.get("command"), without_flags(argv, "--output_dir")) != (
        plan.command(spec),
        without_flags(plan.flags(spec), "--output_dir"),
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


def planned_records(plan: Plan, done: Iterable[RunSpec]) -> dict[str, dict[str, Any]]:
    """What the records of the runs still to train will say of their table row, by folder: enough to check them
    against the records under the output folder before training."""
    done = set(done)
    return {
        f"{spec.folder(plan.output_dir)} (to run)": {
            "dataset": spec.dataset,
            "model": spec.model,
            "variant": spec.variant,
            "seed": spec.seed,
            "command": plan.command(spec),
            "argv": plan.flags(spec),
        }
        for spec in plan.specs
        if spec not in done
    }


def check_poolable_plan(plan: Plan, done: Iterable[RunSpec]) -> None:
    """Refuse, before any training, runs that the grid's report could not pool with the records already under the
    output folder: another preset, length or command in one table row (see `records.check_poolable`)."""
    try:
        check_poolable({**read_records(plan.output_dir), **planned_records(plan, done)})
    except ValueError as error:
        raise ValueError(f"{error}; use another --output_dir") from None


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

    def skip(self, spec: RunSpec, reason: str, retry: bool = False) -> None:
        """Say why `spec` is not trained now; unless it is to be retried, the ETA no longer counts it."""
        if not retry:
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


def train_runs(
    plan: Plan, specs: Sequence[RunSpec], progress: Progress, command: str, retry: bool
) -> list[RunSpec]:
    """Train each run of `specs` that no process has finished, writing its record and rewriting the results after
    it; returns the runs skipped because another process held their lock (`retry`: they will be tried again)."""
    locked = []
    for spec in specs:
        progress.start(spec)
        folder = spec.folder(plan.output_dir)
        with run_lock(folder) as held:
            try:
                if not held:
                    locked.append(spec)
                    again = "; tried again at the end" if retry else ""
                    progress.skip(
                        spec, f"another process is running it ({folder / LOCK} is locked){again}", retry
                    )
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
    return locked


def main(argv: list[str]) -> None:
    """Run the grid (resuming finished runs, then trying again the runs that were locked), rewriting the results
    after every run; print the table at the end, and exit non-zero naming the runs still locked."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        plan, args = make_plan(argv)
        done = check_finished(plan)
        check_poolable_plan(plan, done)
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
    try:
        locked = train_runs(plan, [s for s in plan.specs if s not in done], progress, command, retry=True)
        if locked:  # their holders may have finished them, or died without a record
            print(f"Retrying {len(locked)} run(s) skipped for their lock.")
            locked = train_runs(plan, locked, progress, command, retry=False)
        paths = report.write_results(plan.output_dir, command)
    except ValueError as error:  # records under the output folder that one report must not pool
        sys.exit(f"error: {error}")
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"Results: {paths['markdown']}, {paths['csv']} and figures in {plan.output_dir}")
    if locked:
        folders = ", ".join(str(spec.folder(plan.output_dir)) for spec in locked)
        sys.exit(
            f"error: {len(locked)} run(s) unfinished, locked by another process: {folders}; run the command "
            "again when it has ended (the results leave them out)"
        )
