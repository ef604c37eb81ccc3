"""Markdown tables (of one dataset and model each) and CSVs of the rows that `stats.summarize` and
`stats.contrasts` make."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from hf_zsharp.reproduce.stats import (
    COMPARED,
    MARGINS,
    METRICS,
    Comparison,
    Interval,
    calibrated_rho,
    chosen_by_validation,
    probe_radius,
    summarize,
)

Row = Mapping[str, Any]


def _interval(value: Interval | None, scale: float = 1.0, fmt: str = ".2f") -> str:
    """`mean [low, high]` (or the mean alone for one seed; n/a when unmeasured); a `+` format signs all three."""
    if value is None:
        return "n/a"
    text = format(value.mean * scale, fmt)
    if value.low is None:
        return text
    return f"{text} [{format(value.low * scale, fmt)}, {format(value.high * scale, fmt)}]"


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _eigenvalue(row: Row, name: str, fmt: str) -> str:
    """A Hessian end over the runs where Lanczos converged on it, with `(converged/measured)`; withheld if none."""
    measured = row["sharpness"].n if row["sharpness"] is not None else 0
    value: Interval | None = row[name]
    if not measured:
        return "n/a"
    if value is None:
        return f"withheld (0/{measured} converged)"
    return f"{_interval(value, fmt=fmt)} ({value.n}/{measured})"


def _measured(row: Row, name: str, fmt: str = ".3f") -> str:
    """A measure that only some runs of the row hold (added later): its interval with `(runs/seeds)`."""
    value: Interval | None = row[name]
    if value is None:
        return "not measured"
    return _interval(value, fmt=fmt) + ("" if value.n == row["seeds"] else f" ({value.n}/{row['seeds']})")


def _worst_case(rows: Sequence[Row], setting: str = "rho") -> str:
    """A worst-case column's title, with the probe's radius from the records' sharpness settings."""
    rho = probe_radius(rows, setting)
    kind = "Scale-invariant worst case" if setting == "scale_invariant_rho" else "Worst-case increase"
    return f"{kind} (ρ={'n/a' if rho is None else format(rho, 'g')})"


def _markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out) + "\n"


def _rho(row: Row) -> str:
    if row["sam_rho"] is None:
        return "—"
    return f"{row['sam_rho']:.3g}"


def accuracy_table(rows: Sequence[Row]) -> str:
    """Test accuracy per method at its default settings: at the final epoch and at the best validation epoch."""
    header = ["Method", "ρ used", "Seeds", "Test acc., final (%)", "Test acc. at best val. epoch (%)"]
    lines = [
        [
            row["method"],
            _rho(row),
            str(row["seeds"]),
            _interval(row["test_accuracy"], 100),
            _interval(row["test_accuracy_at_best_val"], 100),
        ]
        for row in rows
        if row["default"]
    ]
    return _markdown(header, lines)


# The worst case at the extra probe radii (`SharpnessSettings.extra_radii`): metric, column title, format.
_EXTRA_RADII = (
    ("sharpness_0.02", "Worst-case increase (ρ=0.02)", ".4f"),
    ("sharpness_0.2", "Worst-case increase (ρ=0.2)", ".3f"),
)


def sharpness_table(rows: Sequence[Row]) -> str:
    """How hard each method's ascent pushed in training, and how sharp its trained model is, beside its loss at w;
    the worst case at more radii where the runs measured them."""
    extra = [radius for radius in _EXTRA_RADII if any(row[radius[0]] for row in rows)]
    header = [
        "Method", "‖e‖ in training", "L(w+e) − L(w) in training", "Loss at w", _worst_case(rows),
        *(title for _, title, _ in extra), _worst_case(rows, "scale_invariant_rho"), "Hessian λmax", "Hessian λmin",
    ]  # fmt: skip
    lines = [
        [
            row["method"],
            _interval(row["perturbation_norm"], fmt=".3f"),
            _interval(row["loss_increase"], fmt=".3f"),
            _interval(row["loss_at_w"], fmt=".3f"),
            _interval(row["sharpness"], fmt=".3f"),
            *(_measured(row, name, fmt) for name, _, fmt in extra),
            _measured(row, "scale_invariant_sharpness"),
            _eigenvalue(row, "hessian_max_eig", ".0f"),
            _eigenvalue(row, "hessian_min_eig", ".2f"),
        ]
        for row in rows
        if row["default"]
    ]
    return _markdown(header, lines)


