"""Statistics over runs: means with 95 % t-intervals, paired differences to SAM (t-interval, paired t-test, Cohen's
d_z), Holm's correction across the methods compared to SAM, and the validation-chosen variant of a sweep."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as scipy_stats

from hf_zsharp.reproduce.grid import short_name
from hf_zsharp.reproduce.presets import BASELINE, METHODS
from hf_zsharp.sharpness import LANCZOS_TOL

CONFIDENCE = 0.95
Record = Mapping[str, Any]


def _history_mean(key: str) -> Callable[[Record], float | None]:
    """The mean over epochs of a logged per-epoch statistic (None when the run never logged it)."""

    def read(record: Record) -> float | None:
        values = [row[key] for row in record["history"] if key in row]
        return statistics.fmean(values) if values else None

    return read


def _sharpness(key: str) -> Callable[[Record], float | None]:
    return lambda record: (record.get("sharpness") or {}).get(key)


def _converged_eig(key: str) -> Callable[[Record], float | None]:
    """A Hessian end only where Lanczos converged on it (None otherwise). Records written before the
    `*_converged` flags existed are judged by the same test on the residual bound they hold."""

    def read(record: Record) -> float | None:
        measured = record.get("sharpness") or {}
        value, error = measured.get(key), measured.get(f"{key}_error")
        if value is None:
            return None
        converged = measured.get(f"{key}_converged")
        if converged is None:
            converged = error is not None and error <= LANCZOS_TOL * abs(value)
        return value if converged else None

    return read


# What a row summarises, read from each record (None: not measured in that run).
METRICS: dict[str, Callable[[Record], float | None]] = {
    "test_accuracy": lambda r: r["metrics"]["test_accuracy"],
    "test_accuracy_at_best_val": lambda r: r["metrics"]["test_accuracy_at_best_val"],
    "val_accuracy": lambda r: r["metrics"]["val_accuracy"],
    "sharpness": _sharpness("sharpness"),
    "hessian_max_eig": _converged_eig("hessian_max_eig"),
    "hessian_min_eig": _converged_eig("hessian_min_eig"),
    "loss_increase": _history_mean("sam_loss_increase"),
    "perturbation_norm": _history_mean("sam_perturbation_norm"),
    "wall_time_s": lambda r: r["timing"]["wall_time_s"],
    "train_samples_per_second": lambda r: r["timing"]["train_samples_per_second"],
}
COMPARED = ("test_accuracy", "sharpness")  # the metrics compared to SAM, each with its own Holm family
# What ZSharp's effect comes from: ZSharp against each control, one change at a time.
ZSHARP_CONTRASTS = (
    ("zsharp", "sam-matched"),  # the mask and per-tensor split vs SAM at the same total norm
    ("zsharp", "sam-layerwise"),  # the mask alone, at the same per-tensor radii
    ("zsharp", "zsharp-global"),  # the per-tensor radius (total rho sqrt(L)) vs one global radius rho
    ("zsharp", "zsharp-magnitude"),  # Z-score vs plain |g| selection
    ("zsharp", "zsharp-random"),  # Z-score vs random selection
)


@dataclass(frozen=True)
class Interval:
    """A mean (or mean difference) with its two-sided t confidence interval; bounds None below two values."""

    mean: float
    low: float | None
    high: float | None
    std: float | None
    n: int


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, t-interval (mean ± t_{n-1} s / sqrt(n)) and sample standard deviation of `values`."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, None, None, n)
    std = statistics.stdev(values)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, std, n)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison over seeds: the difference's mean and t-interval, the paired t-test, Cohen's d_z."""

    difference: Interval
    p: float | None  # two-sided paired t-test; None below two pairs or when all differences are equal
    d_z: float | None  # mean difference / standard deviation of the differences
    p_holm: float | None = None


def paired(values: Mapping[int, float], baseline: Mapping[int, float]) -> Comparison | None:
    """`values` minus `baseline` over the seeds both have (None without a common seed)."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    differences = [values[s] - baseline[s] for s in seeds]
    interval = mean_ci(differences)
    # With all differences equal (up to rounding) the t statistic and d_z are undefined.
    if len(seeds) < 2 or statistics.pstdev(differences) <= 1e-12 * max(1.0, abs(interval.mean)):
        return Comparison(interval, None, None)
    p = float(scipy_stats.ttest_1samp(differences, 0.0).pvalue)
    return Comparison(interval, p, interval.mean / interval.std)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family: the defined ones); None stays None."""
    defined = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (len(defined) - rank) * p))
        adjusted[i] = running
    return adjusted


