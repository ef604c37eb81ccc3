"""Markdown tables (of one dataset and model each) and a CSV of the rows that `stats.summarize` makes."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hf_zsharp.reproduce.stats import METRICS, Comparison, Interval, chosen_by_validation, probe_radius

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


def _comparison(row: Row, key: str, scale: float, fmt: str) -> list[str]:
    """Δ [CI], p, Holm p, d_z of a row's comparison to SAM ("—" for SAM itself, n/a without one)."""
    c: Comparison | None = row[key]
    if row["variant"] == "sam":
        return ["—"] * 4
    if c is None:
        return ["n/a"] * 4
    d_z = "n/a" if c.d_z is None else f"{c.d_z:+.2f}"
    return [_interval(c.difference, scale, "+" + fmt), _p(c.p), _p(c.p_holm), d_z]


def _eigenvalue(row: Row, name: str, fmt: str) -> str:
    """A Hessian end over the runs where Lanczos converged on it, with `(converged/measured)`; withheld if none."""
    measured = row["sharpness"].n if row["sharpness"] is not None else 0
    value: Interval | None = row[name]
    if not measured:
        return "n/a"
    if value is None:
        return f"withheld (0/{measured} converged)"
    return f"{_interval(value, fmt=fmt)} ({value.n}/{measured})"


def _worst_case(rows: Sequence[Row]) -> str:
    """The worst-case column's title, with the probe's radius from the records' sharpness settings."""
    rho = probe_radius(rows)
    return f"Worst-case increase (ρ={'n/a' if rho is None else format(rho, 'g')})"


def _markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out) + "\n"


def _rho(row: Row) -> str:
    if row["sam_rho"] is None:
        return "—"
    return f"{row['sam_rho']:.3g}"


def accuracy_table(rows: Sequence[Row]) -> str:
    """Test accuracy per method at its default settings: final epoch and best-validation epoch, and vs SAM."""
    header = [
        "Method", "ρ used", "Seeds", "Test acc., final (%)", "Test acc. at best val. epoch (%)",
        "Δ final vs SAM (pp)", "p", "p (Holm)", "d_z",
    ]  # fmt: skip
    lines = [
        [
            row["method"],
            _rho(row),
            str(row["seeds"]),
            _interval(row["test_accuracy"], 100),
            _interval(row["test_accuracy_at_best_val"], 100),
            *_comparison(row, "test_accuracy_vs_sam", 100, ".2f"),
        ]  # fmt: skip
        for row in rows
        if row["default"]
    ]
    return _markdown(header, lines)


def sharpness_table(rows: Sequence[Row]) -> str:
    """How hard each method's ascent pushed in training, and how sharp its trained model is, vs SAM."""
    header = [
        "Method", "‖e‖ in training", "L(w+e) − L(w) in training", _worst_case(rows),
        "Δ vs SAM", "p (Holm)", "d_z", "Hessian λmax", "Hessian λmin",
    ]  # fmt: skip
    lines = []
    for row in rows:
        if not row["default"]:
            continue
        delta, _, p_holm, d_z = _comparison(row, "sharpness_vs_sam", 1, ".3f")
        lines.append(
            [
                row["method"],
                _interval(row["perturbation_norm"], fmt=".3f"),
                _interval(row["loss_increase"], fmt=".3f"),
                _interval(row["sharpness"], fmt=".3f"),
                delta,
                p_holm,
                d_z,
                _eigenvalue(row, "hessian_max_eig", ".0f"),
                _eigenvalue(row, "hessian_min_eig", ".2f"),
            ]  # fmt: skip
        )
    return _markdown(header, lines)


def sweep_table(rows: Sequence[Row], methods: Sequence[str]) -> str:
    """Every variant of the swept methods: ρ, total norm, validation and test accuracy, sharpness; the variant
    validation picks is marked (test accuracy plays no part in the pick)."""
    header = [
        "Method", "ρ", "Percentile", "Seeds", "‖e‖ in training", "Val. acc. (%)", "Test acc., final (%)",
        _worst_case(rows), "Hessian λmax",
    ]  # fmt: skip
    lines = []
    for method in methods:
        variants = [r for r in rows if r["method"] == method]
        chosen = chosen_by_validation(variants, method)
        for row in sorted(variants, key=lambda r: (r["rho"] or 0.0, r["percentile"] or 0.0)):
            mark = " (chosen by val.)" if row is chosen and len(variants) > 1 else ""
            lines.append(
                [
                    f"{method}{mark}",
                    _rho(row),
                    "—" if row["percentile"] is None else f"{row['percentile']:g}",
                    str(row["seeds"]),
                    _interval(row["perturbation_norm"], fmt=".3f"),
                    _interval(row["val_accuracy"], 100),
                    _interval(row["test_accuracy"], 100),
                    _interval(row["sharpness"], fmt=".3f"),
                    _eigenvalue(row, "hessian_max_eig", ".0f"),
                ]
            )
    return _markdown(header, lines)


def contrast_table(rows: Sequence[Row]) -> str:
    """ZSharp against each control (`stats.contrasts`): paired differences in test accuracy and sharpness."""
    header = [
        "Contrast", "Pairs", "Δ test acc. (pp)", "p (Holm)", "d_z", "Δ worst-case increase", "p (Holm)", "d_z",
    ]  # fmt: skip
    lines = []
    for row in rows:
        cells = [f"{row['a']} − {row['b']}"]
        accuracy, sharpness = row["test_accuracy"], row["sharpness"]
        cells.append(str(accuracy.difference.n if accuracy else 0))
        for c, scale, fmt in ((accuracy, 100, ".2f"), (sharpness, 1, ".3f")):
            if c is None:
                cells += ["n/a"] * 3
                continue
            cells += [
                _interval(c.difference, scale, "+" + fmt),
                _p(c.p_holm),
                "n/a" if c.d_z is None else f"{c.d_z:+.2f}",
            ]
        lines.append(cells)
    return _markdown(header, lines)


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


def _flat(row: Row) -> dict[str, Any]:
    """A row as flat CSV cells: each interval as mean, low, high, std; each comparison as its numbers."""
    cells: dict[str, Any] = {
        k: row[k] for k in ("dataset", "model", "method", "variant", "rho", "sam_rho", "percentile", "seeds")
    }
    for name in METRICS:
        value: Interval | None = row[name]
        for part in ("mean", "low", "high", "std"):
            cells[f"{name}_{part}"] = None if value is None else getattr(value, part)
    for key in ("test_accuracy_vs_sam", "sharpness_vs_sam"):
        c: Comparison | None = row[key]
        parts: dict[str, Callable[[Comparison], Any]] = {
            "delta": lambda c: c.difference.mean,
            "delta_low": lambda c: c.difference.low,
            "delta_high": lambda c: c.difference.high,
            "p": lambda c: c.p,
            "p_holm": lambda c: c.p_holm,
            "d_z": lambda c: c.d_z,
            "pairs": lambda c: c.difference.n,
        }
        for part, read in parts.items():
            cells[f"{key}_{part}"] = None if c is None else read(c)
    return cells


def table_csv(rows: Sequence[Row]) -> str:
    """Every row as CSV (accuracies as fractions; empty cells where a value is undefined)."""
    flat = [_flat(row) for row in rows]
    buffer = io.StringIO()
    if flat:
        writer = csv.DictWriter(buffer, fieldnames=list(flat[0]), lineterminator="\n")
        writer.writeheader()
        for cells in flat:
            writer.writerow({k: "" if v is None else v for k, v in cells.items()})
    return buffer.getvalue()