def _seed_range(seeds: Sequence[int]) -> str:
    seeds = sorted(seeds)
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def sweep_table(rows: Sequence[Row], axis: str) -> str:
    """Every cell of a sweep (rows of `stats.sweeps`, one seed set): settings, ascent, validation and test accuracy,
    sharpness beside the loss at w; the cell validation picks per method is marked (test accuracy plays no part)."""
    seeds = sorted({s for row in rows for s in row["seed_list"]})
    header = [
        "Method", "ρ", "Percentile", "Seeds", "‖e‖ in training", "L(w+e) − L(w) in training",
        "Jaccard(Z-score mask, magnitude mask)", "Val. acc. (%)", "Test acc., final (%)", "Loss at w",
        _worst_case(rows), "Hessian λmax",
    ]  # fmt: skip
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [r for r in rows if r["method"] == method]
        chosen = chosen_by_validation(cells, method)
        for row in sorted(cells, key=lambda r: r[axis] or 0.0):
            lines.append(
                [
                    f"{method} (chosen by val.)" if row is chosen else method,
                    _rho(row),
                    "—" if row["percentile"] is None else f"{row['percentile']:g}",
                    str(row["seeds"]),
                    _interval(row["perturbation_norm"], fmt=".3f"),
                    _interval(row["loss_increase"], fmt=".3f"),
                    "—" if row["percentile"] is None else _measured(row, "mask_jaccard"),
                    _interval(row["val_accuracy"], 100),
                    _interval(row["test_accuracy"], 100),
                    _interval(row["loss_at_w"], fmt=".3f"),
                    _interval(row["sharpness"], fmt=".3f"),
                    _eigenvalue(row, "hessian_max_eig", ".0f"),
                ]
            )
    caption = f"Every cell on seeds {_seed_range(seeds)}, the seeds all cells of this sweep ran.\n\n"
    return caption + _markdown(*_measured_columns(header, lines))


