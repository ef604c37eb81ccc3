"""Figures of one dataset and model: the methods side by side, and a sweep against the total perturbation norm."""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_zsharp.reproduce.presets import VARIANTS
from hf_zsharp.reproduce.records import write_atomic
from hf_zsharp.reproduce.stats import METRICS, Interval, probe_radius, summarize

Row = Mapping[str, Any]


def _figure(width: float, height: float, panels: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, panels, squeeze=True)


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(
        buffer, format="png", dpi=90, metadata={"Software": None}
    )  # no version: same bytes each time
    write_atomic(path, buffer.getvalue())
    return path


def _probe(rows: Sequence[Row]) -> str:
    rho = probe_radius(rows)
    return "‖e‖ ≤ n/a" if rho is None else f"‖e‖ ≤ {rho:g}"


def _colour(method: str) -> str:
    names = list(VARIANTS)
    return f"C{names.index(method) % 10}" if method in names else "k"


def _errorbar(axes: Any, x: float, value: Interval, colour: str, scale: float = 1.0, **kwargs: Any) -> None:
    low = (value.mean - value.low) * scale if value.low is not None else 0
    high = (value.high - value.mean) * scale if value.high is not None else 0
    axes.errorbar(x, value.mean * scale, yerr=[[low], [high]], fmt="o", color=colour, capsize=4, **kwargs)


def plot_methods(
    rows: Sequence[Row], records: Sequence[Mapping[str, Any]], title: str, path: str | Path
) -> Path:
    """Per method at its default settings: test accuracy and worst-case sharpness (seeds as dots, mean with 95 %
    interval), and the mean validation accuracy per epoch."""
    probe = _probe(rows)
    rows = [r for r in rows if r["default"]]
    if not rows:
        raise ValueError("No runs to plot.")
    figure, (accuracy, sharpness, curves) = _figure(15, 4.2, 3)
    for x, row in enumerate(rows):
        colour = _colour(row["method"])
        runs = [r for r in records if r["variant"] == row["variant"]]
        for axes, name, scale in ((accuracy, "test_accuracy", 100), (sharpness, "sharpness", 1)):
            if row[name] is None:
                continue
            values = [v for v in (METRICS[name](r) for r in runs) if v is not None]
            axes.scatter([x + 0.2] * len(values), [v * scale for v in values], color=colour, s=10, alpha=0.5)
            _errorbar(axes, x, row[name], colour, scale)
        epochs, mean = _mean_curve(runs)
        curves.plot(epochs, mean, color=colour, label=row["method"], marker=".")
    labels = [r["method"] for r in rows]
    for axes, ylabel, what in (
        (accuracy, "test accuracy (%)", "final test accuracy"),
        (sharpness, f"max loss increase, {probe}", "worst-case loss increase"),
    ):
        axes.set_xticks(range(len(rows)), labels, rotation=35, ha="right")
        axes.set(title=f"{title}: {what}", ylabel=ylabel)
        axes.grid(axis="y", alpha=0.3)
    curves.set(title=f"{title}: validation accuracy (seed mean)", xlabel="epoch", ylabel="accuracy (%)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small")
    return _save(figure, path)


def loss_at_w_runs(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The runs `plot_loss_at_w` draws: methods at their default settings with a measured loss at w."""
    return [r for r in records if r["variant"] == r["method"] and METRICS["loss_at_w"](r) is not None]


def plot_loss_at_w(records: Sequence[Mapping[str, Any]], title: str, path: str | Path) -> Path:
    """Per run of a method at its default settings: worst-case loss increase against the loss at w on the same
    images, so flatness can be read at matched training loss."""
    runs = loss_at_w_runs(records)
    if not runs:
        raise ValueError("No runs with a sharpness measurement to plot.")
    figure, axes = _figure(7.5, 5, 1)
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == method]
        axes.scatter(
            [METRICS["loss_at_w"](r) for r in group],
            [METRICS["sharpness"](r) for r in group],
            color=_colour(method),
            label=method,
            s=16,
        )
    axes.set(
        title=f"{title}: sharpness against loss at w (one dot per run)",
        xlabel="loss at w (the probe's training images)",
        ylabel=f"worst-case loss increase, {_probe(summarize(runs))}",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def _mean_curve(runs: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Mean validation accuracy (%) per epoch over the runs that logged that epoch."""
    per_epoch: dict[float, list[float]] = {}
    for run in runs:
        for row in run["history"]:
            if "eval_accuracy" in row:
                per_epoch.setdefault(row["epoch"], []).append(100 * row["eval_accuracy"])
    epochs = sorted(per_epoch)
    return epochs, [statistics.fmean(per_epoch[e]) for e in epochs]


def plot_sweep(rows: Sequence[Row], swept: Sequence[str], title: str, path: str | Path) -> Path:
    """Test accuracy and worst-case sharpness against the total perturbation norm logged in training: one line
    per swept method through its rho values, the other methods at their defaults as single points."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    probe = _probe(rows)
    points = [r for r in rows if r["perturbation_norm"] is not None]
    if not points:
        raise ValueError("No runs with an ascent to plot.")
    figure, (accuracy, sharpness) = _figure(12, 4.4, 2)
    for axes, name, scale in ((accuracy, "test_accuracy", 100), (sharpness, "sharpness", 1)):
        for method in dict.fromkeys(r["method"] for r in points):
            group = sorted(
                (r for r in points if r["method"] == method), key=lambda r: r["perturbation_norm"].mean
            )
            group = [r for r in group if r[name] is not None]
            if method not in swept:
                group = [r for r in group if r["default"]]
            if not group:
                continue
            colour = _colour(method)
            norms = [r["perturbation_norm"].mean for r in group]
            for norm, row in zip(norms, group):
                _errorbar(axes, norm, row[name], colour, scale, markersize=4 if method in swept else 7)
            if method in swept:
                axes.plot(
                    norms, [r[name].mean * scale for r in group], color=colour, label=f"{method} (ρ sweep)"
                )
            else:
                axes.plot([], [], "o", color=colour, label=method)
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set(xlabel="total perturbation norm ‖e‖ (mean over training)")
        axes.grid(alpha=0.3, which="both")
    accuracy.set(title=f"{title}: final test accuracy (mean, 95 % CI)", ylabel="test accuracy (%)")
    sharpness.set(title=f"{title}: worst-case loss increase, {probe}", ylabel="loss increase")
    accuracy.legend(fontsize="small")
    return _save(figure, path)
