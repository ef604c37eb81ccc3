"""The options of `hf-zsharp-reproduce` as a dataclass read by `HfArgumentParser`, as the training CLI reads its own.

List options are comma-separated words (`--methods sam,zsharp`, `--seeds 0,5,7`), as the records' commands hold
them; `__post_init__` checks every value, so a bad one is refused before any training.
"""

from __future__ import annotations

import math
from argparse import RawDescriptionHelpFormatter
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_zsharp.models import PAPER_MODELS
from hf_zsharp.reproduce.grid import COMMAND
from hf_zsharp.reproduce.presets import PRESETS, VARIANTS


def _words(text: str | None, option: str) -> tuple[str, ...] | None:
    """'a, b' -> ('a', 'b'); None stays None (the preset's value)."""
    if text is None:
        return None
    words = tuple(word.strip() for word in text.split(",") if word.strip())
    if not words:
        raise ValueError(f"--{option}: give at least one name (comma-separated), got {text!r}")
    return words


def _distinct(values: tuple, option: str, text: str) -> tuple:
    if len(set(values)) != len(values):
        raise ValueError(f"--{option}: expected distinct values, got {text!r}")
    return values


def _positive(word: str, option: str) -> float:
    try:
        value = float(word)
    except ValueError as error:
        raise ValueError(f"--{option}: expected a number, got {word!r}") from error
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--{option}: expected a number > 0, got {word!r}")
    return value


@dataclass
class ReproduceArguments:
    """What `hf-zsharp-reproduce` runs: a preset narrowed to some methods, models, datasets and seeds, with sweep
    axes; every other flag goes to each run's `hf-zsharp-train` arguments."""

    preset: str = field(default="digits", metadata={"help": "the grid to run", "choices": list(PRESETS)})
    methods: str | None = field(
        default=None, metadata={"help": "comma-separated subset of the methods below"}
    )
    models: str | None = field(
        default=None, metadata={"help": f"comma-separated models (paper models: {', '.join(PAPER_MODELS)})"}
    )
    datasets: str | None = field(
        default=None, metadata={"help": "comma-separated Hub dataset ids or local dataset folders"}
    )
    seeds: str | None = field(
        default=None,
        metadata={"help": "a count (3: seeds 0,1,2) or a comma-separated list (0,5,7; one seed: 5,)"},
    )
    epochs: float | None = field(
        default=None, metadata={"help": "training epochs of every run (default: the preset's)"}
    )
    rho: str | None = field(
        default=None,
        metadata={
            "help": "a grid axis: comma-separated radii for every method with an ascent (default: each method's "
            "own; sam-matched scales it by sqrt(L))"
        },
    )
    percentile: str | None = field(
        default=None,
        metadata={
            "help": "a grid axis: comma-separated ZSharp filter percentiles (zsharp* methods; default 0.95)"
        },
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch threads (default: the preset's; digits: 1, bit-reproducible)"}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "where runs and results go (default: reproduce-<preset>)"}
    )
    measure_sharpness: bool = field(
        default=False, metadata={"help": "measure each trained model's sharpness (hf_zsharp.sharpness)"}
    )
    dry_run: bool = field(default=False, metadata={"help": "list the runs (done / to run) and exit"})

    def __post_init__(self) -> None:
        for parsed in ("method_names", "model_names", "dataset_names", "seed_list", "rho_values"):
            getattr(self, parsed)
        if any(q >= 1 for q in self.percentile_values or ()):
            raise ValueError(f"--percentile: percentiles lie in (0, 1), got {self.percentile!r}")
        if self.epochs is not None:
            _positive(str(self.epochs), "epochs")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads: the thread count must be >= 1, got {self.threads}")

    @property
    def method_names(self) -> tuple[str, ...] | None:
        return _words(self.methods, "methods")

    @property
    def model_names(self) -> tuple[str, ...] | None:
        return _words(self.models, "models")

    @property
    def dataset_names(self) -> tuple[str, ...] | None:
        return _words(self.datasets, "datasets")

    @property
    def seed_list(self) -> tuple[int, ...] | None:
        """'3' -> seeds 0, 1, 2 (a count); '0,5,7' or '5,' -> those seeds."""
        if self.seeds is None:
            return None
        try:
            if "," not in self.seeds:
                count = int(self.seeds)
                if count < 1:
                    raise ValueError(f"--seeds: the seed count must be >= 1, got {count}")
                return tuple(range(count))
            seeds = tuple(int(s) for s in self.seeds.split(",") if s.strip())
        except ValueError as error:
            if str(error).startswith("--seeds"):
                raise
            raise ValueError(
                f"--seeds: expected a count or a comma-separated list of integers, got {self.seeds!r}"
            ) from error
        if not seeds:
            raise ValueError(f"--seeds: expected distinct seeds, got {self.seeds!r}")
        return _distinct(seeds, "seeds", self.seeds)

    @property
    def rho_values(self) -> tuple[float, ...] | None:
        words = _words(self.rho, "rho")
        return words and _distinct(tuple(_positive(w, "rho") for w in words), "rho", self.rho)

    @property
    def percentile_values(self) -> tuple[float, ...] | None:
        words = _words(self.percentile, "percentile")
        return words and _distinct(
            tuple(_positive(w, "percentile") for w in words), "percentile", self.percentile
        )


def build_parser() -> HfArgumentParser:
    """The reproduction's own options; every other flag goes to each run's `hf-zsharp-train` arguments."""
    presets = "\n".join(f"  {name}: {preset.description}" for name, preset in PRESETS.items())
    methods = "\n".join(f"  {name}: {method.description}" for name, method in VARIANTS.items())
    return HfArgumentParser(
        ReproduceArguments,
        prog=COMMAND,
        usage="%(prog)s [PRESET] [--methods ...] [--models ...] [--datasets ...] [--seeds ...] [--epochs N] "
        "[--rho R,...] [--percentile Q,...] [--threads N] [--output_dir DIR] [--measure_sharpness] [--dry_run] "
        "[hf-zsharp-train flags ...]",
        description="Run the ZSharp paper's method comparison (methods x rho x percentile x models x datasets x "
        "seeds), resumable, with one record per run, and write results tables (Markdown, CSV) and figures.",
        epilog=f"presets:\n{presets}\n\nmethods:\n{methods}\n\nAny other flag is passed to every run as an "
        "hf-zsharp-train flag (e.g. --max_train_samples 512 --bf16 --dataloader_num_workers 8).",
        formatter_class=RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


def parse_reproduce_args(argv: list[str]) -> tuple[ReproduceArguments, list[str]]:
    """The options and the pass-through flags; the preset, a first word (default digits), may be left out."""
    if not argv or argv[0].startswith("-"):  # no preset: the default one, named first so that the values of
        argv = ["digits", *argv]  # pass-through flags are never taken for it
    parser = build_parser()
    try:
        args, extra = parser.parse_args_into_dataclasses(["--preset", *argv], return_remaining_strings=True)
    except ValueError as error:
        parser.error(str(error))
    return args, extra