def _order(record: Record) -> tuple:
    method = record["method"]
    rank = list(METHODS).index(method) if method in METHODS else len(METHODS)
    return (
        record["dataset"],
        record["model"],
        rank,
        method,
        record.get("rho") or 0.0,
        record.get("percentile") or 0.0,
        record["seed"],
    )


def group_runs(records: Sequence[Record]) -> dict[tuple[str, str, str], list[Record]]:
    """Records by (dataset, model, variant), in the methods' order then by rho, percentile and seed."""
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for record in sorted(records, key=_order):
        groups.setdefault((record["dataset"], record["model"], record["variant"]), []).append(record)
    return groups


def summarize(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per (dataset, model, variant): seeds, an `Interval` per metric (None where unmeasured), and for
    each default-setting method the `Comparison` to SAM of each compared metric, Holm-corrected per family."""
    groups = group_runs(records)
    rows = []
    for (dataset, model, variant), group in groups.items():
        first = group[0]
        row: dict[str, Any] = {
            "dataset": short_name(dataset),
            "model": short_name(model),
            "method": first["method"],
            "variant": variant,
            "default": variant == first["method"],
            "rho": first.get("rho"),
            "sam_rho": first.get("sam_rho"),
            "percentile": first.get("percentile"),
            "seeds": len(group),
            "probe_rho": sorted({r["sharpness"]["settings"]["rho"] for r in group if _probed(r)}),
        }
        for name, read in METRICS.items():
            values = [v for v in (read(r) for r in group) if v is not None]
            row[name] = mean_ci(values) if values else None
        baseline = groups.get((dataset, model, BASELINE), [])
        for name in COMPARED:
            comparison = None
            if row["default"] and variant != BASELINE:
                comparison = paired(_by_seed(group, name), _by_seed(baseline, name))
            row[f"{name}_vs_sam"] = comparison
        rows.append(row)
    _correct(rows)
    return rows


def _probed(record: Record) -> bool:
    return bool((record.get("sharpness") or {}).get("settings"))


def _by_seed(group: Sequence[Record], metric: str) -> dict[int, float]:
    read = METRICS[metric]
    return {r["seed"]: v for r in group if (v := read(r)) is not None}


def _correct(rows: list[dict[str, Any]]) -> None:
    """Holm-adjust each compared metric's p-values within each (dataset, model)."""
    for name in COMPARED:
        key = f"{name}_vs_sam"
        families: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            if row[key] is not None:
                families.setdefault((row["dataset"], row["model"]), []).append(row)
        for family in families.values():
            adjusted = holm([row[key].p for row in family])
            for row, p_holm in zip(family, adjusted):
                c = row[key]
                row[key] = Comparison(c.difference, c.p, c.d_z, p_holm)


def contrasts(
    records: Sequence[Record], pairs: Sequence[tuple[str, str]] = ZSHARP_CONTRASTS
) -> list[dict[str, Any]]:
    """Paired comparisons of default-setting variants of one dataset and model, `a - b` for each (a, b) present,
    per compared metric, Holm-corrected across the pairs."""
    groups = {variant: group for (_, _, variant), group in group_runs(records).items()}
    rows = [{"a": a, "b": b} for a, b in pairs if a in groups and b in groups]
    for name in COMPARED:
        comparisons = [paired(_by_seed(groups[r["a"]], name), _by_seed(groups[r["b"]], name)) for r in rows]
        adjusted = holm([c.p if c else None for c in comparisons])
        for row, c, p_holm in zip(rows, comparisons, adjusted):
            row[name] = c and Comparison(c.difference, c.p, c.d_z, p_holm)
    return rows


def probe_radius(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The radius of the worst-case probe that the rows' records were measured with (their sharpness settings);
    None if none was measured. Runs measured at different radii cannot share a column: ValueError."""
    radii = {rho for row in rows for rho in row["probe_rho"]}
    if len(radii) > 1:
        raise ValueError(f"the records measured sharpness at different radii {sorted(radii)}: not comparable")
    return radii.pop() if radii else None


def chosen_by_validation(rows: Sequence[Mapping[str, Any]], method: str) -> Mapping[str, Any] | None:
    """Among rows of one dataset and model: the variant of `method` with the highest mean validation accuracy
    (ties: the first in row order). This is how a sweep picks rho; test accuracy only reports the pick."""
    candidates = [r for r in rows if r["method"] == method and r["val_accuracy"] is not None]
    return max(candidates, key=lambda r: r["val_accuracy"].mean, default=None)