def _measured_columns(
    header: Sequence[str], lines: Sequence[Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    """The columns of a table that some line measured (a column of "n/a" and "—" only is left out)."""
    kept = [i for i in range(len(header)) if any(line[i] not in ("n/a", "—") for line in lines)]
    return [header[i] for i in kept], [[line[i] for i in kept] for line in lines]


def _margin(name: str, scale: float, unit: str) -> str:
    return f"±{MARGINS[name] * scale:g}{unit}"


class _ContrastColumn(NamedTuple):
    metric: str
    title: str
    scale: float
    fmt: str
    unit: str  # of its TOST margin
    always: bool  # shown even where no pair measured it


_CONTRAST_COLUMNS = (
    _ContrastColumn("test_accuracy", "Δ test acc. (pp)", 100, ".2f", " pp", True),
    _ContrastColumn("sharpness", "Δ worst-case increase", 1, ".3f", "", True),
    _ContrastColumn("sharpness_0.02", "Δ worst case at ρ=0.02", 1, ".4f", "", False),
    _ContrastColumn("sharpness_0.2", "Δ worst case at ρ=0.2", 1, ".3f", "", False),
    _ContrastColumn("scale_invariant_sharpness", "Δ scale-invariant worst case", 1, ".3f", "", False),
    _ContrastColumn("loss_at_w", "Δ loss at w", 1, ".3f", "", True),
)


def contrast_table(rows: Sequence[Row]) -> str:
    """A family's contrasts (`stats.contrasts`): paired differences a − b with unadjusted 95 % t-intervals over
    seeds, paired-t p and TOST p against the declared margins, both Holm-corrected within the family, per metric;
    where the runs hold per-image results, the accuracy difference's 95 % interval from a paired bootstrap over
    seeds and test images."""
    columns = [c for c in _CONTRAST_COLUMNS if c.always or any(r[c.metric] for r in rows)]
    bootstrap = any(r.get("test_accuracy_bootstrap") for r in rows)
    header = ["Contrast", "Pairs"]
    for column in columns:
        header += [column.title, "p (Holm)"]
        if column.metric in MARGINS:
            header.append(f"TOST {_margin(column.metric, column.scale, column.unit)}: p (Holm)")
        if column.metric == "test_accuracy" and bootstrap:
            header.append("Δ test acc., bootstrap over seeds × test images (pp)")
    lines = []
    for row in rows:
        accuracy = row["test_accuracy"]
        pairs = accuracy.difference.n if accuracy else 0
        cells = [f"{row['a']} − {row['b']}", str(pairs)]
        for column in columns:
            c: Comparison | None = row[column.metric]
            fewer = c is not None and c.difference.n != pairs  # a measure only some runs hold
            cells += [
                "n/a"
                if c is None
                else _interval(c.difference, column.scale, "+" + column.fmt)
                + (f" ({c.difference.n} pairs)" if fewer else ""),
                "n/a" if c is None else _p(c.p_holm),
            ]
            if column.metric in MARGINS:
                cells.append("n/a" if c is None else _p(c.p_tost_holm))
            if column.metric == "test_accuracy" and bootstrap:
                cells.append(_interval(row.get("test_accuracy_bootstrap"), 100, "+.2f"))
        lines.append(cells)
    caption = "Intervals: 95 %, each unadjusted for multiplicity; the p-values are Holm-corrected.\n\n"
    return caption + _markdown(header, lines)


def calibration_table(records: Sequence[Row], target: str, control: str, used: float | None) -> str:
    """The runs that calibrate `control`'s radius to `target`'s in-training loss increase (`stats.calibrated_rho`),
    the interpolated radius, and the radius the loss-matched method `used`."""
    rows = summarize(records)
    header = ["Method", "ρ", "Seeds", "‖e‖ in training", "L(w+e) − L(w) in training"]
    lines = [
        [row["method"], _rho(row), _seed_range(row["seed_list"]), _interval(row["perturbation_norm"], fmt=".3f"),
         _interval(row["loss_increase"], fmt=".4f")]
        for row in sorted(rows, key=lambda r: (r["method"] != target, r["rho"] or 0.0))
    ]  # fmt: skip
    aim, rho = calibrated_rho(records, target, control)
    caption = (
        f"\n{control} matches {target}'s mean loss increase {aim:.4f} at ρ = {rho:.4f} (linear interpolation "
        f"between the bracketing radii); the loss-matched control runs at ρ = "
        f"{'(not set)' if used is None else format(used, 'g')}.\n"
    )
    return _markdown(header, lines) + caption


def cost_table(rows: Sequence[Row]) -> str:
    """Wall time (training plus test and sharpness) and training throughput per method."""
    header = ["Method", "Seeds", "Wall time / run (s)", "Train samples/s"]
    lines = [
        [
            row["method"],
            str(row["seeds"]),
            _interval(row["wall_time_s"], fmt=".0f"),
            _interval(row["train_samples_per_second"], fmt=".0f"),
        ]  # fmt: skip
        for row in rows
        if row["default"]
    ]
    return _markdown(header, lines)


def _flat_row(row: Row) -> dict[str, Any]:
    """A summary row as flat CSV cells: its settings, then each interval as mean, low, high, std."""
    cells: dict[str, Any] = {
        k: row[k] for k in ("dataset", "model", "method", "variant", "rho", "sam_rho", "percentile", "seeds")
    }
    for name in METRICS:
        value: Interval | None = row[name]
        for part in ("mean", "low", "high", "std"):
            cells[f"{name}_{part}"] = None if value is None else getattr(value, part)
    return cells


def _flat_contrast(row: Row) -> dict[str, Any]:
    """A contrast as flat CSV cells: per compared metric the difference, its interval, p-values and d_z; the
    accuracy difference's bootstrap interval over seeds and test images (empty where the runs lack per-image results)."""
    cells: dict[str, Any] = {"family": row["family"], "a": row["a"], "b": row["b"]}
    for name in COMPARED:
        c: Comparison | None = row[name]
        parts = {
            "pairs": c and c.difference.n,
            "delta": c and c.difference.mean,
            "delta_low": c and c.difference.low,
            "delta_high": c and c.difference.high,
            "p": c and c.p,
            "p_holm": c and c.p_holm,
            "p_tost": c and c.p_tost,
            "p_tost_holm": c and c.p_tost_holm,
            "d_z": c and c.d_z,
        }
        cells |= {f"{name}_{part}": value for part, value in parts.items()}
    boot: Interval | None = row.get("test_accuracy_bootstrap")
    cells |= {
        "test_accuracy_bootstrap_delta": boot and boot.mean,
        "test_accuracy_bootstrap_low": boot and boot.low,
        "test_accuracy_bootstrap_high": boot and boot.high,
    }
    return cells


def _csv(flat: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    if flat:
        writer = csv.DictWriter(buffer, fieldnames=list(flat[0]), lineterminator="\n")
        writer.writeheader()
        for cells in flat:
            writer.writerow({k: "" if v is None else v for k, v in cells.items()})
    return buffer.getvalue()


def table_csv(rows: Sequence[Row]) -> str:
    """Every summary row as CSV (accuracies as fractions; empty cells where a value is undefined)."""
    return _csv([_flat_row(row) for row in rows])


def contrasts_csv(rows: Sequence[Row]) -> str:
    """Every contrast row (each with its `family`) as CSV."""
    return _csv([_flat_contrast(row) for row in rows])
