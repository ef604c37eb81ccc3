"""The grid of runs: one `RunSpec` per dataset x model x method x rho x percentile x seed, and the resolved `Plan`."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hf_zsharp.models import PAPER_MODELS
from hf_zsharp.reproduce.presets import DEFAULT_PERCENTILE, PRESETS, VARIANTS, Preset

COMMAND = "hf-zsharp-reproduce"


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid; `rho` and `percentile` are None where the run uses the method's default."""

    dataset: str
    model: str
    method: str
    seed: int
    rho: float | None = None
    percentile: float | None = None

    @property
    def variant(self) -> str:
        """The method and its non-default hyper-parameters, as in folder names: `zsharp_rho0.1_q0.9`."""
        rho = "" if self.rho is None else f"_rho{self.rho:g}"
        percentile = "" if self.percentile is None else f"_q{self.percentile:g}"
        return f"{self.method}{rho}{percentile}"

    @property
    def effective_rho(self) -> float | None:
        """The radius the method is given (before sam-matched's sqrt(L) scaling); None without an ascent."""
        return VARIANTS[self.method].rho if self.rho is None else self.rho

    @property
    def effective_percentile(self) -> float | None:
        """The filter's percentile for ZSharp-filtered methods, else None."""
        if not VARIANTS[self.method].filtered:
            return None
        return DEFAULT_PERCENTILE if self.percentile is None else self.percentile

    def folder(self, output_dir: str | Path) -> Path:
        """`<output_dir>/<dataset>/<model>/<variant>/seed-<n>`, with datasets and models by their short names."""
        return Path(
            output_dir, short_name(self.dataset), short_name(self.model), self.variant, f"seed-{self.seed}"
        )


def without_flags(flags: Sequence[str], *names: str) -> list[str]:
    """`flags` less each `NAME VALUE` (or `NAME=VALUE`) of the given option names: `without_flags(argv,
    "--output_dir")` is what a run is, wherever its folder lies."""
    kept: list[str] = []
    skip = False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        elif not flag.startswith(tuple(f"{name}=" for name in names)):
            kept.append(flag)
    return kept


def short_name(name: str) -> str:
    """The last component of a Hub id or local path: `uoft-cs/cifar10` -> `cifar10`."""
    return Path(name.rstrip("/\\")).name or name


def _variants(method: str, rhos: Sequence[float | None], percentiles: Sequence[float | None]) -> list[tuple]:
    """The (rho, percentile) pairs a method takes from the sweep axes; a default value is stored as None."""
    spec = VARIANTS[method]
    rho_values = [None] if spec.rho is None else [None if r == spec.rho else r for r in rhos]
    q_values = [None if q == DEFAULT_PERCENTILE else q for q in percentiles] if spec.filtered else [None]
    return list(dict.fromkeys((r, q) for r in rho_values for q in q_values))


def expand_grid(
    datasets: Sequence[str],
    models: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    rhos: Sequence[float | None] = (None,),
    percentiles: Sequence[float | None] = (None,),
) -> list[RunSpec]:
    """All runs, in the order they run: per dataset and model, seed by seed, every method variant of a seed.

    So the first seed gives a complete comparison early, and later seeds add the spread. The rho axis applies to
    every method with an ascent, the percentile axis to ZSharp's filters; the base optimizer runs once per seed.
    """
    for kind, names in (("dataset", datasets), ("model", models)):
        shorts = [short_name(n) for n in names]
        clashes = sorted({s for s in shorts if shorts.count(s) > 1})
        if clashes:
            raise ValueError(
                f"Two {kind}s share the folder name {clashes[0]!r}; give them distinct last names."
            )
    return [
        RunSpec(dataset, model, method, seed, rho, percentile)
        for dataset in datasets
        for model in models
        for seed in seeds
        for method in methods
        for rho, percentile in _variants(method, rhos, percentiles)
    ]


def check_names(methods: Sequence[str], models: Sequence[str], datasets: Sequence[str]) -> None:
    """Catch typos before hours of training: unknown methods, and models/datasets that cannot be found."""
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}.")
    for kind, names, builtin in (("model", models, PAPER_MODELS), ("dataset", datasets, ("digits",))):
        for name in names:
            if name.lower() in builtin or Path(name).expanduser().exists():
                continue
            if name.startswith((".", "/", "~")) or name.count("/") != 1:
                raise ValueError(
                    f"Unknown {kind} {name!r}: not one of {', '.join(builtin)}, not an existing local path, and not "
                    "a Hub id of the form owner/name."
                )


def check_calibrated_settings(preset: Preset, epochs: float) -> None:
    """Refuse a variant whose radius was calibrated or tuned in another setting (`Method.setting`): with other
    data, models, epochs or training flags a "loss-matched" or "tuned" radius is neither."""
    for name in preset.methods:
        method = VARIANTS[name]
        home = method.setting
        if home is None:
            continue
        origin = PRESETS[home]
        if (
            epochs == origin.epochs
            and preset.train_args == origin.train_args
            and {short_name(d) for d in preset.datasets} <= {short_name(d) for d in origin.datasets}
            and {short_name(m) for m in preset.models} <= {short_name(m) for m in origin.models}
        ):
            continue
        base = next(n for n, m in VARIANTS.items() if m.flags == method.flags and m.setting is None)
        raise ValueError(
            f"{name}'s radius {method.rho:g} was calibrated or tuned in the preset {home} "
            f"({', '.join(origin.datasets)}, {', '.join(origin.models)}, {origin.epochs:g} epochs, its training "
            f"flags); in this grid it would not be what its name says. Find the radius for this setting (RESULTS.md "
            f"shows how) and pass it: --methods {base} --rho R."
        )


@dataclass
class Plan:
    """The resolved grid: a preset narrowed by the command line, with per-run flags and re-creating commands."""

    preset_name: str
    preset: Preset
    specs: list[RunSpec]
    epochs: float
    output_dir: Path
    extra: list[str]
    measure_sharpness: bool
    threads: int | None

    def flags(self, spec: RunSpec) -> list[str]:
        """The `hf-zsharp-train` flags of one run (later flags win): preset, method, user extras, then the grid's."""
        method = VARIANTS[spec.method]
        rho = [] if spec.effective_rho is None else ["--sam_rho", repr(spec.effective_rho)]
        percentile = (
            []
            if spec.effective_percentile is None
            else ["--zsharp_percentile", repr(spec.effective_percentile)]
        )
        return [
            *self.preset.train_args,
            *method.flags,
            *rho,
            *percentile,
            *self.extra,
            "--model_name_or_path", spec.model,
            "--dataset_name", spec.dataset,
            "--seed", str(spec.seed),
            "--num_train_epochs", f"{self.epochs:g}",
            "--output_dir", str(spec.folder(self.output_dir)),
        ]  # fmt: skip

    def command(self, spec: RunSpec) -> str:
        """The command that re-creates this one run in `./reproduce-<preset>/` (run from any folder)."""
        words = [
            COMMAND, self.preset_name,
            "--datasets", spec.dataset,
            "--models", spec.model,
            "--methods", spec.method,
            "--seeds", f"{spec.seed},",
            "--epochs", f"{self.epochs:g}",
        ]  # fmt: skip
        if spec.rho is not None:
            words += ["--rho", f"{spec.rho!r}"]
        if spec.percentile is not None:
            words += ["--percentile", f"{spec.percentile!r}"]
        if self.threads is not None:
            words += ["--threads", str(self.threads)]
        if self.measure_sharpness:
            words.append("--measure_sharpness")
        return shlex.join([*words, *self.extra])
